"""Where a slot's wall time goes (issue 11), per trial of a run, from its records alone:

    python bench/slot_share.py runs/<tag> [--json]

Works on any run folder (or its `experiments.jsonl`), on the machine that ran it or another.
Per trial (one record: the baseline, a noise run, a candidate's first run; a candidate's reruns
are in the ledger only as their seconds, so they count in the run's totals, not as rows):

- **start-up**: seconds from train.py's start to the end of its first training step (imports,
  set-up, compilation), as train.py reports it (`reported_startup_seconds`, else the summary's
  `startup_seconds`); "-" where the record has neither (records before it was added).
- **steps**: the candidate's reported training window (`reported_training_seconds`, else the
  summary's `training_seconds`): the seconds its own clock counted in training steps. What the
  candidate says, not the runner's measure; good enough for where the time goes.
- **setup / fallback / first step**: the start-up in three, from the lines the baseline's
  train.py prints (its `device:` line and its `fallback saved:` line, each with the seconds
  left): process start to the first line (imports, data, model), the fallback's check, trace
  and save, the rest (compilation or the cache's load, and one step); "-" for a train.py that
  prints no such lines.
- **train**, **score**, **build**: the runner's phase seconds (`phases`); train is the whole
  training process on the runner's clock (start-up, steps, holdout checks, export).
- **slot**: the seconds its slot was taken: `slot_seconds` (from the start to the moment the
  slot could start its next trial: with scoring beside the next trial, when the candidate was
  frozen and killed; records before it: `wall_seconds`, build, train, score, clean up).
- **share** = steps / slot: the share of the slot's wall time spent in training steps.

Rows are grouped by the compile cache the trial started with (the record's `compile_cache`:
`start` cold or warm; "unknown" for records without it). For each group and for all: the
median of each figure and the pooled share (sum of steps / sum of slot seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIGURES = ("startup", "setup", "fallback", "first", "steps", "train", "score", "build", "slot",
           "share")
DEVICE_LINE = re.compile(r"^device: .*\bleft: ([\d.]+)s\s*$", re.M)
FALLBACK_LINE = re.compile(r"^fallback saved: .*\bleft ([\d.]+)s\s*$", re.M)


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def cache_state(rec: Mapping[str, Any]) -> str:
    """cold | warm | unknown: how the trial's compile cache started (the record's
    `compile_cache`, a dict with `start`; older records have none)."""
    cache = rec.get("compile_cache")
    if isinstance(cache, Mapping) and cache.get("start") in ("cold", "warm"):
        return str(cache["start"])
    return "unknown"


def startup_parts(rec: Mapping[str, Any], startup: float | None) -> dict[str, float | None]:
    """setup, fallback and first step (the module's docstring) from the record's log tail."""
    budget, log = _num(rec.get("budget")), rec.get("log_tail")
    parts: dict[str, float | None] = {"setup": None, "fallback": None, "first": None}
    device = DEVICE_LINE.search(log) if isinstance(log, str) else None
    fallback = FALLBACK_LINE.search(log) if isinstance(log, str) else None
    if budget is None or device is None:
        return parts
    parts["setup"] = budget - float(device.group(1))
    if fallback is not None:
        parts["fallback"] = float(device.group(1)) - float(fallback.group(1))
        if startup is not None:
            parts["first"] = startup - (budget - float(fallback.group(1)))
    return parts


def trial_figures(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One trial's figures (the module's docstring); None where the record lacks them."""
    summary = rec.get("summary") if isinstance(rec.get("summary"), Mapping) else {}
    phases = rec.get("phases") if isinstance(rec.get("phases"), Mapping) else {}
    assert isinstance(summary, Mapping) and isinstance(phases, Mapping)
    startup = _num(rec.get("reported_startup_seconds"))
    if startup is None:
        startup = _num(summary.get("startup_seconds"))
    steps = _num(rec.get("reported_training_seconds"))
    if steps is None:
        steps = _num(summary.get("training_seconds"))
    slot = _num(rec.get("slot_seconds")) or _num(rec.get("wall_seconds"))
    return {"number": rec.get("number"), "role": rec.get("role") or "candidate",
            "status": rec.get("trial_status") or rec.get("status"), "cache": cache_state(rec),
            "stopped": bool(rec.get("stopped_at_deadline")),
            "budget": _num(rec.get("budget")), "startup": startup,
            **startup_parts(rec, startup), "steps": steps,
            "train": _num(phases.get("train")), "score": _num(phases.get("score")),
            "build": _num(phases.get("build")), "slot": slot,
            "share": steps / slot if steps is not None and slot else None}


def trials(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The figures of every record that ran a trial (proposals that never ran are left out)."""
    return [trial_figures(r) for r in records if _num(r.get("wall_seconds")) is not None
            and isinstance(r.get("phases"), Mapping) and "train" in r["phases"]]


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """group (cold, warm, unknown, all) -> n, the median of each figure, the pooled share."""
    out: dict[str, dict[str, Any]] = {}
    groups = {g: [r for r in rows if r["cache"] == g] for g in ("cold", "warm", "unknown")}
    groups["all"] = rows
    for name, group in groups.items():
        if not group:
            continue
        entry: dict[str, Any] = {"n": len(group)}
        for key in FIGURES:
            values = [r[key] for r in group if r[key] is not None]
            entry[f"median_{key}"] = statistics.median(values) if values else None
        both = [r for r in group if r["steps"] is not None and r["slot"]]
        slot = sum(r["slot"] for r in both)
        entry["pooled_share"] = sum(r["steps"] for r in both) / slot if slot else None
        out[name] = entry
    return out


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a run folder or an experiments.jsonl (through the runner's own reader)."""
    from runner.record import read
    path = Path(path)
    return [dict(r) for r in read(path / "experiments.jsonl" if path.is_dir() else path)]


def _f(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def markdown(rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]], title: str = "") -> str:
    lines = [f"Slot time of {title}:" if title else "Slot time:", "",
             "| # | role | status | cache | start-up s | setup / fallback / first step s | steps s "
             "| train s | score s | slot s | steps / slot |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['number']} | {r['role']} | {r['status']} | {r['cache']} | "
                     f"{_f(r['startup'])} | {_f(r['setup'])} / {_f(r['fallback'])} / "
                     f"{_f(r['first'])} | {_f(r['steps'])} | {_f(r['train'])} | {_f(r['score'])} | "
                     f"{_f(r['slot'])} | {_pct(r['share'])} |")
    lines += ["", "| cache | trials | start-up s (median) | score s (median) | slot s (median) "
              "| steps / slot (median) | steps / slot (pooled) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, g in groups.items():
        lines.append(f"| {name} | {g['n']} | {_f(g['median_startup'])} | {_f(g['median_score'])} | "
                     f"{_f(g['median_slot'])} | {_pct(g['median_share'])} | {_pct(g['pooled_share'])} |")
    lines += ["", "steps: the candidate's reported training window; slot: the seconds until "
              "its slot could start the next trial (scored beside the next trial: until it was "
              "frozen and killed; scored alone: build, train, score, clean-up); start-up: "
              "train.py's start to the end of its first step, as it reports it."]
    blind = [r for r in rows if r["stopped"] and r["steps"] is None]
    if blind:
        lines += ["", f"Note: {len(blind)} of {len(rows)} trials were stopped at the deadline "
                  "before train.py printed its summary (no steps, no start-up figure): they were "
                  "scored on an earlier export, often the early fallback one. A budget that small "
                  "measures start-up, not training: raise it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", help="a run folder (runs/<tag>) or its experiments.jsonl")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.run is None:             # run bare: say what it needs
        print("slot_share: skipped: give a run folder (runs/<tag>)")
        return
    rows = trials(load(args.run))
    groups = summarise(rows)
    if args.json:
        print(json.dumps({"trials": rows, "groups": groups}))
    else:
        print(markdown(rows, groups, str(args.run)))


if __name__ == "__main__":
    main()
