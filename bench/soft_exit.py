"""Run a script as __main__ in this process, with its os._exit made an ordinary exit.

    python [-m cProfile -o FILE] bench/soft_exit.py SCRIPT [ARGS]

train.py ends with os._exit(0): an ordinary exit's teardown costs the slot about a second on a
GPU. That skips the atexit handlers and what a profiler writes at the end, so the benchmarks that
report then (cProfile's -o in bench/startup_profile.py, bench/sample_stacks.py) run train.py
through `run`. Only this process's os._exit is changed: a child forked from it (a compile
worker) still ends at once, as it must.
"""

from __future__ import annotations

import os
import runpy
import sys


def run(script: str, argv: list[str]) -> None:
    hard_exit, me = os._exit, os.getpid()

    def soft_exit(code: int) -> None:
        if os.getpid() != me:
            hard_exit(code)
        raise SystemExit(code)

    os._exit = soft_exit  # type: ignore[assignment]
    sys.argv = [script] + argv
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
