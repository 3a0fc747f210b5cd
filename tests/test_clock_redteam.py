"""Red team of the sealed clock (issue 11): candidates that try to compute or write after the
runner's deadline, and what the record says about their time.

The measure used throughout is a *heartbeat in the scored file*: the candidate makes
``model.pt2`` a table of little-endian doubles, one slot per writer (the main thread, a thread,
children made every way a process can be made, writers through a hard link or an inherited
descriptor), and every writer keeps storing ``time.time()`` in its slot. The runner copies the
file it would score out (``TrialSpec.artifact_dir``); a slot later than the deadline the
candidate was told (``AUTORESEARCH_DEADLINE``, the runner's own deadline as an epoch) means
that writer computed and wrote after the deadline, into the file that is scored. (The scorer
refuses such a file, which is beside the point: a writer that can write a table of times can
write a model.)

Bounds: budgets of a few seconds, at most a few hundred processes inside a container with a
pids limit, a 64 KiB model file, and every container and volume of this suite removed after
each case, by the runner or else by the fixture here (which, for a container the engine cannot
kill, first kills its processes from a sidecar that joins its pid namespace as the candidate's
uid: nothing on the host is signalled by name).

Three holes this found are fixed (runner/sandbox/docker_backend.py, `run_to_deadline`): a crowd
busy in system calls made `docker pause` fail and the runner raise; `docker kill` of a frozen
container thawed a crowd that starved PID 1 (it wrote up to 9 s after the deadline); and
`training_seconds` was read after the kill, not when the freeze took hold.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, docker_engine_missing
from runner.sandbox import Limits, TrialSpec, process_backend

RUN = f"redclock{uuid.uuid4().hex[:6]}"           # unique: suites may share an engine
LABEL = f"autoresearch.run={RUN}"
TAG_PREFIX = f"autoresearch/exp:{RUN}-"
UID = "10001:10001"
EVAL_TOKENS = 4096
LIMITS = Limits(memory_bytes=2 * 2**30, cpus=1.0, pids=512, out_bytes=64 * 2**20,
                tmp_bytes=64 * 2**20, score_memory_bytes=4 * 2**30, score_timeout_s=120)
SLACK_S = 1.0             # what the design promises: the budget of wall time "within a second"

_DOCKER = docker_engine_missing()
needs_docker = pytest.mark.skipif(_DOCKER is not None, reason=_DOCKER or "")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def render(source: str, **values) -> str:
    for name, value in values.items():
        source = source.replace(f"__{name}__", repr(value))
    assert not re.search(r"__[A-Z][A-Z0-9_]*__", source.replace("__main__", "")), source
    return source


def stamps(path: Path, names: list[str]) -> dict[str, float]:
    data = path.read_bytes()
    assert len(data) == 8 * len(names), len(data)
    return dict(zip(names, struct.unpack(f"<{len(names)}d", data), strict=True))


def logged(rec_or_log, key: str) -> float:
    log = rec_or_log if isinstance(rec_or_log, str) else rec_or_log["log_tail"]
    m = re.search(rf"^{key} ([0-9.]+)$", log, re.M)
    assert m, log[-3000:]
    return float(m.group(1))


def _client():
    import docker
    return docker.from_env(timeout=120)


def sidecar_kill(cli, container) -> None:
    """Kill every process of the candidate's uid in `container`'s pid namespace but its init,
    from a sidecar container (works on a frozen container: the signals wait for the thaw)."""
    from runner.sandbox import images
    from runner.sandbox.docker_backend import hardening
    opts = hardening(TrialSpec(train_py=Path("x"), data_dir=Path("x"), budget=1, run=RUN), "sidecar")
    side = cli.containers.run(
        images.default_base_tag(),
        ["python", "-I", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
        pid_mode=f"container:{container.id}", detach=True, **opts)
    try:
        side.wait(timeout=60)
    finally:
        side.remove(force=True)


def leftovers(cli) -> list:
    return cli.containers.list(all=True, filters={"label": LABEL})


@pytest.fixture(scope="module")
def cli():
    if _DOCKER is not None:
        pytest.skip(_DOCKER)
    client = _client()
    yield client
    for image in client.images.list(name="autoresearch/exp"):
        for t in image.tags:
            if t.startswith(TAG_PREFIX):
                try:
                    client.images.remove(t, force=True)
                except Exception:  # noqa: BLE001
                    pass


@pytest.fixture
def clean_engine(cli):
    """After each docker case: nothing of this run is left (the runner's job; where it failed,
    this cleans up so that the next case and the host are not affected). The cases assert
    "nothing left" themselves, before this runs."""
    yield
    import docker.errors
    for c in leftovers(cli):
        try:
            c.reload()
            if c.status in ("running", "paused"):
                sidecar_kill(cli, c)
            c.remove(force=True)
        except docker.errors.APIError:
            pass
    for v in cli.volumes.list(filters={"label": LABEL}):
        for _ in range(20):
            try:
                v.remove(force=True)
                break
            except docker.errors.APIError:
                time.sleep(0.2)


def docker_trial(tmp_path: Path, data: Path, number: int, source: str, budget: int,
                 **limits) -> tuple[dict | None, BaseException | None, Path]:
    """Run `source` as train.py on the docker backend; (record or None, exception or None,
    where the file that was (or would have been) scored is copied)."""
    from runner.trial import run_trial
    train_py = tmp_path / f"train_{number}.py"
    train_py.write_text(source)
    art = tmp_path / f"artifact_{number}"
    spec = TrialSpec(train_py=train_py, data_dir=data, budget=budget, run=RUN, number=number,
                     limits=replace(LIMITS, **limits), eval_tokens=EVAL_TOKENS, artifact_dir=art)
    messages: list[str] = []
    t0 = time.perf_counter()
    try:
        rec, err = run_trial(spec, "docker", messages.append), None
    except Exception as e:  # noqa: BLE001  (the runner raising is one of the outcomes)
        rec, err = None, e
    print(f"\n[redclock {number}] {time.perf_counter() - t0:.1f} s; "
          + (f"status={rec['status']} reason={rec['reason']!r} training_seconds="
             f"{rec['training_seconds']} phases={rec['phases']}" if rec else f"RAISED {err!r}"))
    return rec, err, art / "model.pt2"


# ------------------------------------------------------------------------------------------
# The heartbeat candidate: writers of every kind, polite enough that the freeze succeeds
# ------------------------------------------------------------------------------------------

WRITERS = ["main", "thread", "child", "setsid_grandchild", "own_group", "hardlink",
           "inherited_fd", "exec_scrubbed_env"]

HEARTBEAT = r'''
import os, signal, struct, sys, threading, time
print(f"FIRST {time.time():.6f}", flush=True)            # the first thing the candidate does
DEADLINE = float(os.environ["AUTORESEARCH_DEADLINE"])
print(f"DEADLINE {DEADLINE:.6f}", flush=True)
NAMES = __NAMES__
OUT = os.environ.get("AUTORESEARCH_OUT", "/out")
MODEL = os.path.join(OUT, "model.pt2")
with open(MODEL, "wb") as f:
    f.write(b"\0" * 8 * len(NAMES))
os.link(MODEL, os.path.join(OUT, "hardlink"))
os.utime(MODEL, (1, 1))                                   # an mtime from 1970: means nothing
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.environ["TZ"] = "Pacific/Kiritimati"                   # its own idea of the time of day
time.tzset()

def beat(name, fd=None, path=MODEL):
    fd = os.open(path, os.O_WRONLY) if fd is None else fd
    off = 8 * NAMES.index(name)
    while True:
        os.pwrite(fd, struct.pack("<d", time.time()), off)
        sum(i * i for i in range(2000))                   # a little work between beats
        time.sleep(0.002)

def child(name, fn):
    if os.fork() == 0:
        try:
            fn(name)
        finally:
            os._exit(0)

threading.Thread(target=beat, args=("thread",), daemon=True).start()
child("child", beat)

def setsid_grandchild(name):
    os.setsid()
    if os.fork() == 0:
        beat(name)
    os._exit(0)                                           # the grandchild is orphaned
child("setsid_grandchild", setsid_grandchild)

def own_group(name):
    os.setpgid(0, 0)
    beat(name)
child("own_group", own_group)

child("hardlink", lambda name: beat(name, path=os.path.join(OUT, "hardlink")))

inherited = os.open(MODEL, os.O_WRONLY)
child("inherited_fd", lambda name: beat(name, fd=inherited))

CODE = """
import os, struct, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
while True:
    os.pwrite(fd, struct.pack("<d", time.time()), int(sys.argv[2]))
    time.sleep(0.002)
