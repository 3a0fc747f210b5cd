"""Progress of the offline base-image build: the lines build_offline_base.sh prints become a
bar with phases done of all and time left, and the phase times are kept for the next build."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

from rich.console import Console

from conftest import REPO
from runner.progress import FROM_CACHE, FROM_SCRATCH, PhaseTracker, base_build_progress

SCRIPT = (REPO / "images" / "build_offline_base.sh").read_text()


def script_lines(phases: dict[str, int]) -> list[str]:
    """The lines the script's own `phase` function prints (its printf format, read from it)."""
    fmt = re.search(r"printf '(\[base\] %-10s %4ss)\\n'", SCRIPT)
    assert fmt, "build_offline_base.sh no longer prints phase times as this module reads them"
    assert 'echo "[base] $PHASE ..."' in SCRIPT
    lines = ["[base] autoresearch/base:offline-x: Debian bookworm/amd64 from "
             "http://deb.debian.org/debian, torch==2.13.0 (a line wider than 80 columns)"]
    for name, seconds in phases.items():
        lines += [f"[base] {name} ...", "I: Retrieving Packages", fmt[1] % (name, seconds)]
    return lines + ["[base] autoresearch/base:offline-x built in 85s"]


def test_phases_and_time_left():
    names = sorted(set(re.findall(r'phase "([^"]+)"', SCRIPT)))
    assert set(names) == set(FROM_SCRATCH) | set(FROM_CACHE)   # every phase the script has
    tracker = PhaseTracker({"debootstrap": 40, "cache root": 1, "download wheels": 4,
                            "venv + install.sh": 25, "docker import": 10})
    assert tracker.left() == 80
    lines = script_lines({"debootstrap": 43, "cache root": 0})
    for line in lines[:2]:
        tracker.feed(line)
    assert tracker.describe() == "base image: debootstrap (1/5)"
    time.sleep(0.3)
    assert 79 < tracker.left() < 80
    for line in lines[2:]:
        tracker.feed(line)
    assert tracker.done == {"debootstrap": 43, "cache root": 0}
    assert tracker.left() == 39
    cached = PhaseTracker({})
    cached.feed("[base] unpack cached root ...")
    assert cached.phases == FROM_CACHE and cached.describe().endswith("(1/4)")


def test_bar_in_a_terminal_and_times_kept(tmp_path: Path):
    cache = tmp_path / "phases.json"
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    times = {"debootstrap": 43, "cache root": 0, "download wheels": 3, "venv + install.sh": 26,
             "docker import": 13}
    with base_build_progress(console, cache) as log:
        for line in script_lines(times):
            log(line)
    text = out.getvalue()
    assert "I: Retrieving Packages" in text            # every line is still printed
    assert "phases" in text and "left" in text           # the bar was drawn
    assert json.loads(cache.read_text()) == times        # the next estimate
    again = PhaseTracker(json.loads(cache.read_text()))
    assert again.left() == sum(times.values())
    # No terminal: the lines alone, no bar; an unfinished build keeps no times.
    cache.unlink()
    plain = io.StringIO()
    with base_build_progress(Console(file=plain, force_terminal=False), cache) as log:
        for line in script_lines(times)[:4]:
            log(line)
    assert plain.getvalue().splitlines() == script_lines(times)[:4]
    assert not cache.exists()
