"""The loop's slot scheduling with timed, scripted trials in place of the sandbox (through the
loop's `executor`): what runs when, on which slot, and in what order it is recorded. The
real trials are in tests/test_loop.py; here the durations and scores must be exact, so that
the order of events is what is tested."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runner import record
from runner.loop import LoopConfig, overnight
from runner.sandbox import Outcome


class Scripted:
    """An executor whose trials sleep `seconds(spec)` and score `val_bpb(spec)`; keeps every
    span."""

    backend = "scripted"

    def __init__(self, seconds, val_bpb):
        self.seconds, self.val_bpb = seconds, val_bpb
        self.spans: list[tuple[int, int, str | None, float, float]] = []   # number, seed, slot
        self.lock = threading.Lock()

    def sweep_orphans(self, log):
        return 0

    def abort(self, run):
        return 0

    def uses_gpu(self, slot):
        return False

    def run(self, spec, log=lambda _: None, **fields):
        start = time.time()
        time.sleep(self.seconds(spec))
        outcome = Outcome(status="ok", val_bpb=self.val_bpb(spec), phases={"train": 0.1},
                          summary={"training_seconds": "0.1"})
        end = time.time()
        with self.lock:
            self.spans.append((spec.number, spec.seed, spec.gpu, start, end))
        return record.from_outcome(spec, outcome, self.backend, start, end - start, **fields)


def test_confirming_rerun_holds_one_slot_while_the_others_go_on(project: Path, data: Path):
    """Candidate 1 is an apparent win; its confirming rerun (seed 1) takes 3 s on the slot it
    trained on, and meanwhile the other slot trains and records the next candidates."""
    def seconds(spec):
        return 3.0 if (spec.number, spec.seed) == (1, 1) else 0.3

    def val_bpb(spec):
        return {0: 1.0, 1: 0.9}.get(spec.number, 1.1)

    trial = Scripted(seconds, val_bpb)
    cfg = LoopConfig(tag="sched-confirm", budget=1, max_experiments=5, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["a", "b"],
                     keep_rule="threshold", noise_runs=1, same_seed_runs=0, confirm=True,
                     executor=trial)
    ledger = overnight(cfg, log=lambda _: None)
    by = {r["number"]: r for r in ledger.records}
    assert sorted(by) == [0, 1, 2, 3, 4]
    assert by[1]["status"] == "keep" and by[1]["confirm"]["seed"] == 1
    assert "confirmed by a rerun (seed 1): mean 0.900000" in by[1]["decision"]
    spans = {(n, seed): (slot, a, b) for n, seed, slot, a, b in trial.spans}
    first, rerun = spans[(1, 0)], spans[(1, 1)]
    assert rerun[0] == first[0]                                # the same slot
    other = [n for (n, seed), (slot, a, b) in spans.items()
             if n > 1 and slot != first[0] and a < rerun[2] and b > rerun[1]]
    assert len(other) >= 2                                     # the other slot went on
    order = [r["number"] for r in ledger.records]
    assert order.index(1) > order.index(other[0])              # and recorded first
    assert all(by[n]["status"] == "discard" for n in (2, 3, 4))


def test_candidates_wait_for_every_noise_run(project: Path, data: Path):
    """With two noise runs on one slot each and a third slot free, a candidate trains at once
    but is decided only after both measurements, against their spread."""
    def seconds(spec):
        return 2.0 if spec.number == 1 else 0.3                 # the noise run is slow

    def val_bpb(spec):
        return {0: 1.0, 1: 1.02}.get(spec.number, 0.95)

    trial = Scripted(seconds, val_bpb)
    cfg = LoopConfig(tag="sched-noise", budget=1, max_experiments=4, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["a", "b", "c"],
                     keep_rule="threshold", noise_runs=2, same_seed_runs=0, noise_k=2.0,
                     min_delta=0.0, executor=trial)
    ledger = overnight(cfg, log=lambda _: None)
    assert [r["number"] for r in ledger.records if r["role"] == "candidate"] == [2, 3]  # no more
    order = [(r["number"], r["role"]) for r in ledger.records]
    assert order[0][1] in ("baseline", "noise") and order[1][1] in ("baseline", "noise")
    spans = {n: (a, b) for n, seed, slot, a, b in trial.spans}
    assert spans[2][0] < spans[1][0] + 1.0                     # started beside the noise run
    assert spans[2][1] < spans[1][1]                           # and finished before it...
    spread = 0.02 / 2 ** 0.5                                   # stdev of 1.0 and 1.02
    for r in ledger.records[2:]:
        assert f"spread {spread:.6f}" in r["decision"]         # ...but was decided after


# ---- the sequential keep rule (runner.decide), on one slot so the order is exact ----

NOISE = {(0, 0): 1.00, (1, 1001): 1.01, (2, 1002): 0.99, (3, 0): 1.0003}   # (number, seed)


def sequential_run(project: Path, data: Path, tag: str, scores: dict, n: int, **kw):
    def val_bpb(spec):
        return {**NOISE, **scores}[(spec.number, spec.seed)]

    trial = Scripted(lambda spec: 0.2, val_bpb)
    logs: list[str] = []
    cfg = LoopConfig(tag=tag, budget=1, max_experiments=n, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["a"], min_delta=0.0,
                     executor=trial, **kw)
    ledger = overnight(cfg, log=logs.append)
    return {r["number"]: r for r in ledger.records}, trial, logs


def test_sequential_rule_reruns_inside_the_noise_and_keeps_on_the_test(project: Path, data: Path):
    """The noise is measured first (3 seeds and a same-seed rerun); a worse candidate is
    discarded after one run; one inside the noise is rerun to the cap of 4 runs and discarded;
    a better one is rerun until the t-test passes and kept, and the next is judged against the
    mean of its runs."""
    scores = {(4, 0): 1.02,
              (5, 0): 0.995, (5, 1): 1.003, (5, 2): 0.996, (5, 3): 0.999,
              (6, 0): 0.975, (6, 1): 0.976,
              (7, 0): 0.9757}
    by, trial, logs = sequential_run(project, data, "seq", scores, 8, rerun_share=1.0,
                                     futility=0.0)
    assert [by[n]["role"] for n in range(4)] == ["baseline", "noise", "noise", "noise"]
    assert by[3]["same_seed"] is True and by[3]["seed"] == 0
    assert any("sd over 3 seeds 0.010000, over 2 runs of one seed 0.000212" in line
               for line in logs)
    assert by[4]["status"] == "discard" and len(by[4]["runs"]) == 1
    assert "no better" in by[4]["decision"]
    five = by[5]
    assert five["status"] == "discard" and [r["seed"] for r in five["runs"]] == [0, 1, 2, 3]
    assert "not shown better in 4 runs" in five["decision"]
    assert five["test"]["effect"] == "flat" and by[4]["test"]["effect"] == "not better"
    assert five["mean_bpb"] == pytest.approx(0.99825)
    assert five["test"]["best_runs"] == [1.0, 1.01, 0.99]      # the baseline's seeds, not its rerun
    six = by[6]
    assert six["status"] == "keep" and [r["val_bpb"] for r in six["runs"]] == [0.975, 0.976]
    test = six["test"]
    assert test["rule"] == "sequential" and test["alpha"] == 0.05
    assert test["statistic"] >= test["critical"] and test["p_value"] < 0.05 / 4
    assert test["df"] == 2 + 3 + 1                             # baseline, #5's and its own runs
    assert six["delta"] == pytest.approx(0.9755 - 1.0)
    # the best's score is now the mean of #6's runs: 0.9757 is no better than 0.9755
    seven = by[7]
    assert seven["test"]["best_runs"] == [0.975, 0.976] and seven["status"] == "discard"
    trained = sorted((n, seed) for n, seed, *_ in trial.spans)
    assert trained == sorted(list(NOISE) + list(scores))       # nothing else ran


def test_reruns_stop_at_their_share_of_the_trial_time(project: Path, data: Path):
    """With reruns capped at 25% of the trial seconds, a candidate inside the noise gets one
    rerun (1 of 6 equal trials) but not a second (2 of 7), and is discarded saying so."""
    scores = {(4, 0): 0.995, (4, 1): 0.994, (4, 2): 0.993}
    by, trial, logs = sequential_run(project, data, "seq-cap", scores, 5, futility=0.0)
    four = by[4]
    assert [r["seed"] for r in four["runs"]] == [0, 1]
    assert four["status"] == "discard" and "rerun budget spent" in four["decision"]
    from runner import decide
    reruns, total = decide.rerun_share(list(by.values()))
    assert 0 < reruns / total <= 0.25


def test_remeasure_noise_measures_each_new_best(project: Path, data: Path):
    """With --remeasure-noise a keep queues the new best's seeds and a same-seed rerun first;
    the next decision takes the best's mean over its own run and those seeds."""
    kept_text: list[str] = []

    def val_bpb(spec):
        if spec.number < 4:
            return NOISE[(spec.number, spec.seed)]
        text = spec.train_py.read_text()
        if spec.number == 4:
            kept_text.append(text)
            return 0.9
        if kept_text and text == kept_text[0]:                 # the new best, remeasured
            return 0.9 + (spec.seed % 3) * 0.001
        return 1.05

    trial = Scripted(lambda spec: 0.2, val_bpb)
    cfg = LoopConfig(tag="seq-remeasure", budget=1, max_experiments=11, data_dir=data,
                     runs_dir=project / "runs", repo_root=project, gpus=["a"], min_delta=0.0,
                     remeasure_noise=True, rerun_share=1.0, executor=trial)
    ledger = overnight(cfg, log=lambda _: None)
    by = {r["number"]: r for r in ledger.records}
    assert by[4]["status"] == "keep" and len(by[4]["runs"]) == 1
    again = [r for r in ledger.records if r["role"] == "noise" and r["commit"] == by[4]["commit"]]
    assert len(again) == 4 and sum(bool(r.get("same_seed")) for r in again) == 1
    seeds = [r["val_bpb"] for r in again if not r.get("same_seed")]
    later = [r for r in ledger.records if r["role"] == "candidate" and r["number"] > 4
             and r.get("test")]
    assert later, [r["number"] for r in ledger.records]
    order = [r["number"] for r in ledger.records]
    assert all(order.index(r["number"]) > max(order.index(a["number"]) for a in again)
               for r in later)                                 # decided after the remeasurement
    assert sorted(later[0]["test"]["best_runs"]) == sorted([0.9] + seeds)


