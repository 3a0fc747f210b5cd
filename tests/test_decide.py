"""The keep rule (runner/decide.py) on its own: Student's t without scipy, the pooled spread,
the noise measurement from records, and the rule's false-keep rate and power on simulated runs
(a scripted trial: a known true effect plus Gaussian noise, thousands of decisions, no
training)."""

from __future__ import annotations

import math
import random

import pytest

from runner import decide


@pytest.mark.parametrize("p, df, expected", [(0.975, 10, 2.2281), (0.9875, 2, 6.2053),
                                             (0.95, math.inf, 1.6449), (0.95, 1, 6.3138),
                                             (0.99, 30, 2.4573)])
def test_t_quantile_matches_tables(p, df, expected):
    assert decide.t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    assert decide.t_sf(expected, df) == pytest.approx(1 - p, abs=1e-4)


def test_pooled_sd_ignores_single_runs():
    sd, df = decide.pooled_sd([[1.0, 3.0], [5.0], [10.0, 10.0, 13.0]])
    # sums of squares 2 and 6 over df 1 + 2
    assert (sd, df) == (pytest.approx(math.sqrt(8 / 3)), 3)
    assert decide.pooled_sd([[1.0], []]) == (0.0, 0)


def test_noise_of_splits_same_seed_from_other_seeds():
    recs = [{"role": "baseline", "commit": "a", "seed": 0, "val_bpb": 1.00},
            {"role": "noise", "commit": "a", "seed": 1001, "val_bpb": 1.02},
            {"role": "noise", "commit": "a", "seed": 0, "val_bpb": 1.001, "same_seed": True},
            {"role": "noise", "commit": "a", "seed": 1002, "val_bpb": None},   # failed
            {"role": "candidate", "commit": "b", "seed": 0, "val_bpb": 0.5}]
    noise = decide.noise_of(recs)
    assert noise is not None
    assert noise.seeds == [1.00, 1.02] and noise.same_seed == [[1.00, 1.001]]
    assert noise.seed_sd == pytest.approx(0.02 / math.sqrt(2))
    assert noise.same_seed_sd == pytest.approx(0.001 / math.sqrt(2))
    # a remeasurement of a later best replaces it
    recs.append({"role": "noise", "commit": "b", "seed": 7, "val_bpb": 0.51})
    assert decide.noise_of(recs).seeds == [0.51]


def test_rerun_share_counts_the_reruns_of_each_record():
    recs = [{"wall_seconds": 10.0},
            {"wall_seconds": 10.0, "runs": [{"wall_seconds": 10.0}, {"wall_seconds": 12.0},
                                            {"wall_seconds": 8.0}]}]
    assert decide.rerun_share(recs) == (20.0, 40.0)


def test_one_look_keeps_discards_or_reruns():
    best, noise = [1.0, 1.01, 0.99], [[1.0, 1.01, 0.99]]
    clear = decide.sequential(best, [0.9], noise)
    assert clear.action == "keep" and clear.test["p_value"] < 0.05 / 4
    worse = decide.sequential(best, [1.02], noise)
    assert worse.action == "discard" and "no better" in worse.text
    close = decide.sequential(best, [0.985], noise)
    assert close.action == "rerun" and close.test["statistic"] < close.test["critical"]
    last = decide.sequential(best, [0.985] * 4, noise + [[0.985] * 4])
    assert last.action == "discard" and "not shown better in 4 runs" in last.text
    slightly = decide.sequential(best, [0.996], noise)       # t 0.35: below the futility bound
    assert slightly.action == "discard" and "futility" in slightly.text
    assert decide.sequential(best, [0.996], noise, futility=0.0).action == "rerun"
    capped = decide.sequential(best, [0.985], noise, may_rerun=False)
    assert capped.action == "discard" and "budget" in capped.text
    for key in ("runs", "mean", "best_runs", "best_mean", "sd", "df", "statistic", "critical",
                "p_value", "alpha"):
        assert key in clear.test


def simulate(effect: float, n: int, seed: int, noise_runs: int = 3) -> tuple[float, float]:
    """(share kept, mean runs per decision) of n sequential decisions on a scripted trial whose
    true improvement is `effect` noise sds."""
    rng = random.Random(seed)
    kept = runs_total = 0
    for _ in range(n):
        best = [rng.gauss(0, 1) for _ in range(noise_runs)]
        runs: list[float] = []
        while True:
            runs.append(rng.gauss(-effect, 1))
            v = decide.sequential(best, runs, [best, runs])
            if v.action != "rerun":
                break
        kept += v.action == "keep"
        runs_total += len(runs)
    return kept / n, runs_total / n


def test_false_keep_rate_is_at_most_alpha_on_simulated_runs():
    n = 4000
    rate, runs = simulate(0.0, n, seed=1)
    se = math.sqrt(0.05 * 0.95 / n)
    assert rate <= decide.ALPHA + 2 * se, rate
    assert 1.0 < runs <= decide.MAX_RUNS                  # it did rerun, within the cap
    # the single-run threshold rule (k = 2 x the baseline's spread) keeps far more of them
    rng = random.Random(2)
    false = 0
    for _ in range(n):
        best = [rng.gauss(0, 1) for _ in range(3)]
        false += rng.gauss(0, 1) < best[0] - 2 * decide.statistics.stdev(best)
    assert false / n > 2 * decide.ALPHA


def test_power_grows_with_the_effect():
    rates = [simulate(effect, 1500, seed=3)[0] for effect in (0.5, 1.0, 3.0)]
    assert rates[0] < rates[1] < rates[2] and rates[2] > 0.7
