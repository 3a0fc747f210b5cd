"""`autoresearch trial` on the docker backend: the record, clear infrastructure errors, and no
container left behind after success, Ctrl-C or a runner that died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, TRAIN_BUDGET, docker_engine_missing, wait_for_training

docker = pytest.importorskip("docker")

from runner.sandbox import InfrastructureError, TrialSpec  # noqa: E402
from runner.sandbox import docker_backend, images  # noqa: E402
from runner.trial import run_trial  # noqa: E402


pytestmark = pytest.mark.skipif(docker_engine_missing() is not None,
                                reason=str(docker_engine_missing()))

RUN = f"trialtest{uuid.uuid4().hex[:6]}"   # unique: suites may share an engine


def leftovers() -> list:
    cli = docker.from_env()
    return (cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"})
            + cli.volumes.list(filters={"label": f"autoresearch.run={RUN}"}))


@pytest.fixture(scope="module", autouse=True)
def remove_test_images():
    yield
    cli = docker.from_env()
    for image in cli.images.list(filters={"reference": f"autoresearch/exp:{RUN}-*"}):
        cli.images.remove(image.id, force=True)


def autoresearch(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_trial_cli_prints_one_json_record(small_data: Path, tmp_path: Path):
    proc = autoresearch("trial", str(REPO / "target" / "train.py"), "--budget", str(TRAIN_BUDGET),
                        "--data-dir", str(small_data), "--eval-tokens", "4096", "--memory", "2",
                        "--cpus", "1", "--artifact-dir", str(tmp_path / "art"), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["status"] == "ok", record
    assert record["val_bpb"] < record["score"]["uniform_bpb"]
    assert record["image_tag"].startswith("autoresearch/exp:trial-0-")
    assert {"build", "train", "score"} <= set(record["phases"])
    # The runner's clock: train.py plans to be done, model saved, before the deadline.
    assert 0 < record["training_seconds"] <= TRAIN_BUDGET + 1
    assert record["reported_training_seconds"] > 0               # what train.py says it trained
    assert record["memory_gb"] and record["memory_gb"] > 0
    assert (tmp_path / "art" / "model.pt2").is_file()
    labels = docker.from_env().images.get(record["image_tag"]).labels
    assert labels["autoresearch.budget"] == str(TRAIN_BUDGET) and labels["autoresearch.seed"] == "0"
    assert labels["autoresearch.data_manifest_sha256"] == record["data_manifest_sha256"]
    assert labels["autoresearch.prepare_sha256"] == record["prepare_sha256"]
    docker.from_env().images.remove(record["image_tag"], force=True)
    assert not docker.from_env().containers.list(all=True, filters={"label": "autoresearch.run=trial"})


def test_trial_cli_infrastructure_errors(tmp_path: Path):
    train = str(REPO / "target" / "train.py")
    proc = autoresearch("trial", train, "--data-dir", str(tmp_path / "nothing"), "--budget", "1")
    assert proc.returncode != 0 and "autoresearch prepare" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = autoresearch("trial", train, "--budget", "1", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert proc.returncode != 0 and "dockerd" in proc.stderr and "Traceback" not in proc.stderr
    proc = autoresearch("trial", str(tmp_path / "missing.py"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_missing_base_image_says_how_to_build_it(small_data: Path):
    spec = TrialSpec(train_py=REPO / "target" / "train.py", data_dir=small_data, budget=1,
                     run=RUN, base_image="autoresearch/base:missing-000000000000")
    with pytest.raises(InfrastructureError, match="autoresearch images build"):
        run_trial(spec, "docker")


SLOW_TRAIN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("started", flush=True)
while True:
    time.sleep(1)
"""


def test_ctrl_c_removes_every_container(small_data: Path, tmp_path: Path):
    train = tmp_path / "train.py"
    train.write_text(SLOW_TRAIN)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from pathlib import Path\n"
            "from runner.sandbox import Limits, TrialSpec\n"
            "from runner.trial import run_trial\n"
            f"spec = TrialSpec(train_py=Path({str(train)!r}), data_dir=Path({str(small_data)!r}), "
            f"budget=60, run={RUN!r}, limits=Limits(memory_bytes=2**30, cpus=1.0))\n"
            "run_trial(spec, 'docker')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    if not wait_for_training(RUN):
        proc.kill()
        pytest.fail("the training container never started")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert leftovers() == []


