"""prepare.py score: exact bits per byte from known logits, and `invalid` for every model that
is broken, non-causal, stateful or crafted to run code, without running that code."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PREPARE_PY, run_prepare

import prepare as P

EVAL_TOKENS = 4 * P.SEQ_LEN          # four windows: fast on two CPU cores, still batched


@pytest.fixture(autouse=True)
def few_eval_tokens(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(EVAL_TOKENS))


def vocab(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["vocab_size"]


def export(module: torch.nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=P.SEQ_LEN)
    ep = torch.export.export(module, (torch.zeros(2, 16, dtype=torch.long),),
                             dynamic_shapes={"idx": {0: batch, 1: seq}})
    torch.export.save(ep, str(path))
    return path


class Bigram(torch.nn.Module):
    """Logits are a fixed row of a table picked by the current token: a known answer."""

    def __init__(self, table: torch.Tensor, shift: int = 0):
        super().__init__()
        self.register_buffer("table", table)
        self.shift = shift

    def forward(self, idx):
        if self.shift:                         # look `shift` tokens ahead: not causal
            idx = torch.roll(idx, -self.shift, dims=1)
        return self.table[idx]


class Constant(torch.nn.Module):
    def __init__(self, V: int, fill: float = 0.0, extra: int = 0):
        super().__init__()
        self.V, self.fill, self.extra = V, fill, extra

    def forward(self, idx):
        return torch.full((idx.shape[0], idx.shape[1], self.V + self.extra), self.fill)


class Counter(torch.nn.Module):
    """Keeps state across calls: it could tell the causality check from the scoring."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, idx):
        self.calls.add_(1)
        return torch.zeros(idx.shape[0], idx.shape[1], self.V) + self.calls * 0


class Pair(torch.nn.Module):
    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        z = torch.zeros(idx.shape[0], idx.shape[1], self.V)
        return z, z


def expected_bpb(data: Path, logprob_of) -> float:
    """Bits per byte computed here, independently of the scorer's batching."""
    val = np.load(data / "val" / "val.npy").astype(np.int64)
    token_bytes = np.load(data / "token_bytes.npy")
    windows = EVAL_TOKENS // P.SEQ_LEN
    x = val[:windows * P.SEQ_LEN]
    y = val[1:windows * P.SEQ_LEN + 1]
    b = token_bytes[y]
    nats = -logprob_of(x, y)[b > 0].sum()
    return float(nats / math.log(2) / b.sum())


def test_uniform_logits_give_log2_vocab_bits_per_token(small_data: Path, tmp_path: Path):
    V = vocab(small_data)
    result = P.score(export(Constant(V), tmp_path / "m.pt2"), small_data, "cpu")
    assert result["status"] == "ok"
    want = expected_bpb(small_data, lambda x, y: np.full(len(y), -math.log(V)))
    assert result["val_bpb"] == pytest.approx(want, rel=1e-6)
    assert result["tokens"] == EVAL_TOKENS


def test_known_logits_are_scored_exactly(small_data: Path, tmp_path: Path):
    V = vocab(small_data)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g) * 3
    logp = torch.log_softmax(table.double(), dim=-1).numpy()
    result = P.score(export(Bigram(table), tmp_path / "m.pt2"), small_data, "cpu")
    assert result["status"] == "ok", result
    want = expected_bpb(small_data, lambda x, y: logp[x, y])
    assert result["val_bpb"] == pytest.approx(want, rel=1e-5)
    assert result["val_bpb"] > result["uniform_bpb"]        # random guesses do worse


