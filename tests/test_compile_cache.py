"""The compile cache (runner.sandbox.cache): only the kept line writes it.

A trial starts on a private copy of the run's cache and leaves its own cache in its folder only
when it was scored; the loop makes that the run's cache only on a keep. A candidate that plants
files in its cache (a fake inductor entry, a big file, links to the host's files, FIFOs, odd
names) and is discarded changes nothing for the next one; what a kept one leaves is filtered
(regular files and folders only) and bounded. The candidates here write into
``$TORCHINDUCTOR_CACHE_DIR`` themselves (no real compile: the base image has no C compiler and
inductor's CPU backend needs one); warm-start timing is the GPU benchmark's.

Bounds: caches of a few KiB to a few MiB, budgets of seconds (EXPORT_BUDGET for candidates that
import torch and export a model on one CPU), the scorer on 4096 tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import docker_engine_missing
from runner.sandbox import Limits, TrialSpec, cache

RUN = f"cachetest{uuid.uuid4().hex[:6]}"      # unique: suites may share one engine
EVAL_TOKENS = 4096
EXPORT_BUDGET = 90
KIB, MIB = 2**10, 2**20
LIMITS = Limits(memory_bytes=2 * 2**30, cpus=1.0, pids=256, out_bytes=256 * MIB,
                tmp_bytes=256 * MIB, cache_bytes=8 * MIB, cache_files=400,
                score_memory_bytes=4 * 2**30, score_timeout_s=180)


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (nothing followed): a file's sha256, else its kind."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "other"
    return out


def run_cache(root: Path) -> Path:
    """A run's cache as the runner keeps it: a fake inductor entry and a triton kernel."""
    folder = root / "compile-cache"
    (folder / "inductor" / "fxgraph" / "ab").mkdir(parents=True)
    (folder / "inductor" / "fxgraph" / "ab" / "entry").write_text("kept line's graph\n")
    (folder / "triton" / "HASH").mkdir(parents=True)
    (folder / "triton" / "HASH" / "kernel.so").write_bytes(b"\x7fELF" + bytes(1000))
    os.chmod(folder / "triton" / "HASH" / "kernel.so", 0o755)
    return folder


# ---- the module on its own --------------------------------------------------------------------

def hostile_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "",
                mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, mode
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("cache", kind=tarfile.DIRTYPE, mode=0o700)
        add("cache/inductor/fxgraph/ok", b"fine")
        add("cache/inductor/run.so", b"\x7fELF", mode=0o4755)          # setuid: dropped bits
        add("cache/../escaped", b"evil")
        add("cache/inductor/../../escaped2", b"evil")
        add("/etc/cron.d/evil", b"evil")
        add("cache/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("cache/root", kind=tarfile.SYMTYPE, link="/")
        add("cache/hard", kind=tarfile.LNKTYPE, link="cache/inductor/fxgraph/ok")
        add("cache/null", kind=tarfile.CHRTYPE)
        add("cache/fifo", kind=tarfile.FIFOTYPE)
        add("cache/inductor/fxgraph/ok", b"second copy")             # a name twice
        add("cache/..hidden", b"a plain odd name")
    return buf.getvalue()


def test_extract_keeps_only_regular_files_and_folders_with_safe_names(tmp_path):
    data = hostile_tar()
    chunks = [data[i:i + 700] for i in range(0, len(data), 700)]
    tally = cache.extract(chunks, tmp_path / "out", 1 * MIB, 100)
    assert tree(tmp_path / "out") == {
        "..hidden": hashlib.sha256(b"a plain odd name").hexdigest(),
        "inductor": "dir", "inductor/fxgraph": "dir",
        "inductor/fxgraph/ok": hashlib.sha256(b"fine").hexdigest(),
        "inductor/run.so": hashlib.sha256(b"\x7fELF").hexdigest()}
    assert os.stat(tmp_path / "out" / "inductor" / "run.so").st_mode & 0o7777 == 0o755
    assert tally.skipped == 9 and tally.files == 5
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]            # no temporary left


@pytest.mark.parametrize("max_bytes,max_files,why", [(10, 100, "bytes"), (MIB, 3, "files")])
def test_an_oversized_cache_is_dropped_whole(tmp_path, max_bytes, max_files, why):
    with pytest.raises(cache.TooBig, match=why):
        cache.extract([hostile_tar()], tmp_path / "out", max_bytes, max_files)
    src = run_cache(tmp_path)
    with pytest.raises(cache.TooBig, match=why):
        cache.copy_tree(src, tmp_path / "copy", max_bytes, max_files)
    assert [p.name for p in tmp_path.iterdir()] == ["compile-cache"]   # nothing half-made


