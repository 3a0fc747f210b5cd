"""The experiment record: one JSON object per experiment, the contract between the trial, the
loop, the ledger, the reports and `reproduce`.

Everything about it lives here: its fields (`Record`), the statuses and what they mean, how a
trial's outcome becomes a record (`from_outcome`, `failed_proposal`, and `decided` for the
loop's verdict), and the one reader of `experiments.jsonl` files, which
repairs what a crash can leave and upgrades records written by older versions.

Statuses. A trial ends ``ok`` (scored) or in one of `FAILED`; the loop then turns ``ok`` into
``keep`` or ``discard`` and keeps the trial's own status in ``trial_status``.
"""

from __future__ import annotations

import math

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from runner.paths import PREPARE_PY
from runner.sandbox import Outcome, TrialSpec, reported_numbers

VERSION = 5                        # 2: `limits` (as resolved where the trial ran); 3: the
                                   # runner's `training_seconds` (train.py's is `reported_...`);
                                   # 4: `compile_cache` (older records: not known); 5: `scoring`,
                                   # `slot_seconds` (older: scored alone, slot = wall)

OK = "ok"
KEEP, DISCARD = "keep", "discard"
BROKE = ("crash", "timeout", "oom")            # the candidate ran and broke
FAILED = BROKE + ("invalid",)                  # ...or was refused (bad proposal, bad model)
TRIAL_STATUSES = (OK,) + FAILED
STATUSES = (KEEP, DISCARD) + FAILED            # what a record in the ledger says
STATUS_STYLE = {KEEP: "bold green", DISCARD: "dim", **{s: "bold red" for s in FAILED}}
ROLES = ("baseline", "noise", "candidate")
NO_LLM = {"model": None, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}


class Record(TypedDict, total=False):
    """The fields of a record. The trial writes the first block; the loop adds the second."""

    version: int
    id: str                          # <run>-<number>
    run: str
    number: int
    parent: str | None               # the commit it was proposed on
    commit: str | None               # its own commit (after a keep: the one on the branch)
    image_tag: str | None
    image_id: str | None
    description: str
    status: str                      # one of STATUSES (or "ok" straight from a trial)
    reason: str
    val_bpb: float | None
    memory_gb: float | None          # measured by the host
    reported_memory_gb: float | None  # what train.py says
    training_seconds: float | None   # the runner's clock: the candidate's wall time
    reported_training_seconds: float | None  # what train.py says
    reported_startup_seconds: float | None   # train.py: its start to its first step's end
    stopped_at_deadline: bool        # frozen and killed when the budget ran out
    phases: dict[str, float]         # wall seconds: propose, build, train, score, ...
    wall_seconds: float
    slot_seconds: float              # wall seconds it held its slot (shared: to the hand-on,
                                     # plus a rescoring alone; else its wall seconds)
    scoring: str                     # not scored | alone | shared | rescored alone (...) (Lane)
    started_at: str
    backend: str
    budget: int
    seed: int
    limits: dict[str, Any]           # as resolved on the machine that ran it
    gpu: dict[str, Any]              # NVML summary of the train phase
    compile_cache: dict[str, Any] | None   # start cold/warm, bytes in and out (None: no cache)
    llm: dict[str, Any]              # model, tokens, cost, propose_seconds
    train_sha256: str
    prepare_sha256: str
    data_manifest_sha256: str
    eval_tokens: int | None
    exit_code: int | None
    score: dict[str, Any]            # the scorer's known fields
    summary: dict[str, str]          # train.py's own summary, escaped: informative only
    log_tail: str                    # candidate output, escaped: UNTRUSTED
    cluster: dict[str, Any]          # where a Ray trial ran
    # added by the loop
    trial_status: str
    role: str                        # one of ROLES
    decision: str                    # the rule that decided
    delta: float | None              # val_bpb minus the best before it
    best_before: int
    candidate_commit: str
    confirm: dict[str, Any]          # the confirming rerun (threshold rule)
    runs: list[dict[str, Any]]       # every run of a candidate: seed, status, val_bpb, seconds
    mean_bpb: float                  # the mean of its runs (its score under the sequential rule)
    test: dict[str, Any]             # the keep rule's figures (runner.decide)
    same_seed: bool                  # a noise run repeating the first seed


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def now_iso(when: float | None = None) -> str:
    stamp = datetime.now(timezone.utc) if when is None else datetime.fromtimestamp(when, timezone.utc)
    return stamp.isoformat(timespec="seconds")


