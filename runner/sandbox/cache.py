"""The compile cache of a run: what a trial gets, what comes back out, and what the run keeps.

torch.compile keeps its work in two folders that the candidate is pointed at through the
environment (`env`): inductor's (``TORCHINDUCTOR_CACHE_DIR``: the FX graph and AOTAutograd
caches, on by default in torch 2.13, and the generated kernels) and triton's
(``TRITON_CACHE_DIR``: compiled GPU kernels and their launchers). A candidate whose graph did
not change then finds its kernels and starts training without compiling. A third folder is
the CUDA driver's (``CUDA_CACHE_PATH``, else ``~/.nv/ComputeCache``, empty in every trial's
fresh home): the GPU code it compiles from PTX at run time, ~1.2 s of a warm start-up on an
H200 when it is lost (bench/RESULTS.md).

The rule: **only the kept line writes the run's cache.** The files in it are code that the next
candidate imports, so:

- a trial gets a *private copy* of the run's cache (docker: a tmpfs volume of its own filled by
  the runner; process: a folder in the trial's work folder), never the run's cache itself, and
  the scorer gets none;
- after a *scored* trial, the cache it left is read back (`extract` for a tar stream from a
  container, `copy_tree` for a folder) into the trial's own folder, filtered and bounded: regular
  files and folders only (no link, device or FIFO is followed or made), no absolute or ``..``
  name, at most `Limits.cache_bytes` bytes and `Limits.cache_files` entries, else nothing
  (a cache cut short is not a cache);
- the loop `promote`s that folder to the run's cache only when it keeps the commit, or when the
  trial ran the kept train.py itself on a warm cache (a noise run: the same code as the keep,
  and a fuller cache than a cold trial leaves); the old one is swapped out under a lock, so a
  trial being seeded never sees half of each. It `discard`s the folder otherwise.

A run's cache over half of the trial's cache space is not handed out (the trial starts cold):
the candidate needs room for its own new entries, and the next keep starts a fresh cache.
The cache of a kept commit is as trusted as its train.py: it is the same line's work.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

INDUCTOR, TRITON, CUDA, PYCACHE = "inductor", "triton", "nv", "pycache"
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
MAX_DEPTH = 32                  # inductor's and triton's caches are 2-5 folders deep; the
                                # bytecode mirrors source paths (site-packages/torch/...: ~12)


def env(root: str) -> dict[str, str]:
    """The environment that points torch.compile and the CUDA driver at the cache under `root`."""
    return {"TORCHINDUCTOR_CACHE_DIR": f"{root}/{INDUCTOR}", "TRITON_CACHE_DIR": f"{root}/{TRITON}",
            "CUDA_CACHE_PATH": f"{root}/{CUDA}"}


def bytecode_env(root: str) -> dict[str, str]:
    """Python's bytecode of the modules a trial imports, kept in the cache under `root` (for an
    installation without its own: compiling torch's sources costs seconds per process). Python
    then reads and writes bytecode there only, never beside the sources."""
    return {"PYTHONPYCACHEPREFIX": f"{root}/{PYCACHE}"}


class TooBig(Exception):
    """A cache over its bounds: it is dropped, never cut short."""


@dataclass
class Tally:
    """Bytes and entries (files and folders) of a cache, and what was left out of it."""

    bytes: int = 0
    files: int = 0
    skipped: int = 0                 # links, devices, FIFOs, bad names: never copied

    def add(self, size: int, max_bytes: int, max_files: int) -> None:
        self.bytes += size
        self.files += 1
        if self.bytes > max_bytes:
            raise TooBig(f"over {max_bytes} bytes")
        if self.files > max_files:
            raise TooBig(f"over {max_files} files")


# ---- reading a tree without following anything ---------------------------------------------

def walk(root: Path, max_depth: int = MAX_DEPTH
         ) -> Iterator[tuple[str, int | None, os.stat_result]]:
    """(relative POSIX name, an open fd for a regular file or None, its stat) for everything
    under `root`, depth first, each opened relative to its parent's fd with O_NOFOLLOW: a link
    swapped in anywhere is refused, not followed. A folder comes before what it holds; other
    kinds (links, devices, FIFOs, sockets) come with fd None and a stat that says so; nothing
    deeper than `max_depth` is visited. The file's fd is closed when the caller asks for the
    next entry. Open fds are bounded by the depth."""
    try:
        top = os.open(root, _DIR)
    except OSError:
        return
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = []
    try:
        stack.append((top, "", os.scandir(top)))
        while stack:
            dfd, prefix, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                os.close(dfd)
                continue
            rel, name = prefix + entry.name, entry.name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if len(stack) > max_depth:
                    yield rel, None, os.stat_result((0,) * 10)   # too deep: an unknown kind
                    continue
                try:
                    sub = os.open(name, _DIR, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    sub_entries = os.scandir(sub)
                except OSError:
                    os.close(sub)
                    continue
                stack.append((sub, rel + "/", sub_entries))
                yield rel, None, os.fstat(sub)
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(name, _OPEN, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    fst = os.fstat(fd)
                    if stat.S_ISREG(fst.st_mode):
                        yield rel, fd, fst
                finally:
                    os.close(fd)
            else:
                yield rel, None, st
    finally:
        for dfd, _, entries in stack:
            close = getattr(entries, "close", None)
            if close is not None:
                close()
            os.close(dfd)


def _copy_fd(fd: int, size: int, out: IO[bytes]) -> None:
    with open(fd, "rb", closefd=False) as f:
        left = size
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            out.write(block)
            left -= len(block)


def measure(root: Path) -> Tally:
    """Bytes and entries under `root` (nothing followed)."""
    tally = Tally()
    for _, fd, st in walk(root):
        if fd is not None or stat.S_ISDIR(st.st_mode):
            tally.bytes += st.st_size if fd is not None else 0
            tally.files += 1
    return tally


# ---- writing: a fresh folder that only this module writes into --------------------------------

def _safe_name(name: str) -> str | None:
    """`name` as a relative path of plain parts, or None (absolute, `..`, empty, NUL)."""
    if "\0" in name or "\\" in name:
        return None
    if name.startswith("/"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


class _Writer:
    """Writes a new tree into `root` (a fresh folder of ours: nothing in it is a link, so
    nothing is followed), counting every file and folder it makes against the bounds; a
    name seen twice, too deep or that the file system refuses is skipped."""

    def __init__(self, root: Path, max_bytes: int, max_files: int):
        self.root, self.max_bytes, self.max_files = root, max_bytes, max_files
        self.tally = Tally()
        self.made: set[str] = set()

    def _left_out(self, size: int) -> None:
        """An entry counted against the bounds that the file system then refused: the tally
        says what is on disk."""
        self.tally.bytes -= size
        self.tally.files -= 1
        self.tally.skipped += 1

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name: str) -> None:
        if name in self.made:
            return
        self.tally.add(0, self.max_bytes, self.max_files)
        self.made.add(name)
        self._parents(name)
        try:
            (self.root / name).mkdir(mode=0o755, exist_ok=True)
        except OSError:                      # too long, a file in the way: left out
            self._left_out(0)

    def file(self, name: str, src: IO[bytes] | int, size: int, executable: bool) -> None:
        if name in self.made or name.count("/") >= MAX_DEPTH:
            self.tally.skipped += 1
            return
        self.tally.add(size, self.max_bytes, self.max_files)
        self.made.add(name)
        self._parents(name)
        try:
            fd = os.open(self.root / name,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o755 if executable else 0o644)
        except OSError:
            self._left_out(size)
            return
        with open(fd, "wb") as out:
            if isinstance(src, int):
                _copy_fd(src, size, out)
            else:
                left = size
                while left > 0 and (block := src.read(min(left, 1 << 20))):
                    out.write(block)
                    left -= len(block)


def _fresh(dest: Path) -> Path:
    """A new empty folder next to `dest`, to be renamed into place when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(mode=0o700)
    return tmp


