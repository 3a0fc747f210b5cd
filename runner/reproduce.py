"""Reproduction: rerun a recorded experiment image with the recorded seed, budget and data,
and refuse when the data, the scorer or the base image differ from the recording.

Docker only: the image is the experiment (the process backend builds none). A record made on
a cluster node names an image in that node's engine, so run it there.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from runner import record
from runner.paths import DEFAULT_BUDGET, PREPARE_PY
from runner.record import Record
from runner.sandbox import InfrastructureError, Limits, LimitRequest, Log, TrialSpec, images
from runner.sandbox.docker_backend import copy_out
from runner.trial import run_trial


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_inputs(rec: Record, data_dir: Path) -> None:
    """Refuse (InfrastructureError) when the data or the scorer differ from the recording."""
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise InfrastructureError(f"no prepared data in {data_dir}: run `autoresearch prepare`")
    now = _sha256(manifest)
    if now != rec.get("data_manifest_sha256"):
        raise InfrastructureError(
            f"the data differ from the recording: manifest {now[:12]} in {data_dir}, recorded "
            f"{str(rec.get('data_manifest_sha256'))[:12]}; prepare the same data set (same "
            "--dataset and --vocab-size) or pass its --data-dir")
    prepare_now = _sha256(PREPARE_PY)
    if prepare_now != rec.get("prepare_sha256"):
        raise InfrastructureError("prepare.py (the scorer) differs from the recording: "
                                  f"{prepare_now[:12]} now, {str(rec.get('prepare_sha256'))[:12]} "
                                  "recorded; check out the commit the run used")


def reproduce(ref: str, runs_dir: Path, data_dir: Path, gpu: str | None = None,
              limits: Limits | LimitRequest | None = None, log: Log = lambda _: None
              ) -> tuple[Record, Record]:
    """Rerun the recorded image; returns (recorded record, new record). Refuses (raises
    InfrastructureError) when the data, the scorer or the base image differ from the recording."""
    rec = record.find(ref, runs_dir)
    tag = rec.get("image_tag")
    if not tag:
        raise InfrastructureError(f"{ref} has no image (it never trained): nothing to rerun")
    cli = images.client()
    try:
        image = cli.images.get(tag)
    except Exception:
        raise InfrastructureError(f"image {tag} is not in the Docker engine "
                                  "(pruned?): it cannot be rerun") from None
    labels = image.labels or {}
    check_same_inputs(rec, data_dir)
    base = images.default_base_tag()
    base_id = cli.images.get(base).id if images.base_exists(base, cli) else None
    if labels.get("autoresearch.base") != base_id:
        raise InfrastructureError(
            f"the base image differs from the recording: {base} is {str(base_id)[:19]}, the "
            f"experiment was built on {labels.get('autoresearch.base', '?')[:19]}")
    with tempfile.TemporaryDirectory() as tmp:
        # The exact train.py the image holds (for the record's hash): read out of the image.
        holder = cli.containers.create(tag, ["true"], network_mode="none")
        try:
            train_py = Path(tmp) / "train.py"
            if not copy_out(holder, "/app/train.py", train_py, 1 << 20):
                raise InfrastructureError(f"{tag} holds no /app/train.py")
        finally:
            holder.remove(force=True)
        spec = TrialSpec(train_py=train_py, data_dir=data_dir,
                         budget=int(labels.get("autoresearch.budget", rec.get("budget", DEFAULT_BUDGET))),
                         seed=int(labels.get("autoresearch.seed", rec.get("seed", 0))),
                         run=f"reproduce-{rec.get('run', 'x')}", number=int(rec.get("number", 0)),
                         gpu=gpu, limits=limits or LimitRequest(), image=tag,
                         eval_tokens=rec.get("eval_tokens"), base_image=base)
        new = run_trial(spec, "docker", log=log, description=f"reproduce {rec.get('id')}",
                        commit=rec.get("commit"), parent=rec.get("parent"))
    return rec, new