def test_a_stream_that_is_not_a_tar_or_too_long_is_dropped(tmp_path):
    with pytest.raises(cache.TooBig, match="not a tar"):
        cache.extract([b"\x00garbage" * 200], tmp_path / "a", MIB, 100)
    # A pax header that says it is 600 MB long (tarfile reads a header whole, in memory).
    info = tarfile.TarInfo("cache/pax")
    info.type, info.size = tarfile.XHDTYPE, 600 * MIB
    head = info.tobuf(format=tarfile.USTAR_FORMAT)
    endless = (head if i == 0 else b"x" * 65536 for i in range(10_000))
    with pytest.raises(cache.TooBig, match="archive is over"):
        cache.extract(endless, tmp_path / "b", 64 * KIB, 10)
    assert list(tmp_path.iterdir()) == []


def tarinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_a_flood_of_skipped_members_is_bounded(tmp_path):
    """Hard links (skipped, and free of tmpfs inodes) count against the entries, and the
    streaming reader keeps no member list: 50,000 of them against a 1,000-entry cap."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.addfile(tarinfo("c", tarfile.DIRTYPE))
        for i in range(50_000):
            t.addfile(tarinfo(f"c/l{i}", tarfile.LNKTYPE, linkname="c/x"))
    data = buf.getvalue()
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    got = cache.take_back(lambda dest, b, f: cache.extract(chunks, dest, b, f),
                          tmp_path / "out", 2**30, 1000)
    assert got == {"out": "dropped: over 1000 entries in the archive"}
    assert not (tmp_path / "out").exists()


def test_names_the_host_refuses_drop_the_cache_never_the_trial(tmp_path):
    """Folders nested past the host's path limit (PATH_MAX 4096), and a reader that fails the
    way a full disk or a broken stream does: the cache is dropped or thinned, nothing raises,
    and the record holds no name the candidate chose."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        name = "c"
        t.addfile(tarinfo(name, tarfile.DIRTYPE))
        for _ in range(20):
            name += "/" + "y" * 254
            t.addfile(tarinfo(name, tarfile.DIRTYPE))
        info = tarinfo(name + "/f")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    got = cache.take_back(lambda dest, b, f: cache.extract([buf.getvalue()], dest, b, f),
                          tmp_path / "deep", 2**30, 1000)
    assert got["out"] == "taken" and got["skipped"] >= 1

    def failing(dest, b, f):
        raise OSError(28, "No space left on device: " + "y" * 50)
    got = cache.take_back(failing, tmp_path / "full", 2**30, 1000)
    assert got == {"out": "dropped: OSError errno 28"}


ODD_NAMES = {
    "dot segments": [("c/a/./b", tarfile.REGTYPE), ("c/a//d", tarfile.REGTYPE), ("c/./e", tarfile.REGTYPE)],
    "file then folder": [("c/x", tarfile.REGTYPE), ("c/x", tarfile.DIRTYPE), ("c/x/y", tarfile.REGTYPE)],
    "folder then file": [("c/x", tarfile.DIRTYPE), ("c/x", tarfile.REGTYPE), ("c/x/y", tarfile.REGTYPE)],
    "control, bidi, non-UTF-8": [("c/a\nb", tarfile.REGTYPE), ("c/\u202eevil", tarfile.REGTYPE),
                                 ("c/\udcff\udcfe", tarfile.REGTYPE)],
    "trailing slash on a file": [("c/f/", tarfile.REGTYPE), ("c/f/g", tarfile.REGTYPE)],
    "a file as a parent": [("c/p", tarfile.REGTYPE), ("c/p/q/r", tarfile.REGTYPE)],
}


