"""What comes back out of a sandbox, read with distrust.

- The **scorer's result**: the last line of its stdout, one JSON object, of which only the
  known fields are read, each type-checked (`read_score`); both backends hand the scorer's
  exit code and output to `apply_score`, so there is one reading of it.
- The **candidate's output**: its `key: value` summary (`parse_summary`) and its log tail
  (`escape_log`), escaped before they reach a terminal, a report or the LLM's prompt: no
  terminal controls, no bidi overrides, no invisible characters, no fake line breaks. The
  summary's known numbers (`REPORTED_NUMBERS`) are read once more, type-checked
  (`reported_numbers`), for the record's `reported_*` fields: what the candidate says,
  never the measure.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from runner.sandbox.base import InfrastructureError, Outcome

# The scorer's fields: name -> kind. Anything else it prints is dropped.
SCORE_FIELDS = {
    "status": "status", "reason": "text", "device": "word",
    "val_bpb": "number", "uniform_bpb": "number", "seconds": "number",
    "load_seconds": "number", "check_seconds": "number",
    "tokens": "count", "bytes": "count", "causal_checks": "count",
    "cause": "word",                  # of an invalid result: "memory", "time" (may be retried)
}
SCORE_STATUSES = ("ok", "invalid")
TEXT_LIMIT = {"status": 16, "text": 500, "word": 32}
REASON_LIMIT = 500

# Characters that change how text around them is shown: C0 and C1 controls (but newline
# and tab), DEL, bidi embeddings/overrides/isolates and marks, line and paragraph separators,
# zero-width characters and the BOM.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                    "\u2060-\u2069\ufeff]")
UNSAFE_IN_LINE = re.compile(UNSAFE.pattern[:-1] + "\n\t]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """Text with every unsafe character written as an escape (newlines and tabs stay)."""
    return UNSAFE.sub(_escape, text)


def escape_line(text: str) -> str:
    """One line: also newlines and tabs escaped."""
    return UNSAFE_IN_LINE.sub(_escape, text)


def escape_log(text: str, limit: int) -> str:
    """The last `limit` characters of candidate output, escaped so a log cannot drive a
    terminal, reorder what is shown, hide text or pose as another record."""
    return escape_text(text[-limit:])


def parse_summary(log: str) -> dict[str, str]:
    """The `key: value` lines after the last `---` line of train.py's output, escaped."""
    if "\n---\n" not in "\n" + log:
        return {}
    tail = ("\n" + log).rsplit("\n---\n", 1)[1]
    out = {}
    for line in tail.split("\n")[:64]:             # not splitlines: U+2028 is no line break here
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_.]{0,63}):\s*(.{0,200})", line.strip(), re.ASCII)
        if m:
            out[m.group(1)] = escape_line(m.group(2))
    return out


# train.py's summary fields that the record keeps as numbers, as `reported_<name>`: seconds it
# says it trained (the record's `training_seconds` is the runner's clock) and seconds from its
# start to the end of its first optimizer step (imports, set-up, compilation).
REPORTED_NUMBERS = ("training_seconds", "startup_seconds")


def reported_numbers(summary: dict[str, str]) -> dict[str, float | None]:
    """The `REPORTED_NUMBERS` of a parsed summary, each a finite float or None (missing, not
    a number, NaN or infinite)."""
    out: dict[str, float | None] = {}
    for name in REPORTED_NUMBERS:
        try:
            value = float(summary.get(name, ""))
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        out[name] = value if math.isfinite(value) else None
    return out


STOPPED_SCORED = "stopped at the deadline: scored on the last model.pt2 it saved"


def classify_exit(exit_code: int | None, oom_killed: bool, stopped: bool, log: str,
                  model_exists: bool) -> tuple[str, str]:
    """Status and reason of the training phase, from what the host saw. `stopped`: the runner
    froze and killed it at the deadline; the model it had saved by then is what is scored (a
    save that was cut short never replaced `model.pt2`, or left a file the scorer refuses)."""
    if stopped:
        if model_exists:
            return "ok", STOPPED_SCORED
        return "timeout", "stopped at the deadline without having saved a model.pt2"
    if oom_killed or re.search(r"CUDA out of memory|OutOfMemoryError|\bMemoryError\b", log[-20000:]):
        return "oom", "ran out of memory"
    if exit_code != 0:
        return "crash", f"train.py exited with code {exit_code}"
    if not model_exists:
        return "invalid", "train.py exited without writing model.pt2"
    return "ok", ""


def _invalid(reason: str) -> dict[str, Any]:
    """No result of the scorer's own (it printed none, or exited with an error): a scoring
    beside another trial is done again alone (`runner.sandbox.base.score_in_lane`)."""
    return {"status": "invalid", "reason": reason, "cause": "no result"}


def _field(name: str, value: Any) -> Any:
    """The value if it has its field's type, else raises ValueError."""
    kind = SCORE_FIELDS[name]
    if value is None and kind in ("number", "count"):
        return None
    if kind in ("number", "count"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} is not a finite number")
        if kind == "count" and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} is not a count")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    if kind == "status" and value not in SCORE_STATUSES:
        raise ValueError(f"status {escape_line(value[:16])!r} is not ok or invalid")
    return escape_line(value[:TEXT_LIMIT[kind]])


def parse_score(stdout: str) -> dict[str, Any]:
    """The scorer's result: the last non-empty line of its stdout, a JSON object. Only the
    fields of `SCORE_FIELDS` are kept, each of its type; an earlier line, a missing or
    mistyped field, or an ``ok`` without a val_bpb makes the result ``invalid``."""
    lines = [line for line in stdout.split("\n") if line.strip()]
    if not lines:
        return _invalid("scorer printed nothing")
    if len(lines) > 1:
        return _invalid(f"scorer printed {len(lines)} lines, not one")
    try:
        raw = json.loads(lines[-1])
    except ValueError:
        return _invalid("scorer output is not JSON")
    if not isinstance(raw, dict) or "status" not in raw:
        return _invalid("scorer output has no valid status")
    result: dict[str, Any] = {}
    try:
        for name in SCORE_FIELDS:
            if name in raw:
                result[name] = _field(name, raw[name])
    except ValueError as e:
        return _invalid(f"scorer output: {e}")
    if result["status"] == "ok" and result.get("val_bpb") is None:
        return _invalid("scorer output: ok without a val_bpb")
    return result


def apply_score(outcome: Outcome, exit_code: int, stdout: str, stderr: str) -> None:
    """Fill `outcome` from the scorer's exit code and output (tails). Exit code 2 is the
    scorer finding no data: the set-up's fault, raised as InfrastructureError."""
    if exit_code == 2:
        raise InfrastructureError("the scorer found no data: " + escape_text(stderr[-500:]))
    result = parse_score(stdout)
    if exit_code != 0 and result["status"] != "invalid":
        result = _invalid(f"scorer exited with {exit_code}: " + escape_text(stderr[-300:]))
    outcome.score = result
    if result["status"] == "ok":
        outcome.status, outcome.val_bpb = "ok", float(result["val_bpb"])
    else:
        outcome.status, outcome.reason = "invalid", str(result.get("reason", ""))[:REASON_LIMIT]
