"""Where the repository's files are, seen from the installed runner package.

``prepare/prepare.py`` and ``target/train.py`` are standalone scripts, not modules of this
package: they are mounted into containers and run as programs. The runner is installed
editable from the repository, so the repository root is the parent of the package folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import runner

REPO_ROOT: Path = Path(runner.__file__).resolve().parent.parent
PREPARE_PY: Path = REPO_ROOT / "prepare" / "prepare.py"
TRAIN_PY: Path = REPO_ROOT / "target" / "train.py"
DEFAULT_DATA_DIR: Path = REPO_ROOT / "data"

DATA_DIR_ENV = "AUTORESEARCH_DATA_DIR"


def data_dir() -> Path:
    """The data folder: ``$AUTORESEARCH_DATA_DIR`` if set, else ``<repo>/data``.

    Read at call time rather than import time so tests and callers can set the variable late.
    """
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else DEFAULT_DATA_DIR
