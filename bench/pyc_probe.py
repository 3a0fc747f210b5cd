"""Is torch's bytecode kept and used in a trial? Runs the same command twice as the process
backend launches a trial (scrubbed environment, limits, launcher), with `python -v` and the
bytecode kept under one prefix (cache.bytecode_env), and prints what the second run still
compiled from source, and any bytecode it could not write.

    python bench/pyc_probe.py                     # imports of torch's compile stack
    python bench/pyc_probe.py --train DATA        # target/train.py itself (20 s budget), with
                                                  # the compile cache of the first run
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
import startup_profile  # noqa: E402  (a trial's environment and launch, as the backend makes them)

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--train", type=Path, default=None, metavar="DATA",
                help="run target/train.py on this prepared data, not the imports alone")
ap.add_argument("--budget", type=int, default=20)
args = ap.parse_args()
root = Path(tempfile.mkdtemp())
(root / "w").mkdir()
for i in (1, 2):
    env = startup_profile.trial_env(root / "w", root / "cache", bytecode=True)
    if args.train:
        shutil.copyfile(REPO / "target" / "train.py", root / "w" / "train.py")
        shutil.copyfile(REPO / "prepare" / "prepare.py", root / "w" / "prepare.py")
        env.update({"AUTORESEARCH_DATA_DIR": str(args.train.resolve()), "AUTORESEARCH_OUT": str(root / "w"),
                    "AUTORESEARCH_DEADLINE": f"{time.time() + args.budget:.3f}",
                    "AUTORESEARCH_TIME_BUDGET": str(args.budget)})
        cmd = [sys.executable, "-v", "-u", "train.py"]
    else:
        cmd = [sys.executable, "-v", "-c", "import torch, torch._dynamo, torch._inductor.compile_fx, torch.export"]
    done = startup_profile.launch_as_trial(cmd, root / "w", env, args.budget + 200)
    err = done.stderr.splitlines()
    froms = [ln.rstrip().rstrip("'") for ln in err if ln.startswith("# code object from")]
    code = [ln for ln in froms if ln.endswith(".py")]
    print(f"run {i}: rc {done.returncode}, bytecode written {sum('# created' in ln for ln in err)}, "
          f"compiled from source {len(code)}, read from bytecode {sum(ln.endswith('.pyc') for ln in froms)}")
    for ln in [ln for ln in err if ln.startswith("# could not") or "stale" in ln or ln.startswith("# bad")][:10]:
        print("   ", ln[:220])
    if i == 2:
        for ln in code[:25]:
            print("   ", ln[:200])
    print(done.stdout[-300:] if args.train else "", flush=True)