def from_outcome(spec: TrialSpec, outcome: Outcome, backend: str, started: float, wall: float,
                 description: str = "", commit: str | None = None, parent: str | None = None,
                 llm: dict[str, Any] | None = None, gpu: dict[str, Any] | None = None) -> Record:
    """The record of one trial, from what the backend found."""
    from dataclasses import asdict, is_dataclass

    peak = outcome.peak_memory_bytes
    reported = _float(outcome.summary.get("peak_memory_mb"))
    said = reported_numbers(outcome.summary)
    return {
        "version": VERSION,
        "id": f"{spec.run}-{spec.number}",
        "run": spec.run,
        "number": spec.number,
        "parent": parent,
        "commit": commit,
        "image_tag": outcome.image_tag,
        "image_id": outcome.image_id,
        "description": description,
        "status": outcome.status,
        "reason": outcome.reason,
        "val_bpb": outcome.val_bpb,
        "memory_gb": round(peak / 2**30, 3) if peak else None,
        "reported_memory_gb": round(reported / 1024, 3) if reported else None,
        "training_seconds": (round(outcome.training_seconds, 3)
                             if outcome.training_seconds is not None else None),
        "reported_training_seconds": said["training_seconds"],
        "reported_startup_seconds": said["startup_seconds"],
        "stopped_at_deadline": outcome.stopped_at_deadline,
        "phases": {k: round(v, 3) for k, v in outcome.phases.items()},
        "wall_seconds": round(wall, 3),
        "slot_seconds": (round(outcome.slot_seconds, 3) if outcome.slot_seconds is not None
                         else round(wall, 3)),
        "scoring": outcome.scoring,
        "started_at": now_iso(started),
        "backend": backend,
        "budget": spec.budget,
        "seed": spec.seed,
        "limits": asdict(spec.limits) if is_dataclass(spec.limits) else {},
        "gpu": gpu if gpu is not None else outcome.gpu,
        "compile_cache": outcome.compile_cache or None,
        "llm": llm or dict(NO_LLM),
        "train_sha256": _sha256(spec.train_py),
        "prepare_sha256": _sha256(PREPARE_PY),
        "data_manifest_sha256": _sha256(spec.data_dir / "manifest.json"),
        "eval_tokens": spec.eval_tokens,
        "exit_code": outcome.exit_code,
        "score": outcome.score,
        "summary": outcome.summary,
        "log_tail": outcome.log_tail,
    }


def failed_proposal(run: str, number: int, parent: str | None, description: str, error: str,
                    llm: dict[str, Any] | None) -> Record:
    """The record of a proposal that never became a candidate (nothing was trained)."""
    return {"version": VERSION, "id": f"{run}-{number}", "run": run, "number": number,
            "parent": parent, "commit": None, "status": "invalid", "reason": error,
            "description": description, "val_bpb": None, "memory_gb": None,
            "llm": llm or dict(NO_LLM),
            "phases": {"propose": float((llm or {}).get("propose_seconds") or 0.0)},
            "started_at": now_iso(), "trial_status": "invalid", "role": "candidate",
            "decision": "no valid proposal"}


def decided(rec: Record, role: str, status: str, decision: str | None, **fields: Any) -> Record:
    """A trial's record with the loop's verdict: its role, the status the loop gave it (the
    trial's own stays in `trial_status`), the rule that decided, and what else the loop knows
    (`delta`, `best_before`, `confirm`, ...). A new record: the trial's is left as it was."""
    verdict: dict[str, Any] = {"trial_status": rec["status"], "role": role, "status": status}
    if decision is not None:
        verdict["decision"] = decision
    return {**rec, **verdict, **fields}  # type: ignore[typeddict-item]


def upgrade(rec: dict[str, Any]) -> Record:
    """A record as this version writes it, from one of any earlier version: the keys the
    runner reads by name are there (None where nothing was known)."""
    out: dict[str, Any] = dict(rec)
    if "number" not in out and isinstance(out.get("id"), str):
        tail = out["id"].rpartition("-")[2]
        if tail.isdigit():
            out["number"] = int(tail)
    if "id" not in out and "run" in out and "number" in out:
        out["id"] = f"{out['run']}-{out['number']}"
    for key in ("parent", "commit", "image_tag", "val_bpb", "memory_gb"):
        out.setdefault(key, None)
    out.setdefault("description", "")
    out.setdefault("reason", "")
    out.setdefault("phases", {})
    out.setdefault("llm", dict(NO_LLM))
    out.setdefault("trial_status", out.get("status"))
    if out.get("version", 1) < 3 and "reported_training_seconds" not in out:
        # before version 3 `training_seconds` was train.py's own figure, not the runner's
        out["reported_training_seconds"] = out.pop("training_seconds", None)
        out["training_seconds"] = None
    if "role" not in out:           # version 1 before slots: only the decision said so
        out["role"] = "baseline" if out.get("decision") == "baseline" else "candidate"
    out["version"] = VERSION
    return out  # type: ignore[return-value]


def read(path: Path, repair: bool = False) -> list[Record]:
    """The records of one `experiments.jsonl`, upgraded, in file order.

    A last line without its newline is a write cut short (`kill -9`): it is left out, and with
    `repair` the file is truncated back to the last whole record so the next append starts
    clean. A line that is not a JSON object is skipped when reading; with `repair` (the
    ledger is about to be appended to) it raises ValueError naming the line: a damaged
    ledger must be looked at by a person, not written past."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    if repair and len(whole) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
            f.flush()
            os.fsync(f.fileno())
    records = []
    for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if repair:
                raise ValueError(f"{path}:{n} is not a JSON record ({e}); the ledger is "
                                 "damaged: fix or move that line") from None
            continue
        records.append(upgrade(rec))
    return records


def find(ref: str, runs_dir: Path) -> Record:
    """The record whose id (`<run>-<n>`) or image tag is `ref`, from any run's ledger."""
    for ledger in sorted(Path(runs_dir).glob("*/experiments.jsonl")):
        for record in read(ledger):
            if ref in (record.get("id"), record.get("image_tag")):
                return record
    raise LookupError(f"no experiment {ref!r} in {runs_dir}/*/experiments.jsonl "
                      "(give an experiment id like mytag-3 or an image tag)")


def finite_number(value: Any) -> float | None:
    """A field as a finite float (numbers or numeric strings; not bools), else None: records
    from old or hand-edited ledgers must not break what reads them."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None
