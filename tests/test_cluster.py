"""Trials as Ray tasks, against a real Ray head that this module starts on loopback.

The head runs in its own session (``start_new_session``), with its own temp dir and ports, so
that teardown stops exactly the processes it started (by session id) and nothing else on the
machine: ``ray stop --force`` would also kill any other Ray of this user (a developer's
cluster, another test run). Teardown checks that no process of that session is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, TRAIN_BUDGET, docker_engine_missing, small_limits

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]'")
docker = pytest.importorskip("docker")

from runner import cluster  # noqa: E402
from runner.sandbox import (InfrastructureError, LimitRequest, Machine, TrialSpec,  # noqa: E402
                            default_limits)
from runner.sandbox.limits import MEMORY_ENV  # noqa: E402
from runner.sandbox import docker_backend, images  # noqa: E402


pytestmark = pytest.mark.skipif(docker_engine_missing() is not None,
                                reason=str(docker_engine_missing()))

RUN = "raytest"
TRAIN_PY = REPO / "target" / "train.py"
RAY_BIN = Path(sys.executable).with_name("ray")
SMALL = small_limits()
# Ray resolves 127.0.0.1 to the machine's outward address unless told not to; with this the
# head, its GCS and every agent bind to loopback only (this head has no authentication).
LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# The node's size as its trials see it (Machine.here() there): not this machine's, which the
# submitting test process sees without the variable.
NODE_MEMORY_GB = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()          # after "(comm)": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_session(sid: int, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of our head's session, by pid. Returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_pids(sid)


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1: 2 CPUs, no GPU, GCS and Ray Client ports of its own."""
    temp = tempfile.mkdtemp(prefix="ar-ray-")             # short: Ray's socket paths are limited
    ports = {"gcs": free_port(), "client": free_port()}
    cmd = [str(RAY_BIN), "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--port={ports['gcs']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--temp-dir={temp}"]
    log = open(Path(temp) / "ray-start.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **LOOPBACK_ENV, MEMORY_ENV: str(NODE_MEMORY_GB)})
    try:
        rc = proc.wait(timeout=90)
        up = rc == 0 and wait_port(ports["client"], 30)
        started_s = time.perf_counter() - t0
        if not up:
            log.flush()
            pytest.fail(f"ray start failed (rc {rc}):\n{(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
        print(f"\n[ray head up in {started_s:.2f} s]")
        yield {**ports, "sid": proc.pid, "started_s": started_s}
    finally:
        cluster.disconnect()
        if proc.poll() is None:
            proc.kill()
        left = stop_session(proc.pid, grace_s=2)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def client(head):
    address = f"ray://127.0.0.1:{head['client']}"
    t0 = time.perf_counter()
    cluster.connect(address, log=print)
    print(f"[connected in {time.perf_counter() - t0:.2f} s]")
    yield address
    cluster.disconnect()


@pytest.fixture(scope="module", autouse=True)
def remove_test_images():
    """Torn down last (after the head is stopped): leaves no image, container or volume of
    this module, and fails if a trial left a container or volume behind."""
    yield
    cli = docker.from_env()
    mine = {"label": f"autoresearch.run={RUN}"}
    left = cli.containers.list(all=True, filters=mine) + cli.volumes.list(filters=mine)
    for container in cli.containers.list(all=True, filters=mine):
        container.remove(force=True)
    for volume in cli.volumes.list(filters=mine):
        volume.remove(force=True)
    for image in cli.images.list(filters={"reference": f"autoresearch/exp:{RUN}-*"}):
        cli.images.remove(image.id, force=True)
    assert not left, f"left behind: {left}"


def spec_for(data: Path, number: int, **kw) -> TrialSpec:
    return TrialSpec(train_py=TRAIN_PY, data_dir=data, budget=TRAIN_BUDGET, run=RUN, number=number,
                     eval_tokens=4096, limits=SMALL, **kw)


def get_one(ref, timeout: float = 240):
    finished, pending = cluster.wait_any([ref], timeout=timeout)
    assert finished and not pending, "the trial did not finish in time"
    return finished[0][1]


def test_trial_runs_as_a_ray_task_and_builds_the_same_image(client, small_data: Path):
    spec = spec_for(small_data, 1)
    ref = cluster.submit_trial(spec, "docker", {"description": "via ray"}, num_gpus=0, num_cpus=1)
    record = get_one(ref)
    assert isinstance(record, dict), record
    assert record["status"] == "ok", record
    assert record["val_bpb"] < record["score"]["uniform_bpb"]
    assert record["description"] == "via ray" and record["backend"] == "docker"
    assert record["cluster"]["gpu"] is None and record["cluster"]["node_ip"] == "127.0.0.1"
    assert record["cluster"]["data_dir"] == str(small_data)
    # Content-addressed: the tag a local run of the same content gets, and the same image.
    sha = hashlib.sha256(TRAIN_PY.read_bytes()).hexdigest()
    assert record["train_sha256"] == sha
    assert record["image_tag"] == docker_backend.experiment_tag(spec, sha)
    base = images.default_base_tag()
    cli = docker.from_env()
    labels = docker_backend.image_labels(spec, cli.images.get(base).id, sha)
    local_id, _ = images.build_experiment(TRAIN_PY, base, record["image_tag"], labels)
    assert local_id == record["image_id"]
    assert cli.images.get(record["image_tag"]).labels["autoresearch.train_sha256"] == sha


def test_two_trials_in_flight_both_complete(client, small_data: Path):
    assert cluster.capacity(num_gpus=0, num_cpus=1) == 2
    assert cluster.capacity(num_gpus=1, num_cpus=1) == 0        # no GPU in this cluster
    specs = [spec_for(small_data, n) for n in (2, 3)]
    t0 = time.perf_counter()
    results = list(cluster.run_trials(specs, "docker", num_gpus=0, num_cpus=1))  # in flight: 2
    assert time.perf_counter() - t0 < 240
    records = {spec.number: record for spec, record in results}
    assert sorted(records) == [2, 3]
    assert all(isinstance(r, dict) and r["status"] == "ok" for r in records.values()), records
    a, b = (records[n]["cluster"] for n in (2, 3))
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "they did not overlap"


SLOW_TRAIN = """
import time
print("started", flush=True)
while True:
    time.sleep(1)
"""


def test_cancel_stops_a_running_trial_and_removes_its_containers(client, small_data: Path,
                                                                 tmp_path: Path):
    """The loop's way: a slot thread blocks in a ClusterTrials call; Ctrl-C cancels them all."""
    slow = tmp_path / "train.py"
    slow.write_text(SLOW_TRAIN)
    trials = cluster.ClusterTrials("docker", num_gpus=0, num_cpus=1)
    outcome: dict = {}

    def slot():
        try:
            outcome["record"] = trials.run(replace(spec_for(small_data, 5), train_py=slow))
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=slot, daemon=True)
    thread.start()
    cli = docker.from_env()
    training = {"label": f"autoresearch.run={RUN}", "name": f"ar-train-{RUN}-5-", "status": "running"}
    deadline = time.monotonic() + 60
    while not cli.containers.list(filters=training) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cli.containers.list(filters=training), "the slow trial never started training"
    assert trials.abort(RUN) == 1
    thread.join(60)
    assert isinstance(outcome.get("error"), cluster.ClusterError), outcome
    assert "cancelled" in str(outcome["error"])
    deadline = time.monotonic() + 30                       # the node kills and removes them
    while cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"}) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"})
    assert not cli.volumes.list(filters={"label": f"autoresearch.run={RUN}"})


