"""The live view shows descriptions (an LLM's text) as written: rich markup in one is text."""

from __future__ import annotations

import io

from rich.console import Console

from runner.live import LiveView, render
from runner.loop import LoopConfig, LoopState

DESCRIPTION = "[bold red]KEPT[/] [link=http://x.invalid]go[/link] :warning:"


def state() -> LoopState:
    rec = {"number": 3, "status": "discard", "val_bpb": 2.0, "delta": 0.1,
           "description": DESCRIPTION}
    return LoopState(tag="t", number=3, recent=[rec], done=1, total=1)


def test_plain_lines_show_markup_as_text():
    out = io.StringIO()
    view = LiveView(LoopConfig(tag="t"), console=Console(file=out, force_terminal=False, width=200))
    with view:
        view.observe(state())
    assert DESCRIPTION in out.getvalue()


def test_the_live_table_shows_markup_as_text():
    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    console.print(render(LoopConfig(tag="t"), state()))
    text = console.export_text()
    assert DESCRIPTION in text
    assert "<a " not in console.export_html()                  # no link was made


def test_the_header_shows_the_measured_noise():
    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    s = state()
    s.best, s.noise = 1.5, "noise sd 0.010000 (3 seeds)"
    console.print(render(LoopConfig(tag="t"), s))
    assert "best val_bpb 1.500000   noise sd 0.010000 (3 seeds)" in console.export_text()