@pytest.mark.parametrize("members", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_odd_but_legal_names_stay_inside_and_go_round(tmp_path, members):
    """Names a tar may hold that the filters do not reject: nothing raises, nothing lands
    outside the trial's folder or as a link, and what was taken goes back out to the next
    trial (`to_tar`) and into the process backend's copy without an error."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      errors="surrogateescape") as t:
        t.addfile(tarinfo("c", tarfile.DIRTYPE))
        for name, kind in members:
            info = tarinfo(name, kind)
            info.size = 4 if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(b"data") if kind == tarfile.REGTYPE else None)
    out = tmp_path / "out"
    got = cache.take_back(lambda d, b, f: cache.extract([buf.getvalue()], d, b, f), out,
                          MIB, 100)
    assert got["out"] == "taken", got
    for p in out.rglob("*"):
        assert not p.is_symlink() and p.resolve().is_relative_to(out.resolve())
    with tempfile.TemporaryFile() as tar:
        note = cache.hand_out(out, lambda s, b, f: cache.to_tar(s, tar, 10001, 10001, b, f),
                              MIB, 100)
        assert note["start"] == "warm" and note["in_files"] == got["out_files"]
    again = cache.take_back(lambda d, b, f: cache.copy_tree(out, d, b, f), tmp_path / "copy",
                            MIB, 100)
    assert again["out"] == "taken" and again["out_files"] == got["out_files"]


def test_a_candidate_that_exits_while_being_frozen_is_not_scored():
    """`docker pause` failed and the container had exited by then: scored only if the engine
    saw it finish before the deadline."""
    from datetime import datetime, timezone

    from runner.sandbox.docker_backend import exited_after

    class Finished:
        def __init__(self, seconds_from_now):
            at = datetime.fromtimestamp(time.time() + seconds_from_now, tz=timezone.utc)
            self.attrs = {"State": {"FinishedAt": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
    deadline = time.monotonic()
    assert exited_after(Finished(2.0), deadline)
    assert not exited_after(Finished(-2.0), deadline)
    unknown = Finished(0)
    unknown.attrs = {"State": {}}
    assert exited_after(unknown, deadline)              # unknown: not placed before it


def test_copy_tree_follows_no_link(tmp_path):
    src = run_cache(tmp_path)
    os.symlink("/etc/passwd", src / "inductor" / "passwd")
    os.symlink("/etc", src / "inductor" / "etc")
    os.mkfifo(src / "triton" / "fifo")
    tally = cache.copy_tree(src, tmp_path / "copy", MIB, 100)
    assert tally.skipped == 3
    assert tree(tmp_path / "copy") == {k: v for k, v in tree(src).items()
                                       if k not in ("inductor/passwd", "inductor/etc",
                                                    "triton/fifo")}
    assert os.stat(tmp_path / "copy" / "triton" / "HASH" / "kernel.so").st_mode & 0o100


def test_tar_for_the_container_is_owned_by_the_candidate(tmp_path):
    src = run_cache(tmp_path)
    os.symlink("/etc/passwd", src / "passwd")
    buf = io.BytesIO()
    cache.to_tar(src, buf, 10001, 10001, MIB, 100)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == set(tree(src)) - {"passwd"}
    assert all(m.uid == m.gid == 10001 and (m.isdir() or m.isreg()) for m in members.values())
    assert members["triton/HASH/kernel.so"].mode == 0o700


def test_promote_swaps_the_run_cache_and_sweep_cleans_up(tmp_path):
    run = tmp_path / "run" / "compile-cache"
    assert not cache.promote(tmp_path / "nothing", run)
    first = run_cache(tmp_path / "t1")
    want = tree(first)
    assert cache.promote(first, run) and tree(run) == want and not first.exists()
    second = tmp_path / "t2"
    (second / "inductor").mkdir(parents=True)
    (second / "inductor" / "new").write_text("new")
    assert cache.promote(second, run) and tree(run) == {"inductor": "dir",
                                                         "inductor/new": tree(run)["inductor/new"]}
    assert sorted(p.name for p in run.parent.iterdir()) == ["compile-cache", "compile-cache.lock"]
    (run.parent / "compile-cache.new-12345678").mkdir()             # a promotion cut short
    (run.parent / "trial-caches" / "3-0").mkdir(parents=True)
    cache.sweep(run, run.parent / "trial-caches")
    assert sorted(p.name for p in run.parent.iterdir()) == ["compile-cache", "compile-cache.lock"]


def test_a_run_cache_over_half_the_space_is_not_handed_out(tmp_path):
    src = run_cache(tmp_path)
    size = cache.measure(src).bytes
    note = cache.hand_out(src, lambda s, b, f: cache.copy_tree(s, tmp_path / "t", b, f),
                          2 * size, 100)
    assert note == {"start": "warm", "in_bytes": size, "in_files": len(tree(src))}
    note = cache.hand_out(src, lambda s, b, f: cache.copy_tree(s, tmp_path / "t2", b, f),
                          2 * size - 2, 100)
    assert note["start"] == "cold" and "not handed out" in note["note"]
    assert not (tmp_path / "t2").exists()
    assert cache.hand_out(tmp_path / "none", lambda s, b, f: cache.Tally(), 10, 10)["start"] == "cold"


# ---- candidates that write their cache ----------------------------------------------------------

# Prints what it found in its cache, writes its entry, plants what PLANT says, exports a table
# model whose logits are random * SCALE (0: uniform; larger: worse).
CANDIDATE = r'''
import hashlib, json, os, stat, sys
import torch, prepare

ROOT = os.path.dirname(os.environ["TORCHINDUCTOR_CACHE_DIR"])
TAG, SCALE, PLANT, BIG = __TAG__, __SCALE__, __PLANT__, __BIG__

def listing():
    out = {}
    for d, dirs, files in os.walk(ROOT):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, ROOT)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                out[rel] = "other"
    return out

print("CACHE_AT_START " + json.dumps(listing(), sort_keys=True), flush=True)
ind = os.environ["TORCHINDUCTOR_CACHE_DIR"]
os.makedirs(os.path.join(ind, "fxgraph", TAG), exist_ok=True)
with open(os.path.join(ind, "fxgraph", TAG, "entry"), "w") as f:
    f.write(f"graph of {TAG}\n")
nv = os.environ["CUDA_CACHE_PATH"]              # the CUDA driver's JIT cache: the trial's too
assert os.path.dirname(nv) == ROOT, nv
os.makedirs(nv, exist_ok=True)
with open(os.path.join(nv, TAG), "w") as f:
    f.write(f"sass of {TAG}\n")
with open(os.path.join(nv, f"{TAG}-seed{prepare.SEED}"), "w") as f:   # which run of TAG it was
    f.write(f"run {prepare.SEED}\n")
if PLANT:
    os.symlink("/etc/passwd", os.path.join(ind, "passwd"))
    os.symlink("/", os.path.join(ind, "root"))
    os.mkfifo(os.path.join(ind, "fifo"))
    with open(os.path.join(ind, "..evil.py"), "w") as f:
        f.write("import os; os.system('echo pwned')\n")
    os.makedirs(os.path.join(ind, "fxgraph", "ab"), exist_ok=True)
    with open(os.path.join(ind, "fxgraph", "ab", "entry"), "w") as f:   # the kept entry
        f.write("poisoned\n")
    try:
        os.link(os.path.join(ind, "fxgraph", TAG, "entry"), os.path.join(ind, "hardlink"))
    except OSError as e:
        print("HARDLINK", e, flush=True)
    os.chmod(os.path.join(ind, "..evil.py"), 0o4755)
if BIG:
    try:
        with open(os.path.join(ind, "big.bin"), "wb") as f:
            for _ in range(BIG):
                f.write(b"\0" * (1 << 20))
        print("BIG written", flush=True)
    except OSError as e:
        print("BIG stopped:", e.strerror, flush=True)

V = prepare.load_meta()["vocab_size"]

class Table(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * SCALE)

    def forward(self, idx):
        return self.table[idx]

batch = torch.export.Dim("batch", min=1, max=4096)
seq = torch.export.Dim("seq", min=2, max=prepare.SEQ_LEN)
ep = torch.export.export(Table(), (torch.zeros(2, 16, dtype=torch.long),),
                         dynamic_shapes={"idx": {0: batch, 1: seq}})
prepare.save_model(ep, os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"))
print("EXPORTED", TAG, flush=True)
'''

OBSERVER = CANDIDATE.split("ind = os.environ")[0] + 'print("DONE", flush=True)\n'


def render(source: str, tag: str, scale: float = 0.0, plant: bool = False, big: int = 0) -> str:
    return (source.replace("__TAG__", repr(tag)).replace("__SCALE__", repr(scale))
            .replace("__PLANT__", repr(plant)).replace("__BIG__", repr(big)))


def seen(rec: dict) -> dict[str, str]:
    found = re.search(r"^CACHE_AT_START (.*)$", rec["log_tail"], re.M)
    assert found, rec["log_tail"]
    return json.loads(found.group(1))


def spec(tmp_path: Path, data: Path, source: str, number: int, cache_from: Path | None,
         cache_to: Path | None, budget: int = EXPORT_BUDGET, **limits) -> TrialSpec:
    train_py = tmp_path / f"train-{number}.py"
    train_py.write_text(source)
    return TrialSpec(train_py=train_py, data_dir=data, budget=budget, run=RUN, number=number,
                     limits=Limits(**{**LIMITS.__dict__, **limits}), eval_tokens=EVAL_TOKENS,
                     cache_from=cache_from, cache_to=cache_to)


PLANTED = {"inductor/passwd", "inductor/root", "inductor/fifo", "inductor/hardlink"}


def check_planter_output(got: Path, kept: dict[str, str], tag: str) -> None:
    """What comes out of the planter: its own entry, the run's other files, no link, FIFO or
    hard link's second name kept as a link, and no set-uid bit."""
    out = tree(got)
    assert not PLANTED & {k for k, v in out.items() if v in ("link", "other")}
    assert "inductor/passwd" not in out and "inductor/root" not in out
    assert "inductor/fifo" not in out
    assert out[f"inductor/fxgraph/{tag}/entry"] == hashlib.sha256(
        f"graph of {tag}\n".encode()).hexdigest()
    assert out[f"nv/{tag}"] == hashlib.sha256(f"sass of {tag}\n".encode()).hexdigest()
    assert out["triton/HASH/kernel.so"] == kept["triton/HASH/kernel.so"]
    assert out["inductor/fxgraph/ab/entry"] == hashlib.sha256(b"poisoned\n").hexdigest()
    assert os.stat(got / "inductor" / "..evil.py").st_mode & 0o7000 == 0
    for p in got.rglob("*"):
        assert not p.is_symlink() and (p.is_dir() or p.is_file())


# ---- the process backend ------------------------------------------------------------------------

def test_process_trial_gets_a_private_copy_and_leaves_a_filtered_one(tmp_path, small_data):
    from runner.trial import run_trial
    kept = run_cache(tmp_path / "run")
    before = tree(kept)
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "p1", plant=True), 1, kept,
                         tmp_path / "t1"), "process")
    assert rec["status"] == "ok", rec
    assert seen(rec) == before                                   # the copy, exactly
    assert tree(kept) == before                                  # the run's cache untouched
    assert rec["compile_cache"]["start"] == "warm"
    assert rec["compile_cache"]["in_files"] == len(before)
    assert rec["compile_cache"]["out"] == "taken" and rec["compile_cache"]["skipped"] >= 3
    check_planter_output(tmp_path / "t1", before, "p1")


