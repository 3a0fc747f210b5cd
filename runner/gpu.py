"""GPUs through NVML (nvidia-ml-py): which ones are free, and what one did during a trial.

- `available()`: NVML initialises (the answer is cached; it never raises or prints).
- `list_gpus()`: every GPU with its memory and the processes using it.
- `resolve_gpus("all" | "0,2")`: the GPU ids a run may use; `"all"` skips GPUs another process
  is using.
- `Sampler(gpu)`: a thread that samples utilisation, memory, clocks, temperature, power and the
  clock-event (throttle) reasons of one GPU while a trial trains; `summary()` is the record's
  `gpu` field.

Without an NVIDIA driver (or without nvidia-ml-py) all of this is quietly absent: `available()`
is False, `list_gpus()` is [], `resolve_gpus("all")` is [], explicit ids are returned as given,
and a `Sampler` samples nothing and summarises to `{}`. A telemetry failure never fails a trial.

GPU ids are NVML indices (nvidia-smi's order, PCI bus order) or UUIDs (`GPU-...`). Docker's
device requests use the same indices; a bare process sees them in the same order only with
`CUDA_DEVICE_ORDER=PCI_BUS_ID` (CUDA's default order is fastest first).

The decoding and summarising are pure functions of plain sample dicts (`decode_reasons`,
`summarise`), testable without a GPU.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

Log = Callable[[str], None]

# ------------------------------------------------------------------------------------------
# Clock-event ("throttle") reasons: the bits of nvmlDeviceGetCurrentClocksEventReasons
# (nvmlClocksEventReason*; the older nvmlClocksThrottleReason* have the same values and two more).
# ------------------------------------------------------------------------------------------

REASON_BITS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake",
    0x100: "display_clocks_setting",
    0x200: "board_limit",          # throttle-reason API only
    0x400: "reliability",          # throttle-reason API only
}

# The reasons that mean the GPU ran slower than it could have for power or heat. gpu_idle, the
# clock settings and sync_boost are not slowdowns of the work (they are policy or idleness).
SLOWDOWN_REASONS = frozenset({"sw_power_cap", "hw_slowdown", "hw_thermal_slowdown",
                              "sw_thermal_slowdown", "hw_power_brake"})

# A trial is `throttled` when one of SLOWDOWN_REASONS was active in MORE than this fraction of
# the samples that read the reasons. One sample in ten tolerates a brief power spike (a second
# at the cap at the start of a burst) without calling the whole trial throttled.
THROTTLED_FRACTION = 0.10


def decode_reasons(mask: int | None) -> list[str]:
    """The names of the bits set in a clock-event reason bitmask, lowest bit first. Bits with
    no known name come out as `bit_<n>`; None (the reasons could not be read) gives []."""
    if not mask:
        return []
    names = []
    for bit in range(64):
        value = 1 << bit
        if mask & value:
            names.append(REASON_BITS.get(value, f"bit_{bit}"))
    return names


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def _max(values: list[float]) -> float | None:
    return round(max(values), 1) if values else None


def summarise(samples: list[dict[str, Any]], threshold: float = THROTTLED_FRACTION) -> dict[str, Any]:
    """What a list of samples says, as the record's `gpu` field. A sample is a dict with any of
    `util_gpu`, `util_mem` (%), `mem_used_mib`, `sm_clock_mhz`, `mem_clock_mhz`, `temp_c`,
    `power_w` and `reasons` (the raw bitmask); a missing or None value was not read and is left
    out of that statistic. No samples: {}.

    `throttle_fraction` is, per reason, the fraction of the samples that read the reasons in
    which it was active; `throttled` is True when any of SLOWDOWN_REASONS (power cap, HW
    slowdown, HW/SW thermal slowdown, power brake; not gpu_idle) was active in more than
    `threshold` of those samples."""
    if not samples:
        return {}

    def values(key: str) -> list[float]:
        return [float(s[key]) for s in samples if s.get(key) is not None]

    read = [s["reasons"] for s in samples if s.get("reasons") is not None]
    counts: dict[str, int] = {}
    slowed = 0
    for mask in read:
        names = decode_reasons(mask)
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        if SLOWDOWN_REASONS.intersection(names):
            slowed += 1
    fraction = {name: round(n / len(read), 3) for name, n in sorted(counts.items())}
    out: dict[str, Any] = {
        "samples": len(samples),
        "util_mean": _mean(values("util_gpu")),
        "util_max": _max(values("util_gpu")),
        "mem_util_mean": _mean(values("util_mem")),
        "memory_used_max_mib": _max(values("mem_used_mib")),
        "sm_clock_mean_mhz": _mean(values("sm_clock_mhz")),
        "sm_clock_max_mhz": _max(values("sm_clock_mhz")),
        "mem_clock_max_mhz": _max(values("mem_clock_mhz")),
        "temperature_max_c": _max(values("temp_c")),
        "power_mean_w": _mean(values("power_w")),
        "power_max_w": _max(values("power_w")),
        "throttle_reasons": sorted(counts),
        "throttle_fraction": fraction,
        "slowdown_fraction": round(slowed / len(read), 3) if read else None,
        "throttled": bool(read) and slowed / len(read) > threshold,
    }
    return out


# ------------------------------------------------------------------------------------------
# NVML
# ------------------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, Any] = {}          # "ok": bool once tried; "nvml": the module


def available() -> bool:
    """NVML initialises on this machine. Tried once per process; never raises, prints nothing."""
    with _lock:
        if "ok" not in _state:
            try:
                import pynvml
                pynvml.nvmlInit()
                _state["nvml"] = pynvml
                _state["ok"] = True
            except Exception:          # no module, no library, no driver, driver mismatch...
                _state["ok"] = False
        return _state["ok"]


def _nvml():
    return _state["nvml"] if available() else None


def _try(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None when NVML cannot answer (not supported, no permission, lost GPU)."""
    try:
        return fn(*args)
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class GpuProcess:
    pid: int
    kind: str                        # "compute", "graphics" (or both: "compute+graphics")
    used_memory_mib: int | None = None


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    processes: list[GpuProcess] = field(default_factory=list)
    processes_known: bool = True     # False: NVML could not list them

    def others(self, own_pids: Iterable[int] | None = None) -> list[GpuProcess]:
        """The processes using this GPU that are not this one (or not in `own_pids`)."""
        own = set(own_pids) if own_pids is not None else {os.getpid()}
        return [p for p in self.processes if p.pid not in own]

    def describe(self) -> str:
        return (f"{self.index}: {self.name} ({self.uuid}), {self.memory_used_mib}/"
                f"{self.memory_total_mib} MiB used, {len(self.processes)} process(es)")


