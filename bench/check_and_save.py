"""What one holdout check and one save of train.py cost on a GPU, and where a check's time
goes (issue 11).

    python bench/check_and_save.py --data DIR [--steps 6] [--checks 3] [--train-first]

Runs target/train.py's own code up to its fallback (knobs, model, optimizers, data, the
compiled loss and `holdout_loss`) in this process, then times `holdout_loss()` before any
training step and after `--steps` compiled training steps, and profiles one check after them
(torch.profiler, CPU and CUDA: the top operators by CPU time and by GPU time). Also times two
variants on the same batches: the losses summed on the GPU with one `.item()` at the end, and
the check without autocast. A check runs every EVAL_EVERY_S seconds of training and once at the
end (the margin keeps 1.5 times it), so its seconds come out of the training steps' share.
Then traces the model as train.py's fallback does and saves it three times with
`prepare.save_model` (the first serializes the graph, the others reuse it where this torch
allows), with `prepare.resave_seconds` after each, and compares the last archive with what
torch.export.save writes whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder")
    ap.add_argument("--steps", type=int, default=6, help="training steps before the later checks")
    ap.add_argument("--checks", type=int, default=3, help="checks timed each time")
    ap.add_argument("--train-first", action="store_true",
                    help="no check before training: the first check's call comes after the "
                         "steps (what of its first-call cost the steps already paid)")
    args = ap.parse_args()
    os.environ["AUTORESEARCH_DATA_DIR"] = str(args.data)
    os.environ.setdefault("AUTORESEARCH_TIME_BUDGET", "600")
    sys.path.insert(0, str(REPO / "prepare"))
    source = (REPO / "target" / "train.py").read_text()
    import types
    module = types.ModuleType("train")              # a real module: Dynamo imports it by name
    sys.modules["train"] = module
    ns = module.__dict__
    exec(compile(source[:source.index("# ---- Fallback ----")], "train.py", "exec"), ns)
    import torch
    import torch.nn.functional as F

    model, holdout, autocast, sync = ns["model"], ns["holdout"], ns["autocast"], ns["sync"]

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return out

    @torch.no_grad()
    def one_item():                      # the losses summed on the GPU, one sync
        model.eval()
        total = torch.zeros((), device=ns["DEVICE"])
        for hx, hy in holdout:
            with autocast:
                total += ns["loss_fn"](hx, hy)
        model.train()
        return (total / len(holdout)).item()

    @torch.no_grad()
    def no_autocast():
        model.eval()
        total = 0.0
        for hx, hy in holdout:
            logits = model(hx)
            total += F.cross_entropy(logits.flatten(0, 1), hy.flatten()).item()
        model.train()
        return total / len(holdout)

    print(f"holdout: {len(holdout)} batches of {tuple(holdout[0][0].shape)}", flush=True)
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)             # noqa: E731
    if not args.train_first:
        print(f"before training: check {fmt(timed(ns['holdout_loss'], args.checks))} s", flush=True)
    x, y = next(ns["loader"])
    for step in range(args.steps):
        sync()
        t = time.perf_counter()
        for _ in range(ns["accum_steps"]):
            with autocast:
                loss = ns["train_loss"](x, y)
            (loss / ns["accum_steps"]).backward()
            x, y = next(ns["loader"])
        for opt in ns["optimizers"]:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        sync()
        print(f"step {step + 1}: {time.perf_counter() - t:.3f} s", flush=True)
    print(f"after training: check {fmt(timed(ns['holdout_loss'], args.checks))} s", flush=True)
    print(f"  one .item(): {fmt(timed(one_item, args.checks))} s", flush=True)
    print(f"  no autocast: {fmt(timed(no_autocast, args.checks))} s", flush=True)
    import prepare
    t = time.perf_counter()
    program = ns["export_model"]()
    print(f"trace: {time.perf_counter() - t:.3f} s", flush=True)
    out = Path(os.environ.get("AUTORESEARCH_OUT", "out")) / "model.pt2"
    for n in range(3):
        t = time.perf_counter()
        prepare.save_model(program, out)
        took = time.perf_counter() - t
        print(f"save {n + 1}: {took:.3f} s, resave_seconds {prepare.resave_seconds(program):.3f} s",
              flush=True)
    import io
    whole = io.BytesIO()
    torch.export.save(program, whole)                # outside save_model: a whole save
    print(f"the last save is the archive a whole save writes: {whole.getvalue() == out.read_bytes()}",
          flush=True)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ns["GPU"] else [])
    with profile(activities=acts) as prof:
        ns["holdout_loss"]()
        sync()
    table = prof.key_averages()
    print(table.table(sort_by="cpu_time_total", row_limit=15))
    if ns["GPU"]:
        print(table.table(sort_by="self_cuda_time_total", row_limit=10))


if __name__ == "__main__":
    main()