# After its own entries: the cache's top-level folders, or the cache itself, swapped for links
# to the host's folders and to the trial's folder above the cache.
RELINK = {
    "its folders": """
import shutil
shutil.rmtree(os.path.join(ROOT, "triton"))
os.symlink("/", os.path.join(ROOT, "triton"))
shutil.rmtree(nv)
os.symlink("/etc", nv)
os.symlink("..", os.path.join(ROOT, "up"))
""",
    "the cache itself": """
import shutil
shutil.rmtree(ROOT)
os.symlink("/", ROOT)
""",
}


@pytest.mark.parametrize("how", RELINK.values(), ids=RELINK.keys())
def test_process_trial_that_swaps_cache_folders_for_links_gives_back_none_of_them(
        tmp_path, small_data, how):
    """The read-back opens each folder without following a link, the cache's own root too:
    what comes back is the regular entries left, and nothing of what the links point at (the
    host's root, /etc, the trial's folder with its model and output)."""
    from runner.trial import run_trial
    kept = run_cache(tmp_path / "run")
    before = tree(kept)
    source = render(CANDIDATE, "r1").replace("V = prepare.load_meta()",
                                              how + 'print("RELINKED", flush=True)\n'
                                              "V = prepare.load_meta()")
    rec = run_trial(spec(tmp_path, small_data, source, 1, kept, tmp_path / "t1"), "process")
    assert rec["status"] == "ok" and "RELINKED" in rec["log_tail"], rec
    assert tree(kept) == before                                  # the run's cache untouched
    got = tree(tmp_path / "t1") if (tmp_path / "t1").exists() else {}
    if how == RELINK["its folders"]:
        assert rec["compile_cache"]["out"] == "taken" and rec["compile_cache"]["skipped"] == 3
        entry = hashlib.sha256(b"graph of r1\n").hexdigest()
        assert got == {"inductor": "dir", "inductor/fxgraph": "dir", "inductor/fxgraph/ab": "dir",
                       "inductor/fxgraph/ab/entry": before["inductor/fxgraph/ab/entry"],
                       "inductor/fxgraph/r1": "dir", "inductor/fxgraph/r1/entry": entry}
    else:
        # The link at the root is not opened: an empty cache, which a keep may make the run's.
        assert got == {} and rec["compile_cache"]["out_files"] == 0, rec["compile_cache"]


