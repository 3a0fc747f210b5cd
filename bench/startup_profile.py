"""Where train.py's start-up goes on a GPU (issue 11): imports, data and model; the fallback;
the first step; cold and warm compile cache.

    python bench/startup_profile.py --data DIR [--budget 45] [--compile blocks|whole] \
        [--bytecode-cache] [--fresh-home] [--cuda-cache] [--runner-env] [--move-cache] \
        [--copy keep|plain|runner] [--cache-from DIR] [--keep-cache DIR] [--warm-runs N] \
        [--no-profile] [--sample] [--env NAME=VALUE] [--train FILE]

Runs target/train.py by hand (no runner: the process is the candidate's, its clock is
prepare's) with one private compile cache: cold (fills the cache), `--warm-runs` times warm,
and warm under cProfile. From each run's own lines: `setup` = the budget's start to the first
line (imports, data, model), `fallback` = to the "fallback saved" line, `first step` = to the
end of the first step (`startup_seconds`); then its steps, MFU and Dynamo's recompiles
(TORCH_LOGS=recompiles). The profiled run's top functions by cumulative time go to
stdout (cProfile slows Python-heavy parts such as Dynamo's tracing: read it for shares, not
seconds). `--runner-env` launches it as the process backend launches a trial (its scrubbed
environment, limits and launcher; a fresh home; the driver's JIT cache and, for a torch without
bytecode, the bytecode in the cache; GPU 0 unless CUDA_VISIBLE_DEVICES says otherwise), and
`--move-cache` gives each run a copy of the cache at a new path, as each trial gets: together,
a trial without the runner around it. `--copy` says
how that copy is made: `keep` (file times and modes kept), `plain` (contents only) or `runner`
(the runner's own bounded copy); after each run the cache's files per folder are listed.
`--cache-from DIR` starts warm from a copy of DIR (no cold run). Needs a GPU to say anything
about one; runs anywhere.
"""

from __future__ import annotations

import argparse
import math
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from runner.sandbox import cache as compile_cache  # noqa: E402  (the folders a trial gets)
from runner.sandbox import process_backend  # noqa: E402  (how it launches a trial)
from runner.sandbox.output import parse_summary  # noqa: E402  (train.py's summary, as the runner reads it)
import slot_share  # noqa: E402  (bench/, this script's folder: the start-up's parts, one parser)