def score_cli(model: Path, data: Path) -> dict:
    proc = subprocess.run([sys.executable, str(PREPARE_PY), "score", "--model", str(model),
                           "--data-dir", str(data), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout                      # exactly one JSON line
    result = json.loads(lines[0])
    assert {"status", "reason", "val_bpb", "tokens", "bytes", "seconds"} <= set(result)
    return result


def test_cli_prints_one_json_line(small_data: Path, tmp_path: Path):
    result = score_cli(export(Constant(vocab(small_data)), tmp_path / "m.pt2"), small_data)
    assert result["status"] == "ok" and result["bytes"] > 0


@pytest.mark.parametrize("name,module,reason", [
    ("peek-one-ahead", lambda V: Bigram(torch.randn(V, V), shift=1), "not causal"),
    ("peek-far-ahead", lambda V: Bigram(torch.randn(V, V), shift=100), "not causal"),
    ("nan", lambda V: Constant(V, fill=float("nan")), "NaN"),
    ("inf", lambda V: Constant(V, fill=float("inf")), "NaN or inf"),
    ("wrong-vocab", lambda V: Constant(V, extra=1), "shape"),
    ("two-outputs", Pair, "one tensor"),
    ("stateful", Counter, "mutates state"),
])
def test_broken_models_are_invalid(small_data: Path, tmp_path: Path, name, module, reason):
    result = score_cli(export(module(vocab(small_data)), tmp_path / f"{name}.pt2"), small_data)
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert reason in result["reason"]


def test_missing_and_garbage_files_are_invalid(small_data: Path, tmp_path: Path):
    assert "no model file" in score_cli(tmp_path / "absent.pt2", small_data)["reason"]
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(os.urandom(4096))
    assert "not a zip" in score_cli(garbage, small_data)["reason"]
    good = export(Constant(vocab(small_data)), tmp_path / "good.pt2").read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(good[: len(good) // 2])
    assert score_cli(cut, small_data)["status"] == "invalid"


def test_missing_data_is_an_infrastructure_error(tmp_path: Path):
    proc = run_prepare("score", "--model", str(tmp_path / "m.pt2"), "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "autoresearch prepare" in proc.stderr
    assert proc.stdout == ""


# ---- crafted archives: the payload must never run -------------------------------------------

class Payload:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a model archive, letting `change(name, data)` edit members (None drops one)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            data = change(info.filename[len(root):], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        extra = change("<extra>", None)
        if extra:
            zout.writestr(root + extra[0], extra[1])
    return dst


def edit_json(data: bytes, fn) -> bytes:
    tree = json.loads(data)
    fn(tree)
    return json.dumps(tree).encode()


def first_node(tree):
    return tree["graph_module"]["graph"]["nodes"][0]


def crafted(kind: str, base: Path, out: Path, marker: Path) -> Path:
    evil = pickle.dumps(Payload(marker))

    def change(name: str, data: bytes | None):
        if name == "<extra>":
            return {"extra-member": ("extra/run_me.py", b"print('hi')"),
                    "custom-obj": ("data/constants/custom_obj_0", evil)}.get(kind)
        if kind == "sample-inputs-pickle" and name.startswith("data/sample_inputs/"):
            return evil
        if kind == "weights-pickle" and name.endswith(("_weights_config.json", "_constants_config.json")):
            def flip(cfg):
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
            return edit_json(data, flip)
        if kind == "weights-pickle" and name.startswith(("data/weights/weight_", "data/constants/tensor_")):
            return evil
        if name.startswith("models/") and name.endswith(".json"):
            if kind == "target-os-system":
                return edit_json(data, lambda t: first_node(t).update(target="torch.os.system"))
            if kind == "target-from-file":
                return edit_json(data, lambda t: first_node(t).update(
                    target="torch.ops.aten.from_file.default"))
            if kind == "extension-op":
                return edit_json(data, lambda t: first_node(t).update(target="#evil:op"))
            if kind == "sympy-eval":
                return data.replace(b"Symbol('s", b"__import__('os').system('true') or Symbol('s", 1)
            if kind == "pytree-import":
                def spec(t):
                    sig = t["graph_module"]["module_call_graph"][0]["signature"]
                    sig["in_spec"] = json.dumps([1, {"type": "collections.defaultdict",
                                                     "context": "null", "children_spec": []}])
                return edit_json(data, spec)
        return data

    return rewrite(base, out, change)


CRAFTED = {                                   # kind -> what the scorer must say
    "weights-pickle": "stored as a pickle",
    "extra-member": "unexpected archive member", "custom-obj": "unexpected archive member",
    "target-os-system": "torch.os.system", "target-from-file": "from_file",
    "extension-op": "#evil:op", "sympy-eval": "shape expression", "pytree-import": "defaultdict",
}


@pytest.fixture(scope="module")
def base_archive(small_data: Path, tmp_path_factory) -> Path:
    """A valid archive with a tensor constant and symbolic shapes, to be tampered with."""
    V = vocab(small_data)
    return export(Bigram(torch.randn(V, V)), tmp_path_factory.mktemp("base") / "base.pt2")


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_archive_is_invalid_and_payload_never_runs(kind, small_data, base_archive, tmp_path):
    marker = tmp_path / "pwned"
    model = crafted(kind, base_archive, tmp_path / f"{kind}.pt2", marker)
    result = score_cli(model, small_data)
    assert result["status"] == "invalid", result
    assert result["val_bpb"] is None and CRAFTED[kind] in result["reason"]
    assert not marker.exists()


def test_candidate_sample_inputs_are_never_read(small_data, base_archive, tmp_path):
    """The scorer loads sample inputs it made itself: a pickle in the candidate's sample
    inputs is dropped unread (its program is scored as it deserves), and never runs."""
    marker = tmp_path / "pwned"
    model = crafted("sample-inputs-pickle", base_archive, tmp_path / "evil.pt2", marker)
    result = score_cli(model, small_data)
    assert result["status"] == "ok", result
    assert result["val_bpb"] == pytest.approx(score_cli(base_archive, small_data)["val_bpb"])
    assert not marker.exists()


def test_the_pickle_threat_is_real_without_the_checks(small_data, base_archive, tmp_path):
    """Positive control: plain torch.export.load runs the sample-inputs payload, so the test
    above would fail if prepare.py handed the archive to torch unchecked."""
    marker = tmp_path / "pwned"
    model = crafted("sample-inputs-pickle", base_archive, tmp_path / "evil.pt2", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(model)!r})"],
                   capture_output=True, timeout=120)
    assert marker.exists()


def test_untampered_base_archive_scores(small_data, base_archive):
    assert P.score(base_archive, small_data, "cpu")["status"] == "ok"


# ---- one strict reading of the archive --------------------------------------------------------

def zip_bytes(entries: list[tuple[str, bytes]], *, gap_after: int | None = None,
              local_names: dict[int, str] | None = None, central_sizes: dict[int, int] | None = None,
              same_offset: tuple[int, int] | None = None, crc_off: int | None = None,
              method: int = 0, comment: bytes = b"") -> bytes:
    """A stored zip written by hand, with one defect at a time: what a zip library would
    refuse to write, and two readers could disagree on."""
    import struct
    import zlib
    body, central, offsets = b"", b"", []
    for i, (name, data) in enumerate(entries):
        crc = zlib.crc32(data) ^ (1 if i == crc_off else 0)
        lname = (local_names or {}).get(i, name).encode()
        offsets.append(len(body))
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                            len(data), len(lname), 0) + lname + data
        if gap_after == i:
            body += b"\0" * 64
    for i, (name, data) in enumerate(entries):
        crc = zlib.crc32(data) ^ (1 if i == crc_off else 0)
        size = (central_sizes or {}).get(i, len(data))
        off = offsets[same_offset[0]] if same_offset and i == same_offset[1] else offsets[i]
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                               size, size, len(name), 0, 0, 0, 0, 0, off) + name.encode()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central),
                      len(body), len(comment)) + comment
    return body + central + end


