"""The docker backend: the real isolation (the default).

One trial is three containers and one volume (two with a compile cache), all labelled with the
run (``autoresearch.run=<run>``) and the trial (``autoresearch.trial``), and removed on every
path out of ``run`` (success, failure, exception, Ctrl-C) before it returns (`teardown`):

- the **output volume**: a tmpfs of ``limits.out_bytes`` and ``limits.out_files``, owned by the
  candidate's uid: the only place the candidate can write besides a small ``/tmp``. A tmpfs
  lives only while some container mounts it, so a tiny **holder** container (base image,
  ``sleep``) keeps it mounted from before training until the scorer is done and the artifact
  has been copied out.
- the **training container**: the experiment image (base + ``COPY train.py``), run as uid 10001
  with no network, a read-only root, every capability dropped, no-new-privileges, pids, memory
  and CPU limits, ``prepare.py`` and the *training* part of the data mounted read-only, the
  validation split absent, an environment with nothing of the host's in it, and one GPU by
  device request when the spec names one. Its clock is the runner's: the deadline is fixed
  just before the container is created (``budget + limits.launch_s``, the engine's own start-up)
  and passed in as ``AUTORESEARCH_DEADLINE``; at the deadline the container is frozen (``docker
  pause``), so whatever ``model.pt2`` it had saved is final, and then killed. A candidate that
  saved none is a ``timeout``.
- the **cache volume** (when the spec has a compile cache): a second tmpfs of
  ``limits.cache_bytes`` and ``limits.cache_files``, mounted at ``/cache`` in the holder and the
  training container only, filled by the runner through the holder (``put_archive``) with a copy
  of the run's cache before the clock starts, and read back through the holder as a tar stream
  (``get_archive``, filtered and bounded by ``runner.sandbox.cache``) only from a scored trial.
- the **scoring container**: the *base* image (no candidate code), the same restrictions, the
  whole data set and the output volume read-only (never the cache); it runs ``prepare.py score`` and prints one
  JSON line, which is the score. Nothing the candidate printed is ever read as a score.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from runner.gpu import Sampler
from runner.paths import PREPARE_PY
from runner.sandbox import cache, images
from runner.sandbox.base import (ALONE, Backend, InfrastructureError, Lane, Log, Outcome,
                                 TrialSpec, deadline_env, score_in_lane, scorer_options,
                                 training_view)
from runner.sandbox.output import (apply_score, classify_exit, escape_line, escape_log,
                                   parse_summary)

UID = "10001:10001"
CACHE = "/cache"                            # the trial's private compile cache (a tmpfs volume)
LABEL_RUN = "autoresearch.run"
LABEL_OWNER = "autoresearch.owner"          # host:pid of the runner that made it
LABEL_TRIAL = "autoresearch.trial"          # the one trial it belongs to, for its teardown
OWNER = f"{socket.gethostname()}:{os.getpid()}"
TAG_REPO = "autoresearch/exp"
UNFROZEN = ("could not be frozen at the deadline, so it may have written after it: killed, "
            "not scored")
SCORE_CMD = ["python", "-I", "/app/prepare.py", "score", "--model", "/model/model.pt2",
             "--data-dir", "/data"]


def sanitize(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit] or "x"


def experiment_tag(spec: TrialSpec, train_sha: str) -> str:
    sha7 = (spec.labels.get("autoresearch.commit") or train_sha)[:7]
    return f"{TAG_REPO}:{sanitize(spec.run)}-{spec.number}-{sha7}"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_labels(spec: TrialSpec, base_id: str, train_sha: str) -> dict[str, str]:
    """What a later `reproduce` needs to rerun this image and to refuse when things differ."""
    return {
        LABEL_RUN: spec.run,
        "autoresearch.number": str(spec.number),
        "autoresearch.base": base_id,
        "autoresearch.train_sha256": train_sha,
        "autoresearch.prepare_sha256": sha256_file(PREPARE_PY),
        "autoresearch.data_manifest_sha256": sha256_file(spec.data_dir / "manifest.json"),
        "autoresearch.seed": str(spec.seed),
        "autoresearch.budget": str(spec.budget),
        **spec.labels,
    }


def hardening(spec: TrialSpec, trial: str) -> dict[str, Any]:
    """Container options shared by every container of the trial named `trial`."""
    return dict(
        user=UID,
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        ipc_mode="private",
        init=True,                                    # reaps and forwards; PID 1 is not ours
        labels={LABEL_RUN: spec.run, LABEL_OWNER: OWNER, LABEL_TRIAL: trial},
        log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
        ulimits=[Ulimit(name="core", soft=0, hard=0)],
    )


def gpu_request(spec: TrialSpec) -> list[DeviceRequest]:
    return [DeviceRequest(device_ids=[str(spec.gpu)], capabilities=[["gpu"]])] if spec.gpu else []


def ro(source: Path, target: str) -> Mount:
    return Mount(target=target, source=str(Path(source).resolve()), type="bind", read_only=True)


def has_model(holder, attempts: int = 3) -> bool:
    """Is there a model in the output? Asked of the holder (`test` runs in its read-only view,
    nothing executes from the volume); a symlink or FIFO is not a model. `test` answers 0 or
    1; anything else is the exec failing (runc can, under load), which is retried, then raised:
    an infrastructure fault must not become the candidate's "invalid"."""
    for attempt in range(attempts):
        check = holder.exec_run(["test", "-f", "/out/model.pt2", "-a", "!", "-L", "/out/model.pt2"],
                                user=UID)
        if check.exit_code in (0, 1):
            return check.exit_code == 0
        time.sleep(0.5 * (attempt + 1))
    raise InfrastructureError(f"could not look into the output volume (exec exit {check.exit_code}: "
                              f"{check.output[-300:].decode('utf-8', 'replace').strip()})")


