"""The keep rule: plain functions on numbers, no I/O, so the rule can be proven on simulated runs
(`bench/keep_rule.py`, `tests/test_decide.py`) exactly as the loop uses it.

**The sequential rule** (the default). The best's score is the mean of its runs (seeds); a
candidate's is the mean of its own. After each of the candidate's runs (a *look*, at most
`max_runs`), a one-sided pooled two-sample t-test asks whether the best's mean exceeds the
candidate's by more than `margin` (H0: improvement <= margin):

    t = (mean_best - mean_candidate - margin) / (sd * sqrt(1/n_best + 1/n_candidate))

`sd` is pooled from every group of runs of one commit over different seeds (the noise
measurement, the best's runs, the candidate's, earlier candidates' reruns), with `df` the sum
of (runs - 1) over the groups. The candidate is **kept** as soon as `t >= t_{1 - alpha /
max_runs, df}`; **discarded** as soon as its mean is no better than the best's (`t <= futility`,
at the margin: it cannot be shown better without running until chance carries it) or its t is
at most `futility` (default 0.5: a change that looks only a little better is not worth the
reruns), or at the last look; otherwise it is **rerun** with another seed. A discard says what the runs showed:
`worse` (the same test, the other way, passes), `flat` (rerun, and still inside the noise) or
`not better` (one run, inside the noise, no better than the best).

Why the false-keep rate is at most `alpha`: with Gaussian noise of one variance, each look is an
exact t-test at level `alpha / max_runs` (the pooled variance is independent of the means), and
the rule keeps only when some look passes, so by the union bound (Bonferroni over the looks) the
chance of keeping a candidate whose true improvement is at most `margin` is at most `alpha`.
Stopping early for futility or for the rerun cap only removes chances to keep. This is a rate
*per decision*: over a night of N candidates with no real effect, about `alpha x N` are kept.
The rule is conservative while df is small (few noise runs): it then reruns more and keeps less.

**The threshold rule** (before this rule; `--keep-rule threshold`): keep when one run scores
below `best - max(min_delta, k x spread)`. It states no error rate; `bench/keep_rule.py` measures
it beside the sequential rule.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

KEEP, DISCARD, RERUN = "keep", "discard", "rerun"
ALPHA = 0.05                      # the stated false-keep rate, per decision
MAX_RUNS = 4                      # looks per candidate: its first run and up to 3 reruns
RERUN_SHARE = 0.25                # at most this share of the run's trial time goes to reruns
FUTILITY = 0.5                    # discard once t is at most this: fewer reruns of null changes


# ---- Student's t, without scipy ----

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom (df = inf: the normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on `t_sf`; |error| < 1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must lie in (0, 1)")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2.0


# ---- noise ----

def pooled_sd(groups: Iterable[Sequence[float]]) -> tuple[float, int]:
    """(pooled standard deviation, degrees of freedom) over groups of runs of one commit with
    different seeds; groups of one run add nothing. (0.0, 0) when no group has two runs."""
    ss, df = 0.0, 0
    for g in groups:
        values = [float(v) for v in g]
        if len(values) >= 2:
            m = sum(values) / len(values)
            ss += sum((v - m) ** 2 for v in values)
            df += len(values) - 1
    return (math.sqrt(ss / df), df) if df else (0.0, 0)


@dataclass
class Noise:
    """The spread of the unchanged best: over seeds (what decisions use) and over reruns with
    one seed (the machine's own nondeterminism: GPU kernels, thread scheduling)."""

    commit: str | None
    seeds: list[float] = field(default_factory=list)       # val_bpb, one per seed
    same_seed: list[list[float]] = field(default_factory=list)   # val_bpb, per repeated seed

    @property
    def seed_sd(self) -> float | None:
        return statistics.stdev(self.seeds) if len(self.seeds) >= 2 else None

    @property
    def same_seed_sd(self) -> float | None:
        """Pooled over the seeds that were run more than once."""
        sd, df = pooled_sd(self.same_seed)
        return sd if df else None

    @property
    def n_same_seed(self) -> int:
        return sum(len(g) for g in self.same_seed)

    def same_seed_text(self) -> str:
        """`over N runs of one seed` (or of K seeds)."""
        k = len(self.same_seed)
        return f"over {self.n_same_seed} runs of " + ("one seed" if k == 1 else f"{k} seeds")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seed_sd": self.seed_sd, "same_seed_sd": self.same_seed_sd,
                "n_seeds": len(self.seeds), "n_same_seed": self.n_same_seed}


def noise_of(records: Sequence[Mapping[str, Any]]) -> Noise | None:
    """The latest noise measurement in a run's records: the scored baseline and noise runs of
    the commit measured last (every measurement of it: a remeasurement adds seeds). Runs marked
    `same_seed` repeat a seed of that commit; the others are one seed each. None when nothing
    was measured."""
    runs = [r for r in records if r.get("role") in ("baseline", "noise")]
    if not runs:
        return None
    commit = runs[-1].get("commit")
    mine = [r for r in runs if r.get("commit") == commit
            and isinstance(r.get("val_bpb"), (int, float))]
    seeds = [r for r in mine if not r.get("same_seed")]
    again = [r for r in mine if r.get("same_seed")]
    noise = Noise(commit, seeds=[float(r["val_bpb"]) for r in seeds])
    for seed in dict.fromkeys(r.get("seed") for r in again):          # in order, once each
        noise.same_seed.append([float(r["val_bpb"]) for r in seeds + again
                                if r.get("seed") == seed])
    return noise


