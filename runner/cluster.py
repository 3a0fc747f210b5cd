"""Many hosts: trials as Ray tasks (``--cluster ray://HOST:PORT`` or an existing Ray address).

Ray schedules; we add no cluster protocol of our own. One trial is one Ray task that asks for
one GPU (``num_gpus=1``; tests ask for a CPU slot instead). The task carries the candidate's
``train.py`` *content* and the spec's plain fields, never a path of the submitting machine, so the
nodes need not share a filesystem. On the node it:

1. writes ``train.py`` into a private temporary folder;
2. finds the prepared data: the path the submitter named if it holds the same data set (same
   ``manifest.json`` hash), else the node's own ``$AUTORESEARCH_DATA_DIR`` (or ``<repo>/data``) if
   that one matches (a submitter without the data set: the named path as it is); anything else
   is an ``InfrastructureError``: scores on other data would not be comparable;
3. checks that the node's checkout has the same ``prepare.py`` (the scorer) as the submitter;
4. runs ``runner.trial.run_trial`` there, on the GPU Ray assigned (``ray.get_gpu_ids()``; ``None``
   for a CPU task), with limits fitted to *that node* when the submitter asked for a
   ``LimitRequest``: its size (``Machine.here()`` on the node) shared by as many trials as
   Ray can run there at once. The docker backend builds the same content-addressed image as a
   local run would (same tag, labels and base: the submitter resolves the base tag), so a
   record from a node names the same image as one from this machine;
5. returns the record, with a ``cluster`` block saying where it ran (``reproduce`` needs that
   node's Docker engine, which holds the image) and what the backend logged.

A candidate's failure is a record, as locally. An ``InfrastructureError`` or image error on the
node comes back as itself (not wrapped); a task lost with its worker or node comes back as
``ClusterError``. Tasks are never retried by Ray (``max_retries=0``): whether to run a candidate
again is the loop's decision.

The loop uses ``ClusterTrials``, an ``Executor`` (``runner.trial``): each of its slot threads
blocks in one ``run``, and ``abort`` cancels every trial still in flight. For a list of specs,
``run_trials`` keeps ``capacity()`` of them in flight with ``submit_trial`` + ``wait_any``.
Cancelling (not forced) stops a running trial the way Ctrl-C does locally: the node's backend
aborts its containers and removes them. A trial whose worker was killed outright (forced
cancel, node out of memory) leaves its containers to the backend's ``sweep_orphans``, which the
next trial on that node's new worker runs.

Nodes need the project installed (``pip install -e '.[cluster]'``, the same commit), the Docker
engine and base image (``autoresearch images build``) and the prepared data, and join the head
with ``ray start --address=HEAD:6379 --num-gpus=N``. A plain ``HOST:PORT`` (the GCS address) or
``auto`` is for a submitter that is itself a node of the cluster; from anywhere else, use the Ray
Client address ``ray://HEAD:10001``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from runner.record import Record
from runner.sandbox import (ALONE, Backend, InfrastructureError, Lane, LimitRequest, Limits,
                            Log, Machine, TrialSpec, get_backend)

RAY_CLIENT_PORT = 10001          # `ray start --head` default for the Ray Client server
RAY_GCS_PORT = 6379              # `ray start --head` default for the GCS
PROBE_TIMEOUT_S = 5.0            # a closed or unreachable address fails this fast
NODE_LOG_LINES = 50              # backend log lines a node sends back with the record


class ClusterError(RuntimeError):
    """The cluster could not be reached, or lost a trial (worker or node died). Not the
    candidate's fault; the message names the address or the trial."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed: `pip install -e '.[cluster]'` "
                           "(or `pip install 'ray[client]==2.60.*'`)") from None
    return ray


