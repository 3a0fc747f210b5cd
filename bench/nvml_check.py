"""Check runner.gpu on a real GPU machine.

Usage:
    python bench/nvml_check.py [--seconds 15] [--interval 0.5] [--size 8192] [--json FILE]

1. Lists the GPUs NVML sees (memory, processes) and resolves `--gpus all` and `--gpus 0`, and
   checks that an unknown id is refused.
2. Starts a child process that holds a CUDA context on GPU 0 and checks that `all` now skips
   GPU 0 (the busy-GPU rule), then stops it.
3. Runs a Sampler on GPU 0 while a bf16 matmul loop keeps it busy for --seconds, and prints the
   summary JSON (utilisation should be near 100%, with clocks, temperature, power and the
   clock-event reasons seen).

Needs only torch and nvidia-ml-py. Without NVML or without a CUDA torch it says so and exits 0.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")     # CUDA ids = NVML ids
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner import gpu  # noqa: E402

HOLDER = ("import sys, time, torch; x = torch.ones(1 << 20, device='cuda'); torch.cuda.synchronize();"
          " print('ready', flush=True); time.sleep(float(sys.argv[1]))")


def say(text: str) -> None:
    print(text, flush=True)


def check_busy_skip(failures: list[str]) -> dict:
    """A child holds a context on GPU 0; `all` must skip GPU 0 while it lives."""
    gpus = gpu.list_gpus()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[0].uuid or "0")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, "120"], env=env, stdout=subprocess.PIPE,
                             text=True)
    result: dict = {"child_pid": child.pid}
    try:
        line = child.stdout.readline().strip()
        if line != "ready":
            failures.append(f"the CUDA holder child did not start ({line!r})")
            return result
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:      # NVML may take a moment to list a new context
            seen = [p.pid for p in gpu.list_gpus()[0].processes]
            if seen:
                break
            time.sleep(0.5)
        notes: list[str] = []
        resolved = gpu.resolve_gpus("all", log=notes.append)
        result.update(pids_on_gpu0=seen, resolved_all=resolved, notes=notes,
                      child_pid_visible=child.pid in seen)
        say(f"with a child (pid {child.pid}) on GPU 0: NVML lists pids {seen}; "
            f"all -> {resolved}; notes: {notes}")
        if "0" in resolved:
            failures.append("`all` did not skip GPU 0 while another process used it")
        if seen and child.pid not in seen:
            say("note: NVML reports pids from another pid namespace (container); the busy rule "
                "still works, but pids in notes are host pids")
    finally:
        child.kill()
        child.wait()
    return result


def load(seconds: float, size: int):
    """bf16 matmuls on cuda:0 for `seconds`; returns (matmuls, achieved TFLOP/s)."""
    import torch
    a = torch.randn(size, size, device="cuda:0", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda:0", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            c = a @ b
        n += 20
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del c
    return n, 2 * size**3 * n / elapsed / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()

    if not gpu.available():
        say("NVML is not available here (no NVIDIA driver, or no nvidia-ml-py): nothing to check. "
            "runner.gpu stays quietly absent on such machines.")
        return 0
    failures: list[str] = []
    report: dict = {}

    # ---- 1. listing and resolving (before this process touches CUDA) ----
    gpus = gpu.list_gpus()
    say(f"{len(gpus)} GPU(s):")
    for g in gpus:
        say(f"  {g.describe()}; processes: {[(p.pid, p.kind, p.used_memory_mib) for p in g.processes]}")
    report["gpus"] = [{"index": g.index, "uuid": g.uuid, "name": g.name,
                       "memory_total_mib": g.memory_total_mib, "memory_used_mib": g.memory_used_mib,
                       "processes": [p.__dict__ for p in g.processes]} for g in gpus]
    if not gpus:
        say("NVML works but lists no GPU: nothing more to check.")
        return 0
    notes: list[str] = []
    report["resolved_all"] = gpu.resolve_gpus("all", log=notes.append)
    say(f"resolve_gpus('all') -> {report['resolved_all']}; notes: {notes}")
    report["resolved_0"] = gpu.resolve_gpus("0")
    report["resolved_uuid"] = gpu.resolve_gpus(gpus[0].uuid)
    try:
        gpu.resolve_gpus("0,999")
        failures.append("resolve_gpus('0,999') did not raise")
    except ValueError as exc:
        say(f"resolve_gpus('0,999') -> ValueError: {exc}")

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        say("torch with CUDA is not available: the busy and sampling checks are skipped.")
        print(json.dumps(report, indent=2))
        return 1 if failures else 0

    # ---- 2. a busy GPU is skipped ----
    report["busy_check"] = check_busy_skip(failures)

    # ---- 3. sampling under load ----
    props = torch.cuda.get_device_properties(0)
    torch_uuid = str(getattr(props, "uuid", ""))
    report["torch_device0"] = {"name": props.name, "uuid": torch_uuid}
    if torch_uuid and torch_uuid.replace("GPU-", "") not in gpus[0].uuid:
        failures.append(f"CUDA device 0 ({torch_uuid}) is not NVML GPU 0 ({gpus[0].uuid})")
    with gpu.Sampler(0, interval=args.interval) as sampler:
        time.sleep(2 * args.interval)                   # a little idle first
        matmuls, tflops = load(args.seconds, args.size)
        time.sleep(2 * args.interval)
    summary = sampler.summary()
    report.update(matmuls=matmuls, achieved_tflops=round(tflops, 1), summary=summary,
                  last_samples=sampler.samples[-3:])
    say(f"{matmuls} bf16 {args.size}^3 matmuls, {tflops:.1f} TFLOP/s")
    say("Sampler(0).summary():")
    say(json.dumps(summary, indent=2))
    if not summary or summary.get("samples", 0) < args.seconds / args.interval * 0.8:
        failures.append(f"too few samples: {summary.get('samples')}")
    if (summary.get("util_max") or 0) < 90:
        failures.append(f"utilisation never reached 90% (max {summary.get('util_max')})")
    if not summary.get("sm_clock_max_mhz") or summary.get("temperature_max_c") is None:
        failures.append("no SM clock or temperature read")
    if "gpu_idle" not in summary.get("throttle_reasons", []):
        say("note: gpu_idle was never reported (the idle seconds may have been too short)")

    # ---- a CPU trial and an unknown GPU are no-ops ----
    with gpu.Sampler(None) as none_sampler, gpu.Sampler("999", interval=0.1) as bad_sampler:
        time.sleep(0.3)
    if none_sampler.summary() != {} or bad_sampler.summary() != {}:
        failures.append("a Sampler for None or an unknown GPU returned a summary")

    report["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    say("FAILED: " + "; ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
