"""Base and experiment images.

Two base images can hold the same install (``images/install.sh``: torch, numpy, the user
``trainer`` with uid/gid 10001, ``/app``, ``/data``, ``/out``):

- **offline** (the default here): a debootstrapped Debian root loaded with ``docker import`` by
  ``images/build_offline_base.sh``; needs no registry, only apt's mirror and pip's torch wheel.
- **cuda**: ``images/base.Dockerfile``, ``FROM`` an official CUDA PyTorch image (needs a registry).

A base is tagged ``autoresearch/base:<kind>-<hash12>``, the hash covering the inputs of its build,
so an unchanged base is never rebuilt and a changed recipe never reuses a stale image.

An experiment image is the base plus ``COPY train.py``: one thin layer, built with networking off
from an in-memory context that holds only the experiment Dockerfile and ``train.py``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable

import docker
import docker.errors

from runner.paths import REPO_ROOT

IMAGES_DIR: Path = REPO_ROOT / "images"
INSTALL_SH = "install.sh"
OFFLINE_BUILDER = "build_offline_base.sh"
CUDA_DOCKERFILE = "base.Dockerfile"
EXPERIMENT_DOCKERFILE = "experiment.Dockerfile"

BASE_REPO = "autoresearch/base"
DEFAULT_TORCH_SPEC = "torch==2.13.0"
TORCH_SPEC_ENV = "AUTORESEARCH_TORCH_SPEC"   # torch for the offline base; the CUDA one keeps its own
BASE_ENV = "AUTORESEARCH_BASE"               # "cuda" selects the CUDA base; anything else: offline
CUDA_TORCH_SPEC = "keep"                     # install.sh: keep the torch the CUDA image ships
TRAINER_UID = 10001

BUILD_TIMEOUT_S = 3600    # docker API read timeout while a base builds (quiet steps can be long)
LOG_TAIL_LINES = 40

Log = Callable[[str], None]


class ImageError(RuntimeError):
    """An image could not be built or found; the message says why and what to do."""


class DockerUnavailable(ImageError):
    """No Docker engine answers."""


def client(timeout: int = 120) -> docker.DockerClient:
    """A Docker client, or ``DockerUnavailable`` saying how to start an engine."""
    try:
        cli = docker.from_env(timeout=timeout)
        cli.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(
            f"no Docker engine answers ({exc}).\n"
            "Start one: `sudo systemctl start docker`, or on a machine without systemd "
            "`sudo dockerd > /var/log/dockerd.log 2>&1 &` (Debian/Ubuntu: `apt-get install "
            "docker.io` first). Set DOCKER_HOST if the engine listens elsewhere."
        ) from exc
    return cli


# ------------------------------------------------------------------------------------------
# Base images
# ------------------------------------------------------------------------------------------

def default_offline() -> bool:
    """True unless ``AUTORESEARCH_BASE=cuda``: machines here reach no registry for a CUDA image."""
    return os.environ.get(BASE_ENV, "").strip().lower() != "cuda"


def torch_spec(offline: bool) -> str:
    """The torch requirement a base is built with (``keep`` for the CUDA image's own torch)."""
    if not offline:
        return CUDA_TORCH_SPEC
    return os.environ.get(TORCH_SPEC_ENV, "").strip() or DEFAULT_TORCH_SPEC


def base_inputs_hash(offline: bool, install_sh: bytes, recipe: bytes, torch_spec: str) -> str:
    """12 hex digits over everything a base build reads: the kind, the shared install script,
    the recipe (the offline builder script or the CUDA Dockerfile) and the torch spec."""
    h = hashlib.sha256()
    for part in (b"offline" if offline else b"cuda", install_sh, recipe, torch_spec.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:12]


def base_tag(offline: bool, images_dir: Path = IMAGES_DIR) -> str:
    """``autoresearch/base:<offline|cuda>-<hash12>`` for the recipe as it is now."""
    recipe = images_dir / (OFFLINE_BUILDER if offline else CUDA_DOCKERFILE)
    digest = base_inputs_hash(offline, (images_dir / INSTALL_SH).read_bytes(), recipe.read_bytes(),
                              torch_spec(offline))
    return f"{BASE_REPO}:{'offline' if offline else 'cuda'}-{digest}"


def default_base_tag() -> str:
    return base_tag(default_offline())


def base_exists(tag: str, cli: docker.DockerClient | None = None) -> bool:
    try:
        (cli or client()).images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_base(offline: bool, rebuild: bool = False, log: Log | None = None) -> str:
    """Build the base image unless its tag already exists (or ``rebuild``); return the tag.

    ``log`` receives the build's output line by line (default: discarded; a failure's
    ``ImageError`` carries the last lines either way).
    """
    cli = client(timeout=BUILD_TIMEOUT_S)
    tag = base_tag(offline)
    if not rebuild and base_exists(tag, cli):
        return tag
    if offline:
        _build_offline(tag, log)
    else:
        _build_cuda(cli, tag, log)
    if not base_exists(tag, cli):
        raise ImageError(f"the base build finished but {tag} is not in the Docker engine")
    return tag


def _build_offline(tag: str, log: Log | None) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "TORCH_SPEC": torch_spec(True)}
    argv = ["bash", str(IMAGES_DIR / OFFLINE_BUILDER), tag]
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace")
    except OSError as exc:
        raise ImageError(f"cannot run {argv[1]}: {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if log:
                log(line)
    if proc.returncode != 0:
        raise ImageError(f"the offline base build failed (exit {proc.returncode}); "
                         "last lines:\n" + "\n".join(tail))


def _build_cuda(cli: docker.DockerClient, tag: str, log: Log | None) -> None:
    stream = cli.api.build(path=str(IMAGES_DIR), dockerfile=CUDA_DOCKERFILE, tag=tag, rm=True,
                           forcerm=True, pull=True, decode=True)
    _follow_build(stream, log, what=f"the CUDA base build ({CUDA_DOCKERFILE})")


def _follow_build(stream: Iterable[dict], log: Log | None, what: str) -> str | None:
    """Consume a docker build stream; return the built image id, raise ImageError on failure."""
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    image_id = None
    try:
        for chunk in stream:
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if line.strip():
                        tail.append(line)
                        if log:
                            log(line)
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("error") or chunk["errorDetail"].get("message", "")
                tail.append(detail)
                raise ImageError(f"{what} failed: {detail.strip()}\nlast lines:\n" + "\n".join(tail))
    except docker.errors.APIError as exc:
        raise ImageError(f"{what} failed: {exc}\nlast lines:\n" + "\n".join(tail)) from exc
    return image_id


# ------------------------------------------------------------------------------------------
# Experiment images
# ------------------------------------------------------------------------------------------

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the build cache then depends only on the content.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
    tar.addfile(info, io.BytesIO(data))


def experiment_context(train_py: bytes) -> io.BytesIO:
    """The whole build context: the experiment Dockerfile and train.py, nothing else."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _tar_add(tar, "Dockerfile", (IMAGES_DIR / EXPERIMENT_DOCKERFILE).read_bytes())
        _tar_add(tar, "train.py", train_py)
    buf.seek(0)
    return buf


def build_experiment(train_py: Path, base: str, tag: str,
                     labels: dict[str, str]) -> tuple[str, float]:
    """Build ``base`` + ``train_py`` as ``tag`` with networking off; return (image id, seconds).

    The Dockerfile has no RUN step, so nothing of the candidate runs at build time; the build
    runs with ``network_mode="none"`` all the same. Same file, base and labels: the layer cache
    gives back the same image id.
    """
    start = time.perf_counter()
    cli = client()
    if not base_exists(base, cli):
        raise ImageError(f"base image {base} is not in the Docker engine: "
                         "build it with `autoresearch images build`")
    stream = cli.api.build(fileobj=experiment_context(Path(train_py).read_bytes()),
                           custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
                           network_mode="none", labels=dict(labels), buildargs={"BASE": base},
                           decode=True)
    image_id = _follow_build(stream, None, what=f"building {tag}")
    if image_id is None:
        image_id = cli.images.get(tag).id
    return image_id, time.perf_counter() - start


def remove_image(tag: str, force: bool = True) -> bool:
    """Remove an image by tag or id; False if it was not there."""
    try:
        client().images.remove(tag, force=force)
    except docker.errors.ImageNotFound:
        return False
    return True
