"""Base and experiment images (runner.sandbox.images) against a real Docker engine.

The offline base is built once per session if it is missing (about two minutes from scratch; CI
builds it before the tests). Every container and experiment image made here carries the label
autoresearch.test=1 and is removed at the end.
"""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from runner.sandbox import images as img

TEST_LABEL = {"autoresearch.test": "1"}


def _engine() -> docker.DockerClient | None:
    try:
        cli = docker.from_env(timeout=10)
        cli.ping()
        return cli
    except docker.errors.DockerException:
        return None


pytestmark = pytest.mark.skipif(
    _engine() is None,
    reason="no Docker engine answers docker.from_env().ping() (start one: `dockerd &` or "
    "`systemctl start docker`)",
)


@pytest.fixture(scope="module")
def cli():
    cli = img.client()
    yield cli
    for c in cli.containers.list(all=True, filters={"label": "autoresearch.test=1"}):
        c.remove(force=True)
    for i in cli.images.list(filters={"label": "autoresearch.test=1"}):
        try:
            cli.images.remove(i.id, force=True)
        except docker.errors.ImageNotFound:
            pass


@pytest.fixture(scope="session")
def base() -> str:
    return img.ensure_base(offline=True)


def run(cli: docker.DockerClient, image: str, command: list[str], **kwargs) -> tuple[int, str]:
    """Run a throwaway container with networking off; return (exit code, output)."""
    container = cli.containers.run(image, command, detach=True, network_mode="none",
                                   labels=TEST_LABEL, **kwargs)
    try:
        code = container.wait(timeout=120)["StatusCode"]
        return code, container.logs().decode()
    finally:
        container.remove(force=True)


def tiny_train_py(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(f"# {uuid.uuid4()}\nprint('tiny train.py')\n")
    return path


def test_offline_base_runs_torch_as_trainer(cli, base):
    code, out = run(cli, base, ["python", "-c",
                                "import os, numpy, torch; print(os.getuid(), os.getgid(), "
                                "torch.__version__, numpy.__version__)"],
                    user="10001:10001", read_only=True)
    assert code == 0, out
    uid, gid, torch_version, _ = out.split()
    assert (uid, gid) == ("10001", "10001")
    assert torch_version.startswith(img.DEFAULT_TORCH_SPEC.removeprefix("torch=="))
    # /app is root's (read-only for the user), /out is the user's.
    code, out = run(cli, base, ["stat", "-c", "%n %u %a", "/app", "/data", "/out"])
    assert code == 0, out
    assert out.split("\n")[:3] == ["/app 0 755", "/data 0 755", "/out 10001 755"]


def test_base_tag_is_stable_and_follows_its_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv(img.TORCH_SPEC_ENV, raising=False)
    offline = img.base_tag(True)
    assert offline == img.base_tag(True)
    assert offline.startswith(f"{img.BASE_REPO}:offline-") and len(offline.rsplit("-", 1)[1]) == 12
    assert img.base_tag(False).startswith(f"{img.BASE_REPO}:cuda-")

    copy = tmp_path / "images"
    shutil.copytree(img.IMAGES_DIR, copy)
    assert img.base_tag(True, images_dir=copy) == offline
    (copy / img.INSTALL_SH).write_bytes((copy / img.INSTALL_SH).read_bytes() + b"# changed\n")
    assert img.base_tag(True, images_dir=copy) != offline
    assert img.base_tag(False, images_dir=copy) != img.base_tag(False)

    install_sh = (img.IMAGES_DIR / img.INSTALL_SH).read_bytes()
    recipe = (img.IMAGES_DIR / img.OFFLINE_BUILDER).read_bytes()
    digest = img.base_inputs_hash(True, install_sh, recipe, img.DEFAULT_TORCH_SPEC)
    assert offline.endswith(digest)
    assert img.base_inputs_hash(True, install_sh + b" ", recipe, img.DEFAULT_TORCH_SPEC) != digest
    assert img.base_inputs_hash(True, install_sh, recipe, "torch==2.12.0") != digest
    monkeypatch.setenv(img.TORCH_SPEC_ENV, "torch==2.12.0")
    assert img.base_tag(True) != offline


def test_experiment_image(cli, base, tmp_path):
    train_py = tiny_train_py(tmp_path)
    tag = f"autoresearch/exp:test-{uuid.uuid4().hex[:8]}"
    labels = {**TEST_LABEL, "autoresearch.commit": "0123456789abcdef", "autoresearch.seed": "0"}
    image_id, seconds = img.build_experiment(train_py, base, tag, labels)
    image = cli.images.get(tag)
    assert image.id == image_id
    assert labels.items() <= image.labels.items()
    assert image.attrs["Config"]["User"] == "10001:10001"
    assert image.attrs["Config"]["WorkingDir"] == "/out"
    # One thin layer on top of the base: train.py.
    base_layers = cli.images.get(base).attrs["RootFS"]["Layers"]
    assert image.attrs["RootFS"]["Layers"][:-1] == base_layers

    code, out = run(cli, tag, ["sh", "-c", "id -u; id -g; cat /app/train.py"], read_only=True)
    assert code == 0, out
    assert out == "10001\n10001\n" + train_py.read_text()
    code, out = run(cli, tag, ["python", "/app/train.py"], read_only=True)
    assert (code, out) == (0, "tiny train.py\n")

    again_id, again_seconds = img.build_experiment(train_py, base, tag, labels)
    assert again_id == image_id  # the layer cache: nothing rebuilt
    assert again_seconds < 2.0, f"a cached experiment build took {again_seconds:.2f}s"


def test_experiment_build_has_no_network(cli, base, tmp_path, monkeypatch):
    """build_experiment asks for network_mode=none, and the engine honours it for build steps."""
    seen: list[dict] = []
    original = docker.api.client.APIClient.build

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(docker.api.client.APIClient, "build", spy)
    tag = f"autoresearch/exp:test-{uuid.uuid4().hex[:8]}"
    img.build_experiment(tiny_train_py(tmp_path), base, tag, TEST_LABEL)
    assert [k.get("network_mode") for k in seen] == ["none"]
    monkeypatch.undo()

    # Were there a RUN step, it would see no interface but loopback.
    dockerfile = (f"FROM {base}\nRUN ls /sys/class/net > /nets\n").encode()
    probe = f"autoresearch/exp:test-netprobe-{uuid.uuid4().hex[:8]}"
    stream = cli.api.build(fileobj=io.BytesIO(dockerfile), tag=probe, rm=True,
                           forcerm=True, network_mode="none", labels=TEST_LABEL, decode=True)
    img._follow_build(stream, None, what="network probe")
    code, out = run(cli, probe, ["cat", "/nets"])
    assert (code, out.split()) == (0, ["lo"])


def test_missing_base_and_absent_image(tmp_path):
    with pytest.raises(img.ImageError, match="autoresearch images build"):
        img.build_experiment(tiny_train_py(tmp_path), "autoresearch/base:offline-missing000000",
                             "autoresearch/exp:test-never", TEST_LABEL)
    assert img.remove_image("autoresearch/exp:test-absent-image") is False


def test_default_offline(monkeypatch):
    monkeypatch.delenv(img.BASE_ENV, raising=False)
    assert img.default_offline() and img.default_base_tag() == img.base_tag(True)
    monkeypatch.setenv(img.BASE_ENV, "cuda")
    assert not img.default_offline() and img.default_base_tag() == img.base_tag(False)
