"""Loop throughput: how much of a slot's wall time goes to training, and how trials per hour
scale with the number of slots (issue 5).

Usage:
    python bench/loop_throughput.py [--mode duty|scaling|both] [--trials 10] [--budget 40]
        [--scaling-trials N] [--scaling-seconds S] [--scaling-budget 15] [--slot-counts 1,2,4]
        [--parallel-configs] [--backend docker|process] [--data-dir DIR] [--gpus 0,1,2,3]
        [--seed 0] [--json OUT.json]

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
         of the window spent in the timed training steps (`reported_training_seconds`, what
         train.py says it spent in training steps), inside the training process (`phases.train_inside`), in the
         whole train phase, in whole trials (build, train, score, clean-up), and the idle gaps
         between trials, with whether the slot waited for a proposal.

scaling  The `search` agent, one loop per configuration of k slots. With `--gpus` (N ids) the
         configurations are 1, 2, 4, 8, ... slots up to N (and N itself when it is not a power
         of two), each on the first k GPUs of the list; on CPU (no `--gpus`) 1 and 2 slots of
         `default_limits(share=k)` (the cores split over k). `--slot-counts 1,2,4` picks them.
         Each loop runs `--scaling-trials` experiments after the baseline, or, with
         `--scaling-seconds S`, starts no trial later than S s after the loop started (trials
         running then finish; `LoopConfig.until`), with both: whichever comes first. Without
         either, 12 experiments.
         `--parallel-configs` (GPUs only; on CPU the configurations always run one after
         another): the configurations whose slot counts fit the GPU list together run at the
         same time, each on its own GPUs (counts 1,2 on GPUs 0,1,2,3: 1 slot on GPU 0 and 2 on
         GPUs 1,2), in its own thread and temporary project; CPU limits are then split over all
         slots running at once. The configurations that do not fit run after, alone, on the
         first k GPUs.
         Reported per configuration: candidates per hour = candidates / the wall time from the
         first candidate's start to the last one's end (again with the baseline and its window),
         the ratio to the 1-slot rate and that ratio / k (the goal: >= 0.95), mean trial wall,
         timed training and score phase, and the duty cycle: sum of `training_seconds` /
         (k x window), with and without the baseline, and the share of the window inside
         trials. Per slot (GPU id): its trials' `training_seconds` / the configuration's window
         (first trial start to last trial end on any slot), with and without the baseline, and
         its share of the window inside trials; CPU slots have no id, so only the
         configuration's figure.

Trial start and end times are taken around each trial call (the loop's executor, local trials
that also note the trial's GPU), to the millisecond; the records' `started_at`
(whole seconds) + `wall_seconds` agree with them to within a second. Prints Markdown tables for
bench/RESULTS.md; `--json` writes the raw figures (records and spans included).

Runs without docker (`--backend process`), litellm (the scaling mode) and matplotlib (the loop
then skips its progress.png and report.html and says so). `--eval-tokens 0` scores what the
trusted scorer scores by default (the whole validation split, at most EVAL_TOKENS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))          # llm_server.py, projects.py

from runner.loop import LoopConfig, overnight  # noqa: E402
from runner.sandbox import default_limits  # noqa: E402
from runner.trial import LocalTrials  # noqa: E402
from projects import make_project  # noqa: E402

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


class Timed(LocalTrials):
    """The loop's executor: local trials, with the wall-clock start and end of every call and
    the GPU it ran on (None: a CPU slot)."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.spans: dict[int, tuple[float, float]] = {}
        self.gpus: dict[int, str | None] = {}
        self.lock = threading.Lock()

    def run(self, spec, log=lambda _: None, **kw) -> dict[str, Any]:
        t0 = time.time()
        try:
            return super().run(spec, log, **kw)
        finally:
            with self.lock:
                self.spans[spec.number] = (t0, time.time())
                self.gpus[spec.number] = spec.gpu


