"""Sandbox backends and the images they run.

``runner.sandbox.images`` builds the base images (the offline Debian one, or the CUDA one) and the
thin per-experiment images. The backends run one candidate through the same three phases and
return the same ``Outcome``:

- ``docker`` (``runner.sandbox.docker_backend``, the default): the real isolation. The candidate
  trains in a container with no network, a read-only root, no capabilities and hard limits; the
  trusted scorer runs in a second container from the base image.
- ``process`` (``runner.sandbox.process_backend``): plain subprocesses with resource limits, for
  machines without a container engine (a bare GPU box). It isolates nothing and says so.

A backend is a function ``run(spec: TrialSpec, log) -> Outcome``; nothing else is shared.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]

TRAINING_FILES = ("manifest.json", "tokenizer.json", "token_bytes.npy", "train")  # never val/


@dataclass
class Limits:
    """Resource limits of one trial. Defaults suit a GPU box; tests shrink them."""

    memory_bytes: int = 64 * 2**30        # RAM of the training container (no swap)
    cpus: float = 8.0                     # CPU cores of the training container
    pids: int = 512                       # processes and threads (torch.compile spawns workers)
    out_bytes: int = 4 * 2**30            # the one writable output (model.pt2 and nothing big)
    out_files: int = 1024                 # files in the output
    tmp_bytes: int = 2 * 2**30            # /tmp (compile caches, HOME)
    log_bytes: int = 256 * 2**10          # candidate output kept for the record (tail)
    startup_s: int = 240                  # hard cap = budget + this (imports, compile, export)
    score_timeout_s: int = 600            # the scorer's own cap
    score_memory_bytes: int = 32 * 2**30  # RAM of the scoring container


@dataclass
class TrialSpec:
    """Everything a backend needs to build, train and score one candidate."""

    train_py: Path
    data_dir: Path
    budget: int                                  # training seconds (AUTORESEARCH_TIME_BUDGET)
    run: str = "trial"                           # run name: labels, tags, container names
    number: int = 0                              # experiment number within the run
    seed: int = 0
    gpu: str | None = None                       # one GPU id, or None for CPU
    limits: Limits = field(default_factory=Limits)
    labels: dict[str, str] = field(default_factory=dict)   # extra image labels (git commit...)
    artifact_dir: Path | None = None             # where model.pt2 is copied out, if anywhere
    eval_tokens: int | None = None               # AUTORESEARCH_EVAL_TOKENS for the scorer (tests)
    base_image: str | None = None                # docker: the base tag (default: the current one)
    image: str | None = None                     # docker: rerun this experiment image, no build


@dataclass
class Outcome:
    """What a backend found. `status` is ok (scored; the loop turns it into keep or discard),
    crash, timeout, oom or invalid. `phases` holds wall seconds of build, train, score (and, for the
    docker backend, the steps inside them); `summary` is the candidate's own `key: value`
    summary: informative, never trusted for the decision."""

    status: str
    reason: str = ""
    val_bpb: float | None = None
    score: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, str] = field(default_factory=dict)
    log_tail: str = ""
    exit_code: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    image_tag: str | None = None
    image_id: str | None = None
    peak_memory_bytes: int | None = None
    gpu: dict[str, Any] = field(default_factory=dict)   # NVML summary of the train phase
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InfrastructureError(RuntimeError):
    """The trial could not run for reasons that are not the candidate's: no engine, no base
    image, no data. The message says what to do."""


def parse_summary(log: str) -> dict[str, str]:
    """The `key: value` lines after the last `---` line of train.py's output."""
    if "\n---\n" not in "\n" + log:
        return {}
    tail = ("\n" + log).rsplit("\n---\n", 1)[1]
    out = {}
    for line in tail.splitlines()[:64]:
        m = re.fullmatch(r"([A-Za-z_][\w.]{0,63}):\s*(.{0,200})", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def parse_score(stdout: str) -> dict[str, Any]:
    """The scorer prints exactly one JSON line. Anything else is treated as no score."""
    lines = [l for l in stdout.strip().splitlines() if l.strip()]
    if len(lines) != 1:
        return {"status": "invalid", "reason": f"scorer printed {len(lines)} lines, not one"}
    try:
        result = json.loads(lines[0])
    except ValueError:
        return {"status": "invalid", "reason": "scorer output is not JSON"}
    if not isinstance(result, dict) or result.get("status") not in ("ok", "invalid"):
        return {"status": "invalid", "reason": "scorer output has no valid status"}
    return result


def escape_log(text: str, limit: int) -> str:
    """The last `limit` characters of candidate output, with control characters escaped so a
    log cannot drive a terminal or pose as another record."""
    text = text[-limit:]
    return "".join(ch if ch in "\n\t" or 32 <= ord(ch) < 127 or ord(ch) > 159 else f"\\x{ord(ch):02x}"
                   for ch in text)


def training_view(data_dir: Path) -> list[Path]:
    """The parts of a prepared data set a candidate may see: everything but the validation
    split. Raises InfrastructureError when the data set is not there."""
    if not (data_dir / "manifest.json").is_file():
        raise InfrastructureError(
            f"no prepared data in {data_dir}: run `autoresearch prepare` (or pass --data-dir)")
    missing = [name for name in TRAINING_FILES if not (data_dir / name).exists()]
    if missing or not (data_dir / "val").is_dir():
        raise InfrastructureError(f"{data_dir} is incomplete ({', '.join(missing) or 'val/'} "
                                  "missing): run `autoresearch prepare` again")
    return [data_dir / name for name in TRAINING_FILES]


def classify_exit(exit_code: int | None, oom_killed: bool, timed_out: bool, log: str,
                  model_exists: bool) -> tuple[str, str]:
    """Status and reason of the training phase, from what the host saw."""
    if timed_out:
        return "timeout", "killed at the hard wall-clock cap"
    if oom_killed or re.search(r"CUDA out of memory|OutOfMemoryError|\bMemoryError\b", log[-20000:]):
        return "oom", "ran out of memory"
    if exit_code != 0:
        return "crash", f"train.py exited with code {exit_code}"
    if not model_exists:
        return "invalid", "train.py exited without writing model.pt2"
    return "ok", ""


def get_backend(name: str):
    """The backend's `run` function by name."""
    if name == "docker":
        from runner.sandbox import docker_backend
        return docker_backend.run
    if name == "process":
        from runner.sandbox import process_backend
        return process_backend.run
    raise ValueError(f"unknown backend {name!r}: use docker or process")
