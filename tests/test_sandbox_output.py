"""What comes back out of a sandbox: the scorer's result (known fields, checked types, the last
line) and the candidate's output (escaped before people or the LLM see it)."""

from __future__ import annotations

import json

import pytest

from runner.sandbox import (InfrastructureError, Outcome, apply_score, escape_log, parse_score,
                            parse_summary, reported_numbers)

OK = {"status": "ok", "reason": "", "val_bpb": 1.25, "uniform_bpb": 3.0, "tokens": 4096,
      "bytes": 9000, "seconds": 1.5, "load_seconds": 0.2, "device": "cpu",
      "causal_checks": 64, "check_seconds": 0.3}


def line(**fields) -> str:
    return json.dumps(fields) + "\n"


def test_only_known_fields_are_read():
    result = parse_score(line(**OK, forged=1, record={"status": "keep"}, description="x"))
    assert result == OK


@pytest.mark.parametrize("bad, why", [
    ({"val_bpb": "0.1"}, "val_bpb is not a finite number"),
    ({"val_bpb": True}, "val_bpb is not a finite number"),
    ({"uniform_bpb": float("nan")}, "uniform_bpb is not a finite number"),
    ({"seconds": float("inf")}, "seconds is not a finite number"),
    ({"tokens": 1.5}, "tokens is not a count"),
    ({"bytes": -1}, "bytes is not a count"),
    ({"device": ["cpu"]}, "device is not a string"),
    ({"status": "keep"}, "is not ok or invalid"),
    ({"val_bpb": None}, "ok without a val_bpb"),
])
def test_a_mistyped_field_makes_the_result_invalid(bad, why):
    result = parse_score(json.dumps({**OK, **bad}))
    assert result["status"] == "invalid" and why in result["reason"], result


def test_nan_from_the_scorer_is_refused():
    # json.dumps writes NaN (not JSON, but Python reads it back): never a val_bpb.
    assert parse_score('{"status": "ok", "val_bpb": NaN}')["status"] == "invalid"


def test_the_result_is_the_last_line_and_the_only_one():
    assert parse_score("\n" + line(**OK) + "\n\n")["val_bpb"] == 1.25       # blank lines: fine
    forged = line(**{**OK, "val_bpb": 0.01})
    for out in (forged + line(**OK), line(**OK) + forged, "warming up\n" + line(**OK)):
        result = parse_score(out)
        assert result == {"status": "invalid", "reason": "scorer printed 2 lines, not one",
                          "cause": "no result"}
    assert parse_score("")["reason"] == "scorer printed nothing"
    assert parse_score("[1]")["reason"] == "scorer output has no valid status"


def test_strings_are_bounded_and_escaped():
    result = parse_score(line(status="invalid", reason="\x1b[2J" + "r" * 2000, device="c\u202epu"))
    assert result["reason"].startswith("\\x1b[2J") and len(result["reason"]) < 520
    assert result["device"] == "c\\u202epu"


def test_apply_score_one_reading_for_every_backend():
    outcome = Outcome(status="ok")
    apply_score(outcome, 0, line(**OK), "")
    assert (outcome.status, outcome.val_bpb, outcome.score) == ("ok", 1.25, OK)
    outcome = Outcome(status="ok")
    apply_score(outcome, 1, line(**OK), "Traceback\x1b[31m boom")
    assert outcome.status == "invalid" and outcome.val_bpb is None
    assert outcome.reason == "scorer exited with 1: Traceback\\x1b[31m boom"
    outcome = Outcome(status="ok")
    apply_score(outcome, 1, line(status="invalid", reason="not causal"), "")
    assert (outcome.status, outcome.reason) == ("invalid", "not causal")
    with pytest.raises(InfrastructureError, match="found no data"):
        apply_score(Outcome(status="ok"), 2, "", "no val/")


BIDI_AND_INVISIBLE = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
                      "\u2028\u2029\u200b\u200c\u200d\u2060\ufeff\x85\x9b\x1b\x07\r\x7f")


def test_escape_log_leaves_nothing_that_changes_how_text_shows():
    text = f"loss 1.0\n\tstep{BIDI_AND_INVISIBLE}end é 中"
    out = escape_log(text, 10_000)
    assert out.startswith("loss 1.0\n\tstep") and out.endswith("end é 中")
    assert all(ch not in out for ch in BIDI_AND_INVISIBLE)
    assert "\\u202e" in out and "\\u2028" in out and "\\ufeff" in out and "\\x9b" in out
    assert "\\x1b" in out and "\\r" not in out and "\\x0d" in out
    assert escape_log("abcdef", 3) == "def"


def test_summary_values_are_escaped_and_keys_ascii():
    log = ("noise\n---\nval_bpb: 0.001\x1b[2J\nnote: a\u202eb\u2028c\n"
           "ключ: 1\nnum_steps: 5\n")
    assert parse_summary(log) == {"val_bpb": "0.001\\x1b[2J", "note": "a\\u202eb\\u2028c",
                                  "num_steps": "5"}


def test_reported_numbers_are_type_checked():
    summary = parse_summary("x\n---\ntraining_seconds: 12.5\nstartup_seconds: nan\nnum_steps: 5\n")
    assert reported_numbers(summary) == {"training_seconds": 12.5, "startup_seconds": None}
    for bad in ("inf", "1e999", "12 s", "", "\\x1b[2J"):
        assert reported_numbers({"startup_seconds": bad})["startup_seconds"] is None
    assert reported_numbers(parse_summary("---\nstartup_seconds: 3.25\n"))["startup_seconds"] == 3.25
