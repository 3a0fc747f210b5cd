"""Where a train.py run's start-up goes, by sampling its main thread's stack (issue 11).

    python bench/sample_stacks.py [--every-ms 2] [--top 25] target/train.py

Runs the script as __main__ in this process with a thread that samples the main thread's
stack every few milliseconds, until the end of its first training step (train.py's `step`
becomes 1), then prints, for each part of the start-up (setup: to the "# ---- Fallback ----"
banner; fallback: to "# ---- Training ----"; first step: to the end of step 1), the functions
with the most time *inside* them (each counted once per sample) and the most time *at* them
(the innermost frame). Unlike cProfile, sampling does not slow Python-heavy code (Dynamo's
tracing) more than the rest: its seconds are seconds. `bench/startup_profile.py --sample` runs
train.py through it. Reads nothing but the script; prints to stderr (train.py's stdout stays
as it is, for the parser of its lines).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import os
import sys
import threading
import time

import soft_exit  # bench/, this script's folder

PHASES = ("setup", "fallback", "fallback's check", "first step")


def short(code) -> str:
    path = code.co_filename
    for mark in ("site-packages/", "target/", "prepare/"):
        if mark in path:
            path = path.split(mark, 1)[1]
            break
    return f"{path}:{code.co_name}"


def where(path: str, what: str) -> str:
    """A file's place, coarse: bytecode in the cache (PYTHONPYCACHEPREFIX) or beside its
    source, by top package; a compiled source by its own name."""
    if what == "source_to_code":
        return path
    prefix = sys.pycache_prefix or "\0"
    kind = "pyc (prefix)" if path.startswith(prefix) else "pyc" if path.endswith(".pyc") else "file"
    parts = path.split("/")
    for mark in ("site-packages", "dist-packages"):
        if mark in parts:
            return f"{kind} {'/'.join(parts[parts.index(mark):parts.index(mark) + 2])}"
    return f"{kind} {'/'.join(parts[:4])}"


def phase_of(frames: list, script: str, fallback_line: int, training_line: int) -> str | None:
    for frame in frames:                    # the script's module frame: its line says where
        if frame.f_code.co_filename == script and frame.f_code.co_name == "<module>":
            if frame.f_lineno < fallback_line:
                return "setup"
            if frame.f_lineno < training_line:
                return "fallback"
            return "first step" if frame.f_globals.get("step", 0) == 0 else None
    return "setup"                          # before the script's frame exists: the interpreter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("script")
    args, rest = ap.parse_known_args()
    script = os.path.abspath(args.script)
    lines = open(script).read().splitlines()
    fallback_line = next(i for i, s in enumerate(lines, 1) if s.startswith("# ---- Fallback"))
    training_line = next(i for i, s in enumerate(lines, 1) if s.startswith("# ---- Training"))
    main_id = threading.get_ident()
    inside = {p: collections.Counter() for p in PHASES}
    at = {p: collections.Counter() for p in PHASES}
    seconds = collections.Counter()
    files = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        last = time.perf_counter()
        while not done.wait(args.every_ms / 1000):
            frame = sys._current_frames().get(main_id)
            now = time.perf_counter()
            dt, last = now - last, now
            stack = []
            while frame is not None:
                stack.append(frame)
                frame = frame.f_back
            phase = phase_of(stack, script, fallback_line, training_line)
            if phase is None:
                done.set()
                return
            if phase == "fallback" and any(f.f_code.co_name == "holdout_loss" for f in stack):
                phase = "fallback's check"
            seconds[phase] += dt
            for f in stack:                 # the files imports read and compile, by folder
                name = f.f_code.co_name
                if name in ("get_data", "source_to_code", "_path_stat") and \
                        "importlib" in f.f_code.co_filename:
                    files[f"{name} {where(str(f.f_locals.get('path', '?')), name)}"] += dt
                    break
            names = [n for n in (short(f.f_code) for f in stack)   # not the frames of every sample
                     if "runpy" not in n and "sample_stacks" not in n and "soft_exit" not in n
                     and n != "train.py:<module>"]
            for name in set(names):
                inside[phase][name] += dt
            if names:
                at[phase][names[0]] += dt

    def report() -> None:
        done.set()
        for phase in PHASES:
            total = seconds[phase]
            print(f"\n== {phase}: {total:.2f} s sampled ==", file=sys.stderr)
            print("  inside (s):", file=sys.stderr)
            for name, s in inside[phase].most_common(args.top):
                print(f"    {s:6.2f}  {name}", file=sys.stderr)
            print("  at (s):", file=sys.stderr)
            for name, s in at[phase].most_common(args.top // 2):
                print(f"    {s:6.2f}  {name}", file=sys.stderr)
        print("\n== imports: reading, compiling and finding files, by folder (s) ==", file=sys.stderr)
        for name, s in files.most_common(args.top):
            print(f"    {s:6.2f}  {name}", file=sys.stderr)
        sys.stderr.flush()

    atexit.register(report)
    threading.Thread(target=sample, daemon=True).start()
    soft_exit.run(script, rest)                 # train.py's os._exit would skip the report
    return 0


if __name__ == "__main__":
    sys.exit(main())