def test_process_trial_keeps_bytecode_only_for_an_installation_without_it(
        tmp_path, small_data, monkeypatch):
    """An interpreter whose torch has its bytecode (this machine's): no bytecode in the cache.
    One without it (a read-only or --no-compile installation, as on the GPU boxes measured:
    5-6 s of every trial's start-up went to compiling torch's sources): the trial's bytecode
    comes back in its cache (`pycache/`, torch's modules among it), and a trial started on that
    cache gets it and gives it back."""
    from runner.sandbox import process_backend
    from runner.trial import run_trial
    room = {"cache_bytes": 256 * MIB, "cache_files": 20_000}
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "b0"), 1, None, tmp_path / "c0",
                         **room), "process")
    assert rec["status"] == "ok", rec
    assert not (tmp_path / "c0" / cache.PYCACHE).exists()
    monkeypatch.setattr(process_backend, "installed_bytecode", lambda: False)
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "b1"), 2, None, tmp_path / "c1",
                         **room), "process")
    assert rec["status"] == "ok", rec
    written = {p.relative_to(tmp_path / "c1"): p.stat().st_mtime_ns
               for p in (tmp_path / "c1" / cache.PYCACHE).rglob("*.pyc")}
    assert len(written) > 300 and any("torch" in p.parts for p in written)
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "b2"), 3, tmp_path / "c1",
                         tmp_path / "c2", **room), "process")
    assert rec["status"] == "ok", rec
    assert rec["compile_cache"]["start"] == "warm" and rec["compile_cache"]["in_files"] > 300
    again = {p.relative_to(tmp_path / "c2") for p in (tmp_path / "c2" / cache.PYCACHE).rglob("*.pyc")}
    assert set(written) <= again