def _into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)


def copy_tree(src: Path, dest: Path, max_bytes: int, max_files: int) -> Tally:
    """Copy the regular files and folders under `src` to a new folder `dest` (replaced if
    there), bounded; raises TooBig (and leaves nothing) when `src` is over the bounds. `src`
    missing is an empty cache."""
    tmp = _fresh(dest)
    out = _Writer(tmp, max_bytes, max_files)
    try:
        for rel, fd, st in walk(src):
            name = _safe_name(rel)
            if name is None:
                out.tally.skipped += 1
            elif fd is not None:
                out.file(name, fd, st.st_size, bool(st.st_mode & 0o100))
            elif stat.S_ISDIR(st.st_mode) and name.count("/") < MAX_DEPTH:
                out.dir(name)
            else:
                out.tally.skipped += 1
        _into_place(tmp, dest)
        return out.tally
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- tar streams, for a container ---------------------------------------------------------------

def to_tar(src: Path, out: IO[bytes], uid: int, gid: int, max_bytes: int, max_files: int
           ) -> Tally:
    """Write the cache under `src` as a tar (members relative, owned by `uid`:`gid`, regular
    files and folders only) to `out`; raises TooBig over the bounds."""
    tally = Tally()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, fd, st in walk(src):
            name = _safe_name(rel)
            if name is None or (fd is None and not stat.S_ISDIR(st.st_mode)):
                tally.skipped += 1
                continue
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.mtime = uid, gid, int(st.st_mtime)
            if fd is None:
                tally.add(0, max_bytes, max_files)
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                tally.add(st.st_size, max_bytes, max_files)
                info.size, info.mode = st.st_size, 0o700 if st.st_mode & 0o100 else 0o600
                with open(fd, "rb", closefd=False) as f:
                    tar.addfile(info, f)
    return tally


