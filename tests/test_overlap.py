"""Scoring beside the next trial (issue 11): a slot starts its next trial as soon as the last one
is frozen and killed, while the trusted scorer still runs (`runner.loop.SlotLane`,
`runner.sandbox.base.score_in_lane`).

What must hold, and is tested here:
- the slot's next trial starts once the last one's training is over, never before (one trial
  trains per slot), and one trial is scored at a time per slot (a trial whose training ends
  while the one before is still scored waits, holding its slot);
- a scoring that failed for want of memory or time is done again alone: after the slot's
  training in flight has ended, and with no trial starting until it is done; a model's own
  verdict (a bad file, not causal) is never retried (a second draw of the random cuts would be
  a second chance);
- the scorer beside a candidate is capped (`--memory-fraction`), says `cause` when it failed
  for memory or time, and the record says how it was scored (`scoring`) and when its slot was
  free (`slot_seconds`);
- the real process backend and loop do all of it with the real train.py and scorer.

Scheduling is tested with scripted trials (exact durations); the backend and the loop with real
ones (CPU, seconds of budget, bounded memory)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from attack_models import Slow, export
from conftest import PREPARE_PY, REPO, Recording, docker_engine_missing, small_limits
from runner import record
from runner.loop import LoopConfig, overnight
from runner.sandbox import Lane, Limits, Outcome, TrialSpec, process_backend
from runner.sandbox.base import SHARED_SCORER_MEMORY, score_in_lane
from runner.trial import LocalTrials


class Lanes:
    """An executor whose trials train for `train_s`, hand the slot on, then are scored through
    `score_in_lane` for `score_s` with the result `result(spec, attempt)` (status, cause);
    keeps every span (time.monotonic)."""

    backend = "scripted"

    def __init__(self, train_s, score_s, result=lambda spec, attempt: ("ok", None)):
        self.train_s, self.score_s, self.result = train_s, score_s, result
        self.lock = threading.Lock()
        self.training: dict[tuple[int, int], tuple[float, float]] = {}
        self.handed: dict[tuple[int, int], float] = {}
        self.scoring: list[tuple[tuple[int, int], float, float, float | None]] = []   # + cap

    def sweep_orphans(self, log):
        return 0

    def abort(self, run):
        return 0

    def uses_gpu(self, slot):
        return True

    def run(self, spec, log=lambda _: None, lane: Lane | None = None, **fields):
        assert lane is not None and lane.shared          # the loop gives a shared lane
        key = (spec.number, spec.seed)
        start, t0 = time.time(), time.monotonic()
        time.sleep(self.train_s(spec))
        t1 = time.monotonic()
        lane.trained()
        with self.lock:
            self.training[key] = (t0, t1)
            self.handed[key] = time.monotonic()
        outcome = Outcome(status="ok", phases={"train": t1 - t0})
        attempts = []

        def once(cap):
            a = time.monotonic()
            time.sleep(self.score_s(spec))
            status, cause = self.result(spec, len(attempts))
            attempts.append(cap)
            outcome.status = status
            outcome.val_bpb = 1.0 + spec.number / 100 if status == "ok" else None
            outcome.score = {"status": status, **({"cause": cause} if cause else {})}
            outcome.reason = "" if status == "ok" else f"failed ({cause})"
            with self.lock:
                self.scoring.append((key, a, time.monotonic(), cap))

        score_in_lane(lane, outcome, once)
        return record.from_outcome(spec, outcome, self.backend, start, time.time() - start,
                                   **fields)


def loop(project: Path, data: Path, trials: Lanes, n: int, tag: str):
    cfg = LoopConfig(tag=tag, budget=1, max_experiments=n, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["0"],
                     keep_rule="threshold", noise_runs=1, same_seed_runs=0,
                     executor=trials, overlap_scoring=True, compile_cache=False)
    return overnight(cfg, log=lambda _: None)


def overlapping(spans: list[tuple[float, float]]) -> list[tuple[int, int]]:
    return [(i, j) for i, (a, b) in enumerate(spans) for j, (c, d) in enumerate(spans)
            if i < j and a < d - 0.01 and c < b - 0.01]


def test_the_next_trial_trains_while_the_last_is_scored(project: Path, data: Path):
    trials = Lanes(train_s=lambda s: 0.6, score_s=lambda s: 0.8)
    ledger = loop(project, data, trials, 4, "overlap-basic")
    assert [r["number"] for r in ledger.records] == [0, 1, 2, 3]
    assert all(r["status"] in ("keep", "discard") for r in ledger.records)
    keys = sorted(trials.training)
    train = [trials.training[k] for k in keys]
    score = {k: (a, b) for k, a, b, _ in trials.scoring}
    assert overlapping(train) == []                          # one trial trains per slot
    assert overlapping(list(score.values())) == []           # one scored at a time
    for prev, nxt in zip(keys, keys[1:], strict=False):
        assert train[keys.index(nxt)][0] >= train[keys.index(prev)][1]   # after its training
        assert train[keys.index(nxt)][0] < score[prev][1]    # ... and before its score was in
    assert {cap for *_, cap in trials.scoring} == {SHARED_SCORER_MEMORY}
    assert all(r["scoring"] == "shared" for r in ledger.records)


def test_a_slow_scorer_holds_the_next_trial_back(project: Path, data: Path):
    """Scoring longer than training: a trial whose training is over waits, holding its slot,
    until the one before is scored; never more than one training and one scoring per slot."""
    trials = Lanes(train_s=lambda s: 0.3, score_s=lambda s: 1.0)
    loop(project, data, trials, 4, "overlap-slow")
    keys = sorted(trials.training)
    score = {k: (a, b) for k, a, b, _ in trials.scoring}
    for prev, nxt in zip(keys, keys[1:], strict=False):
        assert trials.handed[nxt] >= score[prev][1] - 0.01   # handed on only once it was scored
    events = [(a, 1) for a, _ in trials.training.values()] + \
             [(b, -1) for _, b in (score[k] for k in keys)]
    in_flight = peak = 0
    for _, step in sorted(events):
        in_flight += step
        peak = max(peak, in_flight)
    assert peak <= 2


def test_a_scoring_short_of_memory_is_done_again_alone(project: Path, data: Path):
    """Trial 1's shared scoring fails for memory: it is scored again once the slot's training
    in flight (trial 2) is over, and no trial trains meanwhile. Trial 2's model verdict (no
    cause) is final after one scoring."""
    def result(spec, attempt):
        if spec.number == 1 and attempt == 0:
            return "invalid", "memory"
        if spec.number == 2:
            return "invalid", None
        return "ok", None

    trials = Lanes(train_s=lambda s: 0.8, score_s=lambda s: 0.4, result=result)
    ledger = loop(project, data, trials, 4, "overlap-alone")
    by = {r["number"]: r for r in ledger.records}
    assert by[1]["status"] in ("keep", "discard") and by[1]["val_bpb"] == pytest.approx(1.01)
    assert by[1]["scoring"].startswith("rescored alone (shared: failed (memory))")
    assert by[1]["phases"]["score_wait"] > 0.1               # it waited for trial 2's training
    assert by[2]["status"] == "invalid" and by[2]["scoring"] == "shared"
    attempts = [(a, b, cap) for k, a, b, cap in trials.scoring if k[0] == 1]
    assert [cap for *_, cap in attempts] == [SHARED_SCORER_MEMORY, None]
    alone = attempts[1][:2]
    assert [k for k, (a, b) in trials.training.items()
            if a < alone[1] - 0.01 and alone[0] < b - 0.01] == []   # nothing trained meanwhile
    assert len([k for k, *_ in trials.scoring if k[0] == 2]) == 1


# ---- the real scorer and process backend ------------------------------------------------------

def candidate(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source))
    return path


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

GARBAGE = """
import os
open(os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"), "wb").write(b"PK" + b"x" * 100)
"""


def backend_trial(train_py: Path, data: Path, lane: Lane, budget: int = 10) -> Outcome:
    spec = TrialSpec(train_py=train_py, data_dir=data, budget=budget, eval_tokens=4096,
                     limits=Limits(score_memory_bytes=6 * 2**30))
    return process_backend.run(spec, lambda line: None, lane)


def test_process_backend_hands_the_slot_on_and_scores_beside(small_data: Path):
    lane = Recording()
    outcome = backend_trial(REPO / "target" / "train.py", small_data, lane)
    assert outcome.status == "ok", outcome.reason
    assert lane.events == ["trained"]
    assert outcome.scoring == "shared"
    assert outcome.slot_seconds is not None
    assert outcome.slot_seconds < sum(outcome.phases.values()) - outcome.phases["score"] + 0.5


def test_process_backend_rescores_alone_only_for_memory(small_data: Path, tmp_path: Path):
    lane = Recording()
    outcome = backend_trial(candidate(tmp_path, HOG), small_data, lane)
    assert outcome.status == "invalid" and "out of memory" in outcome.reason
    assert outcome.score.get("cause") == "memory"
    assert lane.events == ["trained", "alone", "alone done"]
    assert outcome.scoring.startswith("rescored alone (shared: the scorer ran out of memory")

    lane = Recording()                                   # a model's own verdict: final
    outcome = backend_trial(candidate(tmp_path, GARBAGE), small_data, lane)
    assert outcome.status == "invalid" and "cause" not in outcome.score
    assert lane.events == ["trained"] and outcome.scoring == "shared"


def score_cli(model: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    return subprocess.run([sys.executable, str(PREPARE_PY), "score", "--model", str(model),
                           "--data-dir", str(data), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=180, preexec_fn=limit,
                          env={"PATH": "/usr/bin:/bin", "AUTORESEARCH_EVAL_TOKENS": "4096"})


def test_scorer_says_why_it_failed_and_checks_its_cap(small_data: Path, tmp_path: Path):
    """Out of time: `cause` "time" (out of memory: the process backend test above). A cap
    outside (0, 1] is refused before anything runs."""
    V = json.loads((small_data / "manifest.json").read_text())["vocab_size"]
    slow = Path(export(Slow(V), str(tmp_path / "slow.pt2")))
    out = score_cli(slow, small_data, "--time-limit", "3")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "invalid" and result["cause"] == "time", result
    for cap in ("0", "1.5"):
        bad = score_cli(slow, small_data, "--memory-fraction", cap)
        assert bad.returncode == 2 and "--memory-fraction must be in (0, 1]" in bad.stderr


def test_the_loop_overlaps_real_trials_on_the_process_backend(project: Path, small_data: Path):
    """Three real trials of train.py on one CPU slot with overlap asked for: each but the last
    started before the one before it was scored, and all were scored."""
    cfg = LoopConfig(tag="overlap-real", budget=8, max_experiments=3, data_dir=small_data,
                     runs_dir=project / "runs", repo_root=project, gpus=[None],
                     noise_runs=2, same_seed_runs=1, eval_tokens=4096,
                     limits=Limits(score_memory_bytes=6 * 2**30),
                     executor=LocalTrials("process"), overlap_scoring=True)
    ledger = overnight(cfg, log=lambda _: None)
    recs = sorted(ledger.records, key=lambda r: r["number"])
    assert [r["status"] for r in recs] == ["keep", "discard", "discard"], \
        [(r["status"], r["reason"]) for r in recs]
    assert all(r["scoring"] == "shared" and r["val_bpb"] is not None for r in recs)
    assert all(r["slot_seconds"] < r["wall_seconds"] for r in recs)
    starts = [datetime.fromisoformat(r["started_at"]).timestamp() for r in recs]
    for i in range(1, len(recs)):
        assert starts[i] < starts[i - 1] + recs[i - 1]["wall_seconds"]


def test_a_scorer_that_gave_no_result_is_done_again_alone():
    """The scorer killed or crashed while shared (no JSON line: `apply_score` makes it invalid
    with cause "no result") is scored again alone; its second result stands."""
    from runner.sandbox import apply_score
    lane, outcome, calls = Recording(), Outcome(status="ok", slot_seconds=10.0), []

    def once(cap):
        calls.append(cap)
        time.sleep(0.2)
        stdout = "" if len(calls) == 1 else json.dumps({"status": "ok", "val_bpb": 1.25})
        apply_score(outcome, -9 if len(calls) == 1 else 0, stdout, "Killed")

    score_in_lane(lane, outcome, once)
    assert calls == [SHARED_SCORER_MEMORY, None] and lane.events == ["alone", "alone done"]
    assert outcome.status == "ok" and outcome.val_bpb == 1.25
    assert outcome.scoring.startswith("rescored alone (shared: scorer printed nothing")
    assert outcome.slot_seconds >= 10.2          # the slot was its own while it was rescored


def test_a_trial_never_scored_says_so(small_data: Path, tmp_path: Path):
    lane = Recording()
    outcome = backend_trial(candidate(tmp_path, "print('no model')\n"), small_data, lane, budget=5)
    assert outcome.status != "ok" and lane.events == ["trained"]
    assert outcome.scoring == "not scored" and outcome.slot_seconds is not None


@pytest.mark.skipif(docker_engine_missing() is not None, reason=docker_engine_missing() or "")
def test_docker_backend_hands_the_slot_on_once_the_training_container_is_gone(small_data):
    """The docker backend tells its lane when training is over, with the training container
    already removed (its GPU memory given back), and scores beside."""
    import docker

    from runner.sandbox import docker_backend
    run = f"overlap{uuid.uuid4().hex[:6]}"
    cli = docker.from_env(timeout=120)

    class Watching(Recording):
        def trained(self) -> None:
            super().trained()
            self.left = [c.name for c in cli.containers.list(
                all=True, filters={"label": f"autoresearch.run={run}"})]

    lane = Watching()
    spec = TrialSpec(train_py=REPO / "target" / "train.py", data_dir=small_data, budget=20,
                     run=run, eval_tokens=4096, limits=small_limits())
    try:
        outcome = docker_backend.run(spec, lambda line: None, lane)
    finally:
        for image in cli.images.list(filters={"reference": f"autoresearch/exp:{run}*"}):
            cli.images.remove(image.id, force=True)
    assert outcome.status == "ok", outcome.reason
    assert lane.events == ["trained"] and outcome.scoring == "shared"
    assert not [n for n in lane.left if n.startswith("ar-train-")], lane.left
    assert outcome.slot_seconds is not None and outcome.slot_seconds < \
        outcome.phases["train"] + outcome.phases["score"]
    assert not cli.containers.list(all=True, filters={"label": f"autoresearch.run={run}"})