def test_remeasure_noise_on_resume_numbers_after_everything(project: Path, data: Path):
    """A resumed run with --remeasure-noise measures the best again (its seeds and a same-seed
    rerun) before anything else, under new numbers; the noise shown is then the new one."""
    def val_bpb(spec):
        return NOISE.get((spec.number, spec.seed), 1.0 + (spec.seed % 7) * 0.002)

    common = dict(budget=1, data_dir=data, runs_dir=project / "runs", repo_root=project,
                  gpus=["a"], min_delta=0.0, executor=Scripted(lambda spec: 0.1, val_bpb))
    first = overnight(LoopConfig(tag="seq-resume", max_experiments=5, **common), log=lambda _: None)
    assert len(first.records) == 5
    ledger = overnight(LoopConfig(tag="seq-resume", max_experiments=10, remeasure_noise=True,
                                  **common), log=lambda _: None)
    numbers = [r["number"] for r in ledger.records]
    assert sorted(numbers) == list(range(len(numbers)))       # none lost, none duplicated
    again = ledger.records[5:9]
    assert [r["role"] for r in again] == ["noise"] * 4 and again[-1]["same_seed"] is True
    assert {r["commit"] for r in again} == {ledger.records[0]["commit"]}
    from runner import decide
    noise = decide.noise_of(ledger.records)                  # both measurements of the commit
    assert noise.seeds == [r["val_bpb"] for r in ledger.records[:3] + again[:3]]
    assert [len(g) for g in noise.same_seed] == [2, 2] and noise.same_seed_text() == \
        "over 4 runs of 2 seeds"