"""
def exec_scrubbed(name):
    os.setsid()
    os.execve(sys.executable, [sys.executable, "-c", CODE, MODEL, str(8 * NAMES.index(name))], {})
child("exec_scrubbed_env", exec_scrubbed)

print("---")
print("training_seconds: 0.5")                           # a claim, kept as one
sys.stdout.flush()
beat("main")
'''


@needs_docker
def test_every_kind_of_writer_is_frozen_at_the_deadline(tmp_path, small_data, cli, clean_engine):
    """Threads, children, a setsid double fork, a process in its own group, writers through a
    hard link or an inherited descriptor, an exec with a scrubbed environment: all are in the
    container's cgroup and stop at the freeze. No candidate code runs before the clock starts;
    its TZ, its mtime and its printed seconds change nothing in the record."""
    budget = 6
    rec, err, model = docker_trial(tmp_path, small_data, 1, render(HEARTBEAT, NAMES=WRITERS),
                                   budget)
    assert err is None, err
    assert leftovers(cli) == []
    assert rec["stopped_at_deadline"] is True, rec
    assert rec["status"] == "invalid" and rec["val_bpb"] is None    # the scorer refused the table
    deadline, first = logged(rec, "DEADLINE"), logged(rec, "FIRST")
    assert first >= deadline - budget - LIMITS.launch_s - 0.05, (first, deadline)   # no head start
    assert budget - 0.5 <= rec["training_seconds"] <= budget + SLACK_S, rec["training_seconds"]
    assert rec["reported_training_seconds"] == 0.5              # the claim, under its own name
    beats = stamps(model, WRITERS)
    late = {k: round(v - deadline, 3) for k, v in beats.items()}
    print(f"[redclock 1] last beat of each writer, seconds after the deadline: {late}")
    for name, t in beats.items():
        assert t > deadline - 2.0, f"{name} was not running near the deadline: {late}"
        assert t <= deadline + SLACK_S, f"{name} wrote after the deadline: {late}"


# ------------------------------------------------------------------------------------------
# Loads around the deadline: a stdout flood and a large resident set
# ------------------------------------------------------------------------------------------

FLOOD_AND_MEMORY = r'''
import os, struct, sys, time
DEADLINE = float(os.environ["AUTORESEARCH_DEADLINE"])
print(f"DEADLINE {DEADLINE:.6f}", flush=True)
MODEL = os.path.join(os.environ.get("AUTORESEARCH_OUT", "/out"), "model.pt2")
NAMES = __NAMES__
with open(MODEL, "wb") as f:
    f.write(struct.pack("<d", DEADLINE) + b"\0" * 8 * (len(NAMES) - 1))  # the flood hides the log
hog = bytearray(1200 * 2**20)                 # 1.2 GB resident (limit 2 GB): a big freeze
for i in range(0, len(hog), 4096):
    hog[i] = 1
print("RESIDENT", flush=True)
for name in NAMES[2:]:                        # two flooders: tiny lines, the most work for the
    if os.fork() == 0:                        # engine's log copier
        fd = os.open(MODEL, os.O_WRONLY)
        off, line, n = 8 * NAMES.index(name), b"x\n" * 2048, 0
        while True:
            os.write(1, line)
            n += 1
            if n % 16 == 0:
                os.pwrite(fd, struct.pack("<d", time.time()), off)
fd = os.open(MODEL, os.O_WRONLY)
while True:
    os.pwrite(fd, struct.pack("<d", time.time()), 8)
    sum(i * i for i in range(5000))
'''


@needs_docker
def test_log_flood_and_a_big_memory_do_not_delay_the_freeze(tmp_path, small_data, cli,
                                                             clean_engine):
    budget = 10              # room to start the writers on a loaded host: touching 1.2 GB and
                             # a fresh container once took a 6 s budget whole (none had begun)
    names = ["deadline", "main", "flood1", "flood2"]
    rec, err, model = docker_trial(tmp_path, small_data, 2,
                                   render(FLOOD_AND_MEMORY, NAMES=names), budget)
    assert err is None, err
    assert leftovers(cli) == []
    assert rec["stopped_at_deadline"] is True and rec["status"] == "invalid", rec["status"]
    beats = stamps(model, names)
    deadline = beats.pop("deadline")
    late = {k: round(v - deadline, 3) for k, v in beats.items()}
    print(f"[redclock 2] last beats after the deadline: {late}")
    assert all(beats.values()), f"a writer had not begun by the deadline (nothing tested): {late}"
    assert all(v > deadline - 2.0 for v in beats.values()), late
    assert all(v <= deadline + SLACK_S for v in beats.values()), late
    # The runner's figure is read after the pause, the kill and the wait: killing 1.2 GB and a
    # flood took it to budget + 2.3 s here while the writes stopped on time. It never
    # understates; that it overstates is a matter of accuracy (see the report), not of the seal.
    assert rec["training_seconds"] >= budget - 0.5, rec["training_seconds"]


# ------------------------------------------------------------------------------------------
# HOLES: a crowd of busy processes at the deadline, and PID 1 starved of the CPU
# ------------------------------------------------------------------------------------------

# Two holes, each shown by a candidate below (measured on this host: cgroup v1, docker
# 20.10.24, runc 1.1.5, 2 cores, other suites running):
#
# 1. A crowd of processes busy in system calls (a few hundred `pwrite` loops) makes `docker
#    pause` fail with "OCI runtime pause failed: unable to freeze" (runc's cgroup v1 freezer
#    gives up after ~0.3 s of retries, thawing in between): 5 of 5 runs here. The runner then
#    raises docker.errors.APIError out of `run_to_deadline`, so `run_trial` raises, and the
#    overnight loop (which calls `future.result()` on the trial) stops; the container may also
#    be left running (seen once). A candidate's doing must be a record, never the loop's end.
#
# 2. When the freeze does succeed, `container.kill()` on a paused container makes the engine
#    send SIGKILL to the container's PID 1 only (docker-init) and then *thaw* the cgroup: every
#    other process runs again until PID 1 has died and the kernel has killed the rest of the
#    namespace. docker-init runs as the candidate's uid, so the candidate may set it to
#    SCHED_IDLE (or nice 19); with a crowd of CPU-bound processes PID 1 waits seconds for the
#    CPU. Through the runner (8 s budget, 300 processes): writes into the scored model.pt2 up
#    to 1.5, 2.5 and 9.0 s after the deadline, by up to 276 processes, and training_seconds
#    17.5 s; by hand with `docker kill`: "tried to kill container, but did not receive an exit
#    event", `docker rm -f` failing the same way, the container running on for minutes. Even
#    at nice 0, 100 busy processes wrote for 0.4 s after the freeze.
#
# The fix (runner/sandbox/docker_backend.py, run_to_deadline): after a successful pause, and
# before `container.kill()`, kill every candidate process while it is still frozen, from a
# sidecar container that joins the candidate's pid namespace as the candidate's uid
# (`pid_mode=f"container:{train.id}"`, `user=UID`, the usual hardening, the base image, command
# `python -I -c "import os, signal; os.kill(-1, signal.SIGKILL)"`: kill(-1) reaches every
# process of that uid in the namespace but its init, cannot race a fork, and the signals are
# taken before any user code runs once thawed); then `container.kill()` finds only PID 1 and
# it dies at once. When the pause fails (APIError and the container still running): do the
# same sidecar kill without the freeze, then `container.kill()`, and report "stopped without
# a freeze" so that the trial is recorded `timeout` ("could not be frozen at the deadline")
# and NOT scored (its model may postdate the deadline). Never raise for either (a failing
# sidecar is logged, the kill still follows); treat a failing `container.kill()` the same way
# (sidecar kill, then kill again). And take `training_seconds` when the candidate stopped
# (pause returned, or the exit was seen), not after kill + wait: the sidecar, or killing a big
# container, adds 0.5-2.5 s that the candidate never had (see the flood case above).
# A prototype of this (patched in, not committed) passed both crowd cases but for that last
# point: writes stopped 0.10-0.22 s after the deadline; a failed pause gave `timeout`.
# `sidecar_kill` in this file is that sidecar, and is what cleans up after these cases today.

CROWD = r'''
import os, struct, sys, time
DEADLINE = float(os.environ["AUTORESEARCH_DEADLINE"])
print(f"DEADLINE {DEADLINE:.6f}", flush=True)
N = __N__
MODEL = os.path.join(os.environ.get("AUTORESEARCH_OUT", "/out"), "model.pt2")
with open(MODEL, "wb") as f:
    f.write(b"\0" * 8 * (N + 1))
try:                                          # PID 1 is docker-init, running as our uid
    os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0))
    print("PID1 SCHED_IDLE", flush=True)
except OSError as e:
    print("PID1 untouched:", e, flush=True)
r, w = os.pipe()
slot = 0
for i in range(N):                            # fork them all first, then start them at once
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        slot = i + 1
        os.close(w)
        os.read(r, 1)                         # the barrier: EOF when the parent closes w
        break
if slot == 0:
    print(f"CROWD {i + 1}", flush=True)
    os.close(w)
fd = os.open(MODEL, os.O_WRONLY)
if __SYSCALLS__:
    own = os.open(os.path.join(os.path.dirname(MODEL), f"busy{slot}"), os.O_WRONLY | os.O_CREAT,
                  0o600)
    n = 0
    while True:                               # busy in system calls, each on its own file,
        os.pwrite(own, b"12345678", 0)        # and a beat in the model now and then
        n += 1
        if n % 32 == 0:
            os.pwrite(fd, struct.pack("<d", time.time()), 8 * slot)
while True:                                   # busy on the CPU, a beat every ~20 ms
    x = 0
    for _ in range(200_000):
        x += 1
    os.pwrite(fd, struct.pack("<d", time.time()), 8 * slot)
'''


def crowd_case(tmp_path, data, cli, number: int, syscalls: bool) -> None:
    budget, n = 8, 300
    names = [f"w{i}" for i in range(n + 1)]
    t0 = time.monotonic()
    rec, err, model = docker_trial(tmp_path, data, number,
                                   render(CROWD, N=n, SYSCALLS=syscalls), budget)
    elapsed = time.monotonic() - t0
    left = [c.name for c in leftovers(cli)]
    if rec:
        said = re.findall(r"^(?:PID1|CROWD).*$", rec["log_tail"], re.M)
        print(f"[redclock {number}] {said}")
        if model.exists():
            deadline = logged(rec, "DEADLINE")
            beats = sorted(t - deadline for t in stamps(model, names).values() if t > 0)
            print(f"[redclock {number}] {len(beats)} beats; last {beats[-1]:+.3f} s after the "
                  f"deadline; {sum(b > 0 for b in beats)} writers wrote after it")
    print(f"[redclock {number}] left running: {left}")
    assert err is None, f"the runner raised: {err!r}"          # a record, never the loop's end
    assert left == [], f"containers the runner could not remove: {left}"
    assert elapsed < budget + 45
    assert rec["status"] in ("timeout", "invalid", "ok"), rec
    assert rec["training_seconds"] <= budget + SLACK_S, rec["training_seconds"]
    if model.exists():                                          # it was scored: nothing late
        deadline = logged(rec, "DEADLINE")
        beats = [t for t in stamps(model, names).values() if t > 0]
        assert max(beats) <= deadline + SLACK_S, max(beats) - deadline


@needs_docker
def test_crowd_in_system_calls_does_not_break_the_runner(tmp_path, small_data, cli, clean_engine):
    crowd_case(tmp_path, small_data, cli, 3, syscalls=True)


@needs_docker
def test_starved_pid1_does_not_let_the_crowd_run_after_the_freeze(tmp_path, small_data, cli,
                                                                  clean_engine):
    crowd_case(tmp_path, small_data, cli, 4, syscalls=False)


class _FrozenFails:
    """A container whose freeze fails the way runc's does under a crowd ("unable to freeze")."""

    def __init__(self):
        import docker.errors
        self.status, self.killed, self.APIError = "running", 0, docker.errors.APIError

    def wait(self, timeout=None):
        if self.killed:
            return {"StatusCode": 137}
        import requests.exceptions
        raise requests.exceptions.ReadTimeout()

    def pause(self):
        raise self.APIError("500 Server Error: Cannot pause container: OCI runtime pause "
                            "failed: unable to freeze: unknown")

    def reload(self):
        pass

    def kill(self, signal=None):
        self.killed += 1
        self.status = "exited"

    def exec_run(self, *a, **k):               # a fix may reach in through the engine
        raise self.APIError("container is not frozen")

    @property
    def client(self):                          # ... or run a sidecar: it runs and exits
        class Sidecar:
            def wait(self, timeout=None):
                return {"StatusCode": 0}

            def remove(self, force=False):
                pass

        class Containers:
            def run(self, *a, **k):
                return Sidecar()

            create = run

        class Client:
            containers = Containers()
        return Client()

    @property
    def id(self):
        return "0" * 64

    name = "ar-train-fake"