def _processes(nvml: Any, handle: Any) -> list[GpuProcess] | None:
    found: dict[int, GpuProcess] = {}
    known = False
    for kind, names in (("compute", ("nvmlDeviceGetComputeRunningProcesses",
                                     "nvmlDeviceGetComputeRunningProcesses_v2")),
                        ("compute", ("nvmlDeviceGetMPSComputeRunningProcesses",
                                     "nvmlDeviceGetMPSComputeRunningProcesses_v2")),
                        ("graphics", ("nvmlDeviceGetGraphicsRunningProcesses",
                                      "nvmlDeviceGetGraphicsRunningProcesses_v2"))):
        for name in names:                       # newest binding first, older drivers next
            fn = getattr(nvml, name, None)
            procs = _try(fn, handle) if fn else None
            if procs is not None:
                break
        if procs is None:
            continue
        known = True
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            mib = used // 2**20 if isinstance(used, int) else None
            if p.pid in found:
                old = found[p.pid]
                if kind not in old.kind.split("+"):
                    old.kind = f"{old.kind}+{kind}"
                if mib is not None:
                    old.used_memory_mib = max(old.used_memory_mib or 0, mib)
            else:
                found[p.pid] = GpuProcess(pid=p.pid, kind=kind, used_memory_mib=mib)
    return list(found.values()) if known else None


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML can see, in NVML index order. [] without NVML. A GPU NVML cannot open
    (lost, no permission) is left out."""
    nvml = _nvml()
    if nvml is None:
        return []
    count = _try(nvml.nvmlDeviceGetCount) or 0
    gpus = []
    for index in range(count):
        handle = _try(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
        procs = _processes(nvml, handle)
        gpus.append(GpuInfo(
            index=index, uuid=_text(_try(nvml.nvmlDeviceGetUUID, handle) or ""),
            name=_text(_try(nvml.nvmlDeviceGetName, handle) or "unknown"),
            memory_total_mib=mem.total // 2**20 if mem else 0,
            memory_used_mib=mem.used // 2**20 if mem else 0,
            processes=procs or [], processes_known=procs is not None))
    return gpus


def resolve_gpus(spec: str, log: Log | None = None) -> list[str]:
    """The GPU ids a run uses, from a `--gpus` value.

    - `"all"`: the indices of every GPU no other process is using (busy ones are skipped and
      named through `log`); [] without NVML, or when every GPU is busy.
    - `"0,2"` (indices or UUIDs): those, in that order, validated against NVML: an unknown id or
      a repeated one raises ValueError naming the GPUs there are; a busy one is kept (it was
      asked for) with a warning through `log`. Without NVML they are returned as given, so the
      process backend still works on a box with CUDA but no NVML.
    """
    say = log or (lambda _: None)
    text = (spec or "").strip()
    if not text:
        raise ValueError("no GPUs given: use `all` or a comma-separated list of ids like 0,2")
    gpus = list_gpus()
    if text.lower() == "all":
        chosen = []
        for gpu in gpus:
            if others := gpu.others():
                pids = ", ".join(str(p.pid) for p in others[:8]) + (" ..." if len(others) > 8 else "")
                say(f"GPU {gpu.index} ({gpu.name}) skipped: in use by pid {pids}")
            else:
                if not gpu.processes_known:
                    say(f"GPU {gpu.index} ({gpu.name}): NVML cannot list its processes; "
                        "assuming it is free")
                chosen.append(str(gpu.index))
        return chosen
    ids = [part.strip() for part in text.split(",")]
    if any(not part for part in ids):
        raise ValueError(f"--gpus {spec!r}: an empty id; use `all` or ids like 0,2")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {spec!r}: a GPU is named twice")
    if not available():
        return ids
    by_id = {str(g.index): g for g in gpus} | {g.uuid: g for g in gpus if g.uuid}
    unknown = [part for part in ids if part not in by_id]
    if unknown:
        there = "; ".join(g.describe() for g in gpus) or "none"
        raise ValueError(f"--gpus {spec!r}: no GPU {', '.join(unknown)}. GPUs here: {there}")
    if len({by_id[part].index for part in ids}) != len(ids):
        raise ValueError(f"--gpus {spec!r}: a GPU is named twice (by index and by UUID)")
    for part in ids:
        gpu = by_id[part]
        if others := gpu.others():
            say(f"GPU {gpu.index} ({gpu.name}) is in use by pid "
                f"{', '.join(str(p.pid) for p in others[:8])}; using it anyway, as asked")
    return ids


def _handle(nvml: Any, gpu: int | str) -> Any:
    text = str(gpu).strip()
    if text.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(text))
    return nvml.nvmlDeviceGetHandleByUUID(text)


class Sampler:
    """Samples one GPU every `interval` seconds in a daemon thread, from start() (or entering
    the `with`) to stop(); `summary()` is `summarise(samples)` plus the GPU's index, name, UUID
    and power limit. `gpu` is an NVML index or UUID; None (a CPU trial), no NVML, or a GPU NVML
    cannot open make it a no-op whose summary is {}. Nothing it does raises."""

    def __init__(self, gpu_index: int | str | None, interval: float = 1.0,
                 threshold: float = THROTTLED_FRACTION) -> None:
        self.gpu = gpu_index
        self.interval = max(0.05, float(interval))
        self.threshold = threshold
        self.samples: list[dict[str, Any]] = []
        self.device: dict[str, Any] = {}
        self._nvml: Any = None
        self._handle: Any = None
        self._reasons_fn: Callable[[Any], int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._seconds = 0.0

    # ---- lifecycle ----
    def start(self) -> Sampler:
        if self._thread is not None or self.gpu is None or self.gpu == "":
            return self
        nvml = _nvml()
        handle = _try(_handle, nvml, self.gpu) if nvml else None
        if handle is None:
            return self
        self._nvml, self._handle = nvml, handle
        self._reasons_fn = self._pick_reasons_fn()
        index = _try(nvml.nvmlDeviceGetIndex, handle)
        limit = _try(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        self.device = {"index": index if index is not None else self.gpu,
                       "name": _text(_try(nvml.nvmlDeviceGetName, handle) or "unknown"),
                       "uuid": _text(_try(nvml.nvmlDeviceGetUUID, handle) or ""),
                       "power_limit_w": round(limit / 1000, 1) if limit else None}
        self._stop.clear()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"gpu-sampler-{self.gpu}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, 3 * self.interval))
        self._seconds = time.monotonic() - self._started
        self._thread = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- sampling ----
    def _pick_reasons_fn(self) -> Callable[[Any], int] | None:
        """Clock-event reasons (drivers >= 535), else the older throttle-reason call."""
        for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(self._nvml, name, None)
            if fn is not None and _try(fn, self._handle) is not None:
                return fn
        return None

    def sample(self) -> dict[str, Any]:
        """One reading of the GPU; a value NVML cannot give is None."""
        nvml, h = self._nvml, self._handle
        util = _try(nvml.nvmlDeviceGetUtilizationRates, h)
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, h)
        power = _try(nvml.nvmlDeviceGetPowerUsage, h)
        return {
            "t": round(time.monotonic() - self._started, 3),
            "util_gpu": util.gpu if util else None,
            "util_mem": util.memory if util else None,
            "mem_used_mib": mem.used // 2**20 if mem else None,
            "sm_clock_mhz": _try(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": _try(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_MEM),
            "temp_c": _try(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
            "power_w": round(power / 1000, 1) if power is not None else None,
            "reasons": _try(self._reasons_fn, h) if self._reasons_fn else None,
        }

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.sample())
            except Exception:
                pass
            if self._stop.wait(self.interval):
                return

    # ---- result ----
    def summary(self) -> dict[str, Any]:
        """The record's `gpu` field: {} when nothing was sampled."""
        out = summarise(list(self.samples), self.threshold)
        if not out:
            return {}
        return {**self.device, "interval_s": self.interval,
                "seconds": round(self._seconds or time.monotonic() - self._started, 1), **out}