PYC_PLANT = r"""
import importlib.util, importlib._bootstrap_external as bootstrap
source_path = json.__file__                     # the stdlib's json: train.py and the scorer import it
hook = ("\nimport os as _os, sys as _sys, time as _time\n"   # one mark per load, never a crash
        "try:\n"
        "    with open(_os.path.join(__MARKS__, f'{_os.getpid()}-{_time.time_ns()}'), 'x') as _f:\n"
        "        _f.write(_sys.argv[0] if _sys.argv else '?')\n"
        "except OSError:\n"
        "    pass\n")
code = compile(open(source_path).read() + hook, source_path, "exec")
st = os.stat(source_path)                       # the header a reader checks: it validates
planted = importlib.util.cache_from_source(source_path)     # under PYTHONPYCACHEPREFIX
if not (sys.pycache_prefix and os.path.abspath(planted).startswith(ROOT + os.sep)):
    sys.exit(f"no pycache prefix in the cache: {planted} would land outside it")  # not the stdlib's
os.makedirs(os.path.dirname(planted), exist_ok=True)
with open(planted, "wb") as f:
    f.write(bootstrap._code_to_timestamp_pyc(code, st.st_mtime, st.st_size))
print("PLANTED", os.path.relpath(planted, ROOT), flush=True)
"""


def test_bytecode_planted_in_the_cache_reaches_no_scorer_and_no_unkept_line(
        tmp_path, small_data, monkeypatch):
    """A candidate on an installation without its bytecode (the trial keeps Python's bytecode
    in its cache) writes bytecode for the stdlib's json under its PYTHONPYCACHEPREFIX, valid for
    the source's time and size, that leaves a mark naming the process that loads it. Its own
    scorer loads none of it (the scorer runs isolated from PYTHON* variables, off the cache); a
    trial on the run's cache as it was (the planter discarded) gets none of it; a trial on the
    planter's cache (as after a keep: a kept line's cache is as trusted as its train.py) loads it
    in its train.py alone, and its scorer still scores clean."""
    from runner.sandbox import process_backend
    from runner.trial import run_trial
    monkeypatch.setattr(process_backend, "installed_bytecode", lambda: False)
    marks = tmp_path / "marks"
    marks.mkdir()
    kept = run_cache(tmp_path / "run")
    room = {"cache_bytes": 256 * MIB, "cache_files": 20_000}
    planter = CANDIDATE.replace("V = prepare.load_meta()", PYC_PLANT + "V = prepare.load_meta()")
    rec = run_trial(spec(tmp_path, small_data, render(planter, "pyc").replace(
        "__MARKS__", repr(str(marks))), 1, kept, tmp_path / "t1", **room), "process")
    assert rec["status"] == "ok" and rec["val_bpb"] > 0, rec
    where = re.search(r"^PLANTED (\S+)$", rec["log_tail"], re.M)
    assert where and (tmp_path / "t1" / where.group(1)).is_file(), rec["log_tail"]
    assert where.group(1).startswith(cache.PYCACHE + "/")
    assert list(marks.iterdir()) == []                   # its scorer loaded none of it
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "next"), 2, kept,
                         tmp_path / "t2", **room), "process")
    assert rec["status"] == "ok", rec
    assert list(marks.iterdir()) == []                   # discarded: the next trial gets none
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "after-keep"), 3,
                         tmp_path / "t1", tmp_path / "t3", **room), "process")
    assert rec["status"] == "ok" and rec["val_bpb"] > 0, rec
    loaders = [m.read_text() for m in marks.iterdir()]
    assert loaders and all(argv0.endswith("train.py") for argv0 in loaders), loaders


def _package(root: Path, name: str, modules: int, with_bytecode: int, tag: str = "") -> Path:
    """A package of `modules` sources in two folders, the first `with_bytecode` of them with
    bytecode beside them (for this interpreter, or for `tag`)."""
    import sys
    tag = tag or sys.implementation.cache_tag
    pkg = root / name
    for i in range(modules):
        folder = pkg if i % 2 else pkg / "sub"
        folder.mkdir(parents=True, exist_ok=True)
        stem = "__init__" if i < 2 else f"m{i}"
        (folder / f"{stem}.py").write_text(f"X = {i}\n")
        if i < with_bytecode:
            (folder / "__pycache__").mkdir(exist_ok=True)
            (folder / "__pycache__" / f"{stem}.{tag}.pyc").write_bytes(b"")
    return pkg


def test_installed_bytecode_counts_every_source_not_a_few(tmp_path, monkeypatch):
    """An installation counts as having its bytecode only when (almost) every source has it:
    a writable one where the host's processes wrote it for what they imported (the package's
    __init__ files and a few more) still compiles the rest in every trial, so its trials keep
    bytecode in their cache. One source in a hundred may lack it (pip skips a file that does
    not compile); bytecode of another Python does not count. Checked on real folders, and
    through installed_bytecode's lookup of the packages on the path."""
    from runner.sandbox import process_backend
    full = _package(tmp_path, "full", 200, 200)
    assert process_backend.bytecode_complete([str(full)])
    assert not process_backend.bytecode_complete([str(_package(tmp_path, "few", 200, 3))])
    assert process_backend.bytecode_complete([str(_package(tmp_path, "odd", 200, 198))])
    assert not process_backend.bytecode_complete([str(_package(tmp_path, "more", 200, 197))])
    assert not process_backend.bytecode_complete([str(_package(tmp_path, "other", 200, 200,
                                                                        "cpython-20"))])
    monkeypatch.syspath_prepend(str(tmp_path))
    for packages, expected in ((("full", "odd", "absent_package"), True), (("full", "few"), False)):
        monkeypatch.setattr(process_backend, "BYTECODE_PACKAGES", packages)
        process_backend.installed_bytecode.cache_clear()
        assert process_backend.installed_bytecode() is expected
    process_backend.installed_bytecode.cache_clear()


