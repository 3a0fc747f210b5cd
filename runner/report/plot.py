"""The progress plot of a run: val_bpb by experiment, kept, discarded and failed, the running
best and the baseline (matplotlib's object API on the Agg canvas: no pyplot, no display).

Each experiment is drawn at the score it was decided on (`summary.decided_scores`): a candidate
that was rerun at the mean of its runs, the baseline at the mean over its seeds; the single runs
of a rerun candidate are drawn as small open marks joined to that mean, and the noise runs
(the baseline's other seeds and same-seed reruns) as their own marks, not as discards.
`plot_points` is what is drawn, as numbers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from runner.record import FAILED, Record
from runner.report.summary import (by_number, decided_scores, is_kept, number_of, one_line,
                                   plural, run_scores, summary)

MAX_ANNOTATIONS = 10
PLOT_SIZE = (11.0, 5.6)          # inches
PLOT_DPI = 110


def progress_png(records: list[Record], path: Path, tag: str | None = None) -> Path:
    """Plot val_bpb by experiment (kept, discarded, failed, the running best and the baseline)
    into a PNG at `path`; returns `path`."""
    path = Path(path)
    path.write_bytes(render_png(records, tag))
    return path


def plot_points(records: list[Record]) -> dict[str, list[tuple[int, float]]]:
    """What the plot draws, as (experiment number, val_bpb) pairs: `kept`, `discarded` and
    `noise` at their decided scores (`decided_scores`), `runs` (each run of a candidate run more
    than once), `best` (the running best's steps) and `failed` (numbers only, y 0)."""
    ordered = by_number(records)
    scores = decided_scores(ordered)
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in
                                               ("kept", "discarded", "noise", "runs", "best", "failed")}
    for r in ordered:
        n = number_of(r)
        if n is None:
            continue
        y = scores.get(id(r))
        if y is None:
            out["failed"].append((n, 0.0))
            continue
        kind = ("kept" if is_kept(r) else "noise" if r.get("role") in ("baseline", "noise")
                else "discarded")
        out[kind].append((n, y))
        out["runs"].extend((n, v) for v in run_scores(r))
        if kind == "kept" and (not out["best"] or y < out["best"][-1][1]):
            out["best"].append((n, y))
    return out


