"""Loop throughput: how much of a slot's wall time goes to training, and how trials per hour
scale with the number of slots (issue 5).

Usage:
    python bench/loop_throughput.py [--mode duty|scaling|both] [--trials 10] [--budget 40]
        [--scaling-trials 12] [--scaling-budget 15] [--backend docker|process]
        [--data-dir DIR] [--gpus 0,1] [--seed 0] [--json OUT.json]

Both modes run `runner.loop.overnight` for real (a temporary git repository holding the
project's target/train.py and program.md, the chosen backend, the prepared data of `--data-dir`,
or, without it, a small vocab-512 set built from generated text), with `--trials` experiments
after the baseline.

duty     One slot, the `llm` agent through litellm over HTTP to a scripted local server
         (tests/llm_server.py). Every reply is computed from the request: a SEARCH/REPLACE of one
         whole constant line of the train.py in the prompt (weight decay, soft-cap, rope base,
         warm-down share, in turn) to a value other than its current one, sent after a latency
         drawn uniformly from 5-30 s (seeded). The budget must be long enough that a reply
         arrives while the previous trial trains. Reported, over the window from the first
         candidate's start to the last one's end (and again from the baseline's start): the share
         of the window spent in the timed training steps (`training_seconds`, what train.py
         counts against its budget), inside the training process (`phases.train_inside`), in the
         whole train phase, in whole trials (build, train, score, clean-up), and the idle gaps
         between trials, with whether the slot waited for a proposal.

scaling  The `search` agent, `--scaling-trials` experiments with one slot (`--gpus`' first GPU,
         or on CPU all cores) and with every slot (all `--gpus`, or on CPU two slots of half the
         cores each: `default_limits(slots=...)`). Trials per hour = candidates / the wall time
         from the first candidate's start to the last one's end (the baseline runs alone in
         either case and is left out; the figure with it is printed too).

Trial start and end times are taken around each trial call (the loop's `trial` hook wrapping
`run_trial`), to the millisecond; the records' `started_at` (whole seconds) + `wall_seconds`
agree with them to within a second. Prints Markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))          # llm_server.py: the scripted LLM server

from runner.loop import LoopConfig, overnight  # noqa: E402
from runner.trial import default_limits, run_trial  # noqa: E402

SESSION = f"loopbench{uuid.uuid4().hex[:6]}"

# (constant, values the scripted LLM cycles through): each keeps train.py valid and its cost
# about the same, so every candidate is a real change that trains like the baseline.
KNOBS = [("WEIGHT_DECAY", ["0.0", "0.01", "0.05", "0.1"]),
         ("LOGIT_SOFTCAP", ["15.0", "20.0", "30.0"]),
         ("ROPE_BASE", ["10000.0", "20000.0", "50000.0"]),
         ("WARMDOWN_FRAC", ["0.4", "0.3", "0.5"])]

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at "
         "which but have an they you were her she there been one all we their has would when what "
         "will more if no out so said who up them some could him into its then two may time king "
         "queen lord lady night day love death sword crown storm sea castle letter friend honour "
         "grief sleep dream blood heart fortune heaven earth fire water").split()


# ---- set-up ----

def small_data(root: Path) -> Path:
    """A prepared vocab-512 data set from generated English-looking text (as tests/conftest)."""
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for f in range(8):
        lines, line = [], []
        for _ in range(5000):
            line.append(rng.choice(WORDS[: rng.randint(20, len(WORDS))]))
            if rng.random() < 0.12:
                lines.append(" ".join(line).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
                line = []
        (corpus / f"text_{f:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "data"
    proc = subprocess.run([sys.executable, str(REPO / "prepare" / "prepare.py"), "data", "--dataset",
                           f"textdir:{corpus}", "--data-dir", str(out), "--vocab-size", "512",
                           "--cache-dir", str(root / "cache")], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"prepare failed:\n{proc.stderr[-2000:]}")
    return out


def make_project(root: Path) -> Path:
    """A git repository holding the project's train.py and program.md, committed."""
    import git
    (root / "target").mkdir(parents=True)
    shutil.copy(REPO / "target" / "train.py", root / "target" / "train.py")
    shutil.copy(REPO / "program.md", root / "program.md")
    repo = git.Repo.init(root)
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "bench").set_value("user", "email", "bench@localhost")
    repo.index.add(["target/train.py", "program.md"])
    repo.index.commit("initial")
    return root


