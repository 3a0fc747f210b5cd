"""Which kind of machine this is (runner/machine.py): the choice on plain facts, so the GPU box
is tested without one; and the device request a GPU slot's trial makes. The GPU path has not
run end to end here: no machine of this project has both a GPU and a container engine."""

from __future__ import annotations

import pytest

from runner import machine
from runner.gpu import GpuInfo, GpuProcess

H200 = [GpuInfo(0, "GPU-a", "NVIDIA H200", 143771, 0), GpuInfo(1, "GPU-b", "NVIDIA H200", 143771, 0)]
NVIDIA_RUNTIME = {"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}}
PLAIN_ENGINE = {"Runtimes": {"runc": {}}}


def nothing(_program):
    return None


def test_no_gpu_is_the_cpu_path():
    p = machine.choose([], PLAIN_ENGINE, env={}, which=nothing)
    assert (p.kind, p.base, p.dataset, p.gpus) == ("cpu", "offline", "shakespeare", [])
    assert "NVML sees no GPU" in p.why


def test_gpus_and_the_nvidia_runtime_make_a_gpu_box():
    p = machine.choose(H200, NVIDIA_RUNTIME, env={}, which=nothing)
    assert (p.kind, p.base, p.dataset, p.gpus) == ("gpu", "cuda", "pysource", ["0", "1"])
    assert "2 GPU(s) (NVIDIA H200)" in p.why and "nvidia runtime" in p.why


def test_the_toolkit_alone_is_enough_and_said():
    p = machine.choose(H200, PLAIN_ENGINE, env={},
                       which=lambda prog: "/usr/bin/nvidia-ctk" if prog == "nvidia-ctk" else None)
    assert p.kind == "gpu" and "nvidia-ctk" in p.why


def test_gpus_without_a_container_runtime_stay_on_the_cpu_and_say_why():
    p = machine.choose(H200, PLAIN_ENGINE, env={}, which=nothing)
    assert p.kind == "cpu" and "no nvidia runtime" in p.why and "--backend process" in p.why
    nobody = machine.choose(H200, None, env={}, which=nothing)
    assert nobody.kind == "cpu" and "no Docker engine answers" in nobody.why
    # the process backend needs no container runtime
    bare = machine.choose(H200, None, backend="process", env={}, which=nothing)
    assert bare.kind == "gpu" and bare.gpus == ["0", "1"]


def test_busy_gpus_are_left_out():
    busy = [GpuInfo(0, "GPU-a", "NVIDIA H200", 143771, 9000, processes=[GpuProcess(1, "compute")]),
            H200[1]]
    assert machine.choose(busy, NVIDIA_RUNTIME, env={}, which=nothing).gpus == ["1"]
    all_busy = [busy[0]]
    p = machine.choose(all_busy, NVIDIA_RUNTIME, env={}, which=nothing)
    assert p.kind == "cpu" and "in use by another process" in p.why


@pytest.mark.parametrize("env, kind, base", [
    ({"AUTORESEARCH_PROFILE": "cpu"}, "cpu", "offline"),
    ({"AUTORESEARCH_PROFILE": "gpu"}, "gpu", "cuda"),
    ({"AUTORESEARCH_BASE": "offline"}, "gpu", "offline"),
])
def test_the_environment_overrides(env, kind, base):
    p = machine.choose(H200, NVIDIA_RUNTIME, env=env, which=nothing)
    assert (p.kind, p.base) == (kind, base)
    if env.get("AUTORESEARCH_PROFILE") == "gpu":             # trusts the person: no runtime check
        assert machine.choose(H200, PLAIN_ENGINE, env=env, which=nothing).kind == "gpu"


def test_a_gpu_slot_requests_its_gpu_from_docker(tmp_path):
    from runner.sandbox import TrialSpec
    from runner.sandbox.docker_backend import gpu_request

    spec = TrialSpec(train_py=tmp_path / "train.py", data_dir=tmp_path, budget=1, gpu="1")
    (req,) = gpu_request(spec)
    assert req["DeviceIDs"] == ["1"] and req["Capabilities"] == [["gpu"]]
    assert gpu_request(TrialSpec(train_py=tmp_path / "train.py", data_dir=tmp_path, budget=1)) == []


def test_the_cuda_recipe_is_the_gpu_box_base():
    from runner.sandbox import images
    assert images.base_tag(False).startswith("autoresearch/base:cuda-")
    recipe = (images.IMAGES_DIR / images.CUDA_DOCKERFILE).read_text()
    assert "cuda" in recipe.lower() and "FROM" in recipe


def test_this_machine_is_detected_without_error():
    p = machine.detect()
    assert p.kind in ("cpu", "gpu") and p.why
