"""The process backend: plain subprocesses with resource limits. NOT a sandbox.

For machines without a container engine (a bare GPU box). One trial runs the same phases as the
docker backend and returns the same ``Outcome``:

- **build**: a private work folder (mode 0700, removed on every path out of ``run``; at the same
  path from trial to trial where it can be, see `work_folder`) holding
  ``train.py`` and ``prepare.py`` side by side (so ``import prepare`` works as in the container's
  ``/app``), ``data/`` with symlinks to only the *training* part of the data set (never ``val/``),
  an empty ``out/``, ``home/`` and ``tmp/``, and, when the spec has a compile cache, ``cache/``:
  a private copy of the run's (``runner.sandbox.cache``), read back only from a scored trial.
- **train**: ``python -u train.py`` in its own session and process group, stdin closed, output
  merged into one pipe of which only the last ``limits.log_bytes`` are kept, an explicit minimal
  environment (nothing of the host's but PATH and the few GPU library variables), core dumps off,
  a per-file size limit, an open-file limit and, without a GPU, an address-space limit. The
  budget is wall time from the launch, told to the candidate as ``AUTORESEARCH_DEADLINE``; at the
  deadline the whole group is stopped (SIGSTOP, which cannot be caught), so the ``model.pt2`` it
  had saved is final, and then SIGKILLed. After any exit, every process left in the group or
  session, or carrying this trial's marker in its environment, is SIGKILLed too.
- **score**: ``model.pt2`` is copied (never through a link) into a separate folder and the
  trusted ``prepare.py score`` runs on it with the whole data set; its one JSON line is the score.

What this does NOT do: the candidate runs as this user, on this machine, with this user's files,
network, GPUs and credentials on disk. The training view of the data is a courtesy to honest code
(a symlink can be followed to ``val/``), the limits are per process, and a process that leaves
the session and scrubs its environment can outlive the trial. The clock is no better: SIGSTOP
reaches the process group, so a candidate that forks a process out of the group (``setsid``)
keeps it running past the deadline until the kill that follows, and can write a model in that
moment or, with a scrubbed environment, long after. The compile cache is a private copy in
the work folder, read back only from a scored trial (`runner.sandbox.cache`), but a candidate
that runs as this user can write the run's cache folder itself. Use the docker backend for
anything you would not run yourself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.gpu import Sampler
from runner.paths import PREPARE_PY
from runner.sandbox import cache
from runner.sandbox.base import (ALONE, Backend, Lane, Log, Outcome, TrialSpec, deadline_env,
                                 score_in_lane, scorer_options, training_view)
from runner.sandbox.output import apply_score, classify_exit, escape_log, parse_summary

WARNING = ("WARNING: the process backend is NOT a sandbox and isolates nothing: train.py runs "
           "as user {user} on this machine, with this user's files, network, GPUs and any "
           "credentials on disk, and its clock stops only its process group (a process that "
           "forks out of the group escapes the budget). Use the docker backend for candidates "
           "you do not trust.")

# Host variables passed through when set: GPU boxes need the library paths, and the NCCL/torch
# switches keep multi-GPU hosts from using NVLink multicast. Nothing else of the host's passes.
PASS_THROUGH = ("LD_LIBRARY_PATH", "CUDA_HOME", "NCCL_NVLS_ENABLE",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
MARKER = "AUTORESEARCH_TRIAL_ID"        # set in the candidate's env: finds processes that escaped
NOFILE = 4096
SAMPLE_S = 0.5                          # memory sampling and deadline check interval
DRAIN_S = 2.0                           # how long to read leftover output after the exit
SCORE_OUT_BYTES = 64 * 1024             # the scorer prints one JSON line
SCORE_ERR_BYTES = 64 * 1024

# Sets the limits, then becomes the real command (exec keeps the pid, so the group and the
# session are the same). Runs with -I -S: no site, no user paths. Used instead of preexec_fn,
# which can deadlock when the runner has threads (one trial per GPU slot).
LAUNCHER = """\
import json, os, resource, sys
for name, value in json.loads(sys.argv[1]).items():
    which = getattr(resource, name)
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
os.execv(sys.argv[2], sys.argv[2:])
"""

_warned_stderr = False


def warn(log: Log) -> None:
    """The loud warning: through the log on every trial, and once per process on stderr."""
    global _warned_stderr
    try:
        import pwd
        user = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        user = str(os.getuid())
    text = WARNING.format(user=user)
    log(text)
    if not _warned_stderr:
        _warned_stderr = True
        print(text, file=sys.stderr, flush=True)


# ---- processes ------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, sid) of a live process, or None when it is gone or a zombie (a zombie
    holds no memory and cannot be killed; its parent or init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def all_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read(1 << 20).split(b"\0")
    except OSError:
        return False


def members(pgid: int, marker: bytes | None = None) -> list[int]:
    """Processes of the trial: in its group or its session (the leader's pid is both), or,
    when `marker` is given, carrying it in their environment (setsid does not drop that)."""
    me = os.getpid()
    found = []
    for pid in all_pids():
        if pid == me:
            continue
        st = proc_stat(pid)
        if st is None:
            continue
        if st[1] == pgid or st[2] == pgid or (marker is not None and has_marker(pid, marker)):
            found.append(pid)
    return found


def kill_all(pgid: int, marker: bytes) -> None:
    """SIGKILL the trial's group, then anything still in its session or carrying its marker,
    until nothing is found (bounded: a fork bomb outside the group is not chased forever)."""
    for attempt in range(10):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        left = members(pgid, marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05 * (attempt + 1))


def group_rss(pgid: int) -> int:
    """Resident bytes summed over the trial's group (shared pages count more than once)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in all_pids():
        st = proc_stat(pid)
        if st is None or st[1] != pgid:
            continue
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: while it is a zombie its pid (the
    group's id) cannot be reused, so killing the group afterwards cannot hit a stranger."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def exit_code_of(returncode: int) -> int:
    """Shell convention, as docker reports it: death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


# ---- files ----------------------------------------------------------------------------------

def copy_regular(src: Path, dest: Path, max_bytes: int | None = None) -> bool:
    """Copy `src` to `dest` only if it is a regular file (a symlink, FIFO, device or folder is
    refused without being opened for reading). Returns whether it was copied."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open(fd, "rb", closefd=False) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, dest)
        return True
    finally:
        os.close(fd)


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def build_env(folder: Path, gpu: str | None) -> dict[str, str]:
    """The explicit environment of a child: nothing of the host's but PATH and PASS_THROUGH."""
    (folder / "home").mkdir(exist_ok=True)
    (folder / "tmp").mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8", "HOME": str(folder / "home"), "TMPDIR": str(folder / "tmp"),
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "CUDA_VISIBLE_DEVICES": gpu or "",
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}             # the numbering NVML and docker use
    for name in PASS_THROUGH:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def launch(argv: list[str], cwd: Path, env: dict[str, str], rlimits: dict[str, int],
           stdout, stderr, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `argv` in its own session (and so its own process group) under `rlimits`, with no
    descriptor of the runner's but `pass_fds`."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(rlimits), *argv],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True, close_fds=True, pass_fds=pass_fds)


def rlimits_for(memory_bytes: int, gpu: str | None, out_bytes: int) -> dict[str, int]:
    limits = {"RLIMIT_CORE": 0, "RLIMIT_FSIZE": out_bytes, "RLIMIT_NOFILE": NOFILE}
    if not gpu:                                   # CUDA maps huge virtual ranges
        limits["RLIMIT_AS"] = memory_bytes
    return limits


BYTECODE_PACKAGES = ("torch", "triton", "sympy", "numpy")   # most of a trial's imports
BYTECODE_MISSING_OK = 0.01      # pip skips the odd source that does not compile on this Python


def bytecode_complete(roots: list[str]) -> bool:
    """Whether every Python source under `roots` has this interpreter's bytecode beside it
    (``__pycache__``), but for `BYTECODE_MISSING_OK` of them."""
    tag = sys.implementation.cache_tag
    total = missing = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            have = set()
            with contextlib.suppress(OSError):
                have = set(os.listdir(os.path.join(folder, "__pycache__")))
            for name in files:
                if name.endswith(".py"):
                    total += 1
                    missing += f"{name[:-3]}.{tag}.pyc" not in have
    return missing <= BYTECODE_MISSING_OK * total


@functools.cache
def installed_bytecode() -> bool:
    """Whether the packages a trial's start-up imports (`BYTECODE_PACKAGES`) come with their
    bytecode. pip writes it when it installs; an installation without it (read-only, or made
    with --no-compile) compiles ~1,800 of torch's modules in every process: 5-6 s of each
    trial's start-up on an H200 box. Every source counts, not a few: on a writable installation
    without it, the processes that import torch write the bytecode of what *they* import beside
    the sources (torch itself, Dynamo), and the rest (inductor, ~0.8 s on that box) was still
    compiled in every trial while a check of three files said all was there. Without it, a
    trial with a compile cache keeps the bytecode there too (`cache.bytecode_env`)."""
    import importlib.util
    for name in BYTECODE_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)      # found, not imported
        except (ImportError, ValueError):
            continue                                   # not installed: nothing to compile then
        if spec is None or not spec.submodule_search_locations:
            continue
        if not bytecode_complete(list(spec.submodule_search_locations)):
            return False
    return True


# ---- the phases -----------------------------------------------------------------------------

def train(spec: TrialSpec, work: Path, marker: str, outcome: Outcome, procs: list,
          lock: int | None = None) -> str:
    """Run train.py to its end or the cap; fills the outcome's train fields; returns the log.
    `lock` (its folder's, `work_folder`) is inherited by the candidate."""
    lim = spec.fixed_limits
    env = build_env(work, spec.gpu)
    env.update({"AUTORESEARCH_SEED": str(spec.seed),
                "AUTORESEARCH_DATA_DIR": str(work / "data"), "AUTORESEARCH_OUT": str(work / "out"),
                MARKER: marker})
    if uses_cache(spec):
        env.update(cache.env(str(work / "cache")))
        if not installed_bytecode():                  # torch's, else compiled every trial
            env.pop("PYTHONDONTWRITEBYTECODE")
            env.update(cache.bytecode_env(str(work / "cache")))
    deadline, told = deadline_env(spec.budget)        # a fork is the runner's only overhead
    env.update(told)
    read_fd, write_fd = os.pipe()
    try:
        proc = launch([sys.executable, "-u", "train.py"], work, env,
                      rlimits_for(lim.memory_bytes, spec.gpu, lim.out_bytes), write_fd, write_fd,
                      () if lock is None else (lock,))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    started = time.monotonic()
    procs.append(proc)
    tail, total, peak = bytearray(), 0, 0
    stopped = False
    next_sample = 0.0
    os.set_blocking(read_fd, False)
    eof = False
    try:
        while True:
            now = time.monotonic()
            if now >= next_sample:
                peak = max(peak, group_rss(proc.pid))
                next_sample = now + SAMPLE_S
            if exited(proc.pid):
                break
            if now >= deadline:
                stopped = True
                try:                              # freeze the group: nothing more is written
                    os.killpg(proc.pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    pass
                break
            if eof:                               # output closed; wait for the exit
                time.sleep(min(0.05, max(0.0, deadline - now)))
                continue
            if readable(read_fd, min(SAMPLE_S, max(0.0, deadline - now))):
                chunk = read_some(read_fd)
                if chunk is None:
                    continue
                if not chunk:
                    eof = True
                    continue
                total += len(chunk)
                tail += chunk
                if len(tail) > 2 * lim.log_bytes:
                    del tail[:-lim.log_bytes]
        outcome.training_seconds = time.monotonic() - started
        # The leader is dead (or still a zombie we hold) or frozen at the deadline: kill what is
        # left (SIGKILL ends a stopped process too).
        kill_all(proc.pid, f"{MARKER}={marker}".encode())
        returncode = proc.wait(timeout=30)
        outcome.stopped_at_deadline = stopped
        # Read what is still buffered in the pipe (bounded: everything that wrote is dead).
        end = time.monotonic() + DRAIN_S
        while not eof and time.monotonic() < end:
            if not readable(read_fd, max(0.0, end - time.monotonic())):
                break
            chunk = read_some(read_fd)
            if chunk is None:
                continue
            if not chunk:
                break
            total += len(chunk)
            tail += chunk
            if len(tail) > 2 * lim.log_bytes:
                del tail[:-lim.log_bytes]
    finally:
        os.close(read_fd)
    del tail[:-lim.log_bytes]
    text = tail.decode("utf-8", errors="replace")
    note = f"[{total - len(tail):,} earlier bytes of output dropped]\n" if total > len(tail) else ""
    # Only a SIGKILL the runner did not send counts as the kernel's OOM killer.
    oom_killed = returncode == -signal.SIGKILL and not stopped
    outcome.exit_code = exit_code_of(returncode)
    outcome.summary = parse_summary(text)
    outcome.log_tail = note + escape_log(text, max(1, lim.log_bytes - len(note)))
    outcome.peak_memory_bytes = peak or None
    outcome.status, outcome.reason = classify_exit(outcome.exit_code, oom_killed, stopped, text,
                                                   is_regular(work / "out" / "model.pt2"))
    return text


def readable(fd: int, timeout_s: float) -> bool:
    """Whether `fd` has data or EOF within `timeout_s` (poll: no FD_SETSIZE limit)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(int(timeout_s * 1000)))


def read_some(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno == errno.EINTR:
            return None
        return b""


def score(spec: TrialSpec, model: Path, folder: Path, outcome: Outcome, procs: list,
          memory_fraction: float | None = None, cuts_seed: int | None = None) -> None:
    """Run the trusted scorer on `model` (a copy the candidate cannot reach any more), with at
    most `memory_fraction` of the GPU's memory when given, and the causality cuts of
    `cuts_seed` (the trial's: a scoring done again alone draws the same)."""
    lim = spec.fixed_limits
    env = build_env(folder, spec.gpu)
    if spec.eval_tokens:
        env["AUTORESEARCH_EVAL_TOKENS"] = str(spec.eval_tokens)
    options = scorer_options(memory_fraction, cuts_seed)
    out_path, err_path = folder / "score.out", folder / "score.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = launch([sys.executable, "-I", str(PREPARE_PY), "score", "--model", str(model),
                       "--data-dir", str(Path(spec.data_dir).resolve()),
                       "--device", "cuda" if spec.gpu else "cpu"] + options,
                      folder, env, rlimits_for(lim.score_memory_bytes, spec.gpu, lim.out_bytes),
                      out, err)
    procs.append(proc)
    deadline = time.monotonic() + lim.score_timeout_s
    while not exited(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    timed_out = not exited(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)       # stray workers; the leader is a zombie or late
    except (ProcessLookupError, PermissionError):
        pass
    returncode = proc.wait(timeout=30)
    if timed_out:
        outcome.status, outcome.reason = "invalid", "scoring timed out"
        outcome.score = {"status": "invalid", "reason": outcome.reason, "cause": "time"}
        return
    stdout = tail_of(out_path, SCORE_OUT_BYTES)
    stderr = tail_of(err_path, SCORE_ERR_BYTES)
    apply_score(outcome, exit_code_of(returncode), stdout, stderr)


# ---- the trial's folder ----------------------------------------------------------------------

POOL_SIZE = 64                          # trials of one user at once that get a reused path


def pool_dir() -> Path | None:
    """`<temp dir>/autoresearch-trials-<uid>`, made if missing; None unless it is a real folder
    (not a link) of this user's that nobody else may enter (another user could otherwise
    make it first and watch or swap what a trial writes there)."""
    base = Path(tempfile.gettempdir()) / f"autoresearch-trials-{os.getuid()}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


@dataclass
class WorkFolder:
    """Where train.py runs, and the flock'd descriptor that holds its pooled path (None: not
    pooled, or given back)."""

    path: Path
    lock: int | None = None


def work_folder(root: Path) -> WorkFolder:
    """The folder train.py runs in (mode 0700, empty). Its path is the same from trial to trial
    where it can be: libraries that compile GPU code at run time write the working directory
    into that code (cuDNN's generated attention kernels do), so the CUDA driver's cache, keyed
    by the code, finds nothing a trial at another path left and compiles it again: ~2 s of a
    trial's start-up on an H200 (bench/RESULTS.md). The docker backend's is always /out.

    So: `<pool>/<n>` for the lowest n whose lock (`<pool>/<n>.lock`, flock) is free. The
    candidate inherits the lock, so the path stays taken while any process of its trial lives
    (one left running by a runner that was killed cannot write into a later trial's folder).
    A trial gives the path back as soon as it has trained (`vacate`), so the next trial on its
    GPU, started while this one is scored, trains at the same path; trials training at once
    (other GPUs, another runner of this user's) take other numbers, each compiled for once.
    What a killed runner left there is removed first. Without a safe pool (`pool_dir`) or a
    free number: `root/work`, as random as the trial's own folder."""
    base = pool_dir()
    for n in range(POOL_SIZE if base is not None else 0):
        assert base is not None                   # for the type checker: no pool, no numbers
        lock_path = base / f"{n}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, named = os.fstat(fd), os.lstat(lock_path)
            if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
                raise OSError("the lock file was replaced")   # a temp cleaner removed it
            os.utime(fd)                          # in use: not for a cleaner by age
            work = base / str(n)
            remove_tree(work)                     # a runner killed mid-trial left it
            os.mkdir(work, 0o700)
            return WorkFolder(work, fd)
        except OSError:                           # held by a trial, or not removable: the next
            os.close(fd)
    (root / "work").mkdir(mode=0o700)
    return WorkFolder(root / "work")


def vacate(folder: WorkFolder, root: Path) -> None:
    """After training (the candidate's processes are dead): move its folder out of the pooled
    path into the trial's own `root` (a rename: instant) and give the path back. Where the move
    fails the path is kept to the end, as before. Ordered so that an interrupt at any point
    leaves `folder` right for `release`."""
    if folder.lock is None:
        return
    try:
        os.rename(folder.path, root / "work")
    except OSError:
        return
    folder.path = root / "work"
    lock, folder.lock = folder.lock, None
    os.close(lock)                                # the flock goes with the last descriptor


def remove_tree(path: Path) -> None:
    """Remove `path` whatever it is: a link is unlinked, never followed; a folder left without
    write or search permission (a candidate's chmod) is given them back to be removed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        return
    for top, dirs, _ in os.walk(path):            # never follows links
        for sub in [top] + [os.path.join(top, d) for d in dirs]:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(sub).st_mode):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def release(folder: WorkFolder) -> None:
    """Remove the trial's work folder, then let another trial take its path."""
    remove_tree(folder.path)
    lock, folder.lock = folder.lock, None
    if lock is not None:
        os.close(lock)


def uses_cache(spec: TrialSpec) -> bool:
    return spec.cache_from is not None or spec.cache_to is not None


def tail_of(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read().decode("utf-8", errors="replace")


def run(spec: TrialSpec, log: Log, lane: Lane = ALONE) -> Outcome:
    warn(log)
    training = training_view(Path(spec.data_dir))
    lim = spec.fixed_limits
    phases: dict[str, float] = {}
    outcome = Outcome(status="crash", backend="process", image_tag=None, phases=phases)
    marker = uuid.uuid4().hex
    procs: list[subprocess.Popen] = []
    root = Path(tempfile.mkdtemp(prefix=f"autoresearch-{marker[:8]}-"))   # mode 0700
    folder: WorkFolder | None = None
    try:
        # ---- build ----
        t0 = time.perf_counter()
        folder = work_folder(root)
        work = folder.path
        (work / "data").mkdir()
        (work / "out").mkdir()
        shutil.copyfile(spec.train_py, work / "train.py")
        shutil.copyfile(PREPARE_PY, work / "prepare.py")
        for part in training:
            (work / "data" / part.name).symlink_to(part.resolve())
        phases["build"] = time.perf_counter() - t0
        if uses_cache(spec):                      # a private copy of the run's compile cache
            t = time.perf_counter()
            given = work / "cache"
            outcome.compile_cache = cache.hand_out(
                spec.cache_from, lambda src, b, f: cache.copy_tree(src, given, b, f),
                lim.cache_bytes, lim.cache_files)
            given.mkdir(exist_ok=True)
            phases["cache_in"] = time.perf_counter() - t

        # ---- train (untrusted, and NOT isolated) ----
        t1 = time.perf_counter()
        log(f"training {spec.train_py} for {spec.budget}s of wall time in {work}; the clock "
            "stops its process group, and a process that leaves the group escapes it")
        gpu_sampler = Sampler(spec.gpu).start()           # NVML; a no-op without a GPU
        try:
            train(spec, work, marker, outcome, procs, folder.lock)
        finally:
            gpu_sampler.stop()
            outcome.gpu = gpu_sampler.summary()
            phases["train"] = time.perf_counter() - t1
        vacate(folder, root)                      # the next trial may train at its path
        work = folder.path
        lane.trained()                            # its processes are dead: the slot is free
        if lane.shared:
            outcome.slot_seconds = time.perf_counter() - t0
        if outcome.status != "ok":
            return outcome

        # ---- score (trusted) ----
        t2 = time.perf_counter()
        scoring = root / "score"
        scoring.mkdir()
        model = scoring / "model.pt2"
        if not copy_regular(work / "out" / "model.pt2", model, lim.out_bytes):
            phases["score"] = time.perf_counter() - t2
            outcome.status, outcome.reason = "invalid", "model.pt2 is not a regular file of at " \
                                                        f"most {lim.out_bytes} bytes"
            return outcome
        cuts_seed = secrets.randbits(128)         # drawn once the candidate is dead
        try:
            score_in_lane(lane, outcome,
                          lambda cap: score(spec, model, scoring, outcome, procs, cap, cuts_seed))
        finally:
            phases["score"] = time.perf_counter() - t2

        # ---- copy out ----
        if spec.artifact_dir is not None:
            t3 = time.perf_counter()
            copy_regular(model, Path(spec.artifact_dir) / "model.pt2")
            phases["copy_out"] = time.perf_counter() - t3
        if spec.cache_to is not None and outcome.status == "ok":   # only a scored trial's
            t = time.perf_counter()
            outcome.compile_cache.update(cache.take_back(
                lambda dest, b, f: cache.copy_tree(work / "cache", dest, b, f),
                Path(spec.cache_to), lim.cache_bytes, lim.cache_files))
            phases["cache_out"] = time.perf_counter() - t
        return outcome
    finally:
        t4 = time.perf_counter()
        for proc in procs:                        # only when an exception cut a phase short
            if proc.returncode is None:
                kill_all(proc.pid, f"{MARKER}={marker}".encode())
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log(f"warning: process {proc.pid} did not die")
        if folder is not None:
            release(folder)
        remove_tree(root)
        phases["cleanup"] = time.perf_counter() - t4


# Nothing to sweep or abort: every trial's processes die with it (`kill_all` on every path out
# of `run`), and a trial cut short by Ctrl-C is killed by its own thread's cleanup.
BACKEND = Backend(name="process", run=run)
