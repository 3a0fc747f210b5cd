"""One trial: build, train and score one train.py, and turn what happened into a record.

This is the unit that `autoresearch trial`, the tests, the benchmarks, the overnight loop and
`reproduce` all use. The record is DESIGN.md's contract (one JSON object per experiment).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runner.paths import PREPARE_PY
from runner.sandbox import Limits, Log, Outcome, TrialSpec, get_backend

RECORD_VERSION = 1


def default_limits(gpu: str | None = None) -> Limits:
    """Limits that fit this machine: no more RAM or cores than it has."""
    cores = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 16 * 2**30
    base = Limits()
    return replace(base, cpus=float(min(base.cpus, cores)),
                   memory_bytes=min(base.memory_bytes, int(ram * 0.75)),
                   score_memory_bytes=min(base.score_memory_bytes, int(ram * 0.5)))


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def make_record(spec: TrialSpec, outcome: Outcome, backend: str, started: float, wall: float,
                description: str = "", commit: str | None = None, parent: str | None = None,
                llm: dict[str, Any] | None = None, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    phases = {k: round(v, 3) for k, v in outcome.phases.items()}
    peak = outcome.peak_memory_bytes
    reported = _float(outcome.summary.get("peak_memory_mb"))
    return {
        "version": RECORD_VERSION,
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
        "memory_gb": round(peak / 2**30, 3) if peak else None,        # measured by the host
        "reported_memory_gb": round(reported / 1024, 3) if reported else None,  # by train.py
        "training_seconds": _float(outcome.summary.get("training_seconds")),
        "phases": phases,
        "wall_seconds": round(wall, 3),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "budget": spec.budget,
        "seed": spec.seed,
        "gpu": gpu or {},
        "llm": llm or {"model": None, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
        "train_sha256": hashlib.sha256(Path(spec.train_py).read_bytes()).hexdigest(),
        "prepare_sha256": hashlib.sha256(PREPARE_PY.read_bytes()).hexdigest(),
        "data_manifest_sha256": hashlib.sha256((spec.data_dir / "manifest.json").read_bytes()).hexdigest(),
        "exit_code": outcome.exit_code,
        "score": outcome.score,
        "summary": outcome.summary,
        "log_tail": outcome.log_tail,
    }


def run_trial(spec: TrialSpec, backend: str = "docker", log: Log = lambda _: None,
              **record_fields: Any) -> dict[str, Any]:
    """Run one trial on `backend` and return its record. Raises InfrastructureError (and the
    image errors) when the trial could not run at all; a candidate's failure is a record."""
    run = get_backend(backend)
    started = time.time()
    t0 = time.perf_counter()
    outcome = run(spec, log)
    return make_record(spec, outcome, backend, started, time.perf_counter() - t0, **record_fields)
