"""runner.gpu: quietly absent without a driver; the decoding and summarising, on plain samples.

The no-NVML tests only run where NVML does not initialise (this CI box); on a GPU machine
bench/nvml_check.py exercises the real thing.
"""

from __future__ import annotations

import time

import pytest

from runner import gpu

no_nvml = pytest.mark.skipif(gpu.available(), reason="NVML works here; see bench/nvml_check.py")


# ---- without NVML ----

@no_nvml
def test_available_is_false_quietly(capfd):
    gpu._state.clear()                       # try the initialisation again, under capture
    assert gpu.available() is False
    assert gpu.available() is False          # cached
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@no_nvml
def test_listing_and_resolving_without_nvml(capfd):
    messages: list[str] = []
    assert gpu.list_gpus() == []
    assert gpu.resolve_gpus("all", log=messages.append) == []
    assert gpu.resolve_gpus(" ALL ") == []
    assert gpu.resolve_gpus("0,1") == ["0", "1"]
    assert gpu.resolve_gpus("3") == ["3"]
    assert gpu.resolve_gpus("GPU-1234, 2") == ["GPU-1234", "2"]
    assert capfd.readouterr() == ("", "")


def test_resolve_rejects_malformed_lists():
    for bad in ("", "  ", "0,,1", "1,1"):
        with pytest.raises(ValueError):
            gpu.resolve_gpus(bad)


@no_nvml
def test_sampler_is_a_no_op(capfd):
    with gpu.Sampler("0", interval=0.05) as sampler:
        time.sleep(0.15)
    assert sampler.samples == []
    assert sampler.summary() == {}
    manual = gpu.Sampler(0).start()
    manual.stop()
    manual.stop()                            # twice is fine
    assert manual.summary() == {}
    assert capfd.readouterr() == ("", "")


def test_sampler_for_a_cpu_trial_is_a_no_op():
    with gpu.Sampler(None, interval=0.05) as sampler:
        time.sleep(0.1)
    assert sampler.summary() == {}


# ---- pure functions ----

def test_decode_reasons():
    assert gpu.decode_reasons(0) == []
    assert gpu.decode_reasons(None) == []
    assert gpu.decode_reasons(0x1) == ["gpu_idle"]
    assert gpu.decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert gpu.decode_reasons(0x1FF) == [
        "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
        "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake", "display_clocks_setting"]
    assert gpu.decode_reasons(1 << 20) == ["bit_20"]


def test_reason_bits_match_the_bindings():
    """Our table agrees with nvidia-ml-py's constants (no driver needed to read them)."""
    pynvml = pytest.importorskip("pynvml")
    pairs = {"GpuIdle": "gpu_idle", "ApplicationsClocksSetting": "applications_clocks_setting",
             "SwPowerCap": "sw_power_cap", "HwSlowdown": "hw_slowdown", "SyncBoost": "sync_boost",
             "SwThermalSlowdown": "sw_thermal_slowdown", "HwThermalSlowdown": "hw_thermal_slowdown",
             "HwPowerBrakeSlowdown": "hw_power_brake", "DisplayClockSetting": "display_clocks_setting"}
    for suffix, name in pairs.items():
        value = getattr(pynvml, f"nvmlClocksEventReason{suffix}",
                        getattr(pynvml, f"nvmlClocksThrottleReason{suffix}", None))
        assert value is not None and gpu.decode_reasons(value) == [name]


def sample(util=90, mem=30000, sm=1980, temp=60, power=650.0, reasons=0, **extra):
    return {"t": 0.0, "util_gpu": util, "util_mem": util // 2, "mem_used_mib": mem,
            "sm_clock_mhz": sm, "mem_clock_mhz": 2619, "temp_c": temp, "power_w": power,
            "reasons": reasons, **extra}


def test_summarise_empty():
    assert gpu.summarise([]) == {}


def test_summarise_statistics():
    samples = [sample(util=0, mem=500, sm=345, temp=35, power=70.0, reasons=0x1),
               sample(util=100, mem=40000, sm=1980, temp=71, power=690.0),
               sample(util=98, mem=41000, sm=1755, temp=74, power=700.0, reasons=0x4)]
    s = gpu.summarise(samples)
    assert s["samples"] == 3
    assert s["util_mean"] == 66.0 and s["util_max"] == 100
    assert s["memory_used_max_mib"] == 41000
    assert s["sm_clock_mean_mhz"] == 1360.0 and s["sm_clock_max_mhz"] == 1980
    assert s["temperature_max_c"] == 74
    assert s["power_mean_w"] == 486.7 and s["power_max_w"] == 700.0
    assert s["throttle_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert s["throttle_fraction"] == {"gpu_idle": 0.333, "sw_power_cap": 0.333}
    assert s["throttled"] is True            # 1 of 3 samples at the power cap > 10%


def test_summarise_skips_values_nvml_could_not_read():
    samples = [sample(power=None, reasons=None), sample(power=None, reasons=None, temp=None)]
    s = gpu.summarise(samples)
    assert s["power_mean_w"] is None and s["power_max_w"] is None
    assert s["temperature_max_c"] == 60
    assert s["throttle_reasons"] == [] and s["throttle_fraction"] == {}
    assert s["slowdown_fraction"] is None and s["throttled"] is False


def _with_slowdowns(total: int, slowed: int, mask: int) -> list[dict]:
    return [sample(reasons=mask) for _ in range(slowed)] + [sample() for _ in range(total - slowed)]


@pytest.mark.parametrize("mask", [0x4, 0x8, 0x20, 0x40, 0x80, 0x4 | 0x40])
def test_throttled_threshold(mask):
    # 10 of 100 samples is not more than 10%: not throttled; 11 of 100 is.
    at = gpu.summarise(_with_slowdowns(100, 10, mask))
    assert at["slowdown_fraction"] == 0.1 and at["throttled"] is False
    over = gpu.summarise(_with_slowdowns(100, 11, mask))
    assert over["slowdown_fraction"] == 0.11 and over["throttled"] is True
    assert gpu.summarise(_with_slowdowns(100, 50, mask), threshold=0.5)["throttled"] is False


@pytest.mark.parametrize("mask", [0x1, 0x2, 0x10, 0x100, 0x1 | 0x2 | 0x10 | 0x100])
def test_idle_and_clock_settings_are_not_throttling(mask):
    s = gpu.summarise(_with_slowdowns(10, 10, mask))
    assert s["throttled"] is False and s["slowdown_fraction"] == 0.0
    assert set(s["throttle_reasons"]) == set(gpu.decode_reasons(mask))
    assert all(f == 1.0 for f in s["throttle_fraction"].values())


def test_samples_without_reasons_do_not_dilute_the_fraction():
    samples = [sample(reasons=None) for _ in range(90)] + _with_slowdowns(10, 2, 0x40)
    s = gpu.summarise(samples)
    assert s["samples"] == 100
    assert s["slowdown_fraction"] == 0.2 and s["throttled"] is True
    assert s["throttle_fraction"] == {"hw_thermal_slowdown": 0.2}
