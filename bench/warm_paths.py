"""Does a warm trial's start-up depend on where its compile cache and its home are? (issue 11)

    python bench/warm_paths.py --data DIR [--budget 25] [--quick]

Runs target/train.py as the process backend launches a trial (scrubbed environment, limits,
launcher; the compile cache, the driver's JIT cache and torch's bytecode under one folder),
first cold, then warm in five ways: everything where the last run had it; the cache copied to a
new folder (the runner's bounded copy, as every trial gets it); a fresh HOME and TMPDIR with the
cache where it was; both new (a runner trial); and that last one again where it is. Prints each
run's start-up and its parts (setup / fallback / first step); the last of the fresh-both runs
is sampled (bench/sample_stacks.py) and its report printed.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from runner.sandbox import cache  # noqa: E402
from runner.sandbox.output import parse_summary  # noqa: E402
import slot_share  # noqa: E402
import startup_profile  # noqa: E402  (a trial's environment and launch, as the backend makes them)


def run(root: Path, data: Path, cache_dir: Path, home: Path, budget: int, sample: bool) -> str:
    work = root / "w"
    work.mkdir(exist_ok=True)
    shutil.copyfile(REPO / "target" / "train.py", work / "train.py")
    shutil.copyfile(REPO / "prepare" / "prepare.py", work / "prepare.py")
    env = startup_profile.trial_env(home, cache_dir, bytecode=True)
    env.update({"AUTORESEARCH_DATA_DIR": str(data), "AUTORESEARCH_OUT": str(work),
                "AUTORESEARCH_TIME_BUDGET": str(budget),
                "AUTORESEARCH_DEADLINE": f"{time.time() + budget:.3f}"})
    cmd = [sys.executable, "-u"] + ([str(REPO / "bench" / "sample_stacks.py")] if sample else []) \
        + ["train.py"]
    done = startup_profile.launch_as_trial(cmd, work, env, budget + 200)
    summary = parse_summary(done.stdout)
    first = float(summary.get("startup_seconds", "nan"))
    parts = slot_share.startup_parts({"budget": budget, "log_tail": done.stdout}, first)
    fmt = lambda v: "?" if v is None else f"{v:.1f}"              # noqa: E731
    line = (f"start-up {first:.1f} s ({fmt(parts['setup'])} / {fmt(parts['fallback'])} / "
            f"{fmt(parts['first'])}), steps {summary.get('num_steps')}, rc {done.returncode}")
    if sample and "\n== setup" in done.stderr:
        line += "\n" + done.stderr[done.stderr.index("\n== setup"):]
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=25)
    ap.add_argument("--cache-from", type=Path, default=None, metavar="DIR",
                    help="no cold run: start from the runner's copy of this cache")
    ap.add_argument("--quick", action="store_true",
                    help="cold, warm where it was, then moved with a fresh home twice (sampled last)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="warm-paths-"))
    data = args.data.resolve()
    homes = iter(root / f"home{i}" for i in range(10))
    caches = iter(root / f"cache{i}" for i in range(10))
    home, where = next(homes), next(caches)
    home.mkdir()

    def moved(src: Path) -> Path:
        dest = next(caches)
        t = time.perf_counter()
        cache.copy_tree(src, dest, 2**40, 10**7)
        print(f"  (cache copied to a new folder in {time.perf_counter() - t:.2f} s)", flush=True)
        return dest

    def fresh() -> Path:
        h = next(homes)
        h.mkdir()
        return h

    if args.cache_from is not None:
        cache.copy_tree(args.cache_from, where, 2**40, 10**7)
    else:
        print("cold:", run(root, data, where, home, max(args.budget, 40), False), flush=True)
    print("warm, all where it was:", run(root, data, where, home, args.budget, False), flush=True)
    if args.quick:
        where, home = moved(where), fresh()
        print("warm, cache moved and fresh home:", run(root, data, where, home, args.budget, False),
              flush=True)
        where, home = moved(where), fresh()
        print("warm, cache moved and fresh home, sampled:",
              run(root, data, where, home, args.budget, True), flush=True)
        return
    print("warm, all where it was:", run(root, data, where, home, args.budget, False), flush=True)
    where = moved(where)
    print("warm, cache moved:", run(root, data, where, home, args.budget, False), flush=True)
    home = fresh()
    print("warm, fresh home:", run(root, data, where, home, args.budget, False), flush=True)
    where, home = moved(where), fresh()
    print("warm, cache moved and fresh home:", run(root, data, where, home, args.budget, False), flush=True)
    print("warm, all where it was:", run(root, data, where, home, args.budget, False), flush=True)
    where, home = moved(where), fresh()
    print("warm, cache moved and fresh home, sampled:", run(root, data, where, home, args.budget, True),
          flush=True)


if __name__ == "__main__":
    main()