def render_png(records: list[Record], tag: str | None = None) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ordered = by_number(records)
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

    numbered = [(r, n) for r in ordered if (n := number_of(r)) is not None]
    pts = plot_points(ordered)
    scores = decided_scores(ordered)
    failed = pts["failed"]
    if not (pts["kept"] or pts["discarded"] or pts["noise"]):
        ax.set_title(f"{plural(s['experiments'], 'experiment')}, none scored", fontsize=10, loc="left",
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

    kept = [(r, n) for r, n in numbered if is_kept(r)]
    base, best = s["baseline_bpb"], s["best_bpb"]
    values = [y for k in ("kept", "discarded", "noise") for _, y in pts[k]]
    ref_hi = base if base is not None else sorted(values)[len(values) // 2]
    ref_lo = best if best is not None else min(values)
    span = max(ref_hi - ref_lo, 0.0)
    pad = max(span * 0.12, abs(ref_hi) * 0.004, 1e-3)
    lo = min(min(values + [y for _, y in pts["runs"]]), ref_lo) - pad * 1.6   # room for labels
    # Far-off results (a diverged run) would flatten the interesting part: clip them.
    hi = max(ref_hi + max(span * 0.6, pad * 2), max(y for _, y in pts["kept"]) + pad if kept else ref_hi)
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

    others = pts["discarded"] + pts["noise"]
    inside = [(n, y) for n, y in pts["discarded"] if y <= hi]
    above = [(n, y) for n, y in others if y > hi]
    if pts["runs"]:
        # a rerun candidate's single runs, joined to the mean it was decided on
        for n in dict.fromkeys(n for n, _ in pts["runs"]):
            ys = [y for m, y in pts["runs"] if m == n]
            ax.vlines(n, min(ys), max(ys), color="#a5b4fc", linewidth=0.9, zorder=1.5)
        ax.scatter([n for n, _ in pts["runs"]], [min(y, hi) for _, y in pts["runs"]], s=14,
                   facecolors="none", edgecolors="#6366f1", linewidths=0.8, zorder=2.5,
                   label=f"runs of rerun candidates ({len(pts['runs'])})")
    if inside:
        ax.scatter([n for n, _ in inside], [y for _, y in inside], s=10 if many else 18,
                   color="#9ca3af", alpha=0.75, linewidths=0, zorder=2,
                   label=f"discarded ({len(pts['discarded'])})")
    noise_in = [(n, y) for n, y in pts["noise"] if y <= hi]
    if noise_in:
        ax.scatter([n for n, _ in noise_in], [y for _, y in noise_in], s=16, marker="D",
                   facecolors="none", edgecolors="#6b7280", linewidths=0.8, zorder=2,
                   label=f"noise runs ({len(pts['noise'])})")
    if above:
        ax.scatter([n for n, _ in above], [0.985] * len(above), transform=trans, marker="^",
                   s=18, color="#9ca3af", zorder=2, clip_on=False,
                   label=f"off the scale ({len(above)})")
    if failed:
        ax.scatter([n for n, _ in failed], [0.015] * len(failed), transform=trans, marker="x",
                   s=14, color="#dc2626", linewidths=1.0, zorder=2, clip_on=False,
                   label=f"failed ({len(failed)})")

    if kept:
        # the running best: a step line from the first keep to the last experiment
        steps_x: list[float] = [n for n, _ in pts["best"]] + [max(xs_all) + 0.5]
        steps_y: list[float] = [y for _, y in pts["best"]] + [pts["best"][-1][1]]
        ax.step(steps_x, steps_y, where="post", color="#16a34a", linewidth=1.8, alpha=0.9,
                zorder=3, label="running best (means)")
        size = 30 if len(kept) > 40 else (46 if many else 64)
        ax.scatter([n for n, _ in pts["kept"]], [y for _, y in pts["kept"]], s=size, color="#22c55e",
                   edgecolors="#14532d", linewidths=1.0, zorder=4, label=f"kept ({len(kept)})")
    if base is not None:
        ax.axhline(base, color="#6b7280", linestyle="--", linewidth=1.0, zorder=1,
                   label=f"baseline {base:.4f}")

    sub = (f"{plural(s['experiments'], 'experiment')} · {s['kept']} kept · "
           f"{s['discarded']} discarded · {s['failed']} failed")
    if best is not None and base is not None:
        sub += f" · best {best:.6f} (#{number_of(s['best'])})"
        if s["improvement"]:
            sub += f", {-s['improvement']:+.6f} ({-100 * s['improvement'] / base:+.2f}%) vs baseline"
    ax.set_title(sub, fontsize=9.5, loc="left", color="#4b5563")
    legend = ax.legend(loc="upper right", fontsize=8.5, frameon=True, framealpha=0.9,
                       edgecolor="#e5e7eb")
    _annotate_gains(ax, kept, s["baseline"], legend, scores)
    return _png_bytes(fig)


def _annotate_gains(ax: Any, kept: list[tuple[Record, int]], baseline: Record | None,
                    legend: Any = None, scores: dict[int, float] | None = None) -> None:
    """Label the kept points with the biggest gains: at most MAX_ANNOTATIONS, biggest first,
    each where it overlaps no other label, kept marker or the legend (else left out)."""
    scores = scores if scores is not None else decided_scores([r for r, _ in kept])

    def scored_bpb(r: Record) -> float:
        return scores[id(r)]

    gains, prev = [], None
    for r, n in kept:
        bpb = scored_bpb(r)
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
    marks = ax.transData.transform([(n, scored_bpb(r)) for r, n in kept])
    x_lo, x_hi = ax.get_xlim()
    placed = 0
    for _, n, r in sorted(gains, key=lambda g: -g[0]):
        if placed >= MAX_ANNOTATIONS:
            break
        label = f"#{n} {one_line(r.get('description'), 32)}"
        # Below and to the left of a kept point nothing is plotted (everything before it was at
        # or above the best of its time), so labels go there first; then to the right.
        left_first = (n - x_lo) / (x_hi - x_lo) > 0.2
        for left in (left_first, not left_first):
            done = False
            for dy in (-8, -22, -36, 8):
                ann = ax.annotate(
                    label, (n, scored_bpb(r)), xytext=(-7 if left else 7, dy), textcoords="offset points",
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
