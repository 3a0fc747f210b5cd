"""Sandbox backends and the images they run: how one trial runs on one machine.

``runner.sandbox.images`` builds the base images (the offline Debian one, or the CUDA one) and the
thin per-experiment images. The backends run one candidate through the same three phases and
return the same ``Outcome``:

- ``docker`` (``runner.sandbox.docker_backend``, the default): the real isolation. The candidate
  trains in a container with no network, a read-only root, no capabilities and hard limits; the
  trusted scorer runs in a second container from the base image.
- ``process`` (``runner.sandbox.process_backend``): plain subprocesses with resource limits, for
  machines without a container engine (a bare GPU box). It isolates nothing and says so.

A backend is a `Backend` (``runner.sandbox.base``): `run(spec, log) -> Outcome`, plus
`sweep_orphans` and `abort` for its lifecycle; `get_backend(name)` gives it. What comes back
from a sandbox (the scorer's result, the candidate's output) is read in one place,
``runner.sandbox.output``; limits are fitted to the machine in ``runner.sandbox.limits``.
"""

from __future__ import annotations

from runner.sandbox.base import (ALONE, TRAINING_FILES, Backend, InfrastructureError, Lane, Log,
                                 Outcome, TrialSpec, training_view)
from runner.sandbox.limits import LimitRequest, Limits, Machine, default_limits, resolve
from runner.sandbox.output import (apply_score, classify_exit, escape_log, escape_text,
                                   parse_score, parse_summary, reported_numbers)

BACKENDS = ("docker", "process")


def get_backend(name: str) -> Backend:
    """The backend called `name` (its module is imported only when asked for)."""
    if name == "docker":
        from runner.sandbox import docker_backend
        return docker_backend.BACKEND
    if name == "process":
        from runner.sandbox import process_backend
        return process_backend.BACKEND
    raise ValueError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}")


__all__ = ["ALONE", "BACKENDS", "TRAINING_FILES", "Lane", "Backend", "InfrastructureError", "LimitRequest",
           "Limits", "Log", "Machine", "Outcome", "TrialSpec", "apply_score", "classify_exit",
           "default_limits", "escape_log", "escape_text", "get_backend", "parse_score",
           "parse_summary", "reported_numbers", "resolve", "training_view"]
