"""What the docker sandbox costs per trial, against a bare process.

Usage:
    python bench/sandbox_overhead.py [--pairs 10] [--budget 5] [--data-dir DIR] [--cold]

Runs the same train.py with the same budget through `--backend docker` and `--backend process`
(train and score both), alternating which goes first, and reports the median of the per-pair
differences in wall time, plus the docker side's breakdown on a warm cache: image build,
container set-up (output volume, holder, create), the train and score phases less the time the
processes themselves ran inside their containers (start, wait, teardown), copy-out, removal.
`--cold` also rebuilds the offline base image from scratch and reports its time; the base image's
size is always reported. Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.paths import TRAIN_PY, data_dir  # noqa: E402
from runner.sandbox import Limits, TrialSpec, default_limits  # noqa: E402
from runner.sandbox import images  # noqa: E402
from runner.trial import run_trial  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--budget", type=int, default=5)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--cold", action="store_true", help="also time a cold offline base build")
    args = ap.parse_args()
    data = (args.data_dir or data_dir()).resolve()

    cold = None
    if args.cold:
        t = time.perf_counter()
        images.ensure_base(True, rebuild=True)
        cold = time.perf_counter() - t
    base = images.default_base_tag()
    size = images.client().images.get(base).attrs["Size"]

    limits: Limits = default_limits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ["docker", "process"] if i % 2 == 0 else ["process", "docker"]
            walls, phases = {}, {}
            for backend in order:
                spec = TrialSpec(train_py=TRAIN_PY, data_dir=data, budget=args.budget, run="bench",
                                 number=i, limits=limits, eval_tokens=args.eval_tokens,
                                 artifact_dir=Path(tmp) / f"{backend}-{i}")
                t = time.perf_counter()
                record = run_trial(spec, backend)
                walls[backend] = time.perf_counter() - t
                if record["status"] != "ok":
                    sys.exit(f"{backend} trial {i} ended {record['status']}: {record['reason']}")
                phases[backend] = record["phases"]
            d = phases["docker"]
            rows.append({
                "diff": walls["docker"] - walls["process"],
                "docker": walls["docker"], "process": walls["process"],
                "build": d["build"], "setup": d["container_setup"],
                "train_overhead": d["train"] - d.get("train_inside", d["train"]),
                "score_overhead": d["score"] - d.get("score_inside", d["score"]),
                "copy_out": d.get("copy_out", 0.0), "cleanup": d["cleanup"],
            })
            print(f"pair {i}: docker {walls['docker']:.2f}s  process {walls['process']:.2f}s  "
                  f"diff {rows[-1]['diff']:+.2f}s", flush=True)
    cli = images.client()
    for image in cli.images.list(filters={"reference": "autoresearch/exp:bench-*"}):
        cli.images.remove(image.id, force=True)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; base {base} {size / 1e9:.2f} GB"
          + (f"; cold base build {cold:.0f} s" if cold else ""))
    print(f"{args.pairs} pairs, budget {args.budget} s, eval tokens {args.eval_tokens}")
    print("| measure (median) | seconds |")
    print("| --- | --- |")
    for key, label in [("docker", "docker trial, wall"), ("process", "process trial, wall"),
                       ("diff", "**docker - process (median of pair differences)**"),
                       ("build", "image build (warm cache)"),
                       ("setup", "output volume + holder + create train container"),
                       ("train_overhead", "train phase less time inside (start, wait, stop)"),
                       ("score_overhead", "score phase less time inside (create, start, wait)"),
                       ("copy_out", "copy-out of model.pt2"), ("cleanup", "removal")]:
        print(f"| {label} | {med[key]:.3f} |")


if __name__ == "__main__":
    main()
