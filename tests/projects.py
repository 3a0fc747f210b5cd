"""A throwaway git project holding this repository's train.py and program.md, committed: what
the loop runs against in tests (the `project` fixture) and in bench/loop_throughput.py. No
pytest here, so the benchmark can import it on a machine without it."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_project(root: Path, user: str = "test") -> Path:
    import git

    (root / "target").mkdir(parents=True)
    shutil.copy(REPO / "target" / "train.py", root / "target" / "train.py")
    shutil.copy(REPO / "program.md", root / "program.md")
    repo = git.Repo.init(root)
    with repo.config_writer() as cw:
        cw.set_value("user", "name", user).set_value("user", "email", f"{user}@localhost")
    repo.index.add(["target/train.py", "program.md"])
    repo.index.commit("initial")
    return root
