"""The experiment record's one reader: torn lines, damaged lines, records of older versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import record
from runner.ledger import Ledger

V1_BASELINE = {"version": 1, "id": "old-0", "run": "old", "number": 0, "status": "keep",
               "trial_status": "ok", "decision": "baseline", "val_bpb": 2.5, "commit": "a" * 40,
               "description": "baseline", "phases": {"train": 1.0}}
V1_FAILED_PROPOSAL = {"version": 1, "id": "old-1", "run": "old", "number": 1, "status": "invalid",
                      "reason": "no edit", "description": "x", "val_bpb": None}


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_reading_leaves_a_torn_line_out_and_repair_cuts_it_off(tmp_path: Path):
    path = write(tmp_path / "experiments.jsonl", json.dumps(V1_BASELINE) + "\n", '{"id": "old-1", "sta')
    before = path.read_bytes()
    assert [r["id"] for r in record.read(path)] == ["old-0"]
    assert path.read_bytes() == before                       # a reader never writes
    assert [r["id"] for r in record.read(path, repair=True)] == ["old-0"]
    assert path.read_bytes() == (json.dumps(V1_BASELINE) + "\n").encode()


def test_a_damaged_line_is_skipped_when_reading_and_refused_before_appending(tmp_path: Path):
    path = write(tmp_path / "experiments.jsonl", "not json\n", "[1, 2]\n", json.dumps(V1_BASELINE) + "\n")
    assert [r["id"] for r in record.read(path)] == ["old-0"]
    with pytest.raises(ValueError, match=r"experiments.jsonl:1 is not a JSON record"):
        record.read(path, repair=True)
    with pytest.raises(ValueError, match="damaged"):
        Ledger.open(tmp_path)


def test_old_records_are_upgraded(tmp_path: Path):
    write(tmp_path / "experiments.jsonl", json.dumps(V1_BASELINE) + "\n",
          json.dumps(V1_FAILED_PROPOSAL) + "\n")
    ledger = Ledger.open(tmp_path)
    base, failed = ledger.records
    assert base["version"] == failed["version"] == record.VERSION
    assert base["role"] == "baseline" and failed["role"] == "candidate"   # v1 had no role
    assert failed["trial_status"] == "invalid" and failed["llm"]["cost_usd"] == 0.0
    assert failed["commit"] is None and failed["phases"] == {}
    assert ledger.best() == base and ledger.next_number() == 2
    # Appending writes the new version next to the old lines, which stay as they were.
    ledger.append(record.failed_proposal("old", 2, "a" * 40, "y", "bad", None))
    lines = (tmp_path / "experiments.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == V1_BASELINE
    assert json.loads(lines[2])["version"] == record.VERSION
    assert [r["number"] for r in Ledger.open(tmp_path).records] == [0, 1, 2]


def test_upgrade_finds_the_number_in_the_id():
    assert record.upgrade({"id": "tag-7", "status": "crash"})["number"] == 7
    assert record.upgrade({"run": "tag", "number": 3})["id"] == "tag-3"


def test_before_version_3_training_seconds_was_the_candidates_claim():
    old = record.upgrade({"version": 2, "id": "tag-1", "status": "keep", "training_seconds": 300.1})
    assert old["training_seconds"] is None and old["reported_training_seconds"] == 300.1
    new = {"version": 3, "id": "tag-2", "training_seconds": 301.2, "reported_training_seconds": 9.0}
    assert record.upgrade(dict(new))["training_seconds"] == 301.2       # the runner's, kept


def test_the_record_takes_training_seconds_from_the_runner(tmp_path: Path):
    from runner.sandbox import Outcome, TrialSpec

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "train.py").write_text("")
    spec = TrialSpec(train_py=tmp_path / "train.py", data_dir=tmp_path, budget=60)
    outcome = Outcome(status="ok", training_seconds=60.21, stopped_at_deadline=True,
                      summary={"training_seconds": "12.0", "startup_seconds": "4.5"})
    rec = record.from_outcome(spec, outcome, "docker", 0.0, 70.0)
    assert rec["training_seconds"] == 60.21 and rec["reported_training_seconds"] == 12.0
    assert rec["reported_startup_seconds"] == 4.5               # train.py's start-up, as it says
    assert rec["stopped_at_deadline"] is True


def test_find_by_id_or_image_tag(tmp_path: Path):
    (tmp_path / "old").mkdir()
    rec = dict(V1_BASELINE, image_tag="autoresearch/exp:old-0-aaaaaaa")
    write(tmp_path / "old" / "experiments.jsonl", json.dumps(rec) + "\n", "torn")
    assert record.find("old-0", tmp_path)["val_bpb"] == 2.5
    assert record.find("autoresearch/exp:old-0-aaaaaaa", tmp_path)["id"] == "old-0"
    with pytest.raises(LookupError, match="no experiment 'old-9'"):
        record.find("old-9", tmp_path)


def test_statuses_have_one_home():
    from runner.agents import search
    from runner.report import FAILED

    assert FAILED is record.FAILED
    assert set(record.BROKE) < set(record.FAILED) and "invalid" not in record.BROKE
    assert search.FAILED is record.BROKE
    assert set(record.STATUS_STYLE) == set(record.STATUSES)


def test_the_loop_verdict_is_a_new_record():
    trial = {"id": "t-1", "status": "ok", "val_bpb": 1.0, "phases": {"train": 1.0}}
    kept = record.decided(trial, "candidate", "keep", "rule", delta=-0.1)
    assert kept == {**trial, "trial_status": "ok", "role": "candidate", "status": "keep",
                    "decision": "rule", "delta": -0.1}
    assert trial["status"] == "ok" and "role" not in trial
    failed = record.decided({"status": "crash"}, "baseline", "crash", None)
    assert failed == {"status": "crash", "trial_status": "crash", "role": "baseline"}
