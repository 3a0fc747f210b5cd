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
    "sample-inputs-pickle": "weights_only=True", "weights-pickle": "stored as a pickle",
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
