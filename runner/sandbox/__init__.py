"""Sandbox backends and the images they run.

``runner.sandbox.images`` builds the base images (the offline Debian one, or the CUDA one) and the
thin per-experiment images; the backends (``docker``, the real isolation, and ``process``, which
is not a sandbox) run a candidate and the trusted scorer.
"""