def test_process_trial_with_an_oversized_cache_leaves_none(tmp_path, small_data):
    from runner.trial import run_trial
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "big", big=12), 2, None,
                         tmp_path / "t2"), "process")
    assert rec["status"] == "ok", rec
    assert "BIG written" in rec["log_tail"]                    # no space limit here...
    assert rec["compile_cache"]["start"] == "cold"
    assert rec["compile_cache"]["out"].startswith("dropped: over 8388608 bytes")
    assert not (tmp_path / "t2").exists()                       # ...but nothing comes out


def test_loop_only_the_kept_line_writes_the_cache(project, small_data):
    """The loop on the process backend: a baseline (kept: its cache becomes the run's) and its
    noise run (the same train.py: its fuller cache becomes the run's too), a planter (worse:
    discarded; the next candidate's cache is exactly the run's), a better one (kept: its
    filtered cache becomes the run's) and one more that sees it."""
    import git

    from runner.agents import Proposal
    from runner.loop import LoopConfig, Overnight
    from runner.trial import LocalTrials

    repo = git.Repo(project)
    (project / "target" / "train.py").write_text(render(CANDIDATE, "base", scale=3.0))
    repo.index.add(["target/train.py"])
    repo.index.commit("a baseline that writes its cache")
    script = [("planter", render(CANDIDATE, "planter", scale=6.0, plant=True)),
              ("the best's own file", render(CANDIDATE, "base", scale=3.0)),   # a candidate:
                                                                            # never a noise run
              ("better", render(CANDIDATE, "better", scale=0.0)),
              ("observer", render(CANDIDATE, "observer", scale=0.0))]

    def propose(program, train_py, history):
        if not script:
            return Proposal(train_py=None, description="none", error="no more in the script")
        description, text = script.pop(0)
        return Proposal(train_py=text, description=description)

    cfg = LoopConfig(tag="cacheloop", budget=EXPORT_BUDGET, data_dir=small_data,
                     runs_dir=project / "runs", repo_root=project, limits=LIMITS,
                     eval_tokens=EVAL_TOKENS, keep_rule="threshold", noise_runs=2,
                     same_seed_runs=0, max_experiments=6, executor=LocalTrials("process"))
    logs: list[str] = []
    loop = Overnight(cfg, log=logs.append)
    loop.agent = propose
    ledger = loop.run()
    by = {r["description"]: r for r in ledger.records}
    assert [r["status"] for r in ledger.records] == ["keep", "discard", "discard", "discard", "keep",
                                                     "discard"], \
        [(r["description"], r["status"], r["reason"]) for r in ledger.records]
    run_dir = project / "runs" / "cacheloop"

    def entries(tag: str, seed: int = 0) -> dict[str, str]:   # what CANDIDATE writes: its graph,
        return {f"inductor/fxgraph/{tag}": "dir",               # its sass, which run it was
                f"inductor/fxgraph/{tag}/entry": hashlib.sha256(f"graph of {tag}\n".encode()).hexdigest(),
                f"nv/{tag}": hashlib.sha256(f"sass of {tag}\n".encode()).hexdigest(),
                f"nv/{tag}-seed{seed}": hashlib.sha256(f"run {seed}\n".encode()).hexdigest()}
    first_cache = {"inductor": "dir", "inductor/fxgraph": "dir", "nv": "dir", **entries("base")}
    noise = next(r for r in ledger.records if r["role"] == "noise")
    assert seen(by["baseline"]) == {} and by["baseline"]["compile_cache"]["start"] == "cold"
    assert seen(noise) == first_cache                         # the baseline's, promoted
    base_cache = {**first_cache, **entries("base", noise["seed"])}
    assert seen(by["planter"]) == base_cache                  # the noise run's, promoted
    assert by["planter"]["compile_cache"]["out"] == "taken"   # scored, then discarded
    assert seen(by["better"]) == base_cache                   # the planter changed nothing
    better_cache = {**base_cache, **entries("better")}
    assert seen(by["observer"]) == better_cache               # the kept one's
    assert by["observer"]["compile_cache"]["start"] == "warm"
    observer_cache = {**better_cache, **entries("observer")}
    assert tree(run_dir / "compile-cache") == better_cache    # the observer was discarded
    assert observer_cache != better_cache
    assert not (run_dir / "trial-caches").exists() or not any((run_dir / "trial-caches").iterdir())
    # Whose cache became the run's: the baseline, its warm noise run, the kept one; never the
    # discarded candidate that ran the best's own train.py, warm and scored.
    same = by["the best's own file"]
    assert same["train_sha256"] == by["baseline"]["train_sha256"] and same["trial_status"] == "ok"
    assert same["compile_cache"]["start"] == "warm"
    promoted = sorted(int(line[1:line.index(":")]) for line in logs if "is the run's now" in line)
    assert promoted == [0, noise["number"], by["better"]["number"]], logs


