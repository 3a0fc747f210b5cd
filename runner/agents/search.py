"""The `search` agent: no LLM, it perturbs one numeric constant of train.py per experiment.

What it edits
    The module-level assignments to UPPER_CASE names before the first ``def``/``class`` whose
    value is a number: ``X = 0.02``, ``X = 2**18``, ``X = 16 * 128`` (constant arithmetic),
    ``X = (0.8, 0.95)`` (each element is its own knob, named ``X[0]``, ``X[1]``). The value a
    run on the chosen device actually uses is the one edited (``device="gpu"``, the default, or
    ``"cpu"``: a run that trains on the CPU must pass it, or it would tune values that never
    run). train.py's layout: the knobs hold the GPU values, and a module-level
    ``if not GPU:`` block (the CPU configuration) assigns some of them again; on the CPU such a
    later assignment replaces the knob (its line is the one edited), on the GPU the block is
    ignored. ``if GPU:`` blocks (their body on the GPU, their ``else`` on the CPU) and the older
    one-line form ``X = 64 if GPU else 16`` (``not GPU`` understood) work the same way;
    conditions other than ``GPU`` / ``not GPU`` are skipped. Only the source text of that one
    value expression is rewritten; the rest of the file is untouched.
    Skipped: booleans, non-numeric values (``prepare.SEQ_LEN``, ``GPU``), zero and negative
    numbers (except that a zero dropout/decay may be switched on at 0.05 or 0.1), and names
    matching `DEFAULT_EXCLUDE` (printing, FLOP peaks, seeds, the time budget, the margin kept
    for the export: a thinner one is a bet against the runner's clock, not a finding; and
    ``SCALAR_LR``, whose group, gains and biases, is empty in the baseline: moving it would
    change nothing).

How a value moves (``up`` = larger, ``down`` = smaller; a small step first, a big one second)
    - ``2**k``: the exponent moves by 1 (big: 2); powers of two stay powers of two.
    - an int literal that is a power of two >= 16 (``HEAD_DIM = 128``): x2 / /2 (big: x4 / /4).
    - a small int (<= 5): +-1 (big: +-2), never below 1.
    - another int: x1.25 / x0.75 (big: x1.5 / x0.5), rounded to a multiple of its largest
      power-of-two factor (capped at a quarter of it), so ``WIDTH = 640`` moves by 128 and
      stays divisible by the head sizes it was divisible by. Ints stay ints.
    - a float in (0, 1) stays in (0, 1): at most 0.5 it is multiplied (x1.4 / x0.7, big x2 /
      x0.5; a result >= 1 is dropped); above 0.5 its distance to 1 is (``0.95 -> 0.965``,
      ``0.93``), so momenta and betas move sensibly.
    - another positive float: x1.4 / x0.7 (big: x2 / x0.5), written with 3 significant digits.

How the next move is chosen (seeded: the same seed and the same history give the same proposal)
    1. Every experiment in the history whose description reads ``search: NAME old -> new`` is a
       result for (NAME, direction). The agent also remembers, for as long as it lives, every
       result it has seen and every move it has proposed, so the history the loop passes may be
       short.
    2. Never repeated: a move (NAME, old, new) already tried or proposed, whatever came of it.
       Only when every new move is used up does it retry moves that were merely discarded on an
       older best file (a keep has changed the file since, so it is a different experiment);
       moves that crashed are never retried.
    3. Never entered: beyond a move that crashed, timed out or ran out of memory, in that
       direction (``DEVICE_BATCH 64 -> 128`` was ``oom``: no value >= 128 is tried again).
    4. Not proposed while anything else is left: a (NAME, direction) whose move the sequential
       keep rule found ``flat`` (its runs inside the noise: ``effect`` in the history), on any
       best file: the noise rule has shown it does not matter.
    5. A score per (NAME, direction): keep +1, discard that was better but inside the noise
       +0.25, other discard -0.5, crash/timeout/oom -1; a discard that made things worse gives
       the opposite direction +0.25. Directions are drawn with weight exp(score) (clipped to
       [-2, 2]): untried ones weigh 1, so everything is explored, helpful ones are preferred.
    6. Momentum: when the latest search result was a keep and the file still holds its value,
       the same constant is pushed further in the same direction with probability `push_prob`.
    7. The small step is taken, the big one with probability `big_step_prob` (or when the small
       one is excluded by rules 2-4). When nothing is left, the proposal is ``train_py=None``
       with an `error` (the loop records it as invalid).
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Iterable, cast

from runner.agents import History, Proposal
from runner.record import BROKE

DEFAULT_EXCLUDE = r"PRINT|PEAK|SEED|TIME_BUDGET|EXPORT_|VERBOSE|LOG_EVERY|^SCALAR_LR$"
# A move that broke training bounds its direction; an `invalid` one (a rejected proposal, a
# model the scorer refused) says nothing about the value.
FAILED = BROKE
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_DESC = re.compile(r"^\s*search:\s+(?P<name>[A-Z][A-Z0-9_]*(?:\[\d+\])?)\s+(?P<old>\S+)\s+->\s+"
                   r"(?P<new>[^\s,;]+)")
_SWITCH_ON = re.compile(r"DROPOUT|DECAY")


@dataclass
class Knob:
    name: str           # "MATRIX_LR", or "ADAM_BETAS[1]" for a tuple element
    value: float | int
    kind: str           # "exp2", "pow2", "int", "frac", "float", "zero"
    start: int          # byte offsets of the value expression in the source
    end: int
    text: str           # its source text


@dataclass
class Result:
    name: str
    old: float
    new: float
    direction: int      # +1 up, -1 down
    status: str
    delta: float | None
    number: int | None
    flat: bool = False  # the sequential keep rule found its runs inside the noise


# ---- reading the constants ----


def _number(node: ast.AST) -> float | int | None:
    """The value of a constant numeric expression (literals, + - * / ** and unary minus)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value  # type: ignore[return-value]  # int or float, checked just above
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp):
        a, b = _number(node.left), _number(node.right)
        if a is None or b is None:
            return None
        try:
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.Div):
                return a / b
            if isinstance(node.op, ast.Pow) and abs(b) <= 64 and abs(a) <= 1e6:
                return a ** b
        except (ArithmeticError, ValueError):
            return None
    return None


