"""The terminal table of a run (`autoresearch status`). Every string from the ledger goes in as
rich `Text`, so markup in a description is shown, never interpreted."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from runner.record import FAILED, STATUS_STYLE, Record
from runner.report.summary import (annotate, cost_of, finite, fmt, gpu_hours, gpus_of,
                                   money, noise_text, number_of, one_line, plural, status_of,
                                   summary, tokens_of, train_seconds, wall_seconds)


def hours(h: float) -> str:
    return f"{h:.3f}" if h < 10 else f"{h:.1f}"


def cost_line(s: dict) -> str:
    """The run's spending and what a kept improvement cost: LLM tokens and money next to
    GPU-hours (train phase seconds x GPUs)."""
    text = (f"LLM {s['tokens']:,} tokens {money(s['cost_usd'])} · GPU {hours(s['gpu_hours'])} h"
            f" (train phases {hours(s['train_hours'])} h)")
    per = s.get("per_kept")
    if per:
        text += (f" · per kept improvement: {money(per['cost_usd'])}, {per['tokens']:,.0f} tokens, "
                 f"{hours(per['gpu_hours'])} GPU h")
    else:
        text += " · no kept improvement yet"
    return text

def status_table(records: list[Record], tag: str, description_width: int = 60) -> Table:
    """One row per experiment, with a caption that sums the run up. Every string from the
    ledger goes in as `Text`, so markup in a description is shown, never interpreted.
    `description_width` (description and, for failures, reason) keeps rows on one line: pass
    `console.width - 92` for a terminal; a narrower terminal wraps the description."""
    table = Table(title=Text(f"autoresearch run {tag}", style="bold"), title_justify="left",
                  caption_justify="left", header_style="bold")
    # The numbers keep their width on a narrow terminal; the description gives way.
    numbers = max((len(str(number_of(r))) for r in records), default=1)
    table.add_column("#", justify="right", no_wrap=True, min_width=max(numbers, 1))
    table.add_column("status", no_wrap=True, min_width=7)
    table.add_column("val_bpb", justify="right", no_wrap=True, min_width=8)
    table.add_column("Δ best", justify="right", no_wrap=True, min_width=9)
    table.add_column("mem GB", justify="right", no_wrap=True, min_width=6)
    table.add_column("train s", justify="right", no_wrap=True, min_width=7)
    table.add_column("wall s", justify="right", no_wrap=True, min_width=6)
    table.add_column("tokens", justify="right", no_wrap=True, min_width=6)
    table.add_column("LLM $", justify="right", no_wrap=True, min_width=5)
    table.add_column("GPU h", justify="right", no_wrap=True, min_width=5)
    table.add_column("description", overflow="fold", min_width=8, max_width=description_width)
    for rec, bpb, best_before in annotate(records):      # bpb: the score decided on
        status = status_of(rec)
        if bpb is not None and best_before is not None:
            d = bpb - best_before
            delta = Text(f"{d:+.6f}", style="green" if status == "keep" else ("red" if d > 0 else ""))
        elif status == "keep" and bpb is not None:
            delta = Text("baseline", style="dim")
        else:
            delta = Text("-", style="dim")
        reason = one_line(rec.get("reason")) if status in FAILED else ""
        text = one_line(rec.get("description")) or "-"
        if isinstance(runs := rec.get("runs"), list) and len(runs) > 1:
            text += (f" [mean of {len(runs)} runs]" if finite(rec.get("mean_bpb")) is not None
                     else f" [{len(runs)} runs]")
        if reason:                       # the description, then as much of the reason as fits
            text = one_line(text, max(description_width // 2, description_width - len(reason) - 2))
        desc = Text(one_line(text, description_width))
        room = description_width - len(desc.plain) - 2
        if reason and room >= 8:
            desc.append("  " + one_line(reason, room), style="red dim")
        n = number_of(rec)
        table.add_row(
            Text("?" if n is None else str(n)),
            Text(status, style=STATUS_STYLE.get(status, "yellow")),
            Text(fmt(bpb, ".6f"), style="bold green" if status == "keep" else ""),
            delta,
            Text(fmt(finite(rec.get("memory_gb")), ".1f")),
            Text(fmt(finite(rec.get("training_seconds")), ".0f")),
            Text(fmt(wall_seconds(rec), ".0f")),
            Text(f"{tokens_of(rec):,}" if tokens_of(rec) else "-"),
            Text(f"{cost_of(rec):.4f}" if cost_of(rec) else "-"),
            Text(hours(gpu_hours(rec)) if gpus_of(rec) else ("cpu" if train_seconds(rec) else "-")),
            desc,
            style="dim" if status == "discard" else None,
        )
    table.caption = caption(records)
    return table


def caption(records: list[Record]) -> Text:
    s = summary(records)
    text = Text(f"{plural(s['experiments'], 'experiment')} · ")
    text.append(f"{s['kept']} kept", style="green")
    text.append(f" · {s['discarded']} discarded · ")
    text.append(f"{s['failed']} failed", style="red" if s["failed"] else "")
    if s["best"] is not None:
        text.append(" · best ")
        text.append(f"{s['best_bpb']:.6f}", style="bold green")
        text.append(f" (#{number_of(s['best'])})")
        if s["improvement"]:
            text.append(f", {-s['improvement']:+.6f} vs baseline")
    else:
        text.append(" · no scored experiment yet")
    text.append(f" · LLM cost {money(s['cost_usd'])}")
    text.append(f"\n{noise_text(s)}")
    text.append("\n" + cost_line(s))
    return text