def run_loop(args, tmp: Path, data: Path, name: str, agent: str, trials: int | None, budget: int,
             gpus: list[str | None], seconds: float = 0.0, limit_slots: int | None = None,
             **kw) -> dict[str, Any]:
    """One overnight loop of `trials` experiments after the baseline (None: no count) and/or
    no trial started later than `seconds` after its start (0: no clock). CPU and memory limits
    are split over `limit_slots` (default: this loop's slots). Returns its records, the spans
    and GPUs of its trials (Timed), its wall time and start, and why it stopped."""
    if trials is None and not seconds:
        raise ValueError("run_loop needs a number of trials or seconds")
    project = make_project(tmp / name, user="bench")
    timed = Timed(args.backend)
    limits = default_limits(share=limit_slots or len(gpus))
    stops = [f"{trials} trials + baseline"] if trials is not None else []
    if seconds:
        stops.append(f"no start after {seconds:g} s")
    print(f"[{name}] {' or '.join(stops)}, budget {budget} s, {len(gpus)} slot(s) of "
          f"{limits.cpus:.3g} CPUs{' on GPUs ' + ','.join(map(str, gpus)) if gpus[0] else ''}, "
          f"agent {agent}", flush=True)
    stopped: list[str] = []

    def log(line: str) -> None:
        if line.startswith("stopped:"):
            stopped.append(line[len("stopped:"):].strip())

    start = time.time()
    cfg = LoopConfig(tag=f"{SESSION}-{name}", agent=agent, budget=budget,
                     max_experiments=trials + 1 if trials is not None else None,
                     until=datetime.now() + timedelta(seconds=seconds) if seconds else None,
                     data_dir=data, runs_dir=project / "runs",
                     repo_root=project, gpus=gpus, limits=limits, eval_tokens=args.eval_tokens or None,
                     seed=args.seed, executor=timed,
                     **{"keep_rule": "threshold", "noise_runs": 1, "same_seed_runs": 0, **kw})
    ledger = overnight(cfg, log=log)
    wall = time.time() - start
    records = list(ledger.records)
    for r in records:
        if r.get("role") != "baseline" and r.get("trial_status") != "ok":
            print(f"[{name}] warning: experiment {r['number']} ended {r['status']}: "
                  f"{str(r.get('reason'))[:200]}", flush=True)
    print(f"[{name}] done in {wall:.0f} s: {len(records)} records; stopped: "
          f"{stopped[-1] if stopped else '?'}", flush=True)
    return {"records": records, "spans": dict(timed.spans), "gpus_of": dict(timed.gpus),
            "wall": wall, "loop_start": start, "limits_cpus": limits.cpus,
            "stopped": stopped[-1] if stopped else None}


# ---- measures ----

def train_seconds(r: dict) -> dict[str, float]:
    ph = r.get("phases") or {}
    return {"training": float(r.get("reported_training_seconds") or 0.0),   # train.py's steps
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
        loop = run_loop(
            args, tmp, data, "duty", "llm", args.trials, args.budget, [gpu], model=srv.model,
            api_base=srv.url, agent_options={"fix_rounds": 0, "retry_wait": 0.01, "timeout": 120})
    records, spans, wall = loop["records"], loop["spans"], loop["wall"]
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
          f"(after experiments {[g['after'] for g in waited]})")
    c = res["windows"]["candidates"]
    print(f"records' started_at + wall_seconds give windows of {fmt(c['window_records'])} s "
          f"(candidates) and {fmt(res['windows']['with baseline']['window_records'])} s (with "
          "the baseline)")


# ---- scaling ----

def default_slot_counts(n_gpus: int) -> list[int]:
    """1, 2, 4, ... up to n_gpus, and n_gpus itself when it is not a power of two."""
    counts, k = [], 1
    while k <= n_gpus:
        counts.append(k)
        k *= 2
    if counts[-1] != n_gpus:
        counts.append(n_gpus)
    return counts


