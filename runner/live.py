"""The live terminal view of an overnight run (rich): the experiment in hand, its phase and how
long it has run, time left, the best val_bpb so far and the last few results. Without a
terminal (a log file, CI) it prints one plain line per finished experiment instead.

Descriptions come from the agent (an LLM): they go to rich as `Text`, never as markup, so
``[red]`` or ``[link=...]`` in one is shown as written."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runner.loop import LoopConfig, LoopState
from runner.record import STATUS_STYLE


def fmt_seconds(s: float) -> str:
    s = max(int(s), 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def time_left(cfg: LoopConfig, state: LoopState, mean_wall: float | None) -> str:
    parts = []
    if cfg.until is not None:
        parts.append(f"{fmt_seconds((cfg.until - datetime.now()).total_seconds())} until {cfg.until:%H:%M}")
    if cfg.max_experiments is not None:
        left = max(cfg.max_experiments - state.total, 0)
        eta = f", ~{fmt_seconds(left * mean_wall)}" if mean_wall else ""
        parts.append(f"{left} experiment(s) left{eta}")
    return "; ".join(parts) or "until stopped (Ctrl-C)"


def render(cfg: LoopConfig, state: LoopState) -> Group:
    walls = [w for r in state.recent if (w := r.get("wall_seconds"))]
    mean_wall = sum(walls) / len(walls) if walls else None
    elapsed = time.time() - state.phase_started
    expected = f" of ~{fmt_seconds(cfg.budget + 60)}" if state.phase == "training" else ""
    best = f"{state.best:.6f}" if state.best is not None else "-"
    bar = f" (keep below {state.best - state.threshold:.6f})" if state.best and state.threshold else ""
    bar += f"   {state.noise}" if state.noise else ""
    running = ", ".join(f"#{n}" for n in sorted(state.running)) or "-"
    head = Text.assemble(
        (f"run {cfg.tag}", "bold"), f"   experiment #{state.number}   ",
        (state.phase, "cyan"), f" {fmt_seconds(elapsed)}{expected}   best val_bpb ",
        (best, "bold green"), bar, f"\n{time_left(cfg, state, mean_wall)}   training: {running}"
        f" on {len(cfg.gpus)} slot(s)   agent {cfg.agent}   backend {cfg.executor.backend}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("#", "status", "val_bpb", "delta", "description"):
        table.add_column(col, justify="right" if col in ("#", "val_bpb", "delta") else "left")
    for r in state.recent[-5:]:
        bpb = f"{r['val_bpb']:.6f}" if r.get("val_bpb") is not None else "-"
        delta = f"{r['delta']:+.6f}" if r.get("delta") is not None else ""
        status = r.get("status", "?")
        table.add_row(str(r.get("number")), Text(status, STATUS_STYLE.get(status, "")), bpb, delta,
                      Text(str(r.get("description", ""))[:60]))
    return Group(head, table)


class LiveView:
    """Context manager: `observe(state)` is handed to the loop."""

    def __init__(self, cfg: LoopConfig, console: Console | None = None):
        self.cfg, self.console = cfg, console or Console(stderr=True)
        self.state: LoopState | None = None
        self.live: Live | None = None
        self.printed = 0

    def __enter__(self) -> "LiveView":
        if self.console.is_terminal:
            self.live = Live(get_renderable=self._renderable, console=self.console,
                             refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _renderable(self):
        return render(self.cfg, self.state) if self.state else Text("starting ...")

    def observe(self, state: LoopState) -> None:
        self.state = state
        if self.live is None and state.done > self.printed:       # plain output
            for r in state.recent[-(state.done - self.printed):]:
                bpb = f"{r['val_bpb']:.6f}" if r.get("val_bpb") is not None else "-"
                self.console.print(Text(f"#{r.get('number')} {r.get('status')} val_bpb {bpb} "
                                        f"{str(r.get('description', ''))[:80]}"))
            self.printed = state.done
