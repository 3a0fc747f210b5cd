"""Scoring beside the next trial on a GPU (issue 11): a neighbour that takes the GPU's memory
makes the scorer wait, never fail, and the score is the one it gets alone.

    python bench/overlap_check.py --data DIR [--gpu 0] [--budget 40] [--hog-budget 25]

Trial A, the baseline target/train.py, trains on the GPU with the loop's shared lane
(`runner.loop.SlotLane`, process backend). When A hands its slot on, trial B starts on the same
GPU: a hog that takes all of the GPU's free memory but 1 GiB and holds it for its budget (it
saves no model: `timeout`). A's scorer, beside it and capped, runs out of memory (`cause`
memory) and scores again alone once B is killed (`scoring`: rescored alone). Then A's model,
copied out, is scored alone by the scorer's command line: the same val_bpb is the check.
Prints one JSON object. Needs a GPU; on a machine without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runner.loop import Slot, SlotLane  # noqa: E402
from runner.paths import PREPARE_PY  # noqa: E402
from runner.sandbox import TrialSpec, default_limits  # noqa: E402
from runner.trial import run_trial  # noqa: E402

HOG = """
import time, torch, prepare
free, total = torch.cuda.mem_get_info()
hold = torch.empty(free - 2**30, dtype=torch.uint8, device="cuda")
print(f"holding {hold.numel() / 2**30:.1f} GiB of {total / 2**30:.1f} GiB", flush=True)
time.sleep(max(0.0, prepare.time_left() + 5))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared data folder")
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--budget", type=int, default=40, help="trial A's budget (s)")
    ap.add_argument("--hog-budget", type=int, default=25, help="trial B's budget (s)")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("overlap_check: skipped: no GPU")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="overlap-check-"))
    hog = tmp / "hog.py"
    hog.write_text(HOG)
    slot = Slot()
    lanes = {"A": SlotLane(slot), "B": SlotLane(slot)}
    specs = {"A": TrialSpec(train_py=REPO / "target" / "train.py", data_dir=args.data.resolve(),
                            budget=args.budget, number=0, gpu=args.gpu, artifact_dir=tmp / "a",
                            limits=default_limits(share=1)),
             "B": TrialSpec(train_py=hog, data_dir=args.data.resolve(), budget=args.hog_budget,
                            number=1, gpu=args.gpu, limits=default_limits(share=1))}
    records: dict[str, dict] = {}
    t0 = time.time()

    def trial(name: str) -> None:
        lane = lanes[name]
        lane.begin()
        try:
            records[name] = dict(run_trial(specs[name], "process", lane=lane,
                                           log=lambda line: print(f"[{name}] {line}", flush=True)))
            records[name]["ended_s"] = round(time.time() - t0, 2)
        finally:
            lane.close()

    a = threading.Thread(target=trial, args=("A",))
    a.start()
    lanes["A"].freed.result()                 # A was frozen and killed: the slot goes on to B
    handed = time.time() - t0
    b = threading.Thread(target=trial, args=("B",))
    b.start()
    a.join()
    b.join()
    alone = subprocess.run([sys.executable, "-I", str(PREPARE_PY), "score", "--model",
                            str(tmp / "a" / "model.pt2"), "--data-dir", str(args.data.resolve()),
                            "--device", "cuda"], capture_output=True, text=True, timeout=600,
                           env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": args.gpu})
    result = json.loads(alone.stdout.strip().splitlines()[-1])
    keys = ("status", "reason", "val_bpb", "scoring", "slot_seconds", "wall_seconds", "phases",
            "reported_startup_seconds", "ended_s")
    out = {"A": {k: records["A"].get(k) for k in keys},
           "B": {k: records["B"].get(k) for k in keys}, "A handed on at s": round(handed, 2),
           "A scored alone by the CLI": {k: result.get(k) for k in ("status", "val_bpb",
                                                                   "seconds")},
           "same val_bpb": records["A"].get("val_bpb") == result.get("val_bpb")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
