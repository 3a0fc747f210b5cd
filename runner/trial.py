"""One trial, and where trials run.

`run_trial` builds, trains and scores one train.py on a backend of this machine and returns
its record (`runner.record`): the unit that `autoresearch trial`, the tests, the benchmarks,
the overnight loop, the cluster's nodes and `reproduce` all use. Limits asked for with a
`LimitRequest` are fitted here, on the machine that runs the trial.

An `Executor` is where and how the loop's trials run, with their lifecycle: `run` one trial
(blocking; the loop calls it from its slots' threads, with the trial's `Lane`), `sweep_orphans` at start, `abort` a
run's trials at once on Ctrl-C, and `uses_gpu` for a slot. `LocalTrials` runs them here on a
backend; `runner.cluster.ClusterTrials` runs them as Ray tasks on other machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from runner import record
from runner.record import Record
from runner.sandbox import ALONE, Lane, Log, Machine, TrialSpec, get_backend, resolve


def _quiet(_: str) -> None:
    pass


def run_trial(spec: TrialSpec, backend: str = "docker", log: Log = _quiet,
              machine: Machine | None = None, share: int | None = None, lane: Lane = ALONE,
              **record_fields: Any) -> Record:
    """Run one trial on `backend` of this machine (of size `machine`, default: measured, with
    `share` trials at once) and return its record; `lane` is its place on its slot (default:
    alone; the loop's lanes let the next trial start while this one is scored). Raises
    InfrastructureError (and the image errors) when the trial could not run at all; a
    candidate's failure is a record."""
    spec = replace(spec, limits=resolve(spec.limits, machine, share))
    started = time.time()
    t0 = time.perf_counter()
    outcome = get_backend(backend).run(spec, log, lane)
    return record.from_outcome(spec, outcome, backend, started, time.perf_counter() - t0,
                               **record_fields)


class Executor(Protocol):
    """Where and how trials run (see the module docstring)."""

    backend: str

    def run(self, spec: TrialSpec, log: Log = _quiet, lane: Lane = ALONE,
            **record_fields: Any) -> Record: ...

    def sweep_orphans(self, log: Log) -> int: ...

    def abort(self, run: str) -> int: ...

    def uses_gpu(self, slot: str | None) -> bool: ...


@dataclass
class LocalTrials:
    """Trials on this machine, on one of its backends; a slot is a GPU id or None (CPU)."""

    backend: str = "docker"

    def run(self, spec: TrialSpec, log: Log = _quiet, lane: Lane = ALONE,
            **record_fields: Any) -> Record:
        return run_trial(spec, self.backend, log=log, lane=lane, **record_fields)

    def sweep_orphans(self, log: Log) -> int:
        return get_backend(self.backend).sweep_orphans(log)

    def abort(self, run: str) -> int:
        return get_backend(self.backend).abort(run)

    def uses_gpu(self, slot: str | None) -> bool:
        return slot is not None
