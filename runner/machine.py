"""Which kind of machine this is, for the defaults of `make install` and `make overnight`: a GPU
box (NVML sees GPUs, and for the docker backend the engine can hand them to containers) gets
the CUDA base image, the big data set and every free GPU; anything else gets the CPU path (the
offline base, `shakespeare`, CPU slots), as CI does.

`choose` is the decision on plain facts (the GPUs NVML lists, what `docker info` says, the
backend, the environment), so it is tested without a GPU; `detect` gathers the facts here.
`AUTORESEARCH_PROFILE=cpu` (or `gpu`) overrides the choice; `AUTORESEARCH_BASE` still picks the
base image when set.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from runner.gpu import GpuInfo, list_gpus

PROFILE_ENV = "AUTORESEARCH_PROFILE"
GPU_DATASET, CPU_DATASET = "pysource", "shakespeare"
# Programs of the NVIDIA Container Toolkit: with one of them, `docker run --gpus` (a device
# request with the gpu capability) works even when no `nvidia` runtime is registered.
TOOLKIT = ("nvidia-container-runtime-hook", "nvidia-ctk", "nvidia-container-runtime")


@dataclass
class Profile:
    kind: str                          # "gpu" or "cpu"
    why: str                           # one line, said on start
    gpus: list[str] = field(default_factory=list)   # free GPU indices (gpu)
    base: str = "offline"              # the base image: "cuda" or "offline"
    dataset: str = CPU_DATASET         # what `make overnight` prepares when data/ is empty

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "why": self.why, "gpus": self.gpus, "base": self.base,
                "dataset": self.dataset}


def container_gpus(docker_info: Mapping[str, Any] | None, which: Any = shutil.which
                   ) -> tuple[bool, str]:
    """Whether the Docker engine can give a container GPUs, and how that was seen: an `nvidia`
    runtime registered with the engine, or the NVIDIA Container Toolkit on this host."""
    if docker_info is None:
        return False, "no Docker engine answers"
    runtimes = docker_info.get("Runtimes") or {}
    if "nvidia" in runtimes:
        return True, "the Docker engine has the nvidia runtime"
    for program in TOOLKIT:
        if which(program):
            return True, f"the NVIDIA Container Toolkit is installed ({program})"
    return False, ("the Docker engine has no nvidia runtime and the NVIDIA Container Toolkit is "
                   "not installed (nvidia-container-toolkit)")


def choose(gpus: Sequence[GpuInfo], docker_info: Mapping[str, Any] | None, backend: str = "docker",
           env: Mapping[str, str] | None = None, which: Any = shutil.which) -> Profile:
    """The profile for these facts; `why` says which facts decided."""
    env = os.environ if env is None else env
    asked = env.get(PROFILE_ENV, "").strip().lower()
    base_env = env.get("AUTORESEARCH_BASE", "").strip().lower()
    cpu_base = "cuda" if base_env == "cuda" else "offline"
    if asked == "cpu":
        return Profile("cpu", f"{PROFILE_ENV}=cpu", base=cpu_base)
    if not gpus:
        return Profile("cpu", "NVML sees no GPU (no NVIDIA driver, or none here)", base=cpu_base)
    names = ", ".join(sorted({g.name for g in gpus}))
    free = [str(g.index) for g in gpus if not g.others()]
    seen = f"NVML sees {len(gpus)} GPU(s) ({names})"
    if not free:
        return Profile("cpu", f"{seen} but every one is in use by another process", base=cpu_base)
    if backend == "docker" and asked != "gpu":
        ok, how = container_gpus(docker_info, which)
        if not ok:
            return Profile("cpu", f"{seen} but {how}: trials would not see them. Install the "
                           "toolkit, or use --backend process", base=cpu_base)
        seen += f" and {how}"
    base = "offline" if base_env == "offline" else "cuda"
    forced = f" ({PROFILE_ENV}=gpu)" if asked == "gpu" else ""
    return Profile("gpu", f"{seen}{forced}: {len(free)} free", gpus=free, base=base,
                   dataset=GPU_DATASET)


def docker_info() -> dict[str, Any] | None:
    """`docker info` of the engine, or None when none answers."""
    try:
        import docker
        cli = docker.from_env(timeout=10)
        info = cli.info()
        cli.close()
        return dict(info)
    except Exception:               # no engine, no socket, no permission
        return None


def detect(backend: str = "docker") -> Profile:
    """The profile of this machine."""
    return choose(list_gpus(), docker_info() if backend == "docker" else None, backend)