def trial_env(home: Path, cache: Path, bytecode: bool | None = None) -> dict[str, str]:
    """The environment the process backend gives a trial with a compile cache at `cache`: its
    scrubbed environment with `home` (HOME and TMPDIR under it), the compile and driver's JIT
    caches, and the bytecode kept in the cache when `bytecode` (default: the backend's rule,
    for an installation without its own)."""
    env = process_backend.build_env(home, os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    env.update(compile_cache.env(str(cache)))
    keep = (not process_backend.installed_bytecode()) if bytecode is None else bytecode
    if keep:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(compile_cache.bytecode_env(str(cache)))
    return env


def launch_as_trial(cmd: list[str], cwd: Path, env: dict[str, str],
                    timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` through the process backend's launcher and limits; its output, as text."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        limits = process_backend.rlimits_for(2**40, env["CUDA_VISIBLE_DEVICES"], 2**32)
        proc = process_backend.launch(cmd, cwd, env, limits, out_f, err_f)
        proc.wait(timeout=timeout)
        out_f.seek(0), err_f.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode,
                                           out_f.read().decode(errors="replace"),
                                           err_f.read().decode(errors="replace"))


def run(data: Path, cache: Path, budget: int, profile: Path | None = None,
        bytecode: bool = False, train: Path = REPO / "target" / "train.py",
        fresh_home: bool = False, cuda_cache: bool = False,
        runner_env: bool = False, sample: bool = False,
        extra_env: dict[str, str] | None = None) -> dict[str, float]:
    if runner_env:                  # the process backend's scrubbed environment, fresh home
        env = trial_env(Path(tempfile.mkdtemp(prefix="trial-")), cache)
    else:
        env = {**os.environ, **compile_cache.env(str(cache))}
        if not cuda_cache:          # the driver's JIT cache where the driver puts it by default
            env.pop("CUDA_CACHE_PATH")
        if bytecode:                # as the process backend does for a torch without bytecode
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env.update(compile_cache.bytecode_env(str(cache)))
    env.update({"PYTHONPATH": str(REPO / "prepare"), "AUTORESEARCH_DATA_DIR": str(data),
                "AUTORESEARCH_TIME_BUDGET": str(budget),
                "AUTORESEARCH_OUT": str(cache.parent / "out")})
    (cache.parent / "out").mkdir(exist_ok=True)
    wrapper = "sample_stacks.py" if sample else "soft_exit.py" if profile else None   # reports at exit
    cmd = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + \
        ([str(REPO / "bench" / wrapper)] if wrapper else []) + [str(train)]
    env["AUTORESEARCH_DEADLINE"] = f"{time.time() + budget:.3f}"   # the clock starts here
    env["TORCH_LOGS"] = "recompiles"
    env.update(extra_env or {})
    if fresh_home:                  # as the backends do: an empty HOME and TMPDIR per run
        env["HOME"] = env["TMPDIR"] = tempfile.mkdtemp(prefix="home-")
    if runner_env:                  # its launcher and limits, output read as it reads it
        done = launch_as_trial(cmd, REPO, env, budget + 120)
    else:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget + 120)
    out = done.stdout
    if sample and "\n== setup" in done.stderr:     # bench/sample_stacks.py's report
        print(done.stderr[done.stderr.index("\n== setup"):], flush=True)
    summary = parse_summary(out)
    first = float(summary.get("startup_seconds", "nan"))
    fallback = next((line for line in out.splitlines() if line.startswith("fallback saved")), "")
    parts = slot_share.startup_parts({"budget": budget, "log_tail": out},
                                     None if math.isnan(first) else first)
    part = {k: float("nan") if v is None else v for k, v in parts.items()}
    return {"setup": part["setup"], "fallback": part["fallback"], "first step": part["first"],
            "startup": first,
            "training": float(summary.get("training_seconds", "nan")),
            "steps": float(summary.get("num_steps", "nan")),
            "mfu %": float(summary.get("mfu_percent", "nan")),
            "recompiles": float(done.stderr.count("Recompiling")),
            "line": fallback}  # type: ignore[dict-item]


def copy_cache(src: Path, dest: Path, how: str) -> None:
    if how == "runner":
        compile_cache.copy_tree(src, dest, 2**40, 10**7)
    else:
        shutil.copytree(src, dest, symlinks=True,
                        copy_function=shutil.copy2 if how == "keep" else shutil.copyfile)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=45)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--bytecode-cache", action="store_true",
                    help="keep Python's bytecode in the cache too (the process backend does when "
                         "torch has none of its own)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for every run (e.g. a torch setting)")
    ap.add_argument("--sample", action="store_true",
                    help="warm runs through bench/sample_stacks.py: the start-up's parts by "
                         "function, sampled (seconds, not cProfile's shares)")
    ap.add_argument("--train", type=Path, default=REPO / "target" / "train.py", metavar="FILE",
                    help="run this train.py (default: target/train.py), e.g. a variant side by side")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="run a copy of train.py with COMPILE set to MODE (blocks, whole)")
    ap.add_argument("--warm-runs", type=int, default=1, help="warm runs without cProfile")
    ap.add_argument("--fresh-home", action="store_true",
                    help="an empty HOME and TMPDIR for each run, as a trial gets")
    ap.add_argument("--cuda-cache", action="store_true",
                    help="keep the CUDA driver's JIT cache in the compile cache (CUDA_CACHE_PATH)")
    ap.add_argument("--move-cache", action="store_true",
                    help="each run gets a copy of the cache at a new path, as each trial does")
    ap.add_argument("--copy", choices=("keep", "plain", "runner"), default="keep",
                    help="how --move-cache copies: file times and modes kept (shutil's copytree), "
                         "contents only, or the runner's copy_tree (what a trial's cache goes "
                         "through on its way in and out)")
    ap.add_argument("--cache-from", type=Path, default=None, metavar="DIR",
                    help="start from a copy of this compile cache (no cold run)")
    ap.add_argument("--keep-cache", type=Path, default=None, metavar="DIR",
                    help="copy the compile cache to DIR at the end (for a runner's --cache-from)")
    ap.add_argument("--runner-env", action="store_true",
                    help="launch as the process backend launches a trial: its environment, limits "
                         "and launcher (implies --fresh-home, --cuda-cache and the bytecode rule)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    cache = tmp / "cache"
    train = args.train.resolve()
    if args.compile is not None:
        text, n = re.subn(r"^COMPILE = \S+", f"COMPILE = {args.compile!r}", train.read_text(),
                          count=1, flags=re.M)
        if not n:
            ap.error("no COMPILE line in train.py")
        train = tmp / "train.py"
        train.write_text(text)
    if args.cache_from is not None:
        copy_cache(args.cache_from, cache, "keep")
    runs = ([] if args.cache_from else [("cold", None)]) + [("warm", None)] * args.warm_runs + \
        ([] if args.no_profile else [("warm, cProfile", tmp / "warm.prof")])
    for i, (name, prof) in enumerate(runs):
        if args.move_cache and cache.exists():      # a private copy at a new path per run
            moved = tmp / f"cache-{i}"
            copy_cache(cache, moved, args.copy)
            shutil.rmtree(cache)
            cache = moved
        figures = run(args.data.resolve(), cache, args.budget, prof, args.bytecode_cache, train,
                      args.fresh_home, args.cuda_cache, args.runner_env,
                      args.sample and name == "warm", dict(e.split("=", 1) for e in args.env))
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if k != "line"))
        print(f"  {figures['line']}")
        print("  cache after it: " + ", ".join(f"{d.name} {sum(1 for f in d.rglob('*') if f.is_file())}"
                                             for d in sorted(cache.glob("*")) if d.is_dir()), flush=True)
    if args.keep_cache is not None:
        shutil.rmtree(args.keep_cache, ignore_errors=True)
        copy_cache(cache, args.keep_cache, "keep")
        print(f"cache kept in {args.keep_cache}")
    if not args.no_profile:
        pstats.Stats(str(tmp / "warm.prof")).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