def archive_members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def test_strict_reader_sees_what_torch_wrote(base_archive):
    """The honest case: a torch.export.save archive (data descriptors, padding, zip64 end
    records) reads member for member as zipfile reads it, and so does a zipfile-written copy."""
    root, members = P.read_archive(base_archive)
    assert [(f"{root}/{n}", d) for n, d in members.items()] == archive_members(base_archive)
    plain = base_archive.parent / "plain.pt2"
    plain.write_bytes(zip_bytes(archive_members(base_archive)))
    assert P.read_archive(plain)[1] == members


POLYGLOTS = {                      # how the file is made -> what the reason must hold
    "evil-then-clean": "does not end where",             # two archives in one file
    "clean-then-evil": "does not end where",
    "leading-bytes": "does not end where",
    "trailing-bytes": "plain end record",
    "comment": "plain end record",
    "gap": "does not start where",
    "local-name-differs": "disagree",
    "central-size-differs": "disagree",
    "two-entries-one-header": "disagree",
    "duplicate-name": "duplicate",
    "bad-crc": "CRC",
    "compressed": "plain stored member",
}


def polyglot(kind: str, clean: list[tuple[str, bytes]], evil: bytes) -> bytes:
    if kind == "evil-then-clean":
        return evil + zip_bytes(clean)
    if kind == "clean-then-evil":
        return zip_bytes(clean) + evil
    if kind == "leading-bytes":
        return b"\0" * 128 + zip_bytes(clean)
    if kind == "trailing-bytes":
        return zip_bytes(clean) + b"\0" * 16
    if kind == "comment":
        return zip_bytes(clean, comment=b"hello")
    if kind == "gap":
        return zip_bytes(clean, gap_after=0)
    program = next(i for i, (n, _) in enumerate(clean) if n.endswith("models/model.json"))
    if kind == "local-name-differs":
        return zip_bytes(clean, local_names={program: clean[program][0].replace("model.json", "evil.json")})
    if kind == "central-size-differs":
        return zip_bytes(clean, central_sizes={program: len(clean[program][1]) - 1})
    if kind == "two-entries-one-header":
        return zip_bytes(clean, same_offset=(0, 1))
    if kind == "duplicate-name":
        return zip_bytes(clean + [clean[program]])
    if kind == "bad-crc":
        return zip_bytes(clean, crc_off=program)
    if kind == "compressed":
        return zip_bytes(clean, method=8)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", sorted(POLYGLOTS))
