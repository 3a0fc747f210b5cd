"""Where things are, what they are called, and the defaults every command shares.

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
PROGRAM_MD: Path = REPO_ROOT / "program.md"
DEFAULT_DATA_DIR: Path = REPO_ROOT / "data"
RUNS_DIR: Path = REPO_ROOT / "runs"
TRAIN_REL = "target/train.py"           # the one file a run changes, inside the repository

DATA_DIR_ENV = "AUTORESEARCH_DATA_DIR"
BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"  # also what train.py reads (through prepare.py)
DEFAULT_BUDGET = 300                     # training seconds: prepare.py's TIME_BUDGET


def data_dir() -> Path:
    """The data folder: ``$AUTORESEARCH_DATA_DIR`` if set, else ``<repo>/data``.

    Read at call time rather than import time so tests and callers can set the variable late.
    """
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else DEFAULT_DATA_DIR


def default_budget() -> int:
    """Training seconds when none is given: ``$AUTORESEARCH_TIME_BUDGET``, else 300."""
    return int(os.environ.get(BUDGET_ENV) or DEFAULT_BUDGET)


# ---- a run's names in git: branch autoresearch/<tag>, refs under refs/autoresearch/<tag>/ ----

def branch_name(tag: str) -> str:
    return f"autoresearch/{tag}"


def ref_prefix(tag: str, kind: str) -> str:
    """`kind` is candidates, kept or discarded."""
    return f"refs/autoresearch/{tag}/{kind}/"


def run_worktree(runs_dir: Path, tag: str) -> Path:
    return runs_dir / tag / "worktree"