def remove_orphans(cli: docker.DockerClient | None = None, log: Log | None = None) -> int:
    """Remove containers and volumes left by runners that are gone (same host, dead pid)."""
    cli = cli or images.client()
    host = socket.gethostname()
    removed = 0

    def orphan(labels: dict[str, str]) -> bool:
        owner = labels.get(LABEL_OWNER, "")
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit():
            return False
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
            return False                              # that runner still lives
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    for c in cli.containers.list(all=True, filters={"label": LABEL_OWNER}):
        if orphan(c.labels):
            c.remove(force=True)
            removed += 1
    for v in cli.volumes.list(filters={"label": LABEL_OWNER}):
        if orphan(v.attrs.get("Labels") or {}):
            try:
                v.remove(force=True)
                removed += 1
            except docker.errors.APIError:
                pass
    if removed and log:
        log(f"removed {removed} container(s)/volume(s) left by a runner that is gone")
    return removed


def abort_own(run: str) -> int:
    """Remove this runner's containers of `run` at once (Ctrl-C with trials in flight in other
    threads: each finds its container gone, cleans the rest up and returns)."""
    cli = images.client()
    gone = 0
    for c in cli.containers.list(all=True, filters={"label": [f"{LABEL_OWNER}={OWNER}",
                                                             f"{LABEL_RUN}={run}"]}):
        try:
            c.remove(force=True)
            gone += 1
        except docker.errors.APIError:
            pass
    return gone


def bounded_logs(container, limit: int, stdout: bool = True, stderr: bool = True) -> str:
    """The last `limit` bytes of a container's output (docker keeps at most 1 MB anyway)."""
    try:
        raw = container.logs(stdout=stdout, stderr=stderr, tail=2000)
    except docker.errors.APIError:
        return ""
    return raw[-limit:].decode("utf-8", errors="replace")