def test_ambiguous_zip_files_are_invalid_and_the_payload_never_runs(kind, small_data,
                                                                    base_archive, tmp_path):
    """Every file that two zip readers could see differently is refused by the one reader the
    scorer uses, and the pickled payload hidden in the other archive never runs."""
    marker = tmp_path / "pwned"
    evil = crafted("weights-pickle", base_archive, tmp_path / "evil.pt2", marker).read_bytes()
    model = tmp_path / f"{kind}.pt2"
    model.write_bytes(polyglot(kind, archive_members(base_archive), evil))
    result = score_cli(model, small_data)
    assert result["status"] == "invalid" and result["val_bpb"] is None, result
    assert POLYGLOTS[kind] in result["reason"], result["reason"]
    assert not marker.exists()


def test_oversized_sparse_and_special_files_are_refused_before_reading(small_data, tmp_path):
    sparse = tmp_path / "sparse.pt2"
    with open(sparse, "wb") as f:
        f.truncate(P.MAX_ARCHIVE_BYTES + 1)           # no blocks written: instant, no disk
    result = score_cli(sparse, small_data)
    assert result["status"] == "invalid" and "more than the limit" in result["reason"], result
    assert result["seconds"] < 60
    fifo = tmp_path / "fifo.pt2"
    os.mkfifo(fifo)                                   # reading it would block forever
    assert "not a regular file" in score_cli(fifo, small_data)["reason"]
    link = tmp_path / "link.pt2"
    link.symlink_to(sparse)
    assert "symbolic link" in score_cli(link, small_data)["reason"]


def test_no_unpickling_while_the_rebuilt_archive_loads():
    """The second line of defence: inside unpickling_refused, torch.load only runs the
    weights-only unpickler and every other unpickling path raises."""
    import io
    buf = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buf)
    with P.unpickling_refused():
        assert torch.load(io.BytesIO(buf.getvalue()))["x"].sum() == 2      # weights-only: fine
        for call in (lambda: torch.load(io.BytesIO(buf.getvalue()), weights_only=False),
                     lambda: pickle.loads(pickle.dumps(1)),
                     lambda: torch._C._pickle_load_obj(b"")):
            with pytest.raises(P.Invalid, match="unpickle"):
                call()
    assert pickle.loads(pickle.dumps(1)) == 1                             # restored after


# ---- causality on the scored calls, and no state --------------------------------------------

import attack_models as A  # noqa: E402