def test_failed_freeze_is_not_raised_and_the_candidate_is_killed():
    pytest.importorskip("docker")
    from runner.sandbox import docker_backend
    fake = _FrozenFails()
    result = docker_backend.run_to_deadline(fake, time.monotonic())
    assert fake.killed >= 1
    assert result.at_deadline and not result.frozen           # stopped, unfrozen: not scored


# ------------------------------------------------------------------------------------------
# The build: nothing of the candidate runs before the clock
# ------------------------------------------------------------------------------------------

def test_build_context_holds_only_the_dockerfile_and_train_py():
    import tarfile
    from runner.sandbox import images
    ctx = images.experiment_context(b"import os\nos.system('echo pwned')\n")
    with tarfile.open(fileobj=ctx) as tar:
        assert sorted(tar.getnames()) == ["Dockerfile", "train.py"]
        dockerfile = tar.extractfile("Dockerfile").read().decode()
    steps = [line.split()[0].upper() for line in dockerfile.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert steps == ["ARG", "FROM", "COPY", "USER", "WORKDIR"], steps    # no RUN, no ONBUILD
    assert "COPY train.py /app/train.py" in dockerfile


# ------------------------------------------------------------------------------------------
# The process backend: the group stops at the deadline; a scrubbed setsid escapes (documented)
# ------------------------------------------------------------------------------------------

PROCESS_WRITERS = ["main", "thread", "child", "own_group"]

PROCESS_HEARTBEAT = r'''
import os, signal, struct, sys, threading, time
DEADLINE = float(os.environ["AUTORESEARCH_DEADLINE"])
print(f"DEADLINE {DEADLINE:.6f}", flush=True)
NAMES = __NAMES__
MODEL = os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2")
with open(MODEL, "wb") as f:
    f.write(b"\0" * 8 * len(NAMES))
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def beat(name):
    fd = os.open(MODEL, os.O_WRONLY)
    while True:
        os.pwrite(fd, struct.pack("<d", time.time()), 8 * NAMES.index(name))
        time.sleep(0.002)

threading.Thread(target=beat, args=("thread",), daemon=True).start()
if os.fork() == 0:
    beat("child")
if os.fork() == 0:
    os.setpgid(0, 0)                           # out of the group, still in the session
    beat("own_group")
print("---\ntraining_seconds: 0.5", flush=True)
beat("main")
'''


def test_process_backend_stops_its_group_and_session_at_the_deadline(small_data, scratch,
                                                                     tmp_path):
    budget = 4
    train_py = tmp_path / "train.py"
    train_py.write_text(render(PROCESS_HEARTBEAT, NAMES=PROCESS_WRITERS))
    art = tmp_path / "art"
    spec = TrialSpec(train_py=train_py, data_dir=small_data, budget=budget, eval_tokens=EVAL_TOKENS,
                     limits=Limits(), artifact_dir=art)
    from runner.trial import run_trial
    rec = run_trial(spec, "process", lambda _: None)
    assert rec["stopped_at_deadline"] is True and rec["status"] == "invalid", rec
    assert budget - 0.2 <= rec["training_seconds"] <= budget + 0.5, rec["training_seconds"]
    assert rec["reported_training_seconds"] == 0.5
    deadline = logged(rec, "DEADLINE")
    beats = stamps(art / "model.pt2", PROCESS_WRITERS)
    late = {k: round(v - deadline, 3) for k, v in beats.items()}
    print(f"\n[redclock process] last beats after the deadline: {late}")
    for name, t in beats.items():
        assert deadline - 1.0 < t <= deadline + 0.5, (name, late)


ESCAPEE = r'''
import os, struct, sys, time
print(f"DEADLINE {float(os.environ['AUTORESEARCH_DEADLINE']):.6f}", flush=True)
BEAT, PIDFILE = __BEAT__, __PIDFILE__
CODE = """
import os, struct, sys, time
with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
end = time.time() + 60                        # bounded: the test kills it sooner
while time.time() < end:
    os.pwrite(fd, struct.pack("<d", time.time()), 0)
    time.sleep(0.01)
"""
if os.fork() == 0:
    os.setsid()                               # out of the group and the session
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c", CODE, BEAT, PIDFILE], {})   # no marker
    os._exit(0)
while True:
    time.sleep(0.1)
'''


def test_process_backend_escape_by_setsid_is_real_and_documented(small_data, scratch, tmp_path):
    """Not a hole of the process backend: it says it is no sandbox and that its clock can be
    escaped this way. The test pins both: the escape works, and the words are there."""
    beat_path, pid_path = tmp_path / "escapee.beat", tmp_path / "escapee.pid"
    train_py = tmp_path / "train.py"
    train_py.write_text(render(ESCAPEE, BEAT=str(beat_path), PIDFILE=str(pid_path)))
    spec = TrialSpec(train_py=train_py, data_dir=small_data, budget=3, eval_tokens=EVAL_TOKENS,
                     limits=Limits())
    lines: list[str] = []
    pid = None
    try:
        outcome = process_backend.run(spec, lines.append)
        ended = time.time()
        assert outcome.status == "timeout" and outcome.stopped_at_deadline
        for _ in range(50):
            if pid_path.exists() and pid_path.read_text():
                pid = int(pid_path.read_text())
                break
            time.sleep(0.1)
        assert pid is not None
        time.sleep(0.5)
        (last,) = struct.unpack("<d", beat_path.read_bytes()[:8])
        assert last > ended, "the escaped process should still be running (documented escape)"
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)        # the one process this test made escape
            except ProcessLookupError:
                pass
    said = " ".join(lines)
    assert "escapes" in said and "NOT a sandbox" in said
    readme = (REPO / "README.md").read_text()
    assert "a process\nthat forks out of the group escapes the clock" in readme or \
        "forks out of the group escapes the clock" in " ".join(readme.split())
    assert "setsid" in process_backend.__doc__ and "escape" in process_backend.WARNING