# ------------------------------------------------------------------------------------------
# Connecting
# ------------------------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int] | None:
    """The TCP endpoint an address points at, or None for `auto` (found by Ray itself)."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if rest in ("", "auto", "local"):
        return None
    rest = rest.split("/", 1)[0]
    default = RAY_CLIENT_PORT if address.startswith("ray://") else RAY_GCS_PORT
    if rest.startswith("["):                                  # [v6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise ClusterError(f"cluster address {address!r} has no host: use ray://HOST:PORT or HOST:PORT")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise ClusterError(f"cluster address {address!r}: {port!r} is not a port") from None


def _probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, when nothing listens there (Ray itself would
    retry for 30 s or more before saying so)."""
    endpoint = _host_port(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            pass
    except OSError as exc:
        what = "the Ray Client server" if address.startswith("ray://") else "a Ray GCS"
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address}: nothing answers on "
            f"{endpoint[0]}:{endpoint[1]} ({exc.strerror or exc}). Is {what} running there "
            "(`ray start --head`, Ray Client port 10001, GCS port 6379) and reachable from here?"
        ) from None


def connect(address: str, log: Log = lambda _: None) -> None:
    """Connect this process to the Ray cluster at `address`: ``ray://HOST:PORT`` (Ray Client),
    ``HOST:PORT`` of a cluster's GCS, or ``auto``. Quiet (warnings only, task output not
    forwarded), no usage statistics, no dashboard. Raises ClusterError naming the address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _ray()
    _probe(address)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=True)
    except Exception as exc:                                  # Ray raises many kinds here
        hint = ""
        if "Starting Ray client server failed" in str(exc):
            hint = ("\nThe head's Ray Client proxy could not start a server for this client. With "
                    "grpcio 1.81 or later that server can crash at birth (grpc/grpc#43055): install "
                    "the head with `pip install -e '.[cluster]'` (grpcio<1.79) or start it with "
                    "GRPC_ENABLE_FORK_SUPPORT=0; its logs are in <temp dir>/session_latest/logs/"
                    "ray_client_server*.")
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: "
                           f"{type(exc).__name__}: {str(exc)[-500:]}{hint}") from exc
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    log(f"ray: connected to {address}: {nodes} node(s), {res.get('CPU', 0):g} CPU, "
        f"{res.get('GPU', 0):g} GPU")


def disconnect() -> None:
    """Leave the cluster (tasks in flight are the cluster's to finish or drop)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def capacity(num_gpus: float = 1.0, num_cpus: float = 1.0) -> int:
    """How many trials of this size the cluster holds at once (total resources; what other
    jobs use is not subtracted). 0 when none fits, e.g. a GPU trial on a cluster without GPUs."""
    res = _ray().cluster_resources()
    fits = []
    if num_gpus > 0:
        fits.append(int(res.get("GPU", 0) // num_gpus))
    if num_cpus > 0:
        fits.append(int(res.get("CPU", 0) // num_cpus))
    return min(fits) if fits else 0


# ------------------------------------------------------------------------------------------
# One trial as a Ray task
# ------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def trial_payload(spec: TrialSpec, backend: str, record_fields: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """What travels to the node: contents and plain values, no path that only exists here
    (the data path travels as a hint, checked against the manifest hash)."""
    from runner.paths import PREPARE_PY

    spec = get_backend(backend).pin(spec)
    fixed = isinstance(spec.limits, Limits)
    return {
        "train_py": Path(spec.train_py).read_bytes(),
        "data_dir": str(spec.data_dir),
        "data_manifest_sha256": _sha256(Path(spec.data_dir) / "manifest.json"),
        "prepare_sha256": _sha256(PREPARE_PY),
        "backend": backend,
        "record_fields": dict(record_fields or {}),
        "spec": {
            "budget": spec.budget, "run": spec.run, "number": spec.number, "seed": spec.seed,
            "limits": asdict(spec.limits), "fixed_limits": fixed, "labels": dict(spec.labels),
            "artifact_dir": str(spec.artifact_dir) if spec.artifact_dir is not None else None,
            "eval_tokens": spec.eval_tokens, "base_image": spec.base_image, "image": spec.image,
        },
    }


def node_data_dir(requested: str, manifest_sha256: str | None) -> Path:
    """The node's copy of the data set the submitter used (see the module docstring)."""
    from runner.paths import data_dir as default_data_dir

    candidates = [Path(requested)]
    if manifest_sha256 is not None:            # only the same data set, found by its hash
        candidates.append(default_data_dir())
    for folder in dict.fromkeys(candidates):
        found = _sha256(folder / "manifest.json")
        if found is not None and (manifest_sha256 is None or found == manifest_sha256):
            return folder
    want = f"manifest {manifest_sha256[:12]}" if manifest_sha256 else "a prepared data set"
    where = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise InfrastructureError(
        f"node {socket.gethostname()} has no {want} in {where}: "
        "run `autoresearch prepare` there with the same --dataset and --vocab-size (or set "
        "AUTORESEARCH_DATA_DIR on the node before `ray start`)")


_orphans_checked = False


def node_share(gpu: str | None) -> int:
    """How many trials this node runs at once, as Ray schedules them: one per GPU for GPU
    trials (as locally), else its CPUs over the CPUs each task holds."""
    if gpu is not None:
        return 1
    import ray

    ctx = ray.get_runtime_context()
    per_task = ctx.get_assigned_resources().get("CPU") or 1.0
    node: dict[str, Any] = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), {})
    return max(1, int((node.get("Resources") or {}).get("CPU", per_task) // per_task))


def node_limits(fields: dict[str, Any], fixed: bool, gpu: str | None) -> Limits | LimitRequest:
    """The spec's limits on this node: fixed ones as sent, a request with its share filled in
    (the node's size itself is read by `run_trial`, here)."""
    if fixed:
        return Limits(**fields)
    request = LimitRequest(**fields)
    if request.share is None:
        request.share = node_share(gpu)
    return request


def _node_trial(payload: dict[str, Any]) -> Record:
    """Runs on a Ray worker: one trial, as `run_trial` would run it locally."""
    global _orphans_checked
    import ray

    from runner.paths import PREPARE_PY
    from runner.trial import run_trial

    started = time.time()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr, flush=True)               # the node's worker log

    if payload["prepare_sha256"] and _sha256(PREPARE_PY) != payload["prepare_sha256"]:
        raise InfrastructureError(
            f"node {socket.gethostname()} has a different prepare.py (the scorer) in "
            f"{PREPARE_PY.parent.parent}: check out the submitter's commit there")
    data_dir = node_data_dir(payload["data_dir"], payload["data_manifest_sha256"])
    gpu_ids = ray.get_gpu_ids()
    gpu = str(gpu_ids[0]) if gpu_ids else None
    backend = get_backend(payload["backend"])
    if not _orphans_checked:                                    # left by a worker that died
        try:
            backend.sweep_orphans(log)
        finally:
            _orphans_checked = True
    fields = dict(payload["spec"])
    fields["limits"] = node_limits(fields["limits"], fields.pop("fixed_limits"), gpu)
    machine = Machine.here()
    if fields["artifact_dir"] is not None:
        fields["artifact_dir"] = Path(fields["artifact_dir"])    # on this node
    with tempfile.TemporaryDirectory(prefix="autoresearch-node-") as tmp:
        train_py = Path(tmp) / "train.py"
        train_py.write_bytes(payload["train_py"])
        spec = TrialSpec(train_py=train_py, data_dir=data_dir, gpu=gpu, **fields)
        record = _interruptible(lambda: run_trial(spec, backend.name, log=log, machine=machine,
                                                  **payload["record_fields"]),
                                backend, spec.run, log)
    ctx = ray.get_runtime_context()
    record["cluster"] = {
        "node": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ctx.get_node_id(),
        "gpu": gpu,
        "data_dir": str(data_dir),
        "machine": asdict(machine),
        "started": started,
        "finished": time.time(),
        "log": lines[-NODE_LOG_LINES:],
    }
    return record


def _interruptible(work: Callable[[], Record], backend: Backend, run: str, log: Log) -> Record:
    """Run `work` so that a non-forced `ray.cancel` stops it cleanly.

    Ray cancels a running task with `_thread.interrupt_main()`: a KeyboardInterrupt that waits
    for the main thread to run Python code, which it does not do while the backend blocks in
    `container.wait()` (up to the hard cap); and Ray repeats it every few seconds until the
    task ends. So the trial runs in a thread and the main thread waits on an Event in short
    steps (not `Thread.join`: a join interrupted by KeyboardInterrupt can mark a live thread as
    finished). On the first interrupt a reaper thread kills the containers this worker owns (the
    backend then sees them end and removes them and its volume, as on Ctrl-C locally); the main
    thread waits for it through the repeated interrupts, then ends the task as cancelled. Other
    backends are waited for: they end at their own hard cap."""
    box: dict[str, Any] = {}
    done, reaped = threading.Event(), threading.Event()

    def target() -> None:
        try:
            box["record"] = work()
        except BaseException as exc:                            # noqa: BLE001 (re-raised below)
            box["error"] = exc
        finally:
            done.set()

    def reap() -> None:
        try:
            _stop_trial(done, backend, run, log)
        finally:
            reaped.set()

    threading.Thread(target=target, name="autoresearch-trial", daemon=True).start()
    try:
        while not done.wait(0.25):
            pass
    except KeyboardInterrupt:
        log("trial cancelled: stopping it")
        threading.Thread(target=reap, name="autoresearch-reaper", daemon=True).start()
        while not reaped.is_set():
            try:
                reaped.wait(0.25)
            except KeyboardInterrupt:                           # Ray repeats the cancel
                pass
        raise KeyboardInterrupt("trial cancelled") from None
    if "error" in box:
        raise box["error"]
    return box["record"]


def _stop_trial(done: threading.Event, backend: Backend, run: str, log: Log,
                deadline_s: float = 120.0) -> None:
    """Until the trial has finished (`done` is set): abort this worker's trials of `run` (a
    Ray worker runs one task at a time, so they are this trial's; containers created after
    the interrupt, while the build was still running, go as they appear)."""
    deadline = time.monotonic() + deadline_s
    try:
        while not done.is_set() and time.monotonic() < deadline:
            backend.abort(run)
            done.wait(0.5)
    except Exception as exc:                                    # noqa: BLE001
        log(f"warning: could not stop the cancelled trial: {exc}")
        done.wait(max(0.0, deadline - time.monotonic()))
    if not done.is_set():
        log(f"warning: the cancelled trial still runs after {deadline_s:.0f} s; a later task "
            "on this node removes what it leaves")


_remote_trial = None


def _remote():
    global _remote_trial
    if _remote_trial is None:
        # max_retries=0: a trial that lost its worker is reported, never silently rerun.
        _remote_trial = _ray().remote(max_retries=0)(_node_trial)
    return _remote_trial


def submit_trial(spec: TrialSpec, backend: str = "docker", record_fields: dict[str, Any] | None = None,
                 num_gpus: float = 1.0, num_cpus: float = 1.0):
    """Start one trial as a Ray task; returns its ObjectRef (the record, once done). Requires
    `connect` first. `spec.gpu` is ignored: the node uses the GPU Ray gives the task."""
    ray = _ray()
    if not ray.is_initialized():
        raise ClusterError("not connected to a Ray cluster: call runner.cluster.connect first")
    payload = trial_payload(spec, backend, record_fields)
    return _remote().options(num_gpus=num_gpus, num_cpus=num_cpus,
                             name=f"trial {spec.run}-{spec.number}").remote(payload)


def _result(ref) -> Record | BaseException:
    """The record behind a finished ref, or the exception that stands for it: the node's own
    exception (InfrastructureError, ImageError...) unwrapped, Ray's own failures (cancelled,
    worker or node died, object lost) as ClusterError."""
    ray = _ray()
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (ray.exceptions.TaskCancelledError, KeyboardInterrupt)):
            return ClusterError(f"trial cancelled ({ref})")
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
            return cause
        return ClusterError(f"the trial failed on the cluster: {str(exc)[-1000:]}")
    except ray.exceptions.TaskCancelledError:
        return ClusterError(f"trial cancelled ({ref})")
    except ray.exceptions.RayError as exc:                      # worker or node died, lost object
        return ClusterError(f"the cluster lost a trial ({type(exc).__name__}): {str(exc)[-500:]}")


def wait_any(refs: Sequence, timeout: float | None = None
             ) -> tuple[list[tuple[Any, Record | BaseException]], list]:
    """Wait until at least one of `refs` finishes (or `timeout` seconds pass). Returns
    ([(ref, record or exception), ...] for every finished one, [refs still running]).
    Exceptions are returned, not raised, so that one failure loses no other result."""
    if not refs:
        return [], []
    ray = _ray()
    done, pending = ray.wait(list(refs), num_returns=1, timeout=timeout)
    if done:                                                    # collect all that are ready now
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        done = done + more
    return [(ref, _result(ref)) for ref in done], list(pending)


def cancel(refs: Iterable) -> None:
    """Ask running trials to stop. Not forced: the task gets KeyboardInterrupt, so the backend
    removes its containers on the way out, as on Ctrl-C locally."""
    ray = _ray()
    for ref in refs:
        try:
            ray.cancel(ref, force=False)
        except Exception:                                       # already finished or gone
            pass


class ClusterTrials:
    """An `Executor` (``runner.trial``) whose trials are Ray tasks: `run` blocks like
    `run_trial` (so N slot threads keep N trials in flight) and raises what it would
    (InfrastructureError, image errors) or ClusterError; `abort` cancels every trial still in
    flight (the loop's Ctrl-C: their containers are on the nodes, not here). Nothing to sweep
    here: each node sweeps its own. Connect first (`connect`)."""

    def __init__(self, backend: str = "docker", num_gpus: float = 1.0, num_cpus: float = 1.0):
        self.backend = backend
        self.num_gpus, self.num_cpus = num_gpus, num_cpus
        self._lock = threading.Lock()
        self._in_flight: dict[int, Any] = {}

    def run(self, spec: TrialSpec, log: Log = lambda _: None, lane: Lane = ALONE,
            **record_fields: Any) -> Record:
        # A trial on a node is scored alone: `lane` is never told, and the slot waits for it.
        ref = submit_trial(spec, self.backend, record_fields, self.num_gpus, self.num_cpus)
        with self._lock:
            self._in_flight[id(ref)] = ref
        try:
            result = _result(ref)
        finally:
            with self._lock:
                self._in_flight.pop(id(ref), None)
        if isinstance(result, BaseException):
            raise result
        where = result.get("cluster", {})
        for line in where.get("log", []):
            log(f"[{where.get('node', '?')}] {line}")
        return result

    def sweep_orphans(self, log: Log) -> int:
        return 0

    def abort(self, run: str | None = None) -> int:
        """Cancel the trials in flight (this executor runs one run's trials); how many."""
        with self._lock:
            refs = list(self._in_flight.values())
        cancel(refs)
        return len(refs)

    def uses_gpu(self, slot: str | None) -> bool:
        return self.num_gpus > 0


def run_trials(specs: Iterable[TrialSpec], backend: str = "docker",
               record_fields: Callable[[TrialSpec], dict[str, Any]] | None = None,
               in_flight: int | None = None, num_gpus: float = 1.0, num_cpus: float = 1.0
               ) -> Iterator[tuple[TrialSpec, Record | BaseException]]:
    """Run `specs` on the cluster with at most `in_flight` at once (default: `capacity`),
    yielding (spec, record or exception) in the order they finish. Closing the generator
    (or Ctrl-C) cancels the trials still running."""
    limit = in_flight if in_flight is not None else max(capacity(num_gpus, num_cpus), 1)
    todo = iter(specs)
    running: dict[Any, TrialSpec] = {}
    try:
        while True:
            while len(running) < limit:
                spec = next(todo, None)
                if spec is None:
                    break
                ref = submit_trial(spec, backend, record_fields(spec) if record_fields else None,
                                   num_gpus=num_gpus, num_cpus=num_cpus)
                running[ref] = spec
            if not running:
                return
            finished, _ = wait_any(list(running))
            for ref, result in finished:
                yield running.pop(ref), result
    finally:
        if running:
            cancel(running)