def plan_configs(gpu_list: list[str | None], counts: list[int], parallel: bool
                 ) -> list[list[dict[str, Any]]]:
    """The configurations in batches that run at the same time. Each: label, name (its tag and
    project folder), gpus (one entry per slot; None for CPU slots) and limit_slots (the slots
    of its whole batch, over which CPU and memory limits are split). On GPUs with `parallel`,
    the configurations that fit side by side, in order, on disjoint GPUs of the list form the
    first batch, the others run after it, alone, on the first k GPUs; otherwise every
    configuration is its own batch."""
    on_gpus = gpu_list[0] is not None
    configs, seen = [], {}
    for i, k in enumerate(counts):
        seen[k] = seen.get(k, 0) + 1
        dup = counts.count(k) > 1
        label = f"{k} slot{'s' if k > 1 else ''}" + (f" #{seen[k]}" if dup else "")
        configs.append({"index": i, "label": label, "slots": k,
                        "name": f"scale{k}" + (f"-{seen[k]}" if dup else "")})
    batches: list[list[dict[str, Any]]] = []
    if parallel and on_gpus:
        together, offset = [], 0
        for c in configs:
            if offset + c["slots"] <= len(gpu_list):
                together.append({**c, "gpus": gpu_list[offset:offset + c["slots"]]})
                offset += c["slots"]
        batches.append(together)
        batches += [[{**c, "gpus": gpu_list[:c["slots"]]}] for c in configs
                    if c["name"] not in {t["name"] for t in together}]
    else:
        batches = [[{**c, "gpus": gpu_list[:c["slots"]] if on_gpus else [None] * c["slots"]}]
                   for c in configs]
    for batch in batches:
        for c in batch:
            c["limit_slots"] = sum(x["slots"] for x in batch)
            c["ran_with"] = [x["label"] for x in batch if x is not c]
    return batches


def summarize(records: list[dict], spans: dict[int, tuple[float, float]],
              gpus_of: dict[int, str | None], slot_gpus: list[str | None]) -> dict[str, Any]:
    """One configuration's figures from its records, its trials' spans and GPUs, and its slots
    (one GPU id per slot, or None per CPU slot). Windows: "candidates" from the first candidate
    trial's start to the last one's end, "with_baseline" from the first trial's start (baseline
    and noise runs included) to the last trial's end, on any slot. Duty = timed training
    (`training_seconds`) / (slots x window); busy = time inside trials / (slots x window); per
    slot (only where every slot has its own GPU id): the same over its own trials / the
    window."""
    by = {r["number"]: r for r in records}
    numbers = sorted((n for n in spans if n in by), key=lambda n: spans[n][0])
    cands = [n for n in numbers if by[n].get("role") == "candidate"]
    k = len(slot_gpus)
    per_slot_ok = all(g is not None for g in slot_gpus) and len(set(slot_gpus)) == k
    out: dict[str, Any] = {
        "slots": k, "gpus": slot_gpus, "n": len(cands), "n_with_baseline": len(numbers),
        "failed": sum(1 for n in cands if by[n].get("trial_status") != "ok"),
        "per_slot_available": per_slot_ok, "windows": {}}
    for label, nums in (("candidates", cands), ("with_baseline", numbers)):
        if not nums:
            out["windows"][label] = {"n": 0, "window": 0.0, "training": 0.0, "in_trials": 0.0,
                                     "duty": 0.0, "busy": 0.0, "per_slot": {}}
            continue
        t0, t1 = min(spans[n][0] for n in nums), max(spans[n][1] for n in nums)
        window = t1 - t0
        training = sum(train_seconds(by[n])["training"] for n in nums)
        inside = sum(spans[n][1] - spans[n][0] for n in nums)
        w = {"n": len(nums), "start": t0, "end": t1, "window": window, "training": training,
             "in_trials": inside, "duty": training / (k * window) if window > 0 else 0.0,
             "busy": inside / (k * window) if window > 0 else 0.0, "per_slot": {}}
        if per_slot_ok:
            for g in slot_gpus:
                mine = [n for n in nums if gpus_of.get(n) == g]
                tr = sum(train_seconds(by[n])["training"] for n in mine)
                ins = sum(spans[n][1] - spans[n][0] for n in mine)
                w["per_slot"][str(g)] = {"trials": len(mine), "training": tr, "in_trials": ins,
                                         "duty": tr / window if window > 0 else 0.0,
                                         "busy": ins / window if window > 0 else 0.0}
        out["windows"][label] = w
    c, b = out["windows"]["candidates"], out["windows"]["with_baseline"]
    out["window"], out["window_with_baseline"] = c["window"], b["window"]
    out["per_hour"] = len(cands) * 3600 / c["window"] if c["window"] > 0 else 0.0
    # Steady rate: per slot, its candidates / its own first start to last end, summed over the
    # slots. Leaves out the tail where some slots have stopped and others still finish.
    steady = 0.0
    for g in (slot_gpus if per_slot_ok else []):
        mine = [n for n in cands if gpus_of.get(n) == g]
        if mine:
            span = max(spans[n][1] for n in mine) - min(spans[n][0] for n in mine)
            steady += len(mine) * 3600 / span if span > 0 else 0.0
    out["per_hour_steady"] = steady if per_slot_ok else None
    out["per_hour_with_baseline"] = len(numbers) * 3600 / b["window"] if b["window"] > 0 else 0.0
    per = [train_seconds(by[n]) for n in cands]
    ph = [by[n].get("phases") or {} for n in cands]

    def mean(xs: list[float]) -> float:
        return statistics.mean(xs) if xs else 0.0

    out.update(trial_wall=mean([p["wall"] for p in per]),
               trial_span=mean([spans[n][1] - spans[n][0] for n in cands]),
               training=mean([p["training"] for p in per]),
               inside=mean([p["inside"] for p in per]),
               score=mean([float(p.get("score", 0.0)) for p in ph]),
               duty=c["duty"], duty_with_baseline=b["duty"],
               busy=c["busy"], busy_with_baseline=b["busy"])
    return out