def copy_out(container, path: str, dest: Path, max_bytes: int) -> bool:
    """Copy one regular file out of a container without following links: a symlink, device,
    FIFO or folder in its place is refused. Returns whether a file was copied."""
    try:
        stream, stat = container.get_archive(path)
    except docker.errors.NotFound:
        return False
    if stat.get("size", 0) > max_bytes:
        return False
    buf = io.BytesIO()
    for chunk in stream:
        buf.write(chunk)
        if buf.tell() > max_bytes + 1024 * 1024:
            return False
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:") as tar:
        members = tar.getmembers()
        if len(members) != 1 or not members[0].isreg():
            return False
        src = tar.extractfile(members[0])
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as f:
            while block := src.read(1 << 20):        # type: ignore[union-attr]
                f.write(block)
        os.replace(tmp, dest)
    return True


def tmpfs_volume(cli, name: str, spec: TrialSpec, trial: str, size: int, inodes: int):
    """A tmpfs volume owned by the candidate's uid: bounded in bytes and files, nosuid, nodev
    (not noexec: a compile cache holds shared objects that are loaded from it)."""
    return cli.volumes.create(
        name=name, driver="local",
        driver_opts={"type": "tmpfs", "device": "tmpfs",
                     "o": f"size={size},nr_inodes={inodes},uid=10001,gid=10001,mode=0700,"
                          "nosuid,nodev"},
        labels={LABEL_RUN: spec.run, LABEL_OWNER: OWNER, LABEL_TRIAL: trial})


def teardown(cli, trial: str, containers: list, volumes: list, log: Log,
             wait_s: float = 30.0) -> None:
    """Remove every container and volume of the trial named `trial`: those the runner made,
    then any other the engine holds under the trial's label (a create whose answer was lost on
    a busy engine). A volume is retried while the engine still holds it (a container's removal
    can release its mounts a moment later) for up to `wait_s`; what is left is logged, and the
    next runner's start removes it. Never raises: it runs on every path out of a trial."""
    def remove(thing, what: str) -> None:
        try:
            thing.remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.exceptions.RequestException) as e:
            log(f"warning: could not remove {what} {thing.name}: {str(e)[:200]}")

    label = {"label": f"{LABEL_TRIAL}={trial}"}
    for c in reversed(containers):
        remove(c, "container")
    try:
        for c in cli.containers.list(all=True, filters=label):
            remove(c, "container")
        listed = cli.volumes.list(filters=label)
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        log(f"warning: could not list what is left of trial {trial}: {str(e)[:200]}")
        listed = []
    pending = {v.name: v for v in [*volumes, *listed]}
    give_up, pause = time.monotonic() + wait_s, 0.05
    while pending:
        for name, volume in list(pending.items()):
            try:
                volume.remove(force=True)
                del pending[name]
            except docker.errors.NotFound:
                del pending[name]
            except (docker.errors.APIError, requests.exceptions.RequestException):
                pass                                  # still held: tried again below
        if pending and time.monotonic() + pause > give_up:
            log(f"warning: volume(s) {', '.join(pending)} of trial {trial} are still held "
                f"after {wait_s:.0f} s: left for the next start to remove")
            return
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def cache_in(holder, spec: TrialSpec) -> dict[str, Any]:
    """Fill the trial's cache volume (mounted in the holder) with a copy of the run's cache,
    as a tar owned by the candidate's uid; returns the record's start fields."""
    lim = spec.fixed_limits
    uid, gid = (int(x) for x in UID.split(":"))
    with tempfile.TemporaryFile(prefix="autoresearch-cache-") as tar:
        note = cache.hand_out(spec.cache_from,
                              lambda src, b, f: cache.to_tar(src, tar, uid, gid, b, f),
                              lim.cache_bytes, lim.cache_files)
        if note["start"] == "warm":
            tar.seek(0)
            try:
                if not holder.put_archive(CACHE, tar):
                    raise docker.errors.APIError("put_archive refused")
            except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                # A cache is worth no failed trial, and half a cache (cut-short shared
                # objects) would charge the candidate for our failure: start it cold.
                emptied = holder.exec_run(["sh", "-c", f"rm -rf {CACHE}/* {CACHE}/.[!.]*"],
                                          user=UID).exit_code == 0
                note.update(start="cold" if emptied else "partial",
                            note=f"the copy failed: {escape_line(str(e)[:200])}")
    return note