# ---- one runner per run ----

def test_a_second_runner_on_a_run_stops_before_it_sweeps(project: Path, data: Path):
    """Another process holds the run (a runner's lock, taken the runner's way): a second runner
    on that tag stops at once, naming it, without sweeping its trials or touching the ledger.
    Once the holder dies (SIGKILL: no clean-up of its own), the run is free again, and a runner
    that ended lets the next one resume."""
    import os
    import signal
    import subprocess
    import sys

    from runner.loop import Overnight
    from runner.sandbox import InfrastructureError

    swept: list[str] = []

    class Sweeping(Scripted):
        def sweep_orphans(self, log):
            swept.append("swept")
            return 0

    def cfg(n: int) -> LoopConfig:
        return LoopConfig(tag="locked", budget=1, max_experiments=n, data_dir=data,
                          runs_dir=project / "runs", repo_root=project, gpus=["a"],
                          keep_rule="threshold", noise_runs=1, same_seed_runs=0,
                          executor=Sweeping(lambda spec: 0.05, lambda spec: 1.0))

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from runner.loop import hold_run; hold_run(Path(sys.argv[1]), 'locked'); "
         "print('held', flush=True); time.sleep(60)", str(project / "runs" / "locked")],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InfrastructureError, match=f"in use by another runner \\(pid {holder.pid}"):
            Overnight(cfg(2), log=lambda _: None)
        assert swept == [] and not (project / "runs" / "locked" / "experiments.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    first = overnight(cfg(2), log=lambda _: None)
    assert swept == ["swept"] and len(first.records) == 2
    again = overnight(cfg(3), log=lambda _: None)            # the lock went with the first run
    assert [r["number"] for r in again.records] == [0, 1, 2]