def rerun_share(records: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """(seconds of trial time spent on reruns, seconds of all trials) in a run's records."""
    reruns = total = 0.0
    for r in records:
        wall = r.get("wall_seconds")
        total += float(wall) if isinstance(wall, (int, float)) else 0.0
        for run in (r.get("runs") or [])[1:]:
            w = run.get("wall_seconds") if isinstance(run, dict) else None
            if isinstance(w, (int, float)):
                reruns += float(w)
                total += float(w)
    return reruns, total


# ---- the rules ----

@dataclass
class Verdict:
    action: str                   # keep | discard | rerun
    text: str                     # the decision in one line, for the record and the log
    test: dict[str, Any]          # the figures: runs, means, sd, df, statistic, critical, ...


def sequential(best: Sequence[float], candidate: Sequence[float], groups: Iterable[Sequence[float]],
               alpha: float = ALPHA, max_runs: int = MAX_RUNS, margin: float = 0.0,
               may_rerun: bool = True, futility: float = FUTILITY) -> Verdict:
    """One look of the sequential rule (the module's docstring): `best` and `candidate` are
    val_bpb of their runs; `groups` every group of same-commit runs over seeds that the sd is
    pooled from (including `best` and `candidate` where they have two runs or more).
    `futility`: discard once t is at most this (0: once the mean is no better than the best's,
    at the margin); a higher bound reruns less and keeps less. It only ever discards, so the
    false-keep bound holds for any value."""
    sd, df = pooled_sd(groups)
    n_b, n_c = len(best), len(candidate)
    m_b, m_c = sum(best) / n_b, sum(candidate) / n_c
    per_look = alpha / max_runs
    test: dict[str, Any] = {
        "rule": "sequential", "test": "one-sided pooled t-test, Bonferroni over looks",
        "alpha": alpha, "alpha_per_look": per_look, "max_runs": max_runs, "margin": margin,
        "best_runs": [round(v, 6) for v in best], "best_mean": round(m_b, 6),
        "runs": [round(v, 6) for v in candidate], "mean": round(m_c, 6),
        "difference": round(m_b - m_c, 6), "sd": round(sd, 6), "df": df}
    better = m_b - m_c > margin
    if df == 0 or sd == 0.0:
        # No spread measured yet: nothing can be shown; rerun what looks better, else discard.
        test.update(statistic=None, critical=None, p_value=None)
        if better and may_rerun and n_c < max_runs:
            return Verdict(RERUN, f"mean {m_c:.6f} vs best {m_b:.6f}: no spread measured yet; "
                           "rerun", test)
        return Verdict(DISCARD, f"mean {m_c:.6f} vs best {m_b:.6f}: not shown better (no spread "
                       "measured)", test)
    se = sd * math.sqrt(1.0 / n_b + 1.0 / n_c)
    t = (m_b - m_c - margin) / se
    critical = t_quantile(1.0 - per_look, df)
    p = t_sf(t, df)
    # What the runs show about the change: better (kept), worse (its mean is worse by the
    # same test the other way), or neither: flat when it was rerun (it looked better, more runs
    # did not show it: a move not worth proposing again), "not better" after one run.
    t_worse = (m_c - m_b) / se
    effect = ("better" if t >= critical else "worse" if t_worse >= critical
              else "flat" if n_c >= 2 else "not better")
    test.update(statistic=round(t, 4), critical=round(critical, 4), p_value=round(p, 6),
                effect=effect)
    figures = (f"runs {n_c}, mean {m_c:.6f} vs best {m_b:.6f} ({n_b} runs), sd {sd:.6f} (df {df}), "
               f"t {t:.2f} vs {critical:.2f} (alpha {alpha:g}/{max_runs} looks)")
    if t >= critical:
        return Verdict(KEEP, f"keep: {figures}", test)
    if not better or t <= futility:
        what = "no better than the best" if not better else f"t at most the futility bound {futility:g}"
        return Verdict(DISCARD, f"discard, {what}: {figures}", test)
    if n_c >= max_runs:
        return Verdict(DISCARD, f"discard, not shown better in {max_runs} runs: {figures}", test)
    if not may_rerun:
        return Verdict(DISCARD, f"discard, rerun budget spent: {figures}", test)
    return Verdict(RERUN, f"rerun: {figures}", test)


def threshold(val_bpb: float, best: float, limit: float, rule: str) -> Verdict:
    """The single-run rule: keep when `val_bpb < best - limit` (`rule` says how `limit` came)."""
    text = f"keep if val_bpb < best {best:.6f} - {rule} = {best - limit:.6f}"
    test = {"rule": "threshold", "best_mean": best, "runs": [val_bpb], "limit": limit}
    return Verdict(KEEP if val_bpb < best - limit else DISCARD, text, test)