def test_limits_are_fitted_to_the_node_not_the_submitter(client, small_data: Path, tmp_path: Path):
    """A request for a share of the machine is resolved on the node, from the node's size (its
    memory set through the variable the head was started with; Ray runs 2 trials there)."""
    assert MEMORY_ENV not in os.environ
    quick = tmp_path / "train.py"
    quick.write_text("print('no model')\n")                  # a record in seconds: invalid
    spec = replace(spec_for(small_data, 6), train_py=quick, limits=LimitRequest(share=None))
    record = cluster.ClusterTrials("docker", num_gpus=0, num_cpus=1).run(spec)
    assert record["status"] == "invalid" and "without writing model.pt2" in record["reason"]
    node = Machine(cpus=os.cpu_count() or 1, memory_bytes=NODE_MEMORY_GB * 2**30)
    assert record["cluster"]["machine"] == {"cpus": node.cpus, "memory_bytes": node.memory_bytes}
    on_node = default_limits(node, share=2)
    assert record["limits"] == dataclasses.asdict(on_node)
    here = default_limits(Machine.here(), share=2)            # what the submitter would have sent
    assert on_node.memory_bytes != here.memory_bytes
    assert record["limits"]["memory_bytes"] == int(NODE_MEMORY_GB * 2**30 * 0.75 / 2)
    # Fixed limits travel as they are.
    record = cluster.ClusterTrials("docker", num_gpus=0, num_cpus=1).run(
        replace(spec_for(small_data, 7), train_py=quick))
    assert record["limits"] == dataclasses.asdict(SMALL)


