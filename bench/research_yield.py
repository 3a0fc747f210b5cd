"""Research yield on GPUs (issue 12): the overnight loop with the search agent, the process
backend, N GPUs and the default (sequential) keep rule, for a fixed time on each prepared data
set given; then the figures the issue asks for, per data set.

    python bench/research_yield.py --data pysource=DIR --data shakespeare=DIR \\
        --gpus 0,1 --budget 100 --minutes 12

Each data set gets its own loop (a temporary git repository holding the project's
target/train.py and program.md, so the checkout is never touched), one after the other, each
starting no trial later than `--minutes` after it began (trials running then finish). Printed,
per data set, as Markdown for bench/RESULTS.md:

- the noise: sd of val_bpb over the baseline's seeds and over reruns of its seed;
- every keep with its statistics (runs, mean, the difference to the best before, t, critical
  value, p, alpha);
- the best gain (the baseline's mean minus the best's mean, and in baseline sds);
- experiments, GPU-hours (the slots x the loop's wall time), experiments and improvement per
  GPU-hour, and the share of trial time that went to reruns.

`--json OUT` writes every record. Nothing here has run on a GPU yet: it is written for the
lead's GPU lease.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))          # projects.py

from projects import make_project  # noqa: E402

from runner import decide  # noqa: E402
from runner.loop import LoopConfig, overnight  # noqa: E402
from runner.sandbox import default_limits  # noqa: E402
from runner.trial import LocalTrials  # noqa: E402


def run_one(name: str, data: Path, gpus: list[str | None], args: argparse.Namespace, tmp: Path
            ) -> dict[str, Any]:
    project = make_project(tmp / name, user="bench")
    start = time.time()
    cfg = LoopConfig(tag=f"yield-{name}", agent="search", budget=args.budget,
                     until=datetime.now() + timedelta(minutes=args.minutes),
                     data_dir=data.resolve(), runs_dir=project / "runs", repo_root=project,
                     gpus=list(gpus), limits=default_limits(share=1), seed=args.seed,
                     executor=LocalTrials("process"), noise_runs=args.noise_runs,
                     same_seed_runs=args.same_seed_runs, alpha=args.alpha,
                     rerun_share=args.rerun_share, eval_tokens=args.eval_tokens)
    ledger = overnight(cfg, log=lambda line: print(f"[{name}] {line}", flush=True))
    return {"name": name, "records": list(ledger.records), "wall": time.time() - start,
            "slots": len(gpus)}


def figures(result: dict[str, Any]) -> dict[str, Any]:
    records = result["records"]
    noise = decide.noise_of(records)
    baseline = noise.seeds if noise else []
    base_mean = statistics.fmean(baseline) if baseline else None
    keeps = [r for r in records if r.get("role") == "candidate" and r.get("status") == "keep"]
    best = keeps[-1] if keeps else None
    best_mean = (best.get("mean_bpb") or best.get("val_bpb")) if best else base_mean
    gain = (base_mean - best_mean) if base_mean is not None and best_mean is not None else None
    reruns, total = decide.rerun_share(records)
    gpu_hours = result["slots"] * result["wall"] / 3600
    candidates = [r for r in records if r.get("role") == "candidate"]
    return {"noise": noise.as_dict() if noise else None, "baseline_mean": base_mean,
            "keeps": keeps, "best_mean": best_mean, "gain": gain,
            "gain_sds": gain / noise.seed_sd if gain is not None and noise and noise.seed_sd else None,
            "experiments": len(records), "candidates": len(candidates), "gpu_hours": gpu_hours,
            "experiments_per_gpu_hour": len(records) / gpu_hours if gpu_hours else None,
            "gain_per_gpu_hour": gain / gpu_hours if gain is not None and gpu_hours else None,
            "rerun_share": reruns / total if total else None}


def fmt(v: Any, spec: str = ".6f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", default=[], metavar="NAME=DIR",
                    help="a prepared data folder and its name (repeat for each data set)")
    ap.add_argument("--gpus", default="0,1", help="GPU ids, one slot each ('cpu': one CPU slot, "
                    "for a smoke test)")
    ap.add_argument("--eval-tokens", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=100, help="training seconds per trial")
    ap.add_argument("--minutes", type=float, default=12.0, help="per data set: start no trial later")
    ap.add_argument("--noise-runs", type=int, default=3)
    ap.add_argument("--same-seed-runs", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=decide.ALPHA)
    ap.add_argument("--rerun-share", type=float, default=decide.RERUN_SHARE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.data:                  # `make bench` runs every script without arguments
        print("research_yield: skipped: give --data NAME=DIR (a prepared data set) and --gpus")
        return
    gpus: list[str | None] = ([None] if args.gpus == "cpu" else
                              [g.strip() for g in args.gpus.split(",") if g.strip()])
    sets = [(part.split("=", 1)[0], Path(part.split("=", 1)[1])) for part in args.data]
    print(f"# research yield: {platform.node()}, GPUs {args.gpus}, budget {args.budget} s, "
          f"{args.minutes:g} min per data set, process backend, search agent, alpha {args.alpha}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="yield-") as tmp:
        for name, data in sets:
            results.append(run_one(name, data, gpus, args, Path(tmp)))
    print("\n| data | noise sd (seeds) | noise sd (same seed) | experiments | keeps | best gain "
          "(bpb, sds) | experiments / GPU-h | gain / GPU-h | reruns |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for res in results:
        f = figures(res)
        rows.append({**f, "name": res["name"], "keeps": [k.get("test") for k in f["keeps"]]})
        n = f["noise"] or {}
        print(f"| {res['name']} | {fmt(n.get('seed_sd'))} ({n.get('n_seeds', 0)}) | "
              f"{fmt(n.get('same_seed_sd'))} ({n.get('n_same_seed', 0)}) | {f['experiments']} | "
              f"{len(f['keeps'])} | {fmt(f['gain'])} ({fmt(f['gain_sds'], '.1f')}) | "
              f"{fmt(f['experiments_per_gpu_hour'], '.1f')} | {fmt(f['gain_per_gpu_hour'], '.5f')} | "
              f"{fmt(100 * f['rerun_share'] if f['rerun_share'] is not None else None, '.0f')}% |")
    for res in results:
        print(f"\nKeeps on {res['name']}:")
        for r in [r for r in res["records"] if r.get("role") == "candidate" and r.get("status") == "keep"]:
            t = r.get("test") or {}
            print(f"- #{r['number']} {r.get('description')}: {len(t.get('runs') or [])} runs, mean "
                  f"{fmt(t.get('mean'))} vs {fmt(t.get('best_mean'))} (diff {fmt(t.get('difference'))}), "
                  f"t {fmt(t.get('statistic'), '.2f')} vs {fmt(t.get('critical'), '.2f')}, "
                  f"p {fmt(t.get('p_value'), '.4f')}, alpha {t.get('alpha')}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, default=str))


if __name__ == "__main__":
    main()
