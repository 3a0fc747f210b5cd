"""What a run's records add up to, for every report: the numbers, ordering and formatting the
terminal table, the plot and the page share.

Records come from the ledger but may be hand-edited or odd: every value is checked here
(`finite`, `number_of`), so a strange line never breaks a report.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Iterable

from runner.decide import noise_of, rerun_share
from runner.record import FAILED, KEEP, Record

def finite(value: Any) -> float | None:
    """A finite number, else None (a hand-edited or odd ledger must not break a report)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def number_of(rec: Record) -> int | None:
    n = rec.get("number")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def by_number(records: Iterable[Record]) -> list[Record]:
    """By experiment number (stable; records without a number last)."""
    return sorted(records, key=lambda r: (number_of(r) is None, number_of(r) or 0))


def bpb_of(rec: Record) -> float | None:
    return finite(rec.get("val_bpb"))


def score_of(rec: Record) -> float | None:
    """What a kept record scored: the mean of its runs where it was rerun, else its val_bpb."""
    mean = finite(rec.get("mean_bpb"))
    return mean if mean is not None else bpb_of(rec)


def baseline_score(records: list[Record], baseline: Record) -> float | None:
    """The baseline's score: the mean over its seeds (the noise runs of its commit that are not
    same-seed reruns), else its one val_bpb."""
    values = [v for r in records if r.get("role") in ("baseline", "noise")
              and r.get("commit") == baseline.get("commit") and not r.get("same_seed")
              and (v := bpb_of(r)) is not None]
    return sum(values) / len(values) if values else score_of(baseline)


def baseline_of(ordered: list[Record]) -> Record | None:
    """The run's baseline: kept experiment #0, else the first kept (records in number order)."""
    kept = [r for r in ordered if is_kept(r)]
    return next((r for r in kept if number_of(r) == 0), kept[0] if kept else None)


def run_scores(rec: Record) -> list[float]:
    """val_bpb of each scored run of a candidate that was run more than once (its `runs`: the
    first run and the reruns), else []."""
    runs = r if isinstance(r := rec.get("runs"), list) else []
    values = [v for run in runs if isinstance(run, dict) and (v := finite(run.get("val_bpb"))) is not None]
    return values if len(values) >= 2 else []


def decided_scores(records: Iterable[Record]) -> dict[int, float]:
    """id(record) -> the score its decision was made on, for every scored record: the mean of
    its runs for a rerun candidate (`mean_bpb`), the mean over its seeds for the baseline (what
    candidates were tested against), else its one val_bpb. What the table, the page and the plot
    show, so they draw what was decided, not a first run."""
    ordered = by_number(records)
    baseline = baseline_of(ordered)
    out: dict[int, float] = {}
    for r in ordered:
        value = (baseline_score(ordered, r) if r is baseline else score_of(r))
        if value is not None:
            out[id(r)] = value
    return out


def status_of(rec: Record) -> str:
    return str(rec.get("status") or "?")


def is_kept(rec: Record) -> bool:
    return status_of(rec) == KEEP and bpb_of(rec) is not None


def one_line(text: Any, width: int | None = None) -> str:
    s = " ".join(str(text or "").split())
    if width is not None and len(s) > width:
        s = s[: max(width - 1, 1)].rstrip() + "…"
    return s


def wall_seconds(rec: Record) -> float | None:
    """Wall time of the whole experiment: the trial (build, train, score, ...) plus proposing."""
    phases: dict[str, Any] = ph if isinstance(ph := rec.get("phases"), dict) else {}
    propose = finite(phases.get("propose")) or 0.0
    wall = finite(rec.get("wall_seconds"))
    if wall is not None:
        return wall + propose
    # No trial ran (an invalid proposal): add the top-level phases (*_inside are nested).
    parts = [p for k, v in phases.items()
             if not str(k).endswith("_inside") and (p := finite(v)) is not None]
    return sum(parts) if parts else None


def llm_of(rec: Record) -> dict[str, Any]:
    return x if isinstance(x := rec.get("llm"), dict) else {}


def tokens_of(rec: Record) -> int:
    """LLM tokens of the proposal (prompt and completion, fix rounds included)."""
    x = llm_of(rec)
    return int(finite(x.get("prompt_tokens")) or 0) + int(finite(x.get("completion_tokens")) or 0)


def cost_of(rec: Record) -> float:
    return finite(llm_of(rec).get("cost_usd")) or 0.0


def gpus_of(rec: Record) -> int:
    """GPUs the trial trained on: a Ray trial's assigned ones, else 1 when NVML sampled a GPU
    during its training (the record's `gpu` field), else 0 (a CPU trial)."""
    where = rec.get("cluster")
    if isinstance(where, dict) and where.get("gpu"):
        return len([g for g in str(where["gpu"]).split(",") if g.strip()])
    gpu = rec.get("gpu")
    return 1 if isinstance(gpu, dict) and gpu.get("index") is not None else 0


def train_seconds(rec: Record) -> float:
    """Wall seconds of the train phase (start-up and export included); 0 when none ran."""
    phases = ph if isinstance(ph := rec.get("phases"), dict) else {}
    return finite(phases.get("train")) or 0.0


def gpu_hours(rec: Record) -> float:
    """Train phase seconds x GPUs, in hours: what the experiment cost in GPU time."""
    return train_seconds(rec) * gpus_of(rec) / 3600