def cache_out(holder, spec: TrialSpec) -> dict[str, Any]:
    """Read the scored trial's cache out of its volume (through the holder, as a tar stream:
    nothing in it is followed or executed) into `spec.cache_to`, filtered and bounded."""
    lim = spec.fixed_limits
    try:
        stream, _ = holder.get_archive(CACHE)
    except docker.errors.NotFound:
        return {"out": "dropped: no cache folder"}
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        return {"out": f"dropped: {type(e).__name__}"}
    try:
        return cache.take_back(lambda dest, b, f: cache.extract(stream, dest, b, f),
                               Path(str(spec.cache_to)), lim.cache_bytes, lim.cache_files)
    finally:
        close = getattr(stream, "close", None)      # a stream dropped half-read
        if close is not None:
            close()


def peak_memory(container, stop: threading.Event, result: dict) -> None:
    """Sample the container's memory use until `stop` (cgroup v1 reports max_usage itself)."""
    try:
        for stats in container.stats(stream=True, decode=True):
            mem = stats.get("memory_stats") or {}
            value = mem.get("max_usage") or mem.get("usage") or 0
            result["peak"] = max(result.get("peak", 0), int(value))
            if stop.is_set():
                break
    except Exception:
        pass


@dataclass
class Stop:
    """How the training container ended: its exit code, whether the runner stopped it at the
    deadline, whether it was frozen then (a candidate that could not be frozen may have written
    after the deadline: it is not scored), and when it stopped (``time.monotonic()``: the
    moment the freeze took hold or the exit was seen, not the later kill and teardown)."""
    exit_code: int | None
    at_deadline: bool
    frozen: bool
    at: float


KILL_ALL = "import os, signal; os.kill(-1, signal.SIGKILL)"


def kill_inside(container, image: str, options: dict[str, Any], spawned: list) -> None:
    """SIGKILL every process of the candidate's uid in `container`'s process namespace but its
    PID 1, from a short-lived container joined to that namespace as the same uid. On a frozen
    container the signal is pending when it thaws, so nothing runs any more of its own code:
    `docker kill` signals PID 1 only and thaws the rest, and a candidate that starves PID 1
    (it runs as the candidate's uid) would otherwise run on after the freeze. `kill(-1)` cannot
    miss a process forked meanwhile. Best effort: a failure is logged by the caller."""
    killer = container.client.containers.run(
        image or "", ["python", "-I", "-c", KILL_ALL], detach=True,
        pid_mode=f"container:{container.id}", mem_limit="64m", pids_limit=8,
        **{**options, "init": False, "user": UID})
    spawned.append(killer)                             # the trial's teardown removes it
    killer.wait(timeout=30)


def exited_after(container, deadline: float, tolerance_s: float = 0.1) -> bool:
    """Whether the engine saw `container` finish later than `deadline` (``time.monotonic()``,
    turned into the wall clock the engine's ``FinishedAt`` uses; one host, one clock). Unknown
    is after: the caller then does not score what it cannot place before the deadline."""
    at = engine_time(container, "FinishedAt")
    return at is None or at > time.time() - (time.monotonic() - deadline) + tolerance_s


