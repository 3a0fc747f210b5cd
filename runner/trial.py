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


def default_limits(gpu: str | None = None, slots: int = 1) -> Limits:
    """Limits that fit this machine: no more RAM or cores than it has, split over `slots`
    trials running at once (CPU slots)."""
    cores = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 16 * 2**30
    base = Limits()
    return replace(base, cpus=float(min(base.cpus, max(cores / slots, 0.5))),
                   memory_bytes=min(base.memory_bytes, int(ram * 0.75 / slots)),
                   score_memory_bytes=min(base.score_memory_bytes, int(ram * 0.5 / slots)))


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
        "eval_tokens": spec.eval_tokens,
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
    record_fields.setdefault("gpu", outcome.gpu)
    return make_record(spec, outcome, backend, started, time.perf_counter() - t0, **record_fields)


# ------------------------------------------------------------------------------------------
# Reproduction: rerun a recorded image with the recorded seed, budget and data
# ------------------------------------------------------------------------------------------

def find_record(ref: str, runs_dir: Path) -> dict[str, Any]:
    """The record whose id (`<run>-<n>`) or image tag is `ref`, from any run's ledger."""
    import json
    for ledger in sorted(runs_dir.glob("*/experiments.jsonl")):
        for line in ledger.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if ref in (record.get("id"), record.get("image_tag")):
                return record
    raise LookupError(f"no experiment {ref!r} in {runs_dir}/*/experiments.jsonl "
                      "(give an experiment id like mytag-3 or an image tag)")


def reproduce(ref: str, runs_dir: Path, data_dir: Path, gpu: str | None = None,
              limits: Limits | None = None, log: Log = lambda _: None) -> tuple[dict, dict]:
    """Rerun the recorded image; returns (recorded record, new record). Refuses (raises
    InfrastructureError) when the data, the scorer or the base image differ from the recording."""
    import tempfile

    from runner.sandbox import InfrastructureError
    from runner.sandbox import images

    record = find_record(ref, runs_dir)
    if not record.get("image_tag"):
        raise InfrastructureError(f"{ref} has no image (it never trained): nothing to rerun")
    cli = images.client()
    try:
        image = cli.images.get(record["image_tag"])
    except Exception:
        raise InfrastructureError(f"image {record['image_tag']} is not in the Docker engine "
                                  "(pruned?): it cannot be rerun") from None
    labels = image.labels or {}
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise InfrastructureError(f"no prepared data in {data_dir}: run `autoresearch prepare`")
    now = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if now != record.get("data_manifest_sha256"):
        raise InfrastructureError(
            f"the data differ from the recording: manifest {now[:12]} in {data_dir}, recorded "
            f"{str(record.get('data_manifest_sha256'))[:12]}; prepare the same data set (same "
            "--dataset and --vocab-size) or pass its --data-dir")
    prepare_now = hashlib.sha256(PREPARE_PY.read_bytes()).hexdigest()
    if prepare_now != record.get("prepare_sha256"):
        raise InfrastructureError("prepare.py (the scorer) differs from the recording: "
                                  f"{prepare_now[:12]} now, {str(record.get('prepare_sha256'))[:12]} "
                                  "recorded; check out the commit the run used")
    base = images.default_base_tag()
    base_id = cli.images.get(base).id if images.base_exists(base, cli) else None
    if labels.get("autoresearch.base") != base_id:
        raise InfrastructureError(
            f"the base image differs from the recording: {base} is {str(base_id)[:19]}, the "
            f"experiment was built on {labels.get('autoresearch.base', '?')[:19]}")
    with tempfile.TemporaryDirectory() as tmp:
        # The exact train.py the image holds (for the record's hash): read out of the image.
        holder = cli.containers.create(record["image_tag"], ["true"], network_mode="none")
        try:
            from runner.sandbox.docker_backend import copy_out
            train_py = Path(tmp) / "train.py"
            if not copy_out(holder, "/app/train.py", train_py, 1 << 20):
                raise InfrastructureError(f"{record['image_tag']} holds no /app/train.py")
        finally:
            holder.remove(force=True)
        spec = TrialSpec(train_py=train_py, data_dir=data_dir,
                         budget=int(labels.get("autoresearch.budget", record.get("budget", 300))),
                         seed=int(labels.get("autoresearch.seed", record.get("seed", 0))),
                         run=f"reproduce-{record.get('run', 'x')}", number=int(record.get("number", 0)),
                         gpu=gpu, limits=limits or default_limits(gpu), image=record["image_tag"],
                         eval_tokens=record.get("eval_tokens"), base_image=base)
        new = run_trial(spec, "docker", log=log, description=f"reproduce {record['id']}",
                        commit=record.get("commit"), parent=record.get("parent"))
    return record, new
