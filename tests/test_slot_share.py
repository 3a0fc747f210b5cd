"""bench/slot_share.py: where a slot's wall time goes, from the records alone (issue 11)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_train

sys.path.insert(0, str(REPO / "bench"))
import slot_share  # noqa: E402


def trial(number: int, cache: str | None, startup: float | None, steps: float, slot: float,
          score: float = 10.0, in_summary: bool = False, log: str = "") -> dict:
    rec = {"version": 3, "id": f"t-{number}", "run": "t", "number": number, "role": "candidate",
           "status": "discard", "trial_status": "ok", "budget": 60, "wall_seconds": slot,
           "phases": {"build": 1.0, "train": 62.0, "score": score, "cleanup": 0.1},
           "reported_training_seconds": None if in_summary else steps,
           "summary": {"training_seconds": str(steps)}, "log_tail": log}
    if startup is not None:
        if in_summary:
            rec["summary"]["startup_seconds"] = str(startup)
        else:
            rec["reported_startup_seconds"] = startup
    if cache is not None:
        rec["compile_cache"] = {"start": cache, "in_bytes": 0}
    return rec


# A 60 s trial's lines as train.py prints them (shortened): 4.3 s to the first, 3.7 s more to
# the fallback's.
LOG = ("device: cuda  params: 49.81M  depth: 8  budget: 60s  left: 55.7s\n"
       "fallback saved: holdout loss 9.0113, check 0.76s, trace 1.79s, margin 3.8s (final save: "
       "this program saved again), left 52.0s\nstep     9    0.5%  loss 8.8010  left  44.8s\n")


def records() -> list[dict]:
    return [trial(0, "cold", 35.0, 25.0, 100.0, log=LOG),
            trial(1, "warm", 8.0, 50.0, 80.0, score=8.0),
            trial(2, "warm", 6.0, 54.0, 75.0, in_summary=True),  # older train.py: summary only
            trial(3, None, None, 40.0, 90.0),                   # before compile_cache existed
            {"version": 3, "id": "t-4", "run": "t", "number": 4, "status": "invalid",
             "wall_seconds": None, "phases": {"propose": 3.0}}]  # a proposal that never ran


def test_figures_per_trial_and_per_cache_state():
    rows = slot_share.trials(records())
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert [r["cache"] for r in rows] == ["cold", "warm", "warm", "unknown"]
    assert [r["startup"] for r in rows] == [35.0, 8.0, 6.0, None]
    assert rows[0]["setup"] == pytest.approx(4.3) and rows[0]["fallback"] == pytest.approx(3.7)
    assert rows[0]["first"] == pytest.approx(35.0 - 8.0)
    assert [r["setup"] for r in rows[1:]] == [None] * 3             # no such lines: unknown
    assert [r["steps"] for r in rows] == [25.0, 50.0, 54.0, 40.0]
    assert rows[0]["share"] == pytest.approx(0.25) and rows[1]["score"] == 8.0
    groups = slot_share.summarise(rows)
    assert list(groups) == ["cold", "warm", "unknown", "all"]
    assert groups["warm"]["n"] == 2 and groups["warm"]["median_startup"] == 7.0
    assert groups["warm"]["pooled_share"] == pytest.approx(104 / 155)
    assert groups["all"]["pooled_share"] == pytest.approx(169 / 345)
    assert groups["unknown"]["median_startup"] is None


def test_command_on_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "experiments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    script = str(REPO / "bench" / "slot_share.py")
    text = subprocess.run([sys.executable, script, str(run)], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert "| 0 | candidate | ok | cold | 35.0 | 4.3 / 3.7 / 27.0 | 25.0 | 62.0 | 10.0 | 100.0 | 25% |" \
        in text
    assert "| 1 | candidate | ok | warm | 8.0 | - / - / - | 50.0 |" in text
    assert "| warm | 2 | 7.0 | 9.0 | 77.5 | 67% | 67% |" in text
    data = json.loads(subprocess.run([sys.executable, script, str(run), "--json"],
                                     capture_output=True, text=True, check=True, timeout=60).stdout)
    assert data["groups"]["cold"]["n"] == 1 and len(data["trials"]) == 4


def test_a_budget_too_small_to_train_is_said():
    """Trials frozen at the deadline before train.py printed its summary have no steps; the
    Markdown says the run measured start-up, not training."""
    frozen = {**trial(0, "cold", None, 0.0, 34.0), "reported_training_seconds": None,
              "summary": {}, "stopped_at_deadline": True}
    rows = slot_share.trials([frozen, trial(1, "warm", 8.0, 50.0, 80.0)])
    assert rows[0]["steps"] is None and rows[0]["share"] is None
    text = slot_share.markdown(rows, slot_share.summarise(rows))
    assert "| 0 | candidate | ok | cold | - | - / - / - | - | 62.0 | 10.0 | 34.0 | - |" in text
    assert "1 of 2 trials were stopped at the deadline" in text
    assert "were stopped" not in slot_share.markdown(rows[1:], slot_share.summarise(rows[1:]))


def test_a_trial_scored_beside_the_next_counts_its_slot_until_it_was_killed():
    """With scoring beside the next trial the slot is free once the candidate is killed: the
    share is over `slot_seconds`, not the wall seconds that include the scoring."""
    shared = dict(trial(1, "warm", 8.0, 50.0, 75.0), slot_seconds=61.0, scoring="shared")
    row = slot_share.trials([shared])[0]
    assert row["slot"] == 61.0 and row["share"] == pytest.approx(50.0 / 61.0)
    assert slot_share.trials([trial(2, "warm", 8.0, 50.0, 75.0)])[0]["slot"] == 75.0


def test_the_start_up_split_reads_train_pys_own_lines(small_data, tmp_path):
    """On what target/train.py prints (a short CPU run): setup, fallback and first step are
    found, each a part of the start-up it reports."""
    budget = 15
    proc = run_train(REPO / "target" / "train.py", tmp_path, small_data, budget)
    assert proc.returncode == 0, proc.stderr
    startup = float(re.search(r"^startup_seconds: ([\d.]+)$", proc.stdout, re.M).group(1))
    rec = {**trial(0, "warm", startup, 5.0, 20.0), "budget": budget, "log_tail": proc.stdout}
    row = slot_share.trials([rec])[0]
    assert all(row[k] is not None and row[k] < startup for k in ("setup", "fallback", "first")), row
    # Each from two figures printed to 0.1 s: a CPU's first step (no compile) can read 0.0 or -0.1.
    assert row["setup"] > 0 and row["fallback"] > 0 and row["first"] > -0.15, row