class _Bounded(io.RawIOBase):
    """A stream of byte chunks read as a file, that raises TooBig past `limit` bytes."""

    def __init__(self, chunks: Iterable[bytes], limit: int):
        self._it, self._left, self._buf = iter(chunks), limit, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
            self._left -= len(self._buf)
            if self._left < 0:
                raise TooBig("the archive is over its bounds")
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def extract(chunks: Iterable[bytes], dest: Path, max_bytes: int, max_files: int,
            strip: int = 1) -> Tally:
    """Unpack a tar stream (``get_archive`` of the cache folder: its first `strip` name parts
    are the folder itself) into a new folder `dest`, keeping only regular files and folders
    with safe names, bounded in bytes and entries (the raw stream too); raises TooBig (and
    leaves nothing) over the bounds or on a stream that is not a tar."""
    tmp = _fresh(dest)
    out = _Writer(tmp, max_bytes, max_files)
    raw = io.BufferedReader(_Bounded(chunks, max_bytes + 2048 * (max_files + 2) + (1 << 20)))
    try:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                seen = 0
                for member in tar:
                    tar.members.clear()  # type: ignore[attr-defined]  # streaming: keep none
                    seen += 1                             # skipped members count too
                    if seen > max_files + 2:
                        raise TooBig(f"over {max_files} entries in the archive")
                    if member.size < 0 or member.issparse():
                        raise TooBig("a negative or sparse member")
                    whole = _safe_name(member.name)       # absolute or `..`: never
                    parts = PurePosixPath(whole).parts[strip:] if whole else ("..",)
                    if not parts:
                        continue                          # the folder itself
                    name = _safe_name("/".join(parts))
                    if name is None or not (member.isreg() or member.isdir()):
                        out.tally.skipped += 1
                    elif member.isdir():
                        if name.count("/") < MAX_DEPTH:
                            out.dir(name)
                        else:
                            out.tally.skipped += 1
                    else:
                        src = tar.extractfile(member)
                        assert src is not None
                        out.file(name, src, member.size, bool(member.mode & 0o100))
        except tarfile.TarError as e:
            raise TooBig(f"not a tar archive ({e})") from None
        _into_place(tmp, dest)
        return out.tally
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the run's cache ----------------------------------------------------------------------------

