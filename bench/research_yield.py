"""Research yield on GPUs (issue 12): the overnight loop with the search agent, the process
backend, N GPUs and the default (sequential) keep rule, for a fixed time on each prepared data
set given; then the figures the issue asks for, per data set.

    python bench/research_yield.py --data NAME=DIR [--data NAME2=DIR2] --gpus 0,1 \
        --budget 60 --minutes 6 --out OUT

Each data set gets its own loop (a temporary git repository holding the project's
target/train.py and program.md, so the checkout is never touched), one after the other, each
starting no trial later than `--minutes` after it began (trials running then finish: allow one
budget plus start-up and scoring after it). Printed, per data set, as Markdown for
bench/RESULTS.md:

- the noise: sd of val_bpb over the baseline's seeds and over reruns of its seed;
- every keep with its statistics (runs, mean, the difference to the best before, t, critical
  value, p, alpha);
- the best gain (the baseline's mean minus the best's mean, and in baseline sds);
- experiments, GPU-hours (the slots x the loop's wall time), experiments and improvement per
  GPU-hour, the share of trial time that went to reruns, and how busy the slots were (trial
  seconds, reruns included, over slots x wall time);
- where each trial's slot time went (issue 11; `bench/slot_share.py`, whose docstring defines
  the figures): start-up to the first training step, scoring, the slot's wall seconds and the
  share of it in training steps (the candidate's reported training window), split by whether
  the compile cache started cold or warm where the records say.

`--out DIR` keeps each data set's ledger (`DIR/<name>/experiments.jsonl`, for
`bench/slot_share.py DIR/<name>` and `autoresearch report`), the printed Markdown
(`DIR/results.md`) and every record (`DIR/results.json`); `--json FILE` writes the records too.

What the runner needs on the machine (the benchmark path imports `runner.loop`, the process
backend and the search agent only): Python >= 3.10 with torch and numpy (for train.py and the
scorer), the `git` command, and three pure-Python wheels: GitPython, gitdb, smmap. Nothing else
of the project's dependencies (rich, click, litellm, docker, pynvml, matplotlib are not needed:
without pynvml the records have no GPU telemetry; without rich or matplotlib the loop's closing
report is skipped with one line, and `autoresearch report` makes it later from the ledger kept
in --out). Checked on a CPU with every other third-party package made unimportable.

**On the lent GPU machine** (checked 2026-11-30 on the one-H200 kind: Python 3.12 in a
virtualenv with torch 2.11 and numpy, /usr/bin/git, rich, click, matplotlib and pynvml
present; GitPython, gitdb and smmap missing; no network; at most 10 minutes a command, so one
data set per command). Its `pip` belongs to another Python than its `python`: unpack the wheels
instead of installing them. From the checkout here, with the wheels downloaded once (`pip
download --no-deps --only-binary=:all: -d .whl GitPython gitdb smmap`) and a prepared copy of the data (`.devdata/shakespeare`: `autoresearch prepare`
or a copy), the device command, on the `nvidia-h200-x2` kind with `carry: [".whl",
".devdata/shakespeare"]` and a 600 s limit:

    mkdir -p /tmp/pylib && for w in .whl/*.whl; do python -m zipfile -e "$w" /tmp/pylib; done && \
    PYTHONPATH=/tmp/pylib python bench/research_yield.py --data shakespeare=.devdata/shakespeare \
        --gpus 0,1 --budget 60 --minutes 6 --out "$OUT/yield"

`bench/gpu_lease.sh` wraps this for the figures in bench/RESULTS.md (both data sets and a
300 s trial in one lease, the loops started warm).

(6 minutes of starts, then the last trials' 60 s and scoring: about 7.5 minutes.) Keep the
budget at 60 s or more: the runner's clock includes import and torch.compile (about 35 s cold
on an H200), and a smoke run at 25 s on one H200 (8 trials) scored every trial on train.py's
untrained fallback export (val_bpb 3.9453 for all, the noise 0.00002): such a run measures
start-up, not research (`bench/slot_share.py` then says so). The big data set goes the same way
(`--data NAME=DIR`, its prepared folder; the carry limit is 64 MiB in all, so a bigger one must
be prepared on the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
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
sys.path.insert(0, str(REPO / "bench"))          # slot_share.py

from projects import make_project  # noqa: E402

import slot_share  # noqa: E402
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
                     gpus=list(gpus), limits=default_limits(share=len(gpus)), seed=args.seed,
                     executor=LocalTrials("process"), noise_runs=args.noise_runs,
                     same_seed_runs=args.same_seed_runs, alpha=args.alpha,
                     rerun_share=args.rerun_share, eval_tokens=args.eval_tokens,
                     overlap_scoring=args.overlap_scoring)
    cache_dir = cfg.runs_dir / cfg.tag / "compile-cache"     # the kept line's (runner.loop)
    if args.cache_from is not None:                           # start warm: another run's cache
        if args.cache_from.is_dir():
            shutil.copytree(args.cache_from, cache_dir)
        else:
            print(f"[{name}] no compile cache at {args.cache_from}: starting cold", flush=True)
    ledger = overnight(cfg, log=lambda line: print(f"[{name}] {line}", flush=True))
    if args.out is not None:
        (args.out / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg.runs_dir / cfg.tag / "experiments.jsonl", args.out / name / "experiments.jsonl")
        if cache_dir.is_dir():                                # for a later --cache-from
            shutil.copytree(cache_dir, args.out / name / "compile-cache", dirs_exist_ok=True)
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
    slots = slot_share.trials(records)
    candidates = [r for r in records if r.get("role") == "candidate"]
    return {"noise": noise.as_dict() if noise else None, "baseline_mean": base_mean,
            "keeps": keeps, "best_mean": best_mean, "gain": gain,
            "gain_sds": gain / noise.seed_sd if gain is not None and noise and noise.seed_sd else None,
            "experiments": len(records), "candidates": len(candidates), "gpu_hours": gpu_hours,
            "experiments_per_gpu_hour": len(records) / gpu_hours if gpu_hours else None,
            "gain_per_gpu_hour": gain / gpu_hours if gain is not None and gpu_hours else None,
            "rerun_share": reruns / total if total else None,
            # trial seconds (reruns included) over slots x the loop's wall time
            "slot_busy": total / (result["slots"] * result["wall"]) if result["wall"] else None,
            "slot_trials": slots, "slot_groups": slot_share.summarise(slots)}


def fmt(v: Any, spec: str = ".6f") -> str:
    return "-" if v is None else format(v, spec)


def report_lines(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """The Markdown for bench/RESULTS.md and each data set's figures."""
    out = [f"# research yield: {platform.node()}, GPUs {args.gpus}, budget {args.budget} s, "
           f"{args.minutes:g} min per data set, process backend, search agent, alpha {args.alpha}",
           "", "| data | noise sd (seeds) | noise sd (same seed) | experiments | keeps | best gain "
           "(bpb, sds) | experiments / GPU-h | gain / GPU-h | reruns | slots busy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for res in results:
        f = figures(res)
        rows.append({**{k: v for k, v in f.items() if k != "keeps"}, "name": res["name"],
                     "wall_seconds": res["wall"], "slots": res["slots"],
                     "keeps": [{"number": k.get("number"), "description": k.get("description"),
                                "test": k.get("test")} for k in f["keeps"]]})
        n = f["noise"] or {}
        pct = (lambda v: fmt(None if v is None else 100 * v, ".0f") + "%")
        out.append(f"| {res['name']} | {fmt(n.get('seed_sd'))} ({n.get('n_seeds', 0)}) | "
                   f"{fmt(n.get('same_seed_sd'))} ({n.get('n_same_seed', 0)}) | {f['experiments']} | "
                   f"{len(f['keeps'])} | {fmt(f['gain'])} ({fmt(f['gain_sds'], '.1f')}) | "
                   f"{fmt(f['experiments_per_gpu_hour'], '.1f')} | {fmt(f['gain_per_gpu_hour'], '.5f')} | "
                   f"{pct(f['rerun_share'])} | {pct(f['slot_busy'])} |")
    for res, f in zip(results, rows, strict=True):
        out += ["", f"Keeps on {res['name']}:"]
        for r in [r for r in res["records"] if r.get("role") == "candidate" and r.get("status") == "keep"]:
            t = r.get("test") or {}
            out.append(f"- #{r['number']} {r.get('description')}: {len(t.get('runs') or [])} runs, mean "
                       f"{fmt(t.get('mean'))} vs {fmt(t.get('best_mean'))} (diff "
                       f"{fmt(t.get('difference'))}), t {fmt(t.get('statistic'), '.2f')} vs "
                       f"{fmt(t.get('critical'), '.2f')}, p {fmt(t.get('p_value'), '.4f')}, "
                       f"alpha {t.get('alpha')}")
        if not f["keeps"]:
            out.append("- none")
        out += ["", slot_share.markdown(f["slot_trials"], f["slot_groups"], res["name"])]
    return out, rows


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
    ap.add_argument("--overlap-scoring", action=argparse.BooleanOptionalAction, default=None,
                    help="score beside the next trial (default: the loop's, on for GPU slots)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="keep each data set's ledger, the Markdown and every record here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache-from", type=Path, default=None, metavar="DIR",
                    help="start the run on this compile cache (a compile-cache folder --out kept)")
    args = ap.parse_args()
    if not args.data:                  # run bare: say what it needs
        print("research_yield: skipped: give --data NAME=DIR (a prepared data set) and --gpus")
        return
    gpus: list[str | None] = ([None] if args.gpus in ("cpu", "none") else
                              [g.strip() for g in args.gpus.split(",") if g.strip()])
    sets = []
    for part in args.data:
        name, _, folder = part.partition("=")
        data = Path(folder)
        if not name or not (data / "manifest.json").is_file():
            ap.error(f"--data {part!r}: give NAME=DIR, DIR a prepared data folder (with manifest.json)")
        sets.append((name, data))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"# research yield: starting; {len(sets)} data set(s), {len(gpus)} slot(s)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="yield-") as tmp:
        for name, data in sets:
            results.append(run_one(name, data, gpus, args, Path(tmp)))
    lines, rows = report_lines(results, args)
    print("\n" + "\n".join(lines), flush=True)
    dump = json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": rows,
                       "results": results}, default=str)
    if args.out is not None:
        (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (args.out / "results.json").write_text(dump, encoding="utf-8")
    if args.json:
        args.json.write_text(dump, encoding="utf-8")


if __name__ == "__main__":
    main()