def annotate(records: list[Record]) -> list[tuple[Record, float | None, float | None]]:
    """(record, its decided score (`decided_scores`), the best kept score before it), in
    experiment order."""
    scores = decided_scores(records)
    out: list[tuple[Record, float | None, float | None]] = []
    best: float | None = None
    for rec in by_number(records):
        score = scores.get(id(rec))
        out.append((rec, score, best))
        if is_kept(rec) and score is not None:
            best = score if best is None else min(best, score)
    return out


def summary(records: list[Record]) -> dict[str, Any]:
    """Counts, baseline, best and cost: what the caption and the page header say."""
    ordered = by_number(records)
    kept = [r for r in ordered if is_kept(r)]
    baseline = baseline_of(ordered)
    scores = decided_scores(ordered)
    best = min(kept, key=lambda r: (scores[id(r)], -(number_of(r) or 0))) if kept else None
    counts: dict[str, int] = {}
    for r in ordered:
        counts[status_of(r)] = counts.get(status_of(r), 0) + 1
    llm: list[dict[str, Any]] = [x if isinstance(x := r.get("llm"), dict) else {} for r in ordered]
    dates = sorted(d for d in (local_time(r.get("started_at")) for r in ordered) if d is not None)
    walls = [w for w in (wall_seconds(r) for r in ordered) if w is not None]
    base_bpb = baseline_score(ordered, baseline) if baseline else None
    best_bpb = scores[id(best)] if best else None
    try:
        noise = noise_of(ordered)
        reruns, trials = rerun_share(ordered)
    except (TypeError, ValueError):             # a hand-edited ledger must not break a report
        noise, reruns, trials = None, 0.0, 0.0
    kept_changes = sum(1 for r in kept if r is not baseline)
    cost = sum(cost_of(r) for r in ordered)
    gpu_h = sum(gpu_hours(r) for r in ordered)
    train_h = sum(train_seconds(r) for r in ordered) / 3600
    tokens = sum(tokens_of(r) for r in ordered)
    return {
        "experiments": len(ordered),
        "kept": len(kept),
        "kept_changes": kept_changes,
        "discarded": counts.get("discard", 0),
        "failed": sum(counts.get(s, 0) for s in FAILED),
        "counts": counts,
        "baseline": baseline,
        "baseline_bpb": base_bpb,
        "best": best,
        "best_bpb": best_bpb,
        "improvement": (base_bpb - best_bpb) if base_bpb is not None and best_bpb is not None else None,
        "cost_usd": cost,
        "tokens": tokens,
        "gpu_hours": gpu_h,
        "train_hours": train_h,        # train phases of every trial, GPU or CPU
        # What one kept improvement (a kept change, the baseline not counted) cost on average:
        # everything the run spent, failures and discards included. None before the first.
        "per_kept": ({"cost_usd": cost / kept_changes, "tokens": tokens / kept_changes,
                      "gpu_hours": gpu_h / kept_changes, "train_hours": train_h / kept_changes}
                     if kept_changes else None),
        "models": sorted({str(x["model"]) for x in llm if x.get("model")}),
        "first": dates[0] if dates else None,
        "last": dates[-1] if dates else None,
        "wall_seconds": sum(walls),
        "noise": noise,
        "rerun_seconds": reruns,
        "rerun_share": reruns / trials if trials else None,
    }


def noise_text(s: dict[str, Any]) -> str:
    """The measured noise and the reruns' share in one line (the caption and the page)."""
    noise = s.get("noise")
    if noise is None:
        return "noise not measured"
    parts = [f"noise sd {fmt(noise.seed_sd, '.6f')} over {plural(len(noise.seeds), 'seed')}"]
    if noise.same_seed:
        parts.append(f"{fmt(noise.same_seed_sd, '.6f')} {noise.same_seed_text()}")
    if s.get("rerun_share") is not None:
        parts.append(f"reruns {100 * s['rerun_share']:.0f}% of trial time")
    return ", ".join(parts)


def rule_text(rec: Record) -> str:
    """What the keep rule found for one record (runs, means, the statistic), or ''."""
    t = rec.get("test")
    if not isinstance(t, dict) or t.get("rule") != "sequential":
        return ""
    runs = r if isinstance(r := t.get("runs"), list) else []
    text = f"{plural(len(runs), 'run')}, mean {fmt(finite(t.get('mean')), '.6f')} vs best " \
           f"{fmt(finite(t.get('best_mean')), '.6f')}"
    if finite(t.get("statistic")) is not None:
        text += (f", t {t['statistic']:.2f} (critical {fmt(finite(t.get('critical')), '.2f')}, "
                 f"p {fmt(finite(t.get('p_value')), '.4f')}, alpha {t.get('alpha')})")
    return text


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def money(usd: float) -> str:
    return f"${usd:.4f}" if 0 < usd < 0.01 else f"${usd:.2f}"


def fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def local_time(stamp: Any) -> datetime | None:
    """An ISO time stamp as an aware datetime in local time (naive ones are taken as local)."""
    if isinstance(stamp, datetime):
        return stamp.astimezone()
    try:
        return datetime.fromisoformat(str(stamp)).astimezone() if stamp else None
    except ValueError:
        return None


def date_text(stamp: Any) -> str:
    when = local_time(stamp)
    return when.strftime("%Y-%m-%d %H:%M") if when else (str(stamp) if stamp else "-")