def test_infrastructure_error_comes_back_as_itself(client, tmp_path: Path):
    ref = cluster.submit_trial(spec_for(tmp_path / "nothing", 4), "docker", num_gpus=0, num_cpus=1)
    error = get_one(ref, timeout=60)
    assert isinstance(error, InfrastructureError), error
    assert "autoresearch prepare" in str(error) and str(tmp_path / "nothing") in str(error)
    with pytest.raises(InfrastructureError, match="autoresearch prepare"):   # the loop's way
        cluster.ClusterTrials("docker", num_gpus=0, num_cpus=1).run(spec_for(tmp_path / "nothing", 4))


@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_closed_port_is_a_clear_error_quickly(head, scheme: str):
    address = f"{scheme}127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(cluster.ClusterError, match=re.escape(address)):
        cluster.connect(address)
    assert time.perf_counter() - t0 < 10


def test_address_parsing():
    assert cluster._host_port("ray://10.0.0.5") == ("10.0.0.5", 10001)
    assert cluster._host_port("ray://head:1234") == ("head", 1234)
    assert cluster._host_port("10.0.0.5") == ("10.0.0.5", 6379)
    assert cluster._host_port("[::1]:7000") == ("::1", 7000)
    assert cluster._host_port("auto") is None
    with pytest.raises(cluster.ClusterError, match="not a port"):
        cluster._host_port("ray://head:http")


def test_existing_cluster_by_gcs_address(head):
    """A plain HOST:PORT (a driver on a node of the cluster), in a process of its own."""
    code = ("from runner import cluster\n"
            f"cluster.connect('127.0.0.1:{head['gcs']}', log=print)\n"
            "print('capacity', cluster.capacity(num_gpus=0, num_cpus=1))\n"
            "cluster.disconnect()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                          cwd=REPO, env={**os.environ, **LOOPBACK_ENV})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "capacity 2" in proc.stdout and f"connected to 127.0.0.1:{head['gcs']}" in proc.stdout


def test_trial_command_on_the_cluster(head, small_data: Path):
    """`autoresearch trial --cluster`: one trial as a Ray task, its record on stdout; a trial
    that asks for a GPU the cluster lacks is refused before anything runs."""
    address = f"ray://127.0.0.1:{head['client']}"
    cli = [sys.executable, "-c", "from runner.cli import main; main()", "trial", str(TRAIN_PY),
           "--cluster", address, "--budget", str(TRAIN_BUDGET), "--data-dir", str(small_data),
           "--eval-tokens", "4096", "--memory", "2", "--cpus", "1"]
    proc = subprocess.run(cli + ["--cluster-gpus", "0", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **LOOPBACK_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    try:
        assert record["status"] == "ok" and record["val_bpb"] < record["score"]["uniform_bpb"]
        assert record["cluster"]["node_ip"] == "127.0.0.1" and record["cluster"]["gpu"] is None
    finally:
        if record.get("image_tag"):
            docker.from_env().images.remove(record["image_tag"], force=True)
    refused = subprocess.run(cli + ["--cluster-gpus", "1"], capture_output=True, text=True,
                             timeout=120, cwd=REPO, env={**os.environ, **LOOPBACK_ENV})
    assert refused.returncode == 2 and "room for no trial of 1 GPU" in refused.stderr
