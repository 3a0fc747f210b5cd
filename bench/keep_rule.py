"""The keep rule on simulated runs: false-keep rate and power of the sequential rule
(runner/decide.py) beside the single-run threshold rule, with no training.

A scripted trial returns `true score + Gaussian noise` (sd 1: effects are in units of the
seed-to-seed sd). Every decision draws a fresh baseline (`--noise-runs` seeds, the best's runs
and the noise measurement) and a candidate whose true improvement is `effect` sd; the
sequential rule reruns the candidate with new draws until it decides. `--prior-df` adds that many
degrees of freedom of other same-commit groups to the pooled sd (later in a night, when earlier
candidates' reruns have been pooled). The threshold rule is today's: one run against the
baseline's first run minus `k x stdev(baseline seeds)` (`--confirm`: an apparent win is rerun
once and judged on the mean of both).

    python bench/keep_rule.py                  # the table in bench/RESULTS.md
    python bench/keep_rule.py --decisions 2000 --effects 0 1
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import decide  # noqa: E402


def sequential(effect: float, rng: random.Random, noise_runs: int, prior_df: int,
               alpha: float, max_runs: int, futility: float) -> tuple[bool, int]:
    """One decision of the sequential rule: (kept, trials run for it, the baseline's excluded)."""
    best = [rng.gauss(0.0, 1.0) for _ in range(noise_runs)]
    prior = [rng.gauss(0.0, 1.0) for _ in range(prior_df + 1)] if prior_df else []
    runs: list[float] = []
    while True:
        runs.append(rng.gauss(-effect, 1.0))
        v = decide.sequential(best, runs, [best, runs, prior], alpha=alpha, max_runs=max_runs,
                              futility=futility)
        if v.action != decide.RERUN:
            return v.action == decide.KEEP, len(runs)


def threshold(effect: float, rng: random.Random, noise_runs: int, k: float, confirm: bool
              ) -> tuple[bool, int]:
    """One decision of the threshold rule as the loop made it before (best = the baseline's first
    run, spread = stdev of its seeds)."""
    best = [rng.gauss(0.0, 1.0) for _ in range(noise_runs)]
    limit = k * (decide.statistics.stdev(best) if noise_runs >= 2 else 0.0)
    first = rng.gauss(-effect, 1.0)
    if not first < best[0] - limit:
        return False, 1
    if not confirm:
        return True, 1
    mean = (first + rng.gauss(-effect, 1.0)) / 2
    return mean < best[0] - limit, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=10000, help="per cell")
    ap.add_argument("--effects", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    ap.add_argument("--noise-runs", type=int, default=3)
    ap.add_argument("--prior-df", type=int, nargs="+", default=[0, 20])
    ap.add_argument("--futility", type=float, nargs="+", default=[0.0, decide.FUTILITY, 1.0])
    ap.add_argument("--alpha", type=float, default=decide.ALPHA)
    ap.add_argument("--max-runs", type=int, default=decide.MAX_RUNS)
    ap.add_argument("--seed", type=int, default=12)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    started = time.perf_counter()
    rules: list[tuple[str, object]] = [
        ("threshold k=2 (one run)", lambda e: threshold(e, rng, a.noise_runs, 2.0, False)),
        ("threshold k=2 + confirm", lambda e: threshold(e, rng, a.noise_runs, 2.0, True)),
        ("threshold k=1 (one run)", lambda e: threshold(e, rng, a.noise_runs, 1.0, False)),
    ]
    for fut in a.futility:
        for df in a.prior_df:
            rules.append((f"sequential, alpha {a.alpha:g}, <= {a.max_runs} runs, futility {fut:g}, "
                          f"prior df {df}",
                          (lambda e, df=df, fut=fut: sequential(e, rng, a.noise_runs, df, a.alpha,
                                                                a.max_runs, fut))))
    print(f"{a.decisions} decisions per cell; noise sd 1; best = {a.noise_runs} baseline seeds; "
          f"seed {a.seed}")
    head = " | ".join(f"{e:+g} sd" for e in a.effects)
    print(f"| rule | {head} | runs per decision (at 0 / +1 sd) |")
    print("| --- | " + " | ".join("---" for _ in a.effects) + " | --- |")
    for name, rule in rules:
        cells, cost = [], {}
        for effect in a.effects:
            kept = runs = 0
            for _ in range(a.decisions):
                k, n = rule(effect)  # type: ignore[operator]
                kept += k
                runs += n
            rate = kept / a.decisions
            se = math.sqrt(max(rate * (1 - rate), 1e-12) / a.decisions)
            cells.append(f"{rate:.3f} ± {se:.3f}")
            cost[effect] = runs / a.decisions
        spent = " / ".join(f"{cost[e]:.2f}" for e in (0.0, 1.0) if e in cost)
        print(f"| {name} | " + " | ".join(cells) + f" | {spent} |")
    print(f"cells: share of decisions kept ± its standard error; effect = true improvement in sd "
          f"(0 and below: every keep is a false keep). {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
