"""Shared fixtures: generated text corpora, a small prepared data set (vocab 512), a data folder
with a manifest only, and a lane that records what a backend asks of it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from runner.sandbox import Lane

REPO = Path(__file__).resolve().parent.parent
PREPARE_PY = REPO / "prepare" / "prepare.py"
sys.path.insert(0, str(REPO / "prepare"))

# A suite started in the background of a non-interactive shell (`bash .ci/run &`) inherits
# SIGINT ignored, and so would every process it starts (runners, Ray workers): the Ctrl-C and
# cancel tests need it delivered. A handled signal is reset to the default in a child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from "
         "at which but have an they you were her she there been one all we their has would when "
         "what will more if no out so said who up them some could him into its then two may time "
         "these like other about than only over new first any my now such do made our also after "
         "king queen lord lady night day love death sword crown storm sea castle letter friend "
         "honour grief sleep dream blood heart fortune heaven earth fire water").split()


def write_corpus(folder: Path, files: int = 6, words_per_file: int = 4000, seed: int = 0) -> Path:
    """English-looking text with structure a model can learn (word frequencies, punctuation)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines, line = [], []
        for _ in range(words_per_file):
            line.append(rng.choice(WORDS[: rng.randint(20, len(WORDS))]))
            if rng.random() < 0.12:
                lines.append(" ".join(line).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
                line = []
                if rng.random() < 0.2:
                    lines.append("")
        (folder / f"text_{f:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def run_prepare(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(PREPARE_PY), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def tree_state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content: to show a failed build changed nothing."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git repository holding the project's train.py and program.md, committed."""
    from projects import make_project
    return make_project(tmp_path / "project")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """No data set: scripted trials read none, but records hash the manifest."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    return tmp_path / "data"


class Recording(Lane):
    """A shared lane that notes what the backend asked of it: "trained" when the slot was
    handed on, "alone" and "alone done" around a rescoring alone."""

    shared = True

    def __init__(self) -> None:
        self.events: list[str] = []

    def trained(self) -> None:
        self.events.append("trained")

    @contextlib.contextmanager
    def alone(self):
        self.events.append("alone")
        yield
        self.events.append("alone done")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A prepared data set from generated text: vocab 512, a few thousand validation tokens."""
    root = tmp_path_factory.mktemp("small")
    corpus = write_corpus(root / "corpus", files=8, words_per_file=5000)
    out = root / "data"
    proc = run_prepare("data", "--dataset", f"textdir:{corpus}", "--data-dir", str(out),
                       "--vocab-size", "512", "--cache-dir", str(root / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["val_tokens"] > 4 * 1024 + 1
    return out


def docker_engine_missing() -> str | None:
    """Why the docker-backed tests cannot run here (no engine, no base image), or None."""
    try:
        import docker
        from runner.sandbox import images
        cli = docker.from_env()
        cli.ping()
    except Exception as e:  # noqa: BLE001
        return f"no Docker engine: {e}"
    if not images.base_exists(images.default_base_tag(), cli):
        return "no base image: run `autoresearch images build`"
    return None


# Wall seconds that give the real train.py, on one CPU in a container, time to import torch,
# save its fallback model, train a little and export: the runner stops it at the budget.
TRAIN_BUDGET = 20


def train_env(out: Path, data: Path, budget: int) -> dict:
    """The environment the runner gives train.py, for a CPU run of `budget` seconds from now."""
    return {**os.environ, "PYTHONPATH": str(REPO / "prepare"), "CUDA_VISIBLE_DEVICES": "",
            "AUTORESEARCH_TIME_BUDGET": str(budget),
            "AUTORESEARCH_DEADLINE": str(time.time() + budget),
            "AUTORESEARCH_OUT": str(out), "AUTORESEARCH_DATA_DIR": str(data)}


def run_train(path: Path, out: Path, data: Path, budget: int) -> subprocess.CompletedProcess:
    """Run a train.py on the CPU as the runner would, without a sandbox."""
    return subprocess.run([sys.executable, str(path)], cwd=REPO, env=train_env(out, data, budget),
                          capture_output=True, text=True, timeout=budget + 120)


def small_limits():
    """Trial limits for tests: a slice of a 2-core, 24 GiB machine."""
    from runner.sandbox import Limits
    return Limits(memory_bytes=2 * 2**30, cpus=1.0, pids=256, out_bytes=256 * 2**20,
                  tmp_bytes=256 * 2**20, score_timeout_s=300,
                  score_memory_bytes=4 * 2**30)


def wait_for_training(run: str, number: int | None = None, timeout: float = 60.0,
                      ready=lambda: True) -> bool:
    """Wait until the training container of `run` (experiment `number`, if given) is up and
    `ready()` holds; False when `timeout` passes first."""
    import time
    import docker
    cli = docker.from_env()
    prefix = f"ar-train-{run}-{number}-" if number is not None else "ar-train-"
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = cli.containers.list(filters={"label": f"autoresearch.run={run}", "status": "running"})
        if ready() and any(c.name.startswith(prefix) for c in running):
            return True
        time.sleep(0.2)
    return False


def pytest_sessionfinish(session, exitstatus):
    """In CI (CI set), a skipped test fails the run: skips here mean a missing install step
    (no Docker engine, no Chromium, no tracking extra), which a green run must not hide."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        names = ", ".join(r.nodeid for r in skipped[:10])
        print(f"\nCI: {len(skipped)} test(s) skipped, which CI does not allow: {names}")
        session.exitstatus = 1


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The backend's temporary folders go here; each test checks that none are left (the
    process backend's pool of trial folders keeps its lock files, and nothing else)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    pool = folder / f"autoresearch-trials-{os.getuid()}"
    left = [p for p in folder.iterdir() if p != pool]
    if pool.is_dir() and not pool.is_symlink():
        left += [p for p in pool.iterdir() if not (p.suffix == ".lock" and p.is_file())]
    assert left == [], f"the work folder was not removed: {left}"