@pytest.mark.parametrize("kind", sorted(A.ATTACKS))
def test_models_that_look_ahead_or_keep_state_are_invalid(kind, small_data, tmp_path):
    V = vocab(small_data)
    model = Path(A.export(A.build(kind, V, rows=EVAL_TOKENS // P.SEQ_LEN), str(tmp_path / "m.pt2")))
    result = score_cli(model, small_data)
    assert result["status"] == "invalid" and result["val_bpb"] is None, result
    assert A.ATTACKS[kind] in result["reason"], result["reason"]


def test_attacks_would_have_won_without_the_checks(small_data, tmp_path):
    """Positive control: scored without the checks, the look-ahead models beat the uniform
    baseline (the late nudge by a believable margin), so refusing them is what protects the
    metric."""
    V = vocab(small_data)
    uniform = math.log2(V)
    for kind in ("peek-random-5", "late-nudge", "batch-gated"):
        model = A.build(kind, V, rows=EVAL_TOKENS // P.SEQ_LEN)
        val = np.load(small_data / "val" / "val.npy").astype(np.int64)
        x = torch.from_numpy(val[:EVAL_TOKENS].reshape(-1, P.SEQ_LEN))
        y = torch.from_numpy(val[1:EVAL_TOKENS + 1].reshape(-1, P.SEQ_LEN))
        with torch.no_grad():
            nats = torch.nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        assert nats.item() / math.log(2) < uniform - 0.05, kind      # bits per token


def test_splice_plan_spreads_cuts_over_batches():
    rng = np.random.default_rng(1)
    big = P.causal_plan(4096, 16, rng)                 # default evaluation: half the batches
    assert len(big) == 256 and big.sum() * 16 == P.CAUSAL_CUTS and set(big) == {0, 1}
    mid = P.causal_plan(144, 16, rng)                 # every row, and at least 256 cuts
    assert mid.sum() * 16 == P.MIN_CAUSAL_CUTS and set(mid) == {1, 2}
    assert P.causal_plan(4, 4, rng).tolist() == [P.MIN_CAUSAL_CUTS // 4]   # tiny: many passes
    assert P.causal_plan(2048, 16, rng).tolist() == [1] * 128   # every row once


def test_cuts_cover_every_position_and_splice_real_text():
    rng = np.random.default_rng(0)
    x = torch.arange(4 * 64).reshape(4, 64)
    donors = torch.arange(4 * 64, 8 * 64).reshape(4, 64)     # another batch's rows
    seen, modes = set(), {"cut": 0, "whole": 0, "untouched": 0}
    for _ in range(800):
        spliced, cuts = P.splice(x, rng, donors)
        for r, c in enumerate(cuts):
            assert 0 <= c <= 64
            assert torch.equal(spliced[r, :c], x[r, :c])
            if c == 64:
                modes["untouched"] += 1
                continue
            modes["whole" if c == 0 else "cut"] += 1
            assert any(torch.equal(spliced[r, c:], donors[d, c:]) for d in range(4)), \
                "the replaced suffix is real text of the other batch"
            seen.add(int(c))
    assert seen == set(range(0, 64))
    total = sum(modes.values())
    assert 0.08 < modes["untouched"] / total < 0.17 and 0.08 < modes["whole"] / total < 0.17


def test_dropout_switched_off_is_honest(small_data, tmp_path):
    """train.py's GPU exports hold dropout with train=False: deterministic, so accepted."""
    V = vocab(small_data)
    result = score_cli(Path(A.export(A.Dropout(V, False), str(tmp_path / "m.pt2"))), small_data)
    assert result["status"] == "ok", result
    assert result["val_bpb"] == pytest.approx(result["uniform_bpb"], rel=1e-6)


def test_honest_model_reports_its_checks(small_data, tmp_path):
    result = score_cli(export(Constant(vocab(small_data)), tmp_path / "m.pt2"), small_data)
    assert result["status"] == "ok"
    assert result["causal_checks"] >= 0.6 * P.MIN_CAUSAL_CUTS          # 3/4 of the spliced rows are cut
    assert result["check_seconds"] >= 0


# ---- the scorer's own limits and its one output line -------------------------------------------

def test_time_limit_is_proportional_to_the_tokens_scored():
    small, large = P.score_time_limit(4, "cpu"), P.score_time_limit(4096, "cpu")
    assert small > P.SCORE_BASE_SECONDS and large > small
    assert P.score_time_limit(4096, "cuda") < large                   # a GPU is given less
    assert P.score_time_limit(4096, "cuda") < 1000


def test_slow_model_runs_out_of_time_with_one_result_line(small_data, tmp_path):
    model = Path(A.export(A.Slow(vocab(small_data)), str(tmp_path / "slow.pt2")))
    proc = subprocess.run([sys.executable, str(PREPARE_PY), "score", "--model", str(model),
                           "--data-dir", str(small_data), "--device", "cpu", "--time-limit", "3"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["status"] == "invalid" and "time limit of 3 s" in result["reason"], result
    assert result["seconds"] < 30


def synthetic_data(folder: Path, V: int = 16) -> Path:
    """A data set with a tiny vocabulary and a full-size validation split (EVAL_TOKENS), so the
    scorer runs at its real scale (4096 rows, one cut each) with a model that costs little."""
    (folder / "val").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": V}))
    np.save(folder / "token_bytes.npy", np.array([0] + [1] * (V - 1), dtype=np.int32))
    rng = np.random.default_rng(0)
    np.save(folder / "val" / "val.npy", rng.integers(1, V, P.EVAL_TOKENS + 1).astype(np.uint16))
    return folder


def test_a_one_percent_peek_is_caught_at_the_default_evaluation(tmp_path, monkeypatch):
    """At the default EVAL_TOKENS, CAUSAL_CUTS (2048) of the 4096 scored rows are spliced,
    about 1536 of them at a cut, so a model that looks ahead at 1% of positions escapes with
    probability ~(0.99)^1536 ~ 2e-7."""
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS")
    data = synthetic_data(tmp_path / "data")
    honest = P.score(export(Constant(16), tmp_path / "honest.pt2"), data, "cpu")
    assert honest["status"] == "ok" and honest["causal_checks"] >= 0.7 * P.CAUSAL_CUTS, honest
    cheat = Path(A.export(A.build("peek-random-1", 16), str(tmp_path / "cheat.pt2")))
    with pytest.raises(P.Invalid, match="not causal"):
        P.score(cheat, data, "cpu")
