"""Reports on a run, for people: a terminal table (`autoresearch status`), a progress plot and a
self-contained HTML page (`autoresearch report`).

Everything here reads the run; nothing writes to its ledger or its git branch. The ledger is
read without `Ledger.open` (which repairs a torn last line in place) so that `status` is safe
while the loop is appending. Descriptions, reasons and log tails come from an LLM and from
candidate output: they are untrusted text, shown as plain text in the terminal (never as rich
markup) and escaped with `html.escape` in the page, which carries no script at all.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text

from runner.paths import REPO_ROOT
from runner.repo import RunRepo

FAILED = ("crash", "timeout", "oom", "invalid")
STATUS_STYLE = {"keep": "bold green", "discard": "dim", **{s: "bold red" for s in FAILED}}
MAX_ANNOTATIONS = 10
PLOT_SIZE = (11.0, 5.6)          # inches
PLOT_DPI = 110

Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------

def load_records(run_dir: Path) -> list[Record]:
    """The run's records, read-only: a torn last line (a write in progress) is left out, not
    repaired; a line that is not a JSON object is skipped."""
    path = Path(run_dir) / "experiments.jsonl"
    if not path.is_file():
        return []
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    records = []
    for line in whole.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def latest_tag(runs_dir: Path) -> str | None:
    """The run whose experiments.jsonl changed last, or None when there is none."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    found = [(p.stat().st_mtime, p.parent.name) for p in runs_dir.glob("*/experiments.jsonl")
             if p.is_file()]
    return max(found)[1] if found else None


def resolve_run(runs_dir: Path, tag: str | None = None) -> Path:
    """The folder of run `tag`, or of the run that changed last when `tag` is None. Raises
    LookupError with a message for people when there is no such run."""
    runs_dir = Path(runs_dir)
    if tag is None:
        tag = latest_tag(runs_dir)
        if tag is None:
            raise LookupError(f"no runs in {runs_dir}: start one with `autoresearch overnight`")
    run_dir = runs_dir / tag
    if not (run_dir / "experiments.jsonl").is_file():
        known = sorted(p.parent.name for p in runs_dir.glob("*/experiments.jsonl"))
        raise LookupError(f"no run {tag!r} in {runs_dir}"
                          + (f" (runs: {', '.join(known)})" if known else ""))
    return run_dir