def run_to_deadline(container, deadline: float, image: str = "",
                    options: dict[str, Any] | None = None, log: Log = print,
                    spawned: list | None = None) -> Stop:
    """Wait for the started `container` to exit, until `deadline` (`time.monotonic()`). At
    the deadline it is frozen (``docker pause``: the cgroup freezer stops every process in it
    at once, so nothing more is written), every process in it is killed while frozen
    (`kill_inside`), and then the container. When the freeze fails (runc gives up on a crowd
    of processes busy in system calls), the processes are killed as they run and the trial is
    reported stopped but not frozen: not scored. Never raises for the candidate's doing."""
    opts = options or {}
    spawned = [] if spawned is None else spawned        # containers made here, for teardown
    while (left := deadline - time.monotonic()) > 0:
        try:
            code = container.wait(timeout=left)["StatusCode"]
            return Stop(code, False, False, time.monotonic())
        except requests.exceptions.ReadTimeout:
            pass
        except requests.exceptions.ConnectionError:   # a read timeout, or the engine went away
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    frozen = True
    try:
        container.pause()
    except docker.errors.APIError as e:
        container.reload()
        if container.status == "exited":               # it exited as the deadline came ...
            code = container.wait(timeout=30)["StatusCode"]
            if not exited_after(container, deadline):
                return Stop(code, False, False, time.monotonic())
            # ... or after it, while runc tried to freeze it (seconds on cgroup v1): what it
            # wrote meanwhile is not scored.
            log(f"{container.name}: exited after the deadline while it was being frozen")
            return Stop(code, True, False, time.monotonic())
        log(f"{container.name}: could not be frozen at the deadline ({str(e)[:200]}): killed")
        frozen = False
    at = time.monotonic()
    for attempt in range(3):
        try:
            kill_inside(container, image, opts, spawned)
        except Exception as e:                          # noqa: BLE001 - the kill below still runs
            log(f"{container.name}: killing its processes failed ({str(e)[:200]})")
        try:
            container.kill()                           # works on a frozen container
            code = container.wait(timeout=30)["StatusCode"]
            return Stop(code, True, frozen, at)
        except (docker.errors.APIError, requests.exceptions.RequestException) as e:
            log(f"{container.name}: kill failed ({str(e)[:200]}), attempt {attempt + 1}")
    return Stop(None, True, frozen, at)                # teardown removes it by force


def inside_seconds(container) -> float | None:
    """How long the container's process itself ran, from the engine's own timestamps: the
    rest of a phase is the sandbox's cost (create, start, wait, teardown)."""
    start, end = engine_time(container, "StartedAt"), engine_time(container, "FinishedAt")
    if start is None or end is None:
        return None
    return max(end - start, 0.0)


def engine_time(container, key: str) -> float | None:
    """One of the engine's timestamps of `container` (``State.StartedAt`` / ``FinishedAt``, RFC
    3339 with nanoseconds) as a ``time.time()`` epoch; None when missing or unreadable."""
    text = getattr(container, "attrs", {}).get("State", {}).get(key, "")
    try:
        return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return None


def score(cli, spec: TrialSpec, base: str, volume, suffix: str, common: dict[str, Any],
          containers: list, outcome: Outcome, memory_fraction: float | None,
          cuts_seed: int | None = None) -> None:
    """Run the trusted scorer on the output volume (read-only), in its own container from the
    base image, with at most `memory_fraction` of the GPU's memory when given, and the
    causality cuts of `cuts_seed` (the trial's: a scoring done again alone draws the same)."""
    lim = spec.fixed_limits
    score_env = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if spec.eval_tokens:
        score_env["AUTORESEARCH_EVAL_TOKENS"] = str(spec.eval_tokens)
    options = scorer_options(memory_fraction, cuts_seed)
    scorer = cli.containers.create(
        base, SCORE_CMD + ["--device", "cuda" if spec.gpu else "cpu"] + options,
        name=f"ar-score-{suffix}-{len(containers)}", environment=score_env,
        mounts=[ro(PREPARE_PY, "/app/prepare.py"), ro(spec.data_dir, "/data")],
        volumes={volume.name: {"bind": "/model", "mode": "ro"}},
        tmpfs={"/tmp": "size=1g,mode=1777"},
        mem_limit=lim.score_memory_bytes, memswap_limit=lim.score_memory_bytes,
        nano_cpus=int(lim.cpus * 1e9), pids_limit=lim.pids,
        device_requests=gpu_request(spec), **common)
    containers.append(scorer)
    scorer.start()
    try:
        score_exit = scorer.wait(timeout=lim.score_timeout_s)["StatusCode"]
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
        scorer.kill()
        outcome.status, outcome.reason = "invalid", "scoring timed out"
        outcome.score = {"status": "invalid", "reason": outcome.reason, "cause": "time"}
        return
    scorer.reload()
    if (inside := inside_seconds(scorer)) is not None:
        outcome.phases["score_inside"] = inside
    if scorer.attrs["State"].get("OOMKilled") and score_exit != 2:
        outcome.status, outcome.reason = "invalid", "the scorer ran out of memory on this model"
        outcome.score = {"status": "invalid", "reason": outcome.reason, "cause": "memory"}
        return
    apply_score(outcome, score_exit, bounded_logs(scorer, 64 * 1024, stderr=False),
                bounded_logs(scorer, 2000, stdout=False))