class Timed:
    """The loop's `trial` hook: run_trial, with the wall-clock start and end of every call."""

    def __init__(self) -> None:
        self.spans: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def __call__(self, spec, backend, **kw) -> dict[str, Any]:
        t0 = time.time()
        try:
            return run_trial(spec, backend, **kw)
        finally:
            with self.lock:
                self.spans[spec.number] = (t0, time.time())


def run_loop(args, tmp: Path, data: Path, name: str, agent: str, trials: int, budget: int,
             gpus: list[str | None], **kw) -> tuple[list[dict], dict[int, tuple[float, float]], float]:
    project = make_project(tmp / name)
    timed = Timed()
    limits = default_limits(gpus[0], slots=len(gpus))
    cfg = LoopConfig(tag=f"{SESSION}-{name}", agent=agent, budget=budget, max_experiments=trials + 1,
                     backend=args.backend, data_dir=data, runs_dir=project / "runs",
                     repo_root=project, gpus=gpus, limits=limits, eval_tokens=args.eval_tokens,
                     seed=args.seed, trial=timed, **kw)
    print(f"[{name}] {trials} trials + baseline, budget {budget} s, {len(gpus)} slot(s) of "
          f"{limits.cpus:g} CPUs, agent {agent}", flush=True)
    t = time.time()
    ledger = overnight(cfg, log=lambda line: None)
    wall = time.time() - t
    records = list(ledger.records)
    for r in records:
        if r.get("role") != "baseline" and r.get("trial_status") != "ok":
            print(f"[{name}] warning: experiment {r['number']} ended {r['status']}: "
                  f"{str(r.get('reason'))[:200]}", flush=True)
    return records, timed.spans, wall


# ---- measures ----

def train_seconds(r: dict) -> dict[str, float]:
    ph = r.get("phases") or {}
    return {"training": float(r.get("training_seconds") or 0.0),
            "inside": float(ph.get("train_inside", ph.get("train", 0.0))),
            "phase": float(ph.get("train", 0.0)),
            "wall": float(r.get("wall_seconds") or 0.0)}


def record_span(r: dict) -> tuple[float, float]:
    from datetime import datetime
    start = datetime.fromisoformat(r["started_at"]).timestamp()
    return start, start + float(r["wall_seconds"])


def fmt(x: float, d: int = 1) -> str:
    return f"{x:.{d}f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"


# ---- duty cycle ----