def parse_value(text: str) -> float | int | None:
    """A number from its source text ("0.02", "2**18", "-3"), or None."""
    try:
        return _number(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _kind(name: str, node: ast.AST, value: float | int) -> str | None:
    if isinstance(value, bool):
        return None
    if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
            and isinstance(node.left, ast.Constant) and node.left.value == 2
            and isinstance(node.right, ast.Constant) and type(node.right.value) is int
            and node.right.value >= 0):
        return "exp2"
    if isinstance(value, int):
        if value <= 0:
            return None
        return "pow2" if value >= 16 and _is_pow2(value) else "int"
    if value == 0:
        return "zero" if _SWITCH_ON.search(name) else None
    if value < 0 or not math.isfinite(value):
        return None
    return "frac" if value < 1 else "float"


def _gpu_test(test: ast.expr) -> bool | None:
    """True for ``GPU``, False for ``not GPU``, None for any other condition."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _gpu_test(test.operand)
        return None if inner is None else not inner
    return True if isinstance(test, ast.Name) and test.id == "GPU" else None


def _device_branch(node: ast.AST, device: str) -> ast.AST | None:
    if not isinstance(node, ast.IfExp):
        return node
    is_gpu = _gpu_test(node.test)
    if is_gpu is None:
        return None                                   # some other condition: leave it alone
    gpu_branch, cpu_branch = (node.body, node.orelse) if is_gpu else (node.orelse, node.body)
    return gpu_branch if device == "gpu" else cpu_branch


def _assignments(body: list[ast.stmt], device: str) -> Iterable[tuple[str, ast.expr]]:
    """(name, value) of the module-level assignments that run on `device`, in file order:
    the statements before the first def/class, and inside them the branch of an ``if GPU:`` /
    ``if not GPU:`` block that runs there."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return
        if isinstance(stmt, ast.If):
            is_gpu = _gpu_test(stmt.test)
            if is_gpu is not None:
                yield from _assignments(stmt.body if is_gpu == (device == "gpu") else stmt.orelse,
                                        device)
            continue
        targets: list[ast.expr]
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        elif isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        else:
            continue
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and _NAME.match(targets[0].id):
            yield targets[0].id, value


