"""autoresearch, done safely: the trusted host-side runner.

The runner proposes edits to ``target/train.py``, trains each candidate in a sealed
container, scores it with ``prepare/prepare.py score`` and keeps only improvements.
"""

__version__ = "0.1.0"