def test_only_a_warm_scored_run_of_the_best_train_py_refreshes_the_cache():
    """The rule behind the noise run's promotion, case by case: the best's own train.py,
    scored, started warm; anything else leaves the run's cache as it is."""
    from runner.loop import completes_cache
    best = {"train_sha256": "a" * 64, "status": "keep"}
    noise = {"train_sha256": "a" * 64, "trial_status": "ok", "compile_cache": {"start": "warm"}}
    assert completes_cache(noise, best)
    assert not completes_cache({**noise, "compile_cache": {"start": "cold"}}, best)
    assert not completes_cache({**noise, "compile_cache": None}, best)
    assert not completes_cache({**noise, "train_sha256": "b" * 64}, best)     # another file
    assert not completes_cache({**noise, "trial_status": "crash"}, best)
    assert not completes_cache(noise, None)                                    # nothing kept yet
    assert not completes_cache({**noise, "train_sha256": None}, {**best, "train_sha256": None})


# ---- the docker backend -------------------------------------------------------------------------

needs_docker = pytest.mark.skipif(docker_engine_missing() is not None,
                                  reason=str(docker_engine_missing()))


@pytest.fixture
def engine():
    import docker
    cli = docker.from_env(timeout=120)
    yield cli
    assert not cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"})
    assert not cli.volumes.list(filters={"label": f"autoresearch.run={RUN}"})
    for image in cli.images.list(filters={"reference": f"autoresearch/exp:{RUN}*"}):
        cli.images.remove(image.id, force=True)


def watch_scorer_mounts(cli, stop: threading.Event, found: list) -> None:
    """The mounts of this run's scoring container, seen while it exists."""
    import docker
    while not stop.is_set():
        try:
            listed = cli.containers.list(all=True, filters={"label": f"autoresearch.run={RUN}"})
        except docker.errors.NotFound:                # one went while it was listed (the
            continue                                  # training container, once it is done)
        for c in listed:
            if c.name.startswith("ar-score-") and not found:
                found.append([m.get("Destination") for m in c.attrs.get("Mounts", [])])
        time.sleep(0.1)


@needs_docker
def test_docker_planting_is_filtered_and_a_discarded_cache_changes_nothing(
        tmp_path, small_data, engine):
    """The planter starts on an exact copy of the run's cache (owned by the candidate, in its
    own volume), plants, is scored, and what comes out is filtered; the scorer has no cache.
    Discarded, it changes nothing: the next candidate sees exactly the run's cache."""
    from runner.trial import run_trial
    kept = run_cache(tmp_path / "run")
    before = tree(kept)
    stop, mounts = threading.Event(), []
    watcher = threading.Thread(target=watch_scorer_mounts, args=(engine, stop, mounts), daemon=True)
    watcher.start()
    try:
        rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "d1", plant=True), 1, kept,
                             tmp_path / "t1"), "docker")
    finally:
        stop.set()
        watcher.join()
    assert rec["status"] == "ok", rec
    assert seen(rec) == before and tree(kept) == before
    assert rec["compile_cache"]["start"] == "warm" and rec["compile_cache"]["out"] == "taken"
    check_planter_output(tmp_path / "t1", before, "d1")
    assert mounts and "/cache" not in mounts[0] and "/model" in mounts[0], mounts
    print(f"\n[cache] docker planter: {rec['compile_cache']} phases={rec['phases']}")

    cache.discard(tmp_path / "t1")                               # the loop's discard
    rec = run_trial(spec(tmp_path, small_data, render(OBSERVER, "d2"), 2, kept, None, budget=30),
                    "docker")
    assert "DONE" in rec["log_tail"] and rec["status"] == "invalid", rec   # no model: unscored
    assert seen(rec) == before
    assert rec["compile_cache"] == {"start": "warm", "in_bytes": cache.measure(kept).bytes,
                                    "in_files": len(before)}


@needs_docker
def test_docker_cache_is_bounded_by_its_volume(tmp_path, small_data, engine):
    """A candidate that writes past `cache_bytes` runs out of space in its cache volume; what
    comes out is within the bound."""
    from runner.trial import run_trial
    rec = run_trial(spec(tmp_path, small_data, render(CANDIDATE, "dbig", big=12), 3, None,
                         tmp_path / "t3"), "docker")
    assert rec["status"] == "ok", rec
    assert "BIG stopped: No space left on device" in rec["log_tail"], rec["log_tail"]
    info = rec["compile_cache"]
    assert info["start"] == "cold" and info["out"] == "taken", info
    assert info["out_bytes"] <= LIMITS.cache_bytes
    assert cache.measure(tmp_path / "t3").bytes == info["out_bytes"]