def find_knobs(source: str, device: str = "gpu", exclude: str | None = DEFAULT_EXCLUDE) -> list[Knob]:
    """The perturbable constants of `source` as they run on `device`, in the order they were
    first assigned (a later assignment, such as the CPU configuration's, replaces a knob)."""
    tree = ast.parse(source)
    data = source.encode("utf-8")
    line_starts = [0]
    for line in data.split(b"\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)

    def span(value: ast.AST) -> tuple[int, int]:
        node = cast(ast.expr, value)                    # the value of an assignment: located
        end_line, end_col = node.end_lineno or node.lineno, node.end_col_offset or node.col_offset
        return (line_starts[node.lineno - 1] + node.col_offset, line_starts[end_line - 1] + end_col)

    skip = re.compile(exclude) if exclude else None
    by_name: dict[str, list[Knob]] = {}                 # insertion order: first assignment
    for name, value in _assignments(tree.body, device):
        by_name[name] = []                              # a reassignment replaces what was there
        if skip is not None and skip.search(name):
            continue
        expr = _device_branch(value, device)
        if expr is None:
            continue
        parts = ([(f"{name}[{i}]", e) for i, e in enumerate(expr.elts)]
                 if isinstance(expr, ast.Tuple) else [(name, expr)])
        for knob_name, e in parts:
            v = _number(e)
            if v is None:
                continue
            kind = _kind(knob_name, e, v)
            if kind is None:
                continue
            start, end = span(e)
            by_name[name].append(Knob(knob_name, v, kind, start, end, data[start:end].decode("utf-8")))
    return [k for knobs in by_name.values() for k in knobs]


# ---- moving a value ----


def _fmt_float(v: float) -> str:
    return repr(float(f"{v:.3g}"))


def _granule(v: int) -> int:
    g = v & -v                                         # largest power of two dividing v
    while g > 1 and g * 4 > v:
        g //= 2
    return g


def steps(knob: Knob, direction: int) -> list[tuple[float | int, str]]:
    """Candidate (new value, new source text) for a direction, the small step first."""
    v = knob.value
    out: list[tuple[float | int, str]] = []
    if knob.kind == "exp2":
        k = int(knob.text.replace(" ", "").split("**")[1])
        for dk in (1, 2):
            nk = k + direction * dk
            if nk >= 0:
                out.append((2 ** nk, re.sub(r"\d+\s*$", str(nk), knob.text)))
    elif knob.kind == "pow2":
        for f in (2, 4):
            n = v * f if direction > 0 else v // f
            if n >= 1:
                out.append((n, str(n)))
    elif knob.kind == "int":
        if v <= 5:
            cands = [v + direction * d for d in (1, 2)]
        else:
            g = _granule(int(v))
            factors = (1.25, 1.5) if direction > 0 else (0.75, 0.5)
            cands = [max(g, int(round(v * f / g)) * g) for f in factors]
        for n in cands:
            if n >= 1 and (n - v) * direction > 0 and n not in [c for c, _ in out]:
                out.append((n, str(n)))
    elif knob.kind == "frac":
        if v <= 0.5:
            factors = (1.4, 2.0) if direction > 0 else (0.7, 0.5)
            raw = [v * f for f in factors]
        else:
            factors = (0.7, 0.5) if direction > 0 else (1.4, 2.0)
            raw = [1 - (1 - v) * f for f in factors]
        for x in raw:
            text = _fmt_float(x)
            rounded = float(text)
            if 0 < rounded < 1 and (rounded - v) * direction > 0:
                out.append((rounded, text))
    elif knob.kind == "float":
        for factor in ((1.4, 2.0) if direction > 0 else (0.7, 0.5)):
            text = _fmt_float(v * factor)
            if (float(text) - v) * direction > 0:
                out.append((float(text), text))
    elif knob.kind == "zero" and direction > 0:
        out = [(0.05, "0.05"), (0.1, "0.1")]
    seen, unique = set(), []
    for n, text in out:
        if n not in seen:
            seen.add(n)
            unique.append((n, text))
    return unique


def _key(x: float) -> float:
    return float(f"{x:.6g}")


def parse_description(description: str) -> tuple[str, float, float] | None:
    """(name, old, new) from "search: NAME old -> new", or None."""
    m = _DESC.match(description or "")
    if not m:
        return None
    old, new = parse_value(m.group("old")), parse_value(m.group("new"))
    if old is None or new is None or old == new:
        return None
    return m.group("name"), float(old), float(new)


# ---- the agent ----


class SearchAgent:
    """``propose(program_md, current_train_py, history) -> Proposal``; see the module docstring."""

    model = "search"

    def __init__(self, seed: int = 0, device: str = "gpu", exclude: str | None = DEFAULT_EXCLUDE,
                 push_prob: float = 0.6, big_step_prob: float = 0.25):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', not {device!r}")
        self.seed, self.device, self.exclude = seed, device, exclude
        self.push_prob, self.big_step_prob = push_prob, big_step_prob
        self.results: dict[object, Result] = {}        # every search result seen, by experiment
        self.last_keep = -1                            # number of the latest keep (any agent's)
        # every move proposed by this agent: (name, old, new, last_keep when it was proposed)
        self.issued: list[tuple[str, float, float, int]] = []

    # -- memory --

    def learn(self, records: Iterable[dict]) -> None:
        for r in records:
            number = r.get("number")
            status = str(r.get("status") or "")
            if status == "keep" and isinstance(number, int):
                self.last_keep = max(self.last_keep, number)
            parsed = parse_description(str(r.get("description") or ""))
            if parsed is None or not status:
                continue
            name, old, new = parsed
            key = number if number is not None else (r.get("description"), status)
            delta = r.get("delta")
            self.results[key] = Result(name, old, new, 1 if new > old else -1, status,
                                       float(delta) if isinstance(delta, (int, float)) else None,
                                       number if isinstance(number, int) else None,
                                       flat=r.get("effect") == "flat" and status == "discard")

    def _tiers(self) -> tuple[set, set]:
        """(moves ever tried or proposed, moves that may be retried because they were only
        discarded on an older best file: the base has changed since, so it is a new experiment)."""
        by_move: dict[tuple[str, float, float], list[Result]] = {}
        for r in self.results.values():
            by_move.setdefault((r.name, _key(r.old), _key(r.new)), []).append(r)
        tried = set(by_move)
        retry = {m for m, rs in by_move.items()
                 if all(r.status in ("discard", "invalid") and r.number is not None
                        and r.number < self.last_keep for r in rs)}
        for name, old, new, epoch in self.issued:
            m = (name, _key(old), _key(new))
            tried.add(m)
            if epoch >= self.last_keep:
                retry.discard(m)                       # proposed on this very base already
            elif m not in by_move:
                retry.add(m)                           # its result never came back to us
        return tried, retry

    def _bounds(self) -> dict[str, tuple[float, float]]:
        """Per name, (lo, hi): values <= lo or >= hi failed (crash/timeout/oom) on the way."""
        bounds: dict[str, tuple[float, float]] = {}
        for r in self.results.values():
            if r.status in FAILED:
                lo, hi = bounds.get(r.name, (-math.inf, math.inf))
                bounds[r.name] = (max(lo, r.new), hi) if r.direction < 0 else (lo, min(hi, r.new))
        return bounds

    def _scores(self) -> dict[tuple[str, int], float]:
        scores: dict[tuple[str, int], float] = {}
        for r in self.results.values():
            k = (r.name, r.direction)
            if r.status == "keep":
                scores[k] = scores.get(k, 0.0) + 1.0
            elif r.status == "discard":
                if r.delta is not None and r.delta < 0:
                    scores[k] = scores.get(k, 0.0) + 0.25
                else:
                    scores[k] = scores.get(k, 0.0) - 0.5
                    if r.delta is not None and r.delta > 0:
                        o = (r.name, -r.direction)
                        scores[o] = scores.get(o, 0.0) + 0.25
            elif r.status in FAILED:
                scores[k] = scores.get(k, 0.0) - 1.0
        return scores

    # -- proposing --

    def flat(self) -> set[tuple[str, int]]:
        """(name, direction) pairs the sequential keep rule found flat."""
        return {(r.name, r.direction) for r in self.results.values() if r.flat}

    def _moves(self, knobs: list[Knob], rng: random.Random, allowed_moves: set | None,
               skip: set[tuple[str, int]] = frozenset()  # type: ignore[assignment]
               ) -> dict[tuple[str, int], tuple[Knob, float | int, str]]:
        """One move per (name, direction), none in `skip`. allowed_moves None: moves never
        tried; else only those in the set."""
        tried, _ = self._tiers()
        bounds = self._bounds()
        moves = {}
        for knob in knobs:
            lo, hi = bounds.get(knob.name, (-math.inf, math.inf))
            for direction in (1, -1):
                if (knob.name, direction) in skip:
                    continue
                ok = []
                for n, t in steps(knob, direction):
                    m = (knob.name, _key(knob.value), _key(n))
                    if not lo < n < hi:
                        continue
                    if (m not in tried) if allowed_moves is None else (m in allowed_moves):
                        ok.append((n, t))
                if not ok:
                    continue
                big = len(ok) > 1 and rng.random() < self.big_step_prob
                n, text = ok[1] if big else ok[0]
                moves[(knob.name, direction)] = (knob, n, text)
        return moves

    def __call__(self, program_md: str, current_train_py: str, history: History | None) -> Proposal:
        t0 = time.time()
        history = history or History()
        self.learn(list(history.best) + list(history.recent))
        try:
            knobs = find_knobs(current_train_py, self.device, self.exclude)
        except SyntaxError as exc:
            return Proposal(None, "search: no proposal", error=f"search: train.py does not parse "
                            f"(line {exc.lineno}): {exc.msg}", model=self.model, seconds=time.time() - t0)
        fingerprint = hashlib.sha256(current_train_py.encode()).hexdigest()[:16]
        memory = sorted((str(k), r.name, r.old, r.new, r.status) for k, r in self.results.items())
        rng = random.Random(f"{self.seed}|{fingerprint}|{memory}|{self.last_keep}|{len(self.issued)}")
        flat = self.flat()
        moves = (self._moves(knobs, rng, None, skip=flat)
                 or self._moves(knobs, rng, self._tiers()[1], skip=flat))
        if not moves:                      # only moves shown flat are left: they after all
            moves = self._moves(knobs, rng, None) or self._moves(knobs, rng, self._tiers()[1])
        if not moves:
            return Proposal(None, "search: no proposal", model=self.model, seconds=time.time() - t0,
                            error="search: every perturbation of the constants has been tried on "
                                  "this best train.py or is ruled out by earlier failures")
        choice = None
        latest = max((r for r in self.results.values() if r.number is not None),
                     key=lambda r: r.number or 0, default=None)
        if latest is not None and latest.status == "keep" and rng.random() < self.push_prob:
            knob = next((k for k in knobs if k.name == latest.name), None)
            if knob is not None and _key(knob.value) == _key(latest.new):
                choice = moves.get((latest.name, latest.direction))
        if choice is None:
            scores = self._scores()
            keys = sorted(moves, key=lambda k: (k[0], k[1]))
            weights = [math.exp(max(-2.0, min(2.0, scores.get(k, 0.0)))) for k in keys]
            choice = moves[rng.choices(keys, weights)[0]]
        knob, new_value, new_text = choice
        data = current_train_py.encode("utf-8")
        new_source = (data[:knob.start] + new_text.encode() + data[knob.end:]).decode("utf-8")
        self.issued.append((knob.name, float(knob.value), float(new_value), self.last_keep))
        old_text, new_text = "".join(knob.text.split()), "".join(new_text.split())
        return Proposal(new_source, f"search: {knob.name} {old_text} -> {new_text}",
                        model=self.model, seconds=time.time() - t0)
