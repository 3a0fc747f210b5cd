"""What the trusted scorer costs: two versions of prepare.py scoring the same exported model,
side by side, on the same machine, interleaved.

Trains target/train.py for a short budget (the export's size and speed do not depend on how
long it trained), then runs `prepare.py score` of each version on the model, several times in
turn, on the real validation split and (--full-scale) on a synthetic split of EVAL_TOKENS
tokens (random ids of the same vocabulary: a forward costs the same whatever the ids). Prints a
table of wall seconds (process start to exit), the scorer's own seconds, its load and check
seconds, and the share of a --trial-seconds trial that scoring takes.

Usage:
    python bench/scorer_cost.py --before OLD/prepare.py [--data-dir DIR] [--budget 20]
                                [--repeats 3] [--device cuda] [--full-scale] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
AFTER = REPO / "prepare" / "prepare.py"
TRAIN_PY = REPO / "target" / "train.py"


def train(data: Path, out: Path, budget: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO / "prepare"), "AUTORESEARCH_DATA_DIR": str(data),
           "AUTORESEARCH_TIME_BUDGET": str(budget), "AUTORESEARCH_OUT": str(out)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(TRAIN_PY)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "model.pt2").exists():
        sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"trained {budget} s budget in {time.time() - t0:.0f} s wall; model "
          f"{(out / 'model.pt2').stat().st_size / 2**20:.1f} MiB", flush=True)
    return out / "model.pt2"


def full_scale(data: Path, folder: Path) -> Path:
    """A copy of the data set whose validation split holds EVAL_TOKENS + 1 random ids."""
    sys.path.insert(0, str(REPO / "prepare"))
    import prepare
    shutil.copytree(data, folder, ignore=shutil.ignore_patterns("train"))
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(1, vocab, prepare.EVAL_TOKENS + 1)
    np.save(folder / "val" / "val.npy", ids.astype(np.uint16), allow_pickle=False)
    return folder


def score(prepare_py: Path, model: Path, data: Path, device: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", str(prepare_py), "score", "--model", str(model),
                           "--data-dir", str(data), "--device", device],
                          capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit(f"{prepare_py} score failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result.get("status") != "ok":
        sys.exit(f"{prepare_py} scored the model {result}")
    return {**result, "wall": wall}


def profile(model: Path, data: Path, device: str) -> None:
    """Where the current scorer's time goes, stage by stage, in this process."""
    sys.path.insert(0, str(REPO / "prepare"))
    import prepare as P
    import torch

    def timed(name, fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {name:34} {time.perf_counter() - t0:7.3f} s", flush=True)
        return out

    print("profile (this process):")
    _, members = timed("read_archive", lambda: P.read_archive(model))
    checked = timed("check_members", lambda: P.check_members(members))
    archive = timed("rebuild_archive", lambda: P.rebuild_archive(checked))
    with P.unpickling_refused():
        ep = timed("torch.export.load", lambda: torch.export.load(archive))
    ep2 = timed("run_decompositions", lambda: ep.run_decompositions({}))
    timed("check_program", lambda: P.check_program(ep))
    m = timed("module().to(device)", lambda: ep.module().to(device))
    m2 = ep2.module().to(device)
    V = json.loads((data / "manifest.json").read_text())["vocab_size"]
    x = torch.randint(0, V, (P.SCORE_BATCH, P.SEQ_LEN), device=device)
    for precision in ("highest", "high"):
        torch.set_float32_matmul_precision(precision)
        for name, mod in (("exported", m), ("decomposed", m2)):
            P.run_model(mod, x, V)
            timed(f"batch forward {name} {precision}", lambda: [P.run_model(mod, x, V) for _ in range(10)])
        a = P.run_model(m, x, V)
        spliced, cuts = P.splice(x, np.random.default_rng(0))
        print(f"  prefix diff ({precision}): {P.check_prefixes(a, P.run_model(m, spliced, V), cuts)}")
    torch.set_float32_matmul_precision("highest")
    ref = P.run_model(m, x, V)
    torch.set_float32_matmul_precision("high")
    fast = P.run_model(m, x, V)
    print(f"  max |logit| diff tf32 vs fp32: {(ref - fast).abs().max().item():.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="the old prepare.py")
    ap.add_argument("--data-dir", type=Path, default=REPO / "data")
    ap.add_argument("--budget", type=int, default=20, help="training seconds for the export")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--full-scale", action="store_true", help="also score EVAL_TOKENS tokens")
    ap.add_argument("--trial-seconds", type=float, default=300, help="for the share column")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    ap.add_argument("--profile", action="store_true", help="also time the stages in-process")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = train(args.data_dir, Path(tmp) / "out", args.budget)
        if args.profile:
            profile(model, args.data_dir, args.device)
        sets = {"real val": args.data_dir}
        if args.full_scale:
            sets["full scale"] = full_scale(args.data_dir, Path(tmp) / "full")
        runs: list[dict] = []
        for name, data in sets.items():
            for i in range(args.repeats):                     # interleaved: before, after, ...
                for version, path in (("before", args.before), ("after", AFTER)):
                    r = score(path, model, data, args.device)
                    runs.append({"set": name, "version": version, "repeat": i, **r})
                    print(f"{name:10} {version:6} #{i}: wall {r['wall']:6.2f} s, scorer "
                          f"{r['seconds']:6.2f} s, load {r.get('load_seconds', 0):5.2f} s, "
                          f"checks {r.get('check_seconds', float('nan')):5.2f} s, "
                          f"{r['tokens']:,} tokens, val_bpb {r['val_bpb']:.6f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(f"\n| data | version | tokens | wall s (median, min-max) | scorer s | load s | "
          f"checks s | causal cuts | share of {args.trial_seconds:.0f} s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sets:
        for version in ("before", "after"):
            rs = [r for r in runs if r["set"] == name and r["version"] == version]
            wall = [r["wall"] for r in rs]
            med = statistics.median(wall)
            print(f"| {name} | {version} | {rs[0]['tokens']:,} | {med:.2f} ({min(wall):.2f}-"
                  f"{max(wall):.2f}) | {statistics.median(r['seconds'] for r in rs):.2f} | "
                  f"{statistics.median(r.get('load_seconds', 0) for r in rs):.2f} | "
                  f"{statistics.median(r.get('check_seconds', 0) for r in rs):.2f} | "
                  f"{rs[0].get('causal_checks', '-')} | {100 * med / args.trial_seconds:.1f}% |")
        same = {round(r["val_bpb"], 9) for r in runs if r["set"] == name}
        print(f"({name}: val_bpb identical across versions and repeats: {len(same) == 1})")


if __name__ == "__main__":
    main()
