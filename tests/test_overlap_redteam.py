"""Red-team of scoring beside the next trial (tests/test_overlap.py has the intended behaviour):
what a stop, a co-tenant on the GPU or a model that fails on purpose can make of it.

- Ctrl-C (the loop's abort) must not be followed by a scoring that had been waiting for its
  slot's scorer or for the slot alone: after `Executor.abort` nothing new starts;
- a co-tenant that fills the GPU makes CUDA fail in ways that are not torch.OutOfMemoryError
  (a context that cannot be created, a cuBLAS handle that cannot be allocated): that is a
  failure "for memory", to be scored again alone, not the model's own verdict;
- a scoring done again alone must draw the same random causality cuts as the shared one: the
  model decides when it fails for memory or time (a data-dependent allocation, a long loop),
  so a fresh draw after such a failure would be a second chance at the causality check."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import PREPARE_PY
from runner import record
from runner.loop import LoopConfig, overnight
from runner.sandbox import Lane, Outcome
from runner.sandbox.base import score_in_lane


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    return tmp_path / "data"


class Killed(RuntimeError):
    """What a trial's phase raises when the executor aborted it (its container is gone)."""


class Abortable:
    """Scripted trials (train `train_s`, score `score_s`, through `score_in_lane`) whose phases
    end at once, raising, when `abort` is called, as a removed container does; notes when each
    scoring started and when abort was called (time.monotonic)."""

    backend = "scripted"

    def __init__(self, train_s, score_s, result=lambda spec, attempt: ("ok", None)):
        self.train_s, self.score_s, self.result = train_s, score_s, result
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.aborted_at: float | None = None
        self.score_starts: list[tuple[int, float]] = []
        self.train_starts: list[tuple[int, float]] = []

    def sweep_orphans(self, log):
        return 0

    def abort(self, run):
        with self.lock:
            self.aborted_at = time.monotonic()
        self.killed.set()
        return 1

    def uses_gpu(self, slot):
        return True

    def phase(self, seconds: float) -> None:
        if self.killed.wait(seconds):
            raise Killed("container removed")

    def run(self, spec, log=lambda _: None, lane: Lane | None = None, **fields):
        assert lane is not None and lane.shared
        start = time.time()
        with self.lock:
            self.train_starts.append((spec.number, time.monotonic()))
        if self.killed.is_set():
            raise Killed("aborted before it started")
        self.phase(self.train_s(spec))
        lane.trained()
        outcome = Outcome(status="ok", phases={"train": self.train_s(spec)})
        attempts: list[float | None] = []

        def once(cap):
            with self.lock:
                self.score_starts.append((spec.number, time.monotonic()))
            self.phase(self.score_s(spec))
            status, cause = self.result(spec, len(attempts))
            attempts.append(cap)
            outcome.status = status
            outcome.val_bpb = 1.0 if status == "ok" else None
            outcome.score = {"status": status, **({"cause": cause} if cause else {})}
            outcome.reason = "" if status == "ok" else f"failed ({cause})"

        score_in_lane(lane, outcome, once)
        return record.from_outcome(spec, outcome, self.backend, start, time.time() - start,
                                   **fields)


def interrupted(project: Path, data: Path, trials: Abortable, after: float, tag: str) -> float:
    """Run the loop on one GPU slot and press Ctrl-C `after` seconds in; returns how long the
    loop took to stop after that."""
    cfg = LoopConfig(tag=tag, budget=1, max_experiments=6, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["0"],
                     keep_rule="threshold", noise_runs=1, same_seed_runs=0,
                     executor=trials, overlap_scoring=True, compile_cache=False)
    t0 = time.monotonic()
    pressed: list[float] = []

    def observe(state):
        if time.monotonic() - t0 > after and not pressed:
            pressed.append(time.monotonic())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        overnight(cfg, observe=observe, log=lambda _: None)
    return time.monotonic() - pressed[0]


def test_ctrl_c_starts_no_scoring_that_waited_for_the_one_before(project: Path, data: Path):
    """Trial 0 is scored for 3 s; trial 1 trains 0.3 s and waits for that scorer. Ctrl-C at
    1.2 s: the executor aborts trial 0's scoring, and trial 1 must not be scored after it (a
    new scorer container, minutes of scoring, with the runner waiting for it)."""
    trials = Abortable(train_s=lambda s: 0.3, score_s=lambda s: 3.0 if s.number == 0 else 2.0)
    took = interrupted(project, data, trials, 1.2, "redteam-ctrl-c")
    assert trials.aborted_at is not None
    late = [(n, t - trials.aborted_at) for n, t in trials.score_starts if t >= trials.aborted_at]
    assert late == [], f"scorings started after the abort: {late}"
    assert took < 1.0


def test_ctrl_c_starts_no_rescoring_alone(project: Path, data: Path):
    """Trial 0's shared scoring fails for memory at 0.5 s; it waits for trial 1's training
    (3 s) to score again alone. Ctrl-C at 1.5 s kills trial 1: trial 0 must not then be
    scored again."""
    def result(spec, attempt):
        return ("invalid", "memory") if attempt == 0 else ("ok", None)

    trials = Abortable(train_s=lambda s: 0.3 if s.number == 0 else 3.0,
                       score_s=lambda s: 0.2 if s.number == 0 else 2.0, result=result)
    took = interrupted(project, data, trials, 1.5, "redteam-ctrl-c-alone")
    assert trials.aborted_at is not None
    late = [(n, t - trials.aborted_at) for n, t in trials.score_starts if t >= trials.aborted_at]
    assert late == [], f"scorings started after the abort: {late}"
    assert took < 1.0