def _num(value: Any) -> float | None:
    """A finite number, else None (a hand-edited or odd ledger must not break a report)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _number(rec: Record) -> int | None:
    n = rec.get("number")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _ordered(records: Iterable[Record]) -> list[Record]:
    """By experiment number (stable; records without a number last)."""
    return sorted(records, key=lambda r: (_number(r) is None, _number(r) or 0))


def _bpb(rec: Record) -> float | None:
    return _num(rec.get("val_bpb"))


def _status(rec: Record) -> str:
    return str(rec.get("status") or "?")


def _is_kept(rec: Record) -> bool:
    return _status(rec) == "keep" and _bpb(rec) is not None


def _one_line(text: Any, width: int | None = None) -> str:
    s = " ".join(str(text or "").split())
    if width is not None and len(s) > width:
        s = s[: max(width - 1, 1)].rstrip() + "…"
    return s


def wall_seconds(rec: Record) -> float | None:
    """Wall time of the whole experiment: the trial (build, train, score, ...) plus proposing."""
    phases = rec.get("phases") if isinstance(rec.get("phases"), dict) else {}
    propose = _num(phases.get("propose")) or 0.0
    wall = _num(rec.get("wall_seconds"))
    if wall is not None:
        return wall + propose
    # No trial ran (an invalid proposal): add the top-level phases (*_inside are nested).
    parts = [_num(v) for k, v in phases.items() if not str(k).endswith("_inside")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def annotate(records: list[Record]) -> list[tuple[Record, float | None]]:
    """(record, best kept val_bpb before it), in experiment order."""
    out, best = [], None
    for rec in _ordered(records):
        out.append((rec, best))
        if _is_kept(rec):
            bpb = _bpb(rec)
            best = bpb if best is None else min(best, bpb)
    return out


def summary(records: list[Record]) -> dict[str, Any]:
    """Counts, baseline, best and cost: what the caption and the page header say."""
    ordered = _ordered(records)
    kept = [r for r in ordered if _is_kept(r)]
    baseline = next((r for r in kept if _number(r) == 0), kept[0] if kept else None)
    best = min(kept, key=lambda r: (_bpb(r), -(_number(r) or 0))) if kept else None
    counts: dict[str, int] = {}
    for r in ordered:
        counts[_status(r)] = counts.get(_status(r), 0) + 1
    llm = [r.get("llm") if isinstance(r.get("llm"), dict) else {} for r in ordered]
    dates = sorted(d for d in (_when(r.get("started_at")) for r in ordered) if d is not None)
    walls = [w for w in (wall_seconds(r) for r in ordered) if w is not None]
    base_bpb = _bpb(baseline) if baseline else None
    best_bpb = _bpb(best) if best else None
    return {
        "experiments": len(ordered),
        "kept": len(kept),
        "kept_changes": sum(1 for r in kept if r is not baseline),
        "discarded": counts.get("discard", 0),
        "failed": sum(counts.get(s, 0) for s in FAILED),
        "counts": counts,
        "baseline": baseline,
        "baseline_bpb": base_bpb,
        "best": best,
        "best_bpb": best_bpb,
        "improvement": (base_bpb - best_bpb) if base_bpb is not None and best_bpb is not None else None,
        "cost_usd": sum(_num(x.get("cost_usd")) or 0.0 for x in llm),
        "tokens": sum(int(_num(x.get("prompt_tokens")) or 0) + int(_num(x.get("completion_tokens")) or 0)
                      for x in llm),
        "models": sorted({str(x["model"]) for x in llm if x.get("model")}),
        "first": dates[0] if dates else None,
        "last": dates[-1] if dates else None,
        "wall_seconds": sum(walls),
    }


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _money(usd: float) -> str:
    return f"${usd:.4f}" if 0 < usd < 0.01 else f"${usd:.2f}"


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _when(stamp: Any) -> datetime | None:
    """An ISO time stamp as an aware datetime in local time (naive ones are taken as local)."""
    if isinstance(stamp, datetime):
        return stamp.astimezone()
    try:
        return datetime.fromisoformat(str(stamp)).astimezone() if stamp else None
    except ValueError:
        return None


def _date(stamp: Any) -> str:
    when = _when(stamp)
    return when.strftime("%Y-%m-%d %H:%M") if when else (str(stamp) if stamp else "-")


# ---------------------------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------------------------

def status_table(records: list[Record], tag: str, description_width: int = 60) -> Table:
    """One row per experiment, with a caption that sums the run up. Every string from the
    ledger goes in as `Text`, so markup in a description is shown, never interpreted.
    `description_width` (description and, for failures, reason) keeps rows on one line: pass
    `console.width - 70` for a terminal; a narrower terminal wraps the description."""
    table = Table(title=Text(f"autoresearch run {tag}", style="bold"), title_justify="left",
                  caption_justify="left", header_style="bold")
    # The numbers keep their width on a narrow terminal; the description gives way.
    numbers = max((len(str(_number(r))) for r in records), default=1)
    table.add_column("#", justify="right", no_wrap=True, min_width=max(numbers, 1))
    table.add_column("status", no_wrap=True, min_width=7)
    table.add_column("val_bpb", justify="right", no_wrap=True, min_width=8)
    table.add_column("Δ best", justify="right", no_wrap=True, min_width=9)
    table.add_column("mem GB", justify="right", no_wrap=True, min_width=6)
    table.add_column("train s", justify="right", no_wrap=True, min_width=7)
    table.add_column("wall s", justify="right", no_wrap=True, min_width=6)
    table.add_column("description", overflow="fold", min_width=8, max_width=description_width)
    for rec, best_before in annotate(records):
        status = _status(rec)
        bpb = _bpb(rec)
        if bpb is not None and best_before is not None:
            d = bpb - best_before
            delta = Text(f"{d:+.6f}", style="green" if status == "keep" else ("red" if d > 0 else ""))
        elif status == "keep" and bpb is not None:
            delta = Text("baseline", style="dim")
        else:
            delta = Text("-", style="dim")
        reason = _one_line(rec.get("reason")) if status in FAILED else ""
        text = _one_line(rec.get("description")) or "-"
        if reason:                       # the description, then as much of the reason as fits
            text = _one_line(text, max(description_width // 2, description_width - len(reason) - 2))
        desc = Text(_one_line(text, description_width))
        room = description_width - len(desc.plain) - 2
        if reason and room >= 8:
            desc.append("  " + _one_line(reason, room), style="red dim")
        n = _number(rec)
        table.add_row(
            Text("?" if n is None else str(n)),
            Text(status, style=STATUS_STYLE.get(status, "yellow")),
            Text(_fmt(bpb, ".6f"), style="bold green" if status == "keep" else ""),
            delta,
            Text(_fmt(_num(rec.get("memory_gb")), ".1f")),
            Text(_fmt(_num(rec.get("training_seconds")), ".0f")),
            Text(_fmt(wall_seconds(rec), ".0f")),
            desc,
            style="dim" if status == "discard" else None,
        )
    table.caption = caption(records)
    return table


def caption(records: list[Record]) -> Text:
    s = summary(records)
    text = Text(f"{_count(s['experiments'], 'experiment')} · ")
    text.append(f"{s['kept']} kept", style="green")
    text.append(f" · {s['discarded']} discarded · ")
    text.append(f"{s['failed']} failed", style="red" if s["failed"] else "")
    if s["best"] is not None:
        text.append(" · best ")
        text.append(f"{s['best_bpb']:.6f}", style="bold green")
        text.append(f" (#{_number(s['best'])})")
        if s["improvement"]:
            text.append(f", {-s['improvement']:+.6f} vs baseline")
    else:
        text.append(" · no scored experiment yet")
    text.append(f" · LLM cost {_money(s['cost_usd'])}")
    return text


# ---------------------------------------------------------------------------------------------
# Progress plot
# ---------------------------------------------------------------------------------------------

def progress_png(records: list[Record], path: Path, tag: str | None = None) -> Path:
    """Plot val_bpb by experiment (kept, discarded, failed, the running best and the baseline)
    into a PNG at `path`; returns `path`."""
    path = Path(path)
    path.write_bytes(render_png(records, tag))
    return path


def render_png(records: list[Record], tag: str | None = None) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ordered = _ordered(records)
    if tag is None:
        tag = next((str(r["run"]) for r in ordered if r.get("run")), "run")
    s = summary(ordered)
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.suptitle(f"autoresearch · {tag}", fontsize=14, fontweight="bold", x=0.01, ha="left")
    ax.set_xlabel("experiment #")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    numbered = [(r, _number(r)) for r in ordered]
    numbered = [(r, n) for r, n in numbered if n is not None]
    scored = [(r, n) for r, n in numbered if _bpb(r) is not None]
    failed = [(r, n) for r, n in numbered if _bpb(r) is None]
    if not scored:
        ax.set_title(f"{_count(s['experiments'], 'experiment')}, none scored", fontsize=10, loc="left",
                     color="#555555")
        msg = "no scored experiment yet"
        if failed:
            msg += f"\n{len(failed)} failed: " + ", ".join(
                f"{k} {v}" for k, v in sorted(s["counts"].items()) if k in FAILED)
        ax.text(0.5, 0.5, msg, transform=ax.transAxes, ha="center", va="center", fontsize=13,
                color="#6b7280")
        ax.set_yticks([])
        if numbered:
            first, last = min(n for _, n in numbered), max(n for _, n in numbered)
            ax.set_xlim(first - 0.5, last + 0.5)
            if last - first <= 20:
                ax.set_xticks(range(first, last + 1))
        else:
            ax.set_xticks([])
        return _png_bytes(fig)

    kept = [(r, n) for r, n in scored if _is_kept(r)]
    others = [(r, n) for r, n in scored if not _is_kept(r)]
    base, best = s["baseline_bpb"], s["best_bpb"]
    values = [_bpb(r) for r, _ in scored]
    ref_hi = base if base is not None else sorted(values)[len(values) // 2]
    ref_lo = best if best is not None else min(values)
    span = max(ref_hi - ref_lo, 0.0)
    pad = max(span * 0.12, abs(ref_hi) * 0.004, 1e-3)
    lo = min(min(values), ref_lo) - pad * 1.6        # room for the labels under kept points
    # Far-off results (a diverged run) would flatten the interesting part: clip them.
    hi = max(ref_hi + max(span * 0.6, pad * 2), max(_bpb(r) for r, _ in kept) + pad if kept else ref_hi)
    hi = min(hi, max(values) + pad)
    hi = max(hi, ref_hi + pad)
    xs_all = [n for _, n in numbered]
    x_lo, x_hi = min(xs_all) - 0.6, max(xs_all) + 0.6
    ax.set_xlim(x_lo, x_hi)
    if max(xs_all) - min(xs_all) <= 20:
        ax.set_xticks(range(min(xs_all), max(xs_all) + 1))
    ax.set_ylim(lo, hi)
    many = len(numbered) > 150
    trans = ax.get_xaxis_transform()           # x in data, y in axes fraction

    inside = [(r, n) for r, n in others if _bpb(r) <= hi]
    above = [(r, n) for r, n in others if _bpb(r) > hi]
    if inside:
        ax.scatter([n for _, n in inside], [_bpb(r) for r, _ in inside], s=10 if many else 18,
                   color="#9ca3af", alpha=0.75, linewidths=0, zorder=2,
                   label=f"discarded ({len(others)})")
    if above:
        ax.scatter([n for _, n in above], [0.985] * len(above), transform=trans, marker="^",
                   s=18, color="#9ca3af", zorder=2, clip_on=False,
                   label=f"off the scale ({len(above)})")
    if failed:
        ax.scatter([n for _, n in failed], [0.015] * len(failed), transform=trans, marker="x",
                   s=14, color="#dc2626", linewidths=1.0, zorder=2, clip_on=False,
                   label=f"failed ({len(failed)})")

    if kept:
        # the running best: a step line from the first keep to the last experiment
        steps_x, steps_y = [], []
        for r, n in kept:
            if steps_y and _bpb(r) >= steps_y[-1]:
                continue
            steps_x.append(n)
            steps_y.append(_bpb(r))
        steps_x.append(max(xs_all) + 0.5)
        steps_y.append(steps_y[-1])
        ax.step(steps_x, steps_y, where="post", color="#16a34a", linewidth=1.8, alpha=0.9,
                zorder=3, label="running best")
        size = 30 if len(kept) > 40 else (46 if many else 64)
        ax.scatter([n for _, n in kept], [_bpb(r) for r, _ in kept], s=size, color="#22c55e",
                   edgecolors="#14532d", linewidths=1.0, zorder=4, label=f"kept ({len(kept)})")
    if base is not None:
        ax.axhline(base, color="#6b7280", linestyle="--", linewidth=1.0, zorder=1,
                   label=f"baseline {base:.4f}")

    sub = (f"{_count(s['experiments'], 'experiment')} · {s['kept']} kept · "
           f"{s['discarded']} discarded · {s['failed']} failed")
    if best is not None and base is not None:
        sub += f" · best {best:.6f} (#{_number(s['best'])})"
        if s["improvement"]:
            sub += f", {-s['improvement']:+.6f} ({-100 * s['improvement'] / base:+.2f}%) vs baseline"
    ax.set_title(sub, fontsize=9.5, loc="left", color="#4b5563")
    legend = ax.legend(loc="upper right", fontsize=8.5, frameon=True, framealpha=0.9,
                       edgecolor="#e5e7eb")
    _annotate_gains(ax, kept, s["baseline"], legend)
    return _png_bytes(fig)


def _annotate_gains(ax: Any, kept: list[tuple[Record, int]], baseline: Record | None,
                    legend: Any = None) -> None:
    """Label the kept points with the biggest gains: at most MAX_ANNOTATIONS, biggest first,
    each where it overlaps no other label, kept marker or the legend (else left out)."""
    gains, prev = [], None
    for r, n in kept:
        bpb = _bpb(r)
        if prev is not None and r is not baseline and bpb < prev:
            gains.append((prev - bpb, n, r))
        prev = bpb if prev is None else min(prev, bpb)
    if not gains:
        return
    from matplotlib.text import Text as MplText

    fig = ax.figure
    fig.canvas.draw()                              # settle the layout: extents are final now
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    marks = ax.transData.transform([(n, _bpb(r)) for r, n in kept])
    x_lo, x_hi = ax.get_xlim()
    placed = 0
    for _, n, r in sorted(gains, key=lambda g: -g[0]):
        if placed >= MAX_ANNOTATIONS:
            break
        label = f"#{n} {_one_line(r.get('description'), 32)}"
        # Below and to the left of a kept point nothing is plotted (everything before it was at
        # or above the best of its time), so labels go there first; then to the right.
        left_first = (n - x_lo) / (x_hi - x_lo) > 0.2
        for left in (left_first, not left_first):
            done = False
            for dy in (-8, -22, -36, 8):
                ann = ax.annotate(
                    label, (n, _bpb(r)), xytext=(-7 if left else 7, dy), textcoords="offset points",
                    fontsize=7.5, color="#14532d", ha="right" if left else "left",
                    va="top" if dy < 0 else "bottom", zorder=5, annotation_clip=True,
                    arrowprops={"arrowstyle": "-", "color": "#4ade80", "lw": 0.7,
                                "shrinkA": 0, "shrinkB": 4},
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#bbf7d0", "lw": 0.6,
                          "alpha": 0.9})
                ann.set_in_layout(False)
                ann.update_positions(renderer)
                box = MplText.get_window_extent(ann, renderer).padded(4)
                inside = (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 + 10 <= box.y0
                          and box.y1 <= frame.y1)
                clear = (not any(box.overlaps(t) for t in taken)
                         and not any(box.x0 - 5 <= x <= box.x1 + 5 and box.y0 - 5 <= y <= box.y1 + 5
                                     for x, y in marks))
                if inside and clear:
                    taken.append(box)
                    placed += 1
                    done = True
                    break
                ann.remove()
            if done:
                break


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------------------------

CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; --soft:#f9fafb;
        --green:#15803d; --greenbg:#dcfce7; --red:#b91c1c; --redbg:#fee2e2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 14px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue",
       Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 12px; }
.sub { color: var(--muted); margin-bottom: 18px; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 2px; }
.card .v.good { color: var(--green); }
.card .n { color: var(--muted); font-size: 12px; }
figure { margin: 18px 0 0; background: var(--bg); border: 1px solid var(--line); border-radius: 10px;
         padding: 10px; }
figure img { width: 100%; height: auto; display: block; }
.tablewrap { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; text-align: left; }
th { position: sticky; top: 0; background: #f3f4f6; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.discard td { color: var(--muted); }
tr.keep td { background: #f0fdf4; }
tr.failed td { background: #fef2f2; }
td.desc { min-width: 260px; max-width: 520px; overflow-wrap: anywhere; }
.reason { color: var(--red); font-size: 12px; margin-top: 2px; overflow-wrap: anywhere; }
.decision { color: var(--muted); font-size: 12px; margin-top: 2px; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; }
.pill.keep { background: var(--greenbg); color: var(--green); }
.pill.discard { background: #f3f4f6; color: var(--muted); }
.pill.failed, .pill.other { background: var(--redbg); color: var(--red); }
.better { color: var(--green); } .worse { color: var(--red); }
details { margin-top: 4px; } summary { cursor: pointer; color: var(--muted); font-size: 12px; }
details pre { max-height: 320px; overflow: auto; background: #111827; color: #e5e7eb; padding: 8px;
              border-radius: 6px; font-size: 11.5px; white-space: pre-wrap; overflow-wrap: anywhere; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.change { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; margin: 0 0 16px;
          overflow: hidden; }
.change h3 { font-size: 14px; margin: 0; padding: 10px 14px; background: #f3f4f6;
             border-bottom: 1px solid var(--line); font-weight: 600; }
.change h3 .meta { color: var(--muted); font-weight: 400; margin-left: 8px; }
pre.diff { margin: 0; padding: 8px 0; overflow-x: auto; font-size: 12.5px; line-height: 1.4; }
pre.diff span { display: block; padding: 0 14px; white-space: pre; }
pre.diff .add { background: #e6ffec; color: #116329; }
pre.diff .del { background: #ffebe9; color: #82071e; }
pre.diff .hunk { background: #ddf4ff; color: #0550ae; }
pre.diff .meta { color: var(--muted); }
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status_class(status: str) -> str:
    if status in ("keep", "discard"):
        return status
    return "failed" if status in FAILED else "other"


def diff_html(diff: str) -> str:
    """A unified diff as escaped, coloured lines."""
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---", "diff ", "index ", "new file", "deleted file")):
            cls = "meta"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        else:
            cls = "ctx"
        out.append(f'<span class="{cls}">{_e(line) or " "}</span>')
    return '<pre class="diff">' + "".join(out) + "</pre>"


def _table_html(records: list[Record], diffs: dict[int, str]) -> str:
    head = ("<tr><th class=num>#</th><th>status</th><th class=num>val_bpb</th>"
            "<th class=num>Δ best</th><th class=num>mem GB</th><th class=num>train s</th>"
            "<th class=num>wall s</th><th>started</th><th>commit</th><th>description</th></tr>")
    rows = []
    for rec, best_before in annotate(records):
        status = _status(rec)
        cls = _status_class(status)
        n = _number(rec)
        bpb = _bpb(rec)
        if bpb is not None and best_before is not None:
            d = bpb - best_before
            delta = f'<span class="{"better" if d < 0 else "worse"}">{d:+.6f}</span>'
        elif status == "keep" and bpb is not None:
            delta = '<span class="decision">baseline</span>'
        else:
            delta = "-"
        number = "?" if n is None else str(n)
        if n is not None and n in diffs:
            number = f'<a href="#diff-{n}">{n}</a>'
        commit = _e(str(rec.get("commit") or "-")[:7])
        desc = f"<div>{_e(rec.get('description') or '-')}</div>"
        if rec.get("reason"):
            desc += f'<div class="reason">{_e(_one_line(rec.get("reason"), 600))}</div>'
        tail = rec.get("log_tail")
        if status in FAILED and tail:
            lines = str(tail).splitlines()[-60:]
            desc += ("<details><summary>log tail (candidate output, untrusted)</summary>"
                     f"<pre>{_e(chr(10).join(lines))}</pre></details>")
        anchor = f' id="exp-{n}"' if n is not None else ""
        rows.append(
            f'<tr class="{cls}"{anchor}>'
            f"<td class=num>{number}</td>"
            f'<td><span class="pill {cls}">{_e(status)}</span></td>'
            f"<td class=num>{_fmt(bpb, '.6f')}</td><td class=num>{delta}</td>"
            f"<td class=num>{_fmt(_num(rec.get('memory_gb')), '.1f')}</td>"
            f"<td class=num>{_fmt(_num(rec.get('training_seconds')), '.0f')}</td>"
            f"<td class=num>{_fmt(wall_seconds(rec), '.0f')}</td>"
            f"<td class=mono>{_e(_date(rec.get('started_at')))}</td>"
            f"<td class=mono>{commit}</td><td class=desc>{desc}</td></tr>")
    return (f'<div class="tablewrap"><table><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _changes_html(records: list[Record], diffs: dict[int, str], have_repo: bool) -> str:
    parts = []
    for rec, best_before in annotate(records):
        n = _number(rec)
        if not _is_kept(rec) or n is None or best_before is None:     # the baseline
            continue
        bpb = _bpb(rec)
        meta = f"val_bpb {bpb:.6f}"
        if best_before is not None:
            meta += f" ({bpb - best_before:+.6f})"
        if rec.get("commit"):
            meta += f" · {str(rec['commit'])[:7]}"
        body = diff_html(diffs[n]) if diffs.get(n) else (
            '<p class="empty" style="padding:0 14px">no diff available'
            + ("" if have_repo else " (the run's git repository was not found)") + "</p>")
        parts.append(f'<section class="change" id="diff-{n}"><h3>#{n} {_e(rec.get("description") or "")}'
                     f'<span class="meta">{_e(meta)}</span></h3>{body}</section>')
    if not parts:
        return '<p class="empty">no kept change yet</p>'
    return "".join(parts)


def report_html(records: list[Record], tag: str, diffs: dict[int, str], path: Path,
                png: bytes | None = None, have_repo: bool = True) -> Path:
    """Write a self-contained HTML report (inline CSS, the plot as a data: URI, no script) to
    `path`; returns `path`. `png` reuses an already rendered plot."""
    path = Path(path)
    s = summary(records)
    png = png if png is not None else render_png(records, tag)
    img = base64.b64encode(png).decode("ascii")

    def card(key: str, value: str, note: str = "", good: bool = False) -> str:
        return (f'<div class="card"><div class="k">{_e(key)}</div>'
                f'<div class="v{" good" if good else ""}">{_e(value)}</div>'
                f'<div class="n">{_e(note)}</div></div>')

    failed_note = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items()) if k in FAILED)
    cards = [card("experiments", str(s["experiments"]),
                  f"{_duration(s['wall_seconds'])} of wall time" if s["wall_seconds"] else ""),
             card("kept", str(s["kept"]), f"{s['kept_changes']} changes + baseline"
                  if s["baseline"] is not None else "", good=s["kept"] > 0),
             card("discarded", str(s["discarded"])),
             card("failed", str(s["failed"]), failed_note)]
    if s["best"] is not None:
        cards.append(card("best val_bpb", f"{s['best_bpb']:.6f}", f"experiment #{_number(s['best'])}",
                          good=True))
        if s["baseline_bpb"] is not None:
            imp = s["improvement"] or 0.0
            pct = 100 * imp / s["baseline_bpb"] if s["baseline_bpb"] else 0.0
            cards.append(card("improvement", f"{-imp:+.6f}",
                              f"{-pct:+.2f}% vs baseline {s['baseline_bpb']:.6f}", good=imp > 0))
    else:
        cards.append(card("best val_bpb", "-", "no scored experiment yet"))
    cards.append(card("LLM cost", _money(s["cost_usd"]),
                      (f"{s['tokens']:,} tokens · " if s["tokens"] else "") + ", ".join(s["models"])))
    dates = f"{_date(s['first'])} → {_date(s['last'])}" if s["first"] else "no experiment yet"
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoresearch · {_e(tag)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>autoresearch run <span class="mono">{_e(tag)}</span></h1>
<div class="sub">{_e(dates)}</div>
<div class="cards">{"".join(cards)}</div>
<figure><img alt="val_bpb by experiment" src="data:image/png;base64,{img}"></figure>
<h2>Experiments</h2>
{_table_html(records, diffs)}
<h2>Kept changes</h2>
<p class="sub">Each kept experiment's change to <code>target/train.py</code>, against its parent.</p>
{_changes_html(records, diffs, have_repo)}
<footer>Generated {_e(generated)} by <code>autoresearch report</code>. Descriptions, reasons and
log tails are untrusted text (from the agent and from candidate output), shown escaped.</footer>
</main></body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Both files for a run
# ---------------------------------------------------------------------------------------------

def collect_diffs(records: list[Record], run_repo: RunRepo | Any | None) -> dict[int, str]:
    """number -> the unified diff of target/train.py from its parent, for every kept change.
    A missing repository or commit leaves the entry out."""
    diffs: dict[int, str] = {}
    if run_repo is None:
        return diffs
    for rec in records:
        n = _number(rec)
        if not _is_kept(rec) or n is None or n <= 0 or not rec.get("commit") or not rec.get("parent"):
            continue
        try:
            diffs[n] = run_repo.diff(str(rec["parent"]), str(rec["commit"]))
        except Exception:                       # noqa: BLE001 - gone commit, no repo: skip it
            continue
    return diffs


def run_repo_for(tag: str, runs_dir: Path, root: Path = REPO_ROOT) -> RunRepo | None:
    """The run's repository for reading diffs, without creating its branch or worktree (as
    `open_run` would); None when `root` is not a git repository."""
    import git

    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    return RunRepo(repo=repo, tag=tag, branch=f"autoresearch/{tag}",
                   worktree=Path(runs_dir) / tag / "worktree")


def write_report(run_dir: Path, run_repo: RunRepo | Any | None,
                 out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write progress.png and report.html for the run in `run_dir` (into `out_dir`, default
    `run_dir`); returns (png, html)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(run_dir)
    tag = next((str(r["run"]) for r in records if r.get("run")), run_dir.name)
    diffs = collect_diffs(records, run_repo)
    png = render_png(records, tag)
    png_path = out / "progress.png"
    png_path.write_bytes(png)
    html_path = report_html(records, tag, diffs, out / "report.html", png=png,
                            have_repo=run_repo is not None)
    return png_path, html_path


__all__ = ["FAILED", "caption", "collect_diffs", "latest_tag", "load_records",
           "progress_png", "render_png", "report_html", "resolve_run", "run_repo_for", "status_table",
           "summary", "write_report"]