def duty(args, tmp: Path, data: Path) -> dict[str, Any]:
    from llm_server import Reply, ScriptedLLM

    rng = random.Random(args.seed)
    arrivals: list[dict[str, float]] = []          # per request: arrival, latency
    lock = threading.Lock()

    def reply(body: dict) -> Reply:
        with lock:
            i = len(arrivals)
            latency = rng.uniform(args.latency_min, args.latency_max)
            arrivals.append({"arrival": time.time(), "latency": latency})
        prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages") or [])
        name, values = KNOBS[i % len(KNOBS)]
        line = next(l for l in prompt.splitlines() if l.startswith(f"{name} = "))
        m = re.match(rf"{name} = (\S+)", line)
        current = m.group(1)
        choices = [v for v in values if float(v) != float(current)]
        new_value = choices[(i // len(KNOBS)) % len(choices)]
        new = f"{name} = {new_value}" + line[m.end():]
        return Reply(f"Trying {name} = {new_value}.\n<<<<<<< SEARCH\n{line}\n=======\n{new}\n"
                     f">>>>>>> REPLACE\nDESCRIPTION: {name.lower()} {new_value}\n", latency=latency)

    gpu = args.gpu_list[0]
    with ScriptedLLM(default=reply) as srv:
        records, spans, wall = run_loop(
            args, tmp, data, "duty", "llm", args.trials, args.budget, [gpu], model=srv.model,
            api_base=srv.url, agent_options={"fix_rounds": 0, "retry_wait": 0.01, "timeout": 120})
    by = {r["number"]: r for r in records}
    order = sorted(spans, key=lambda n: spans[n][0])
    base = [n for n in order if by[n].get("role") == "baseline"]
    cands = [n for n in order if by[n].get("role") == "candidate"]
    result: dict[str, Any] = {"records": records, "spans": spans, "wall": wall, "requests": arrivals,
                              "windows": {}}
    for label, numbers in (("candidates", cands), ("with baseline", base + cands)):
        t0, t1 = spans[numbers[0]][0], spans[numbers[-1]][1]
        window = t1 - t0
        sums = {k: sum(train_seconds(by[n])[k] for n in numbers) for k in ("training", "inside",
                                                                           "phase", "wall")}
        rs = [record_span(by[n]) for n in numbers]
        result["windows"][label] = {
            "n": len(numbers), "window": window,
            "window_records": rs[-1][1] - rs[0][0],
            **{f"share_{k}": v / window for k, v in sums.items()}, **sums}
    # The gaps: the end of one trial to the start of the next, and whether the slot waited for
    # the proposal (its reply left the server after the previous trial had ended).
    # One request per proposal (fix_rounds 0, no retries), proposals made in number order: the
    # i-th request made candidate i of the ledger's numbering.
    replies = {n: a["arrival"] + a["latency"] for n, a in zip(sorted(cands), arrivals)}
    gaps = []
    for prev, nxt in zip(base + cands, cands):
        end, start = spans[prev][1], spans[nxt][0]
        gaps.append({"after": prev, "gap": start - end,
                     "waited_for_proposal": replies.get(nxt, 0.0) > end,
                     "reply_after_previous_end": replies.get(nxt, 0.0) - end,
                     "propose_seconds": (by[nxt].get("llm") or {}).get("propose_seconds")})
    result["gaps"] = gaps
    return result


def print_duty(args, res: dict[str, Any]) -> None:
    by = {r["number"]: r for r in res["records"]}
    print()
    print(f"### duty cycle: 1 slot, llm agent (scripted, {args.latency_min:g}-{args.latency_max:g} s "
          f"per reply), budget {args.budget} s, backend {args.backend}")
    print()
    print("| share of the slot's wall time | candidates only | with the baseline |")
    print("| --- | --- | --- |")
    c, b = res["windows"]["candidates"], res["windows"]["with baseline"]
    print(f"| trials | {c['n']} | {b['n']} |")
    print(f"| window (first start to last end), s | {fmt(c['window'])} | {fmt(b['window'])} |")
    for key, label in [("training", "**timed training steps (`training_seconds`)**"),
                       ("inside", "training process, start to exit (`phases.train_inside`)"),
                       ("phase", "whole train phase (`phases.train`: start, wait, stop)"),
                       ("wall", "whole trials (build, set-up, train, score, clean-up)")]:
        print(f"| {label} | {pct(c['share_' + key])} | {pct(b['share_' + key])} |")
    print(f"| idle between trials | {pct(1 - c['share_wall'])} | {pct(1 - b['share_wall'])} |")
    print()
    numbers = [n for n in sorted(res["spans"], key=lambda n: res["spans"][n][0])
               if by[n].get("role") == "candidate"]
    per = [train_seconds(by[n]) for n in numbers]
    ph = [by[n].get("phases") or {} for n in numbers]
    lat = [a["latency"] for a in res["requests"]]
    prop = [(by[n].get("llm") or {}).get("propose_seconds") or 0.0 for n in numbers]
    gaps = res["gaps"]
    print("| per candidate trial (s) | mean (min, max) |")
    print("| --- | --- |")
    print(f"| trial wall | {stats([p['wall'] for p in per])} |")
    print(f"| timed training steps | {stats([p['training'] for p in per])} |")
    print(f"| training process inside its container | {stats([p['inside'] for p in per])} |")
    print(f"| train phase | {stats([p['phase'] for p in per])} |")
    print(f"| build | {stats([p.get('build', 0.0) for p in ph])} |")
    print(f"| score phase | {stats([p.get('score', 0.0) for p in ph])} |")
    print(f"| scripted reply latency | {stats(lat)} |")
    print(f"| proposal, whole (agent: prompt, HTTP, apply) | {stats(prop)} |")
    print(f"| gap between trials | {stats([g['gap'] for g in gaps])} |")
    waited = [g for g in gaps if g["waited_for_proposal"]]
    print()
    print(f"gaps where the slot waited for a proposal: {len(waited)} of {len(gaps)} "
          f"(after experiments {[g['after'] for g in waited]}; the first follows the baseline, "
          "before which nothing is proposed)")
    c = res["windows"]["candidates"]
    print(f"records' started_at + wall_seconds give windows of {fmt(c['window_records'])} s "
          f"(candidates) and {fmt(res['windows']['with baseline']['window_records'])} s (with "
          "the baseline)")


# ---- scaling ----

def scaling(args, tmp: Path, data: Path) -> dict[str, Any]:
    if args.gpus:
        configs = [("1 slot", args.gpu_list[:1]), (f"{len(args.gpu_list)} slots", args.gpu_list)]
    else:
        configs = [("1 slot", [None]), ("2 slots", [None, None])]
    out = {}
    for i, (label, gpus) in enumerate(configs):
        records, spans, wall = run_loop(args, tmp, data, f"scale{len(gpus)}", "search",
                                        args.scaling_trials, args.scaling_budget, gpus)
        by = {r["number"]: r for r in records}
        cands = [n for n in spans if by[n].get("role") == "candidate"]
        t0, t1 = min(spans[n][0] for n in cands), max(spans[n][1] for n in cands)
        t0b = min(s[0] for s in spans.values())
        per = [train_seconds(by[n]) for n in cands]
        ph = [by[n].get("phases") or {} for n in cands]
        out[label] = {
            "slots": len(gpus), "cpus": default_limits(gpus[0], slots=len(gpus)).cpus,
            "n": len(cands), "window": t1 - t0, "window_with_baseline": t1 - t0b, "run_wall": wall,
            "per_hour": len(cands) * 3600 / (t1 - t0),
            "per_hour_with_baseline": (len(cands) + 1) * 3600 / (t1 - t0b),
            "trial_wall": statistics.mean(p["wall"] for p in per),
            "training": statistics.mean(p["training"] for p in per),
            "inside": statistics.mean(p["inside"] for p in per),
            "score": statistics.mean(p.get("score", 0.0) for p in ph),
            "busy": sum(p["wall"] for p in per) / (len(gpus) * (t1 - t0)),
            "failed": sum(1 for n in cands if by[n].get("trial_status") != "ok"),
            "records": records, "spans": spans}
    return out


def print_scaling(args, res: dict[str, Any]) -> None:
    labels = list(res)
    print()
    print(f"### scaling: search agent, {args.scaling_trials} candidates, budget "
          f"{args.scaling_budget} s, backend {args.backend}")
    print()
    print("| | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    rows = [("CPUs per slot", lambda r: f"{r['cpus']:g}"),
            ("candidates (failed)", lambda r: f"{r['n']} ({r['failed']})"),
            ("window, first candidate start to last end, s", lambda r: fmt(r["window"])),
            ("**candidates per hour**", lambda r: f"**{r['per_hour']:.1f}**"),
            ("per hour, baseline and its window included", lambda r: fmt(r["per_hour_with_baseline"])),
            ("mean trial wall, s", lambda r: fmt(r["trial_wall"], 2)),
            ("mean timed training, s", lambda r: fmt(r["training"], 2)),
            ("mean training process inside, s", lambda r: fmt(r["inside"], 2)),
            ("mean score phase, s", lambda r: fmt(r["score"], 2)),
            ("slots busy (sum of trial walls / slots x window)", lambda r: pct(r["busy"]))]
    for name, f in rows:
        print(f"| {name} | " + " | ".join(f(res[k]) for k in labels) + " |")
    a, b = res[labels[0]], res[labels[-1]]
    print()
    print(f"ratio {labels[-1]} / {labels[0]}: {b['per_hour'] / a['per_hour']:.2f}x "
          f"(baseline included: {b['per_hour_with_baseline'] / a['per_hour_with_baseline']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("duty", "scaling", "both"), default="both")
    ap.add_argument("--trials", type=int, default=10, help="duty: experiments after the baseline")
    ap.add_argument("--budget", type=int, default=40, help="duty: training seconds per trial")
    ap.add_argument("--scaling-trials", type=int, default=12)
    ap.add_argument("--scaling-budget", type=int, default=15)
    ap.add_argument("--latency-min", type=float, default=5.0)
    ap.add_argument("--latency-max", type=float, default=30.0)
    ap.add_argument("--backend", choices=("docker", "process"), default="docker")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="prepared data (default: a small vocab-512 set built here)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids (default: CPU slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = ap.parse_args()
    args.gpu_list = [g.strip() for g in args.gpus.split(",") if g.strip()] or [None]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; session {SESSION}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loopbench-") as tmpname:
        tmp = Path(tmpname)
        data = args.data_dir.resolve() if args.data_dir else small_data(tmp / "small")
        try:
            if args.mode in ("duty", "both"):
                results["duty"] = duty(args, tmp, data)
            if args.mode in ("scaling", "both"):
                results["scaling"] = scaling(args, tmp, data)
        finally:
            if args.backend == "docker":
                from runner.sandbox import images
                cli = images.client()
                for image in cli.images.list(filters={"reference": f"autoresearch/exp:{SESSION}*"}):
                    cli.images.remove(image.id, force=True)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "duty" in results:
        print_duty(args, results["duty"])
    if "scaling" in results:
        print_scaling(args, results["scaling"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