@contextmanager
def locked(run_cache: Path, exclusive: bool) -> Iterator[None]:
    """Readers of the run's cache (seeding a trial) share it; `promote` has it alone."""
    run_cache.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_cache.with_name(run_cache.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def seed_bounds(max_bytes: int, max_files: int) -> tuple[int, int]:
    """How big a run's cache may be to be handed out: half the trial's cache space."""
    return max_bytes // 2, max_files // 2


def promote(trial_cache: Path, run_cache: Path) -> bool:
    """Make the kept trial's cache folder the run's (moved, not copied, when on the same file
    system; the old one is swapped out under the lock and removed). False when the trial left
    no cache (the run's stays as it was)."""
    if not trial_cache.is_dir() or trial_cache.is_symlink():
        return False
    run_cache.parent.mkdir(parents=True, exist_ok=True)
    old = run_cache.with_name(f"{run_cache.name}.old-{uuid.uuid4().hex[:8]}")
    staged = run_cache.with_name(f"{run_cache.name}.new-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(trial_cache, staged)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        copy_tree(trial_cache, staged, 1 << 62, 1 << 62)   # ours: bounded when it was made
        shutil.rmtree(trial_cache, ignore_errors=True)
    with locked(run_cache, exclusive=True):
        if run_cache.exists():
            os.rename(run_cache, old)
        os.rename(staged, run_cache)
    shutil.rmtree(old, ignore_errors=True)
    return True


def discard(trial_cache: Path) -> None:
    shutil.rmtree(trial_cache, ignore_errors=True)


def sweep(run_cache: Path, trial_caches: Path) -> None:
    """After a crash: remove the trials' caches and what a promotion cut short left."""
    shutil.rmtree(trial_caches, ignore_errors=True)
    if run_cache.parent.is_dir():
        for p in run_cache.parent.glob(f"{run_cache.name}.*-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


# ---- what the backends call, and what the record says -------------------------------------------

def hand_out(run_cache: Path | None, fill: Callable[[Path, int, int], Tally], max_bytes: int,
             max_files: int) -> dict[str, Any]:
    """Fill a trial's private cache from the run's with `fill(run_cache, max_bytes, max_files)`
    (under the shared lock, within `seed_bounds`). Returns the record's ``compile_cache``
    fields so far: ``start`` (``warm`` when something was handed out, else ``cold``; the
    docker backend says ``partial`` when copying it into the container failed half-way),
    ``in_bytes`` and ``in_files``, and a ``note`` when the run's cache was not handed out."""
    cold: dict[str, Any] = {"start": "cold", "in_bytes": 0, "in_files": 0}
    if run_cache is None or not run_cache.is_dir():
        return cold
    with locked(run_cache, exclusive=False):
        try:
            tally = fill(run_cache, *seed_bounds(max_bytes, max_files))
        except TooBig as e:
            return {**cold, "note": f"the run's cache is {e}: not handed out (half the space)"}
    return {"start": "warm" if tally.files else "cold", "in_bytes": tally.bytes,
            "in_files": tally.files}


def take_back(read: Callable[[Path, int, int], Tally], dest: Path, max_bytes: int,
              max_files: int) -> dict[str, Any]:
    """Read a scored trial's cache into `dest` with `read(dest, max_bytes, max_files)`; the
    record's ``out`` (``taken`` or ``dropped: why``), ``out_bytes``, ``out_files``, ``skipped``."""
    try:
        tally = read(dest, max_bytes, max_files)
    except TooBig as e:
        return {"out": f"dropped: {e}"}
    except Exception as e:                   # noqa: BLE001 - a cache is worth no lost record
        # Names the candidate chose (too long, a file where a folder goes) or a full disk make
        # the host's file system refuse: the cache is dropped; the scored trial stands. Only
        # the type and errno reach the record, never the message (it may quote a name).
        errno_ = getattr(e, "errno", None)
        return {"out": f"dropped: {type(e).__name__}" + (f" errno {errno_}" if errno_ else "")}
    return {"out": "taken", "out_bytes": tally.bytes, "out_files": tally.files,
            "skipped": tally.skipped}
