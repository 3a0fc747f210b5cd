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

from conftest import PREPARE_PY, Recording
from runner import record
from runner.loop import LoopConfig, overnight
from runner.sandbox import Lane, Outcome
from runner.sandbox.base import score_in_lane


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


# ---- a co-tenant that fills the GPU: CUDA's own out-of-memory errors ---------------------------

# What CUDA raises when another process holds the GPU's memory, besides the caching allocator's
# torch.OutOfMemoryError (c10_cuda_check_implementation, TORCH_CUDABLAS_CHECK, cuDNN).
CUDA_SHORT_OF_MEMORY = [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
    "other API call, so the stacktrace below might be incorrect.",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
]


@pytest.mark.parametrize("message", CUDA_SHORT_OF_MEMORY)
def test_cuda_short_of_memory_is_a_failure_for_memory(message: str):
    import torch

    import prepare
    for kind in (RuntimeError, getattr(torch, "AcceleratorError", RuntimeError)):
        assert prepare.out_of_memory(kind(message)), (kind, message)
    assert not prepare.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_cuda_context_that_cannot_be_created_is_a_failure_for_memory(small_data: Path,
                                                                       tmp_path: Path):
    """Beside a candidate that holds the whole GPU, the capped scorer cannot even create its
    CUDA context (`set_per_process_memory_fraction` is its first CUDA call): the result must
    be one JSON line, invalid for memory (scored again alone), not a traceback that the
    runner reads as the model's own `invalid` (no cause: final)."""
    model = tmp_path / "model.pt2"
    model.write_bytes(b"PK" + b"x" * 100)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(PREPARE_PY.parent)!r})
        import torch
        def full(fraction, device=None):
            raise torch.AcceleratorError("CUDA error: out of memory")
        torch.cuda.set_per_process_memory_fraction = full
        import prepare
        sys.exit(prepare.main(["score", "--model", {str(model)!r}, "--data-dir",
                               {str(small_data)!r}, "--device", "cuda",
                               "--memory-fraction", "0.2"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin",
                                           "AUTORESEARCH_EVAL_TOKENS": "4096"})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.returncode, out.stdout, out.stderr[-800:])
    result = json.loads(lines[0])
    assert result["status"] == "invalid" and result.get("cause") == "memory", result


# ---- a scoring done again alone draws the same causality cuts ----------------------------------

# A scoring that failed for memory or time is done again: with a fresh draw of the cuts, a model
# that could fail so whenever a call looks like a spliced check that would catch it would be
# caught only if both draws caught it (a second chance). Today a model cannot size an allocation
# from its tokens (an unbacked size serializes as GreaterThan(...), which the scorer refuses),
# but nothing else ties the two: the runner draws the cuts once per trial, after the candidate
# is dead, and gives both scorings the same. This model always fails for memory (6 GiB limit).
HOG = """
import os, torch, prepare
V = prepare.load_meta(prepare.data_dir())["vocab_size"]

class Hog(torch.nn.Module):
    def forward(self, idx):
        big = torch.ones(2**36, dtype=torch.uint8)          # 64 GiB for every call
        return torch.zeros(idx.shape[0], idx.shape[1], V) + big[:1].float().sum() * 0

dims = {"idx": {0: torch.export.Dim("b", min=1, max=4096), 1: torch.export.Dim("s", min=2, max=1024)}}
ep = torch.export.export(Hog(), (torch.zeros(2, 16, dtype=torch.long),), dynamic_shapes=dims)
prepare.save_model(ep, os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"))
"""


def test_a_rescoring_alone_draws_the_same_cuts(small_data: Path, tmp_path: Path, monkeypatch):
    """The model fails for memory: the scorer runs twice (shared, then alone), and both runs
    are given the same causality draw."""
    from runner.sandbox import Limits, TrialSpec, process_backend

    argvs: list[list[str]] = []
    real = process_backend.launch

    def launch(argv, *args, **kwargs):
        argvs.append(list(argv))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(process_backend, "launch", launch)
    train_py = tmp_path / "train.py"
    train_py.write_text(textwrap.dedent(HOG))
    lane = Recording()
    spec = TrialSpec(train_py=train_py, data_dir=small_data, budget=10, eval_tokens=4096,
                     limits=Limits(score_memory_bytes=6 * 2**30))
    outcome = process_backend.run(spec, lambda line: None, lane)
    assert outcome.score.get("cause") == "memory", (outcome.status, outcome.reason)
    assert lane.events == ["trained", "alone", "alone done"]
    scorers = [a for a in argvs if "score" in a and "--model" in a]
    assert len(scorers) == 2
    seeds = [a[a.index("--cuts-seed") + 1] if "--cuts-seed" in a else None for a in scorers]
    assert seeds[0] is not None and seeds[0] == seeds[1], seeds
