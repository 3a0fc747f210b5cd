"""Progress on long work (rich): what step of how many, time spent, time left.

`base_build_progress` follows the offline base-image build (`images/build_offline_base.sh`),
whose phases print `[base] NAME ...` when they start and `[base] NAME   Ns` when they end. The
time left comes from how long each phase took the last time it ran on this machine (kept in
the download cache, `base-build-phases.json`), or from typical times on a first build. Every
line of the build is still printed, above the bar. Without a terminal (a log file, CI) there is
no bar: the lines alone, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

# Typical seconds per phase (a 2-core machine, a nearby Debian mirror): the first estimate.
TYPICAL_PHASES = {"unpack cached root": 10.0, "debootstrap": 45.0, "cache root": 2.0,
                  "download wheels": 10.0, "venv + install.sh": 30.0, "docker import": 15.0}
FROM_CACHE = ("unpack cached root", "download wheels", "venv + install.sh", "docker import")
FROM_SCRATCH = ("debootstrap", "cache root", "download wheels", "venv + install.sh", "docker import")
START = re.compile(r"^\[base\] (?P<name>.+?) \.\.\.$")
END = re.compile(r"^\[base\] (?P<name>.+?)\s+(?P<seconds>\d+)s$")


def cache_file() -> Path:
    root = os.environ.get("AUTORESEARCH_CACHE_DIR") or Path.home() / ".cache" / "autoresearch"
    return Path(root).expanduser() / "base-build-phases.json"


class TimeLeftColumn(ProgressColumn):
    """Seconds left: the expected time of the phases not finished, less the current phase's
    time so far (never below zero); '-' once done."""

    def __init__(self, left: Callable[[], float | None]):
        super().__init__()
        self.left = left

    def render(self, task: Task) -> Text:
        left = self.left()
        if left is None or task.finished:
            return Text("-", style="progress.remaining")
        m, s = divmod(int(left + 0.5), 60)
        return Text(f"~{m}:{s:02d} left", style="progress.remaining")


class PhaseTracker:
    """Turns the build's lines into progress: phases done of all, time left."""

    def __init__(self, expected: dict[str, float]):
        self.expected = {**TYPICAL_PHASES, **expected}
        self.phases: tuple[str, ...] = FROM_SCRATCH
        self.done: dict[str, float] = {}
        self.current: str | None = None
        self.started = time.monotonic()

    def feed(self, line: str) -> bool:
        """Read one line; True when it moved the progress."""
        if m := START.match(line):
            name = m["name"]
            if not self.done and self.current is None:
                self.phases = FROM_CACHE if name == "unpack cached root" else FROM_SCRATCH
            self.current, self.started = name, time.monotonic()
            return True
        if (m := END.match(line)) and m["name"] in self.expected:
            self.done[m["name"]] = float(m["seconds"])
            if self.current == m["name"]:
                self.current = None
            return True
        return False

    def left(self) -> float:
        todo = [p for p in self.phases if p not in self.done]
        total = sum(self.expected.get(p, 0.0) for p in todo)
        if self.current in todo:
            total -= min(time.monotonic() - self.started, self.expected.get(self.current, 0.0))
        return max(total, 0.0)

    def describe(self) -> str:
        k = len(self.done) + (1 if self.current else 0)
        return f"base image: {self.current or 'starting'} ({min(k, len(self.phases))}/{len(self.phases)})"


@contextlib.contextmanager
def base_build_progress(console: Console | None = None,
                        cache: Path | None = None) -> Iterator[Callable[[str], None]]:
    """A `log` for `images.ensure_base`: prints each line, and in a terminal shows a bar of the
    build's phases with time left. A finished build's phase times are kept for next time."""
    console = console or Console(stderr=True)
    cache = cache or cache_file()
    try:
        expected = {k: float(v) for k, v in json.loads(cache.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        expected = {}
    tracker = PhaseTracker(expected)
    if not console.is_terminal:
        def feed(line: str) -> None:
            tracker.feed(line)
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        yield feed
    else:
        columns = (TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.0f}/{task.total:.0f} phases"), TimeElapsedColumn(),
                   TimeLeftColumn(tracker.left))
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(tracker.describe(), total=len(tracker.phases))

            def log(line: str) -> None:
                bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
                if tracker.feed(line):
                    bar.update(task, description=tracker.describe(), total=len(tracker.phases),
                               completed=len(tracker.done))
            yield log
    if tracker.done and all(p in tracker.done for p in tracker.phases):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({**expected, **tracker.done}, indent=1) + "\n")
        except OSError:
            pass