def add_ratios(res: dict[str, dict[str, Any]]) -> None:
    """Each configuration's rate against the 1-slot one (or, without a 1-slot configuration,
    against the per-slot rate of the smallest), and that ratio / its slots."""
    if not res:
        return
    ref_label = next((l for l, r in res.items() if r["slots"] == 1),
                     min(res, key=lambda l: res[l]["slots"]))
    ref = res[ref_label]
    for r in res.values():
        for key, suffix in (("per_hour", ""), ("per_hour_with_baseline", "_with_baseline")):
            base = ref[key] / ref["slots"]
            ratio = r[key] / base if base > 0 else 0.0
            r["ratio" + suffix], r["efficiency" + suffix] = ratio, ratio / r["slots"]
        r["ratio_to"] = ref_label
        if r.get("per_hour_steady") and ref.get("per_hour_steady"):
            r["efficiency_steady"] = r["per_hour_steady"] / (ref["per_hour_steady"] / ref["slots"]) / r["slots"]


def scaling(args, tmp: Path, data: Path) -> dict[str, Any]:
    on_gpus = args.gpu_list[0] is not None
    counts = args.slot_counts or (default_slot_counts(len(args.gpu_list)) if on_gpus else [1, 2])
    if on_gpus and max(counts) > len(args.gpu_list):
        sys.exit(f"--slot-counts {counts}: more slots than the {len(args.gpu_list)} GPUs of --gpus")
    if args.parallel_configs and not on_gpus:
        print("note: --parallel-configs needs --gpus (CPU slots would share the cores): the "
              "configurations run one after another", flush=True)
    trials = args.scaling_trials
    if trials is None and not args.scaling_seconds:
        trials = 12
    batches = plan_configs(args.gpu_list, counts, args.parallel_configs)
    res: dict[str, Any] = {}
    for batch in batches:
        if len(batch) > 1:
            together = ", ".join(f"{c['label']} on GPUs {','.join(c['gpus'])}" for c in batch)
            print(f"running at once: {together}", flush=True)
        loops: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def one(c: dict[str, Any]) -> None:
            try:
                loops[c["label"]] = run_loop(args, tmp, data, c["name"], "search", trials,
                                             args.scaling_budget, c["gpus"],
                                             seconds=args.scaling_seconds,
                                             limit_slots=c["limit_slots"])
            except BaseException as e:          # noqa: BLE001 -- re-raised below
                errors.append(e)

        if len(batch) == 1:
            one(batch[0])
        else:
            threads = [threading.Thread(target=one, args=(c,), name=c["name"]) for c in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        for c in batch:
            loop = loops[c["label"]]
            fig = summarize(loop["records"], loop["spans"], loop["gpus_of"], c["gpus"])
            if not fig["n"]:
                print(f"[{c['name']}] warning: no candidate trial ran (stopped: {loop['stopped']})",
                      flush=True)
            res[c["label"]] = {**fig, "cpus": loop["limits_cpus"], "ran_with": c["ran_with"],
                               "run_wall": loop["wall"], "stopped": loop["stopped"],
                               "records": loop["records"], "spans": loop["spans"],
                               "gpus_of": loop["gpus_of"]}
    order = sorted((c for batch in batches for c in batch), key=lambda c: c["index"])
    res = {c["label"]: res[c["label"]] for c in order}        # in --slot-counts order
    add_ratios(res)
    return res


def print_scaling(args, res: dict[str, Any]) -> None:
    labels = list(res)
    stops = []
    if args.scaling_trials is not None or not args.scaling_seconds:
        stops.append(f"{args.scaling_trials or 12} candidates")
    if args.scaling_seconds:
        stops.append(f"no trial started after {args.scaling_seconds:g} s")
    print()
    print(f"### scaling: search agent, {' or '.join(stops)}, budget {args.scaling_budget} s, "
          f"backend {args.backend}")
    print()
    print("| | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    ref = res[labels[0]]["ratio_to"] if labels else ""
    rows = [("GPUs", lambda r: ",".join(map(str, r["gpus"])) if r["gpus"][0] is not None else "CPU"),
            ("ran alongside", lambda r: ", ".join(r["ran_with"]) or "alone"),
            ("CPUs per slot", lambda r: f"{r['cpus']:.3g}"),
            ("candidates (failed)", lambda r: f"{r['n']} ({r['failed']})"),
            ("window, first candidate start to last end, s", lambda r: fmt(r["window"])),
            ("window with the baseline, s", lambda r: fmt(r["window_with_baseline"])),
            ("**candidates per hour**", lambda r: f"**{r['per_hour']:.1f}**"),
            ("per hour, baseline and its window included", lambda r: fmt(r["per_hour_with_baseline"])),
            ("per hour, steady (each slot over its own span, summed)",
             lambda r: fmt(r["per_hour_steady"]) if r.get("per_hour_steady") else "-"),
            ("steady ratio / slots",
             lambda r: f"{r['efficiency_steady']:.2f}" if r.get("efficiency_steady") else "-"),
            (f"ratio to {ref}" + ("" if ref and res[ref]["slots"] == 1 else " (per slot)"),
             lambda r: f"{r['ratio']:.2f}x"),
            ("**ratio / slots** (goal >= 0.95)", lambda r: f"**{r['efficiency']:.2f}**"),
            ("ratio / slots, baseline included", lambda r: f"{r['efficiency_with_baseline']:.2f}"),
            ("mean trial wall, s", lambda r: fmt(r["trial_wall"], 2)),
            ("mean timed training, s", lambda r: fmt(r["training"], 2)),
            ("mean training process inside, s", lambda r: fmt(r["inside"], 2)),
            ("mean score phase, s", lambda r: fmt(r["score"], 2)),
            ("**duty: timed training / (slots x window)**", lambda r: f"**{pct(r['duty'])}**"),
            ("duty, baseline and its window included", lambda r: pct(r["duty_with_baseline"])),
            ("slots busy (time in trials / slots x window)", lambda r: pct(r["busy"])),
            ("slots busy, baseline included", lambda r: pct(r["busy_with_baseline"])),
            ("stopped", lambda r: str(r["stopped"] or "?"))]
    for name, f in rows:
        print(f"| {name} | " + " | ".join(f(res[k]) for k in labels) + " |")
    with_slots = [l for l in labels if res[l]["per_slot_available"]]
    if with_slots:
        print()
        print("Per slot: its trials' timed training (`training_seconds`) and time inside trials, "
              "over its configuration's window (first trial start to last trial end on any slot).")
        print()
        print("| configuration | slot (GPU) | candidates | timed training, s | **duty** | "
              "in trials | trials, baseline included | duty, baseline included | "
              "in trials, baseline included |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for l in with_slots:
            c, b = res[l]["windows"]["candidates"], res[l]["windows"]["with_baseline"]
            none = {"trials": 0, "training": 0.0, "duty": 0.0, "busy": 0.0}
            for g in res[l]["gpus"]:
                sc, sb = c["per_slot"].get(str(g), none), b["per_slot"].get(str(g), none)
                print(f"| {l} | {g} | {sc['trials']} | {fmt(sc['training'])} | "
                      f"**{pct(sc['duty'])}** | {pct(sc['busy'])} | {sb['trials']} | "
                      f"{pct(sb['duty'])} | {pct(sb['busy'])} |")
    elif labels:
        print()
        print("CPU slots carry no id (every trial's gpu is None): duty per configuration only "
              "(the table above).")
    a, b = (res[labels[0]], res[labels[-1]]) if len(labels) > 1 else (None, None)
    if a and a["per_hour"] and a["per_hour_with_baseline"]:
        print()
        print(f"ratio {labels[-1]} / {labels[0]}: {b['per_hour'] / a['per_hour']:.2f}x "
              f"(baseline included: {b['per_hour_with_baseline'] / a['per_hour_with_baseline']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("duty", "scaling", "both"), default="both")
    ap.add_argument("--trials", type=int, default=10, help="duty: experiments after the baseline")
    ap.add_argument("--budget", type=int, default=40, help="duty: training seconds per trial")
    ap.add_argument("--scaling-trials", type=int, default=None,
                    help="scaling: experiments after the baseline per configuration (default 12, "
                         "or no count with --scaling-seconds)")
    ap.add_argument("--scaling-seconds", type=float, default=0.0,
                    help="scaling: start no trial later than this many seconds after each loop "
                         "started (0: off)")
    ap.add_argument("--scaling-budget", type=int, default=15)
    ap.add_argument("--slot-counts", default="",
                    help="scaling: comma-separated slot counts (default 1,2,4,... up to the "
                         "number of --gpus, and that number; on CPU 1,2)")
    ap.add_argument("--parallel-configs", action="store_true",
                    help="scaling, with --gpus: run the configurations that fit side by side "
                         "at the same time on disjoint GPUs")
    ap.add_argument("--latency-min", type=float, default=5.0)
    ap.add_argument("--latency-max", type=float, default=30.0)
    ap.add_argument("--backend", choices=("docker", "process"), default="docker")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="prepared data (default: a small vocab-512 set built here)")
    ap.add_argument("--eval-tokens", type=int, default=4096,
                    help="validation tokens scored per trial (0: the scorer's default)")
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids (default: CPU slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = ap.parse_args()
    args.gpu_list = [g.strip() for g in args.gpus.split(",") if g.strip()] or [None]
    try:
        args.slot_counts = [int(x) for x in args.slot_counts.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--slot-counts {args.slot_counts!r}: comma-separated whole numbers")
    if any(k < 1 for k in args.slot_counts):
        ap.error("--slot-counts: each count must be at least 1")
    if args.scaling_trials is not None and args.scaling_trials < 1:
        ap.error("--scaling-trials must be at least 1")
    if args.scaling_seconds < 0:
        ap.error("--scaling-seconds must be positive (0: off)")

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
