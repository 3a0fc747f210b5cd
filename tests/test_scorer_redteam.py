"""Red-team tests of the trusted scorer (`prepare.py score`): each test is one attack a candidate
could make with a crafted model.pt2, and asserts what the scorer must do about it (`invalid`
with a reason, the payload's sentinel file never created, or the honest score unchanged).

Attacks that still work are marked `xfail(strict=True)` with the reason: they fail today, and
the mark must be removed when the scorer is fixed (a strict xfail that passes is an error).
Every test is bounded: tiny models, AUTORESEARCH_EVAL_TOKENS=4096, payloads that only write a
sentinel file or a result line, computations of a few seconds and a few megabytes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PREPARE_PY

import prepare as P
import attack_models as A
from test_prepare_score import (EVAL_TOKENS, Bigram, Constant, archive_members, base_archive,  # noqa: F401
                                edit_json, export, rewrite, score_cli, vocab, zip_bytes)


@pytest.fixture(autouse=True)
def few_eval_tokens(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(EVAL_TOKENS))


def program_edit(base: Path, out: Path, fn) -> Path:
    """A copy of `base` with its program JSON edited by `fn(tree)`."""
    def change(name: str, data: bytes | None):
        if name == "<extra>":
            return None
        if name == "models/model.json":
            return edit_json(data, fn)
        return data
    return rewrite(base, out, change)


def score_limited(model: Path, data: Path, *args: str, memory: int = 8 * 2**30,
                  timeout: int = 120) -> dict:
    """The scorer CLI under an address-space limit (a memory bomb that got through fails
    inside the limit instead of taking the machine down)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    proc = subprocess.run([sys.executable, str(PREPARE_PY), "score", "--model", str(model),
                           "--data-dir", str(data), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
                          env={**os.environ, "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS)})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    return json.loads(lines[0])


# ---- (b, c) code in the program JSON ----------------------------------------------------------

def forging_guard(marker: Path) -> str:
    """A Python expression that, run inside the scorer, writes `marker`, then finds the scorer's
    own `finish` (the closure that writes the result line to the private stdout), writes a
    forged `ok` result with it and ends the process: the one line the runner reads."""
    forged = {"status": "ok", "reason": "", "val_bpb": 0.0123, "uniform_bpb": 9.0,
              "tokens": EVAL_TOKENS, "bytes": 1, "seconds": 1.0, "device": "cpu"}
    return (f"(open({str(marker)!r}, 'w').close(), "
            f"[f for f in __import__('gc').get_objects() "
            f"if type(f) is __import__('types').FunctionType and f.__name__ == 'finish' "
            f"and 'result_fd' in f.__code__.co_freevars][0]"
            f"({forged!r}), __import__('os')._exit(0))")


def test_guards_code_in_the_program_never_runs(small_data, base_archive, tmp_path):
    marker = tmp_path / "pwned"
    model = program_edit(base_archive, tmp_path / "guards.pt2",
                         lambda t: t.__setitem__("guards_code", [forging_guard(marker)]))
    result = score_cli(model, small_data)
    assert not marker.exists(), "the payload ran inside the scorer"
    # The scorer drops guard code unread: the program gets its own, honest score.
    assert result["val_bpb"] != 0.0123, result
    assert result["val_bpb"] == pytest.approx(score_cli(base_archive, small_data)["val_bpb"])


def test_honest_exports_carry_no_guards_code(base_archive):
    """Control for the test above: the base archive's own guards_code is empty, so a scorer
    that refuses any non-empty guards_code (or drops it) refuses no honest export."""
    import zipfile
    with zipfile.ZipFile(base_archive) as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        assert json.loads(z.read(name)).get("guards_code") == []


class Table(torch.nn.Module):
    """Ignores its input: a program whose one user input can be replaced by a constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 1, 1))

    def forward(self, idx):
        return self.table + 0


def test_a_string_input_in_the_program_never_runs(small_data, tmp_path):
    """The same exec as above by another road, which clearing guards_code does not close:
    the program's one user input is declared a string constant (check_program counts it as
    the one input), and its value closes the quote."""
    marker = tmp_path / "pwned"
    ep = torch.export.export(Table(), (torch.zeros(2, 16, dtype=torch.long),))
    torch.export.save(ep, str(tmp_path / "table.pt2"))
    payload = f"a' or {forging_guard(marker)} or 'b"

    def as_string(tree):
        graph = tree["graph_module"]["graph"]
        specs = tree["graph_module"]["signature"]["input_specs"]
        user = next(i for i, spec in enumerate(specs) if "user_input" in spec)
        graph["inputs"][user] = {"as_string": payload}
        specs[user] = {"user_input": {"arg": {"as_string": payload}}}
    model = program_edit(tmp_path / "table.pt2", tmp_path / "string-input.pt2", as_string)
    result = score_cli(model, small_data)
    assert not marker.exists(), "the payload ran inside the scorer"
    assert result["status"] == "invalid" and result["val_bpb"] is None, result


def test_a_name_in_the_program_never_runs(small_data, base_archive, tmp_path):
    """A third road: the user input renamed `idx, q=<payload>` everywhere in the program, so
    that generated source reads `def forward(self, idx, q=<payload>)`. It runs inside
    torch.export.load itself, so `ep.module(check_guards=False)` does not close it: names
    must be checked (identifiers only) before the program is loaded."""
    marker = tmp_path / "pwned"
    evil = json.dumps(f"idx, q={forging_guard(marker)}").encode()

    def change(name: str, data: bytes | None):
        if name == "<extra>":
            return None
        return data.replace(b'"idx"', evil) if name == "models/model.json" else data
    model = rewrite(base_archive, tmp_path / "evil-name.pt2", change)
    result = score_cli(model, small_data)
    assert not marker.exists(), "the payload ran inside the scorer"
    assert result["status"] == "invalid" and result["val_bpb"] is None, result


def test_a_dead_node_with_a_code_name_never_runs(small_data, base_archive, tmp_path):
    """Contained: an unused node named `a = <payload>; b` (codegen names it afresh)."""
    import copy
    marker = tmp_path / "pwned"

    def dead(tree):
        graph = tree["graph_module"]["graph"]
        node = next(n for n in graph["nodes"] if "as_tensor" in n["outputs"][0])
        extra = copy.deepcopy(node)
        name = f"a = open({str(marker)!r}, 'w'); b"
        graph["tensor_values"][name] = graph["tensor_values"][node["outputs"][0]["as_tensor"]["name"]]
        extra["outputs"][0]["as_tensor"]["name"] = name
        graph["nodes"].insert(graph["nodes"].index(node) + 1, extra)
    score_cli(program_edit(base_archive, tmp_path / "dead.pt2", dead), small_data)
    assert not marker.exists()


# ---- (a) the causality check's own arithmetic -------------------------------------------------

class OverflowTail(torch.nn.Module):
    """Peeks at the next token everywhere but in the last K positions of a row, which are
    after every cut. There it adds +-1.8e38 to all logits (softmax does not change: those
    positions score as uniform), the sign taken from the position's own token. A spliced row
    has other tokens there, so some sign flips: scored minus spliced is 3.6e38, which float32
    rounds to inf; check_prefixes multiplies it by its 0/1 mask of the positions before the
    cut, inf * 0 is NaN, the max over the batch is NaN, and `NaN > CAUSAL_TOL` is False."""

    K = 16

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        B, T = idx.shape
        sign = ((idx * 2654435761) % 1024 < 512).float() * 2 - 1
        tail = (torch.arange(T, device=idx.device) >= T - self.K).float()
        return A.peek(idx, tail[None, :] == 0, self.V) + (sign * tail * 1.8e38)[..., None]


def test_an_overflowing_difference_after_the_cut_does_not_switch_the_check_off(small_data, tmp_path):
    """A plain torch.export of an ordinary module: no crafted archive needed."""
    V = vocab(small_data)
    result = score_cli(export(OverflowTail(V), tmp_path / "overflow.pt2"), small_data)
    assert result["status"] == "invalid" and result["val_bpb"] is None, result


def test_check_prefixes_is_not_fooled_by_an_overflow_after_the_cut():
    """The same defect at the level of check_prefixes: the change before the cut is what it
    must report, whatever happens after the cut."""
    a = torch.zeros(2, 8, 4)
    b = a.clone()
    b[0, 2] = 1.0                                           # before row 0's cut: must be seen
    assert P.check_prefixes(a, b, np.array([5, 5])) == 1.0  # control
    a[1, 7], b[1, 7] = 1.8e38, -1.8e38                      # after row 1's cut: to be ignored
    assert P.check_prefixes(a, b, np.array([5, 5])) == 1.0


# ---- (a) state between calls through uninitialised memory --------------------------------------

MAGIC = 0x5EC2E7A11


class StaleMemory(torch.nn.Module):
    """Hides the scored input in memory it frees, and finds it again with torch.empty in the
    next call. The scored call peeks at the next token of its own input; a spliced call (whose
    rows begin as the scored rows do) finds the scored rows in the uninitialised memory and
    peeks at *those*, so the logits before every cut match the scored ones exactly. The
    carriers come in a few sizes and copies, so that one of them survives the scorer's own
    allocations between calls."""

    PADS = [8, 8, 8, 1000, 1000, 1000, 5000, 5000, 20000, 70000]

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        B, T = idx.shape
        src = idx
        found = torch.zeros(B, dtype=torch.bool)
        for pad in self.PADS:
            stale = torch.empty(B, T + pad + 1, dtype=torch.long)
            prev = stale[:, pad:pad + T]
            known = ((stale[:, pad + T] == MAGIC) & (stale[:, pad - 1] == MAGIC)
                     & (prev[:, 0] == idx[:, 0]) & (prev >= 0).all(1) & (prev < self.V).all(1)
                     & ~found)
            src = torch.where(known[:, None], prev.clamp(0, self.V - 1), src)
            found = found | known
        keep = torch.zeros(B, 1, dtype=torch.long)
        for pad in self.PADS:
            carrier = torch.nn.functional.pad(src, (pad, 1), value=MAGIC)
            keep = keep + carrier[:, :1] * 0
        return A.peek(src, torch.ones(1, T, dtype=torch.bool), self.V) + keep.float()[..., None]


def test_uninitialised_memory_does_not_carry_the_scored_input_to_the_spliced_call(small_data, tmp_path):
    V = vocab(small_data)
    model = export(StaleMemory(V), tmp_path / "stale.pt2")
    results = []
    for _ in range(5):                 # the allocator's layout varies: ~80% of runs get through
        try:
            results.append(P.score(model, small_data, "cpu"))
        except P.Invalid as e:
            results.append({"status": "invalid", "reason": str(e)})
        if results[-1]["status"] == "ok":
            break
    assert all(r["status"] == "invalid" for r in results), \
        f"look-ahead scored ok: {results[-1]}"


class EmptyEcho(torch.nn.Module):
    """Returns (a function of) torch.empty: whatever the memory held before."""

    def forward(self, idx):
        e = torch.empty(idx.shape[0], idx.shape[1], 512, dtype=torch.int32)
        return (e == 7).float()


def test_a_program_never_sees_memory_left_by_someone_else(tmp_path):
    """The primitive behind the attack above, deterministically: memory freed just before a
    call shows up in the model's output (a few sizes, some tries each: the allocator's
    thresholds vary with what ran before)."""
    try:
        model = P.load_program(export(EmptyEcho(), tmp_path / "echo.pt2"), "cpu")
    except P.Invalid:
        return                                             # refused: fine
    seen = 0.0
    for rows, cols in [(2, 16), (2, 64), (4, 256)] * 4:
        pattern = torch.full((rows * cols * 512,), 7, dtype=torch.int32)
        del pattern
        with torch.no_grad():
            seen = max(seen, model(torch.zeros(rows, cols, dtype=torch.long)).mean().item())
    assert seen < 0.5, f"{seen:.0%} of the output is memory freed before the call"


# ---- (a) information across the rows of a batch ---------------------------------------------

class NextRowPeek(torch.nn.Module):
    """Uniform everywhere except the last position of each row, which predicts the first
    token of the next row. When a batch holds consecutive windows (an evaluation of at most
    SCORE_BATCH windows), that token is exactly the last position's target. Position 0 of a
    row is never changed by a splice (cuts are >= 1), so the dependency is never seen."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        B, T = idx.shape
        nxt = torch.roll(idx[:, 0], -1, dims=0)
        last = torch.nn.functional.one_hot(nxt, self.V).float() * 20.0
        pos = (torch.arange(T, device=idx.device) == T - 1).float()
        return pos[None, :, None] * last[:, None, :]


def test_a_row_cannot_read_its_target_from_the_next_row(small_data, tmp_path):
    V = vocab(small_data)
    honest = P.score(export(Constant(V), tmp_path / "uniform.pt2"), small_data, "cpu")
    try:
        cheat = P.score(export(NextRowPeek(V), tmp_path / "next-row.pt2"), small_data, "cpu")
    except P.Invalid:
        return
    assert cheat["val_bpb"] >= honest["val_bpb"] - 1e-9, (cheat["val_bpb"], honest["val_bpb"])


class SpliceAware(torch.nn.Module):
    """Peeks at the next token everywhere, but where another row agrees with this one on the
    K aligned tokens up to p and then differs, it peeks at *that* row's next token. Real rows
    never agree like that; in a spliced batch, row r's own continuation (from r's cut on) is
    the suffix of the row it was donated to, which agrees with r up to r's cut whenever that
    row was cut earlier: about half the rows. There the logit before the cut is the scored
    one, and the cut does not catch the peek."""

    K = 4

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        B, T = idx.shape
        eq = (idx[:, None, :] == idx[None, :, :]) & ~torch.eye(B, dtype=torch.bool, device=idx.device)[:, :, None]
        ones = torch.cumsum(eq.long(), -1)
        run = ones - torch.nn.functional.pad(ones, (self.K, 0))[..., :T]   # agreements in (p-K, p]
        nxt = torch.roll(idx, -1, 1)
        use = (run >= self.K) & (nxt[:, None, :] != nxt[None, :, :])
        other = torch.gather(nxt, 0, use.long().argmax(1))
        tok = torch.where(use.any(1), other, nxt)
        return torch.nn.functional.one_hot(tok, self.V).float() * 20.0


def test_a_cut_catches_a_peek_just_before_it_whatever_the_rest_of_the_batch(small_data):
    """How often a cut just after a peeked position fails to see the peek: never, for the
    plain peek; the docstring's bound assumes never for any model."""
    V = vocab(small_data)
    val = np.load(small_data / "val" / "val.npy").astype(np.int64)
    x = torch.from_numpy(val[:4 * P.SEQ_LEN].reshape(4, P.SEQ_LEN))
    donors = torch.from_numpy(val[2000:2000 + 4 * P.SEQ_LEN].reshape(4, P.SEQ_LEN))   # other text
    rng = np.random.default_rng(0)

    def escapes(model) -> float:
        with torch.no_grad():
            scored = model(x)
            passed = []
            for _ in range(50):
                spliced, cuts = P.splice(x, rng, donors)       # donors: another batch
                other = model(spliced)
                passed += [P.check_prefixes(scored[r:r + 1], other[r:r + 1], cuts[r:r + 1])
                           <= P.CAUSAL_TOL for r in range(len(cuts)) if 0 < cuts[r] < P.SEQ_LEN]
        return float(np.mean(passed))

    assert escapes(A.PeekMask(V, torch.ones(P.SEQ_LEN, dtype=torch.bool))) == 0.0   # control
    rate = escapes(SpliceAware(V))
    assert rate < 0.05, f"{rate:.0%} of the cuts miss a peek just before them"


# ---- (d) shape expressions: sympy evaluates what check_sympy lets through ----------------------

@pytest.mark.parametrize("expr", [
    "Add(Symbol('s0', positive=True, integer=True), Mul(Integer(0), 9**9**9**9))",
    "Add(Symbol('s0', positive=True, integer=True), Mul(Integer(0), "
    "Pow(Integer(9), Pow(Integer(9), Integer(999999999999)))))",
    "Add(Symbol('s0', positive=True, integer=True), Mul(Integer(0), Float(1, 999999999999)))",
])
def test_shape_expressions_that_cost_unbounded_work_are_refused(expr):
    """Checked only: none of these is ever evaluated here."""
    with pytest.raises(P.Invalid):
        P.check_sympy(expr)


def test_the_time_limit_holds_while_a_shape_expression_is_parsed(small_data, base_archive, tmp_path):
    """A ~7 s power (4 MB of digits) under a 4 s limit: the result (ok or invalid: the program
    is honest, the expression adds 0) must come on time. The same tower one level higher would
    hold the scorer for hours, past its own limit, until the runner's outer timeout."""
    def slow(tree):
        for node in tree["graph_module"]["graph"]["nodes"]:
            for out in node["outputs"]:
                sizes = out.get("as_tensor") and tree["graph_module"]["graph"]["tensor_values"][
                    out["as_tensor"]["name"]]["sizes"]
                for s in sizes or []:
                    if "as_expr" in s:
                        e = s["as_expr"]["expr_str"]
                        s["as_expr"]["expr_str"] = f"Add({e}, Mul(Integer(0), 10**10**7))"
                        return
        raise AssertionError("no symbolic size to edit")
    model = program_edit(base_archive, tmp_path / "slow-expr.pt2", slow)
    result = score_limited(model, small_data, "--time-limit", "4")
    assert result["seconds"] < 6.5, f"the 4 s limit fired after {result['seconds']} s: {result}"


# ---- contained: regression tests for attacks the scorer already stops --------------------------

def test_deeply_nested_program_json_is_invalid(base_archive, tmp_path):
    depth = 100_000
    bomb = ("[" * depth + "]" * depth).encode()
    model = rewrite(base_archive, tmp_path / "deep.pt2",
                    lambda n, d: None if n == "<extra>" else (bomb if n == "models/model.json" else d))
    with pytest.raises(P.Invalid, match="not JSON"):
        P.load_program(model, "cpu")


def test_deeply_nested_pytree_spec_is_invalid(small_data, base_archive, tmp_path):
    """check_pytree_spec lets json's RecursionError through (it catches only TypeError and
    ValueError): run_score's catch-all still makes it `invalid` ("scorer error: ...")."""
    def deep(tree):
        sig = tree["graph_module"]["module_call_graph"][0]["signature"]
        sig["in_spec"] = "[" * 50_000 + "]" * 50_000
    model = program_edit(base_archive, tmp_path / "deep-spec.pt2", deep)
    result = score_cli(model, small_data)
    assert result["status"] == "invalid" and result["reason"], result


def test_member_declaring_a_huge_size_is_refused_before_reading(base_archive, tmp_path):
    entries = archive_members(base_archive)
    program = next(i for i, (n, _) in enumerate(entries) if n.endswith("models/model.json"))
    model = tmp_path / "huge.pt2"
    model.write_bytes(zip_bytes(entries, central_sizes={program: 0xFFFFFFF0}))
    with pytest.raises(P.Invalid):
        P.read_archive(model)


def test_empty_weight_payload_declaring_terabytes_is_invalid(small_data, base_archive, tmp_path):
    """A zero-byte weight is made with torch.zeros(sizes from the config): sizes claiming 4 TB
    fail to allocate (under an 8 GB address-space limit here) and the model is invalid."""
    def change(name: str, data: bytes | None):
        if name == "<extra>":
            return None
        if name.endswith("_constants_config.json") or name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            for meta in cfg["config"].values():
                meta["tensor_meta"]["sizes"] = [{"as_int": 2**20}, {"as_int": 2**20}]
                meta["tensor_meta"]["strides"] = [{"as_int": 2**20}, {"as_int": 1}]
            return json.dumps(cfg).encode()
        if name.startswith(("data/constants/tensor_", "data/weights/weight_")):
            return b""
        return data
    model = rewrite(base_archive, tmp_path / "zeros-bomb.pt2", change)
    result = score_limited(model, small_data)
    assert result["status"] == "invalid" and result["val_bpb"] is None, result


def test_node_metadata_with_newlines_never_runs(small_data, base_archive, tmp_path):
    """Contained: stack traces, module stacks, torch_fn and custom metadata holding a line of
    code between newlines stay data (none of them reaches generated source)."""
    marker = tmp_path / "pwned"
    line = f"\nopen({str(marker)!r}, 'w')\n"

    def meta(tree):
        for node in tree["graph_module"]["graph"]["nodes"]:
            node.setdefault("metadata", {}).update({
                "stack_trace": f"x{line}", "nn_module_stack": f"L__self__,{line},__main__.X",
                "torch_fn": f"a{line};b", "custom": json.dumps({"x": line})})
    result = score_cli(program_edit(base_archive, tmp_path / "meta-lines.pt2", meta), small_data)
    assert not marker.exists()
    assert result["status"] in ("ok", "invalid"), result


def test_source_fn_stack_metadata_is_only_looked_up(small_data, base_archive, tmp_path):
    """Node metadata `source_fn_stack` is resolved by getattr on torch (not checked by
    check_model_json): a name that would run something if it were called is only looked up,
    and the program scores as before."""
    def meta(tree):
        for node in tree["graph_module"]["graph"]["nodes"]:
            node.setdefault("metadata", {})["source_fn_stack"] = "x,torch.os.system"
    model = program_edit(base_archive, tmp_path / "meta.pt2", meta)
    assert P.score(model, small_data, "cpu")["val_bpb"] == \
        pytest.approx(P.score(base_archive, small_data, "cpu")["val_bpb"])