def run(spec: TrialSpec, log: Log, lane: Lane = ALONE) -> Outcome:
    cli = images.client()
    base = spec.base_image or images.default_base_tag()
    if not images.base_exists(base, cli):
        raise InfrastructureError(f"no base image {base}: build it with `autoresearch images build` "
                                  "(or `make images`)")
    training = training_view(spec.data_dir)
    lim = spec.fixed_limits
    train_sha = sha256_file(spec.train_py)
    tag = spec.image or experiment_tag(spec, train_sha)
    labels = image_labels(spec, cli.images.get(base).id, train_sha)
    phases: dict[str, float] = {}
    outcome = Outcome(status="crash", backend="docker", image_tag=tag, phases=phases)
    suffix = f"{sanitize(spec.run, 20)}-{spec.number}-{uuid.uuid4().hex[:8]}"
    containers: list = []
    volumes: list = []
    with_cache = spec.cache_from is not None or spec.cache_to is not None
    common = hardening(spec, suffix)
    env = {"AUTORESEARCH_SEED": str(spec.seed),
           "AUTORESEARCH_DATA_DIR": "/data", "AUTORESEARCH_OUT": "/out", "HOME": "/tmp",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": "/tmp"}
    try:
        # ---- build ----
        t0 = time.perf_counter()
        if spec.image:                                # reproduce: the recorded image as it is
            try:
                outcome.image_id = cli.images.get(spec.image).id
            except docker.errors.ImageNotFound:
                raise InfrastructureError(f"image {spec.image} is not in the Docker engine "
                                          "(pruned?): it cannot be rerun") from None
        else:
            outcome.image_id, _ = images.build_experiment(spec.train_py, base, tag, labels)
        phases["build"] = time.perf_counter() - t0

        # ---- output volume (and compile cache), kept mounted by a holder ----
        t1 = time.perf_counter()
        volume = tmpfs_volume(cli, f"ar-out-{suffix}", spec, suffix, lim.out_bytes, lim.out_files)
        volumes.append(volume)
        held = {volume.name: {"bind": "/out", "mode": "ro"}}
        if with_cache:
            cache_volume = tmpfs_volume(cli, f"ar-cache-{suffix}", spec, suffix, lim.cache_bytes,
                                        lim.cache_files + 1)   # + the folder itself
            volumes.append(cache_volume)
            held[cache_volume.name] = {"bind": CACHE, "mode": "rw"}
        holder = cli.containers.run(
            base, ["sleep", "infinity"], name=f"ar-hold-{suffix}", detach=True,
            volumes=held, mem_limit="64m", pids_limit=8, **common)
        containers.append(holder)
        train_volumes = {volume.name: {"bind": "/out", "mode": "rw"}}
        if with_cache:                                # a private copy of the run's cache
            t = time.perf_counter()
            outcome.compile_cache = cache_in(holder, spec)
            train_volumes[cache_volume.name] = {"bind": CACHE, "mode": "rw"}
            env.update(cache.env(CACHE))
            phases["cache_in"] = time.perf_counter() - t

        # ---- train (untrusted) ----
        mounts = [ro(PREPARE_PY, "/app/prepare.py")] + [ro(p, f"/data/{p.name}") for p in training]
        deadline, told = deadline_env(spec.budget, lim.launch_s)
        env.update(told)
        train = cli.containers.create(
            tag, ["python", "-u", "/app/train.py"], name=f"ar-train-{suffix}",
            environment=env, mounts=mounts, volumes=train_volumes,
            tmpfs={"/tmp": f"size={lim.tmp_bytes},mode=1777"},
            mem_limit=lim.memory_bytes, memswap_limit=lim.memory_bytes,
            nano_cpus=int(lim.cpus * 1e9), pids_limit=lim.pids,
            device_requests=gpu_request(spec), working_dir="/out", **common)
        containers.append(train)
        phases["container_setup"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        stop, mem = threading.Event(), dict[str, int]()
        gpu_sampler = Sampler(spec.gpu).start()           # NVML; a no-op without a GPU
        train.start()
        started = time.monotonic()
        sampler = threading.Thread(target=peak_memory, args=(train, stop, mem), daemon=True)
        sampler.start()
        stop_ = run_to_deadline(train, deadline, base, common, log, containers)
        exit_code, stopped = stop_.exit_code, stop_.at_deadline
        outcome.training_seconds = stop_.at - started
        outcome.stopped_at_deadline = stopped
        if stopped:
            log(f"{train.name}: stopped at the deadline ({spec.budget}s)"
                + ("" if stop_.frozen else ", not frozen: not scored"))
        stop.set()
        gpu_sampler.stop()
        outcome.gpu = gpu_sampler.summary()
        phases["train"] = time.perf_counter() - t2
        train.reload()
        oom_killed = bool(train.attrs["State"].get("OOMKilled"))
        if (inside := inside_seconds(train)) is not None:
            phases["train_inside"] = inside
        log_text = bounded_logs(train, lim.log_bytes)
        outcome.exit_code = exit_code
        outcome.summary = parse_summary(log_text)
        outcome.log_tail = escape_log(log_text, lim.log_bytes)
        outcome.peak_memory_bytes = mem.get("peak")

        status, reason = classify_exit(exit_code, oom_killed, stopped, log_text,
                                       has_model(holder))
        if stopped and not stop_.frozen:
            status, reason = "timeout", UNFROZEN
        outcome.status, outcome.reason = status, reason
        try:
            train.remove(force=True)                  # its GPU memory is given back ...
            containers.remove(train)
        except docker.errors.APIError as e:           # dead already; clean-up tries again
            log(f"warning: could not remove {train.name} yet: {e}")
        lane.trained()                                # ... and the slot may start the next
        if lane.shared:
            outcome.slot_seconds = time.perf_counter() - t0
        if status != "ok":
            return outcome

        # ---- score (trusted) ----
        t3 = time.perf_counter()
        cuts_seed = secrets.randbits(128)             # drawn once the candidate is dead
        try:
            score_in_lane(lane, outcome, lambda cap: score(cli, spec, base, volume, suffix, common,
                                                             containers, outcome, cap, cuts_seed))
        finally:
            phases["score"] = time.perf_counter() - t3

        # ---- copy out ----
        if spec.artifact_dir is not None:
            t4 = time.perf_counter()
            copy_out(holder, "/out/model.pt2", Path(spec.artifact_dir) / "model.pt2", lim.out_bytes)
            phases["copy_out"] = time.perf_counter() - t4
        if with_cache and spec.cache_to is not None and outcome.status == "ok":
            t = time.perf_counter()
            outcome.compile_cache.update(cache_out(holder, spec))
            phases["cache_out"] = time.perf_counter() - t
        return outcome
    finally:
        t5 = time.perf_counter()
        teardown(cli, suffix, containers, volumes, log)
        phases["cleanup"] = time.perf_counter() - t5


def pin_base(spec: TrialSpec) -> TrialSpec:
    """The spec with its base tag resolved here, so that every node builds on the same."""
    if spec.base_image is None and not spec.image:
        return replace(spec, base_image=images.default_base_tag())
    return spec


BACKEND = Backend(name="docker", run=run, sweep_orphans=lambda log: remove_orphans(log=log),
                  abort=abort_own, pin=pin_base)