def test_orphans_of_a_dead_runner_are_removed():
    cli = docker.from_env()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    owner = f"{docker_backend.socket.gethostname()}:{dead}"
    labels = {docker_backend.LABEL_RUN: RUN, docker_backend.LABEL_OWNER: owner}
    c = cli.containers.create(images.default_base_tag(), ["sleep", "60"], labels=labels,
                              network_mode="none")
    v = cli.volumes.create(labels=labels)
    alive = cli.containers.create(images.default_base_tag(), ["sleep", "60"], network_mode="none",
                                  labels={docker_backend.LABEL_RUN: RUN,
                                          docker_backend.LABEL_OWNER: docker_backend.OWNER})
    try:
        assert docker_backend.remove_orphans(cli) >= 2
        names = [x.id for x in cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"})]
        assert c.id not in names and alive.id in names
        assert v.name not in [x.name for x in cli.volumes.list()]
    finally:
        alive.remove(force=True)


def test_teardown_removes_what_the_runner_never_got_a_handle_on():
    """A trial's teardown removes its own containers and volumes, including ones the engine
    made under the trial's label that the runner holds no handle of (a create whose answer was
    lost), and a volume that a running container of the trial still mounts; another trial's
    are left alone."""
    cli = docker.from_env()
    B = docker_backend

    def labels(trial: str) -> dict[str, str]:
        return {B.LABEL_RUN: RUN, B.LABEL_OWNER: B.OWNER, B.LABEL_TRIAL: trial}

    known = cli.volumes.create(labels=labels("t1"))
    unknown = cli.volumes.create(labels=labels("t1"))
    other = cli.volumes.create(labels=labels("t2"))
    user = cli.containers.run(images.default_base_tag(), ["sleep", "60"], detach=True,
                              network_mode="none", labels=labels("t1"),
                              volumes={unknown.name: {"bind": "/v", "mode": "rw"}})
    lost = cli.containers.create(images.default_base_tag(), ["sleep", "60"], network_mode="none",
                                 labels=labels("t1"))
    said: list[str] = []
    try:
        B.teardown(cli, "t1", [], [known], said.append, wait_s=10)
        left = {v.name for v in cli.volumes.list(filters={"label": f"{B.LABEL_RUN}={RUN}"})}
        assert known.name not in left and unknown.name not in left and other.name in left
        ids = {c.id for c in cli.containers.list(all=True, filters={"label": f"{B.LABEL_RUN}={RUN}"})}
        assert user.id not in ids and lost.id not in ids
        assert said == []
    finally:
        other.remove(force=True)


def test_teardown_of_a_volume_held_from_outside_the_trial_gives_up_in_time_and_says_so():
    """A volume of the trial that something outside the trial keeps mounted (no trial label:
    teardown must not remove that container) cannot be removed: teardown neither raises nor
    waits past its bound, logs the volume, and leaves the outside container alone."""
    import time

    cli = docker.from_env()
    B = docker_backend
    held = cli.volumes.create(labels={B.LABEL_RUN: RUN, B.LABEL_OWNER: B.OWNER, B.LABEL_TRIAL: "t3"})
    outside = cli.containers.run(images.default_base_tag(), ["sleep", "60"], detach=True,
                                 network_mode="none", labels={B.LABEL_RUN: RUN},
                                 volumes={held.name: {"bind": "/v", "mode": "rw"}})
    said: list[str] = []
    try:
        t0 = time.monotonic()
        B.teardown(cli, "t3", [], [held], said.append, wait_s=2)
        assert time.monotonic() - t0 < 2 + 5                 # its bound, and one engine call
        assert len(said) == 1 and held.name in said[0] and "still held" in said[0]
        outside.reload()
        assert outside.status == "running"
    finally:
        outside.remove(force=True)
        held.remove(force=True)
