"""Resource limits of a trial, and how they are fitted to the machine that runs it.

Time is not among them: the budget is the trial's (`TrialSpec.budget`), counted by the runner
from the moment it starts the candidate, with no allowance for start-up, compilation or export.
`Limits.launch_s` is the one exception, and it is the runner's, not the candidate's: the docker
backend fixes the candidate's deadline just before it creates the training container, and
creating and starting a container takes the engine 0.2-0.5 s that the candidate never sees.

A command asks for limits with a `LimitRequest` (what the person said, and how many trials
share the machine); `resolve` turns it into `Limits` *on the machine that runs the trial*: this
one for a local trial, the node for a Ray trial (whose size is what Ray says it has, so
``ray start --num-cpus/--memory`` can give a node less than the whole box). Fixed `Limits`
(tests, `reproduce`) are used as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

CPUS_ENV = "AUTORESEARCH_MACHINE_CPUS"
MEMORY_ENV = "AUTORESEARCH_MACHINE_MEMORY_GB"


@dataclass
class Limits:
    """Resource limits of one trial. Defaults suit a GPU box; tests shrink them."""

    memory_bytes: int = 64 * 2**30        # RAM of the training container (no swap)
    cpus: float = 8.0                     # CPU cores of the training container
    pids: int = 512                       # processes and threads (torch.compile spawns workers)
    out_bytes: int = 4 * 2**30            # the one writable output (model.pt2 and nothing big)
    out_files: int = 1024                 # files in the output
    tmp_bytes: int = 2 * 2**30            # /tmp (HOME; compile caches without cache_from/to)
    cache_bytes: int = 2 * 2**30          # the trial's compile cache (runner.sandbox.cache)
    cache_files: int = 50_000             # files and folders in it
    log_bytes: int = 256 * 2**10          # candidate output kept for the record (tail)
    launch_s: float = 0.5                 # docker create + start (0.2-0.5 s measured)
    score_timeout_s: int = 600            # the scorer's own cap
    score_memory_bytes: int = 32 * 2**30  # RAM of the scoring container


@dataclass(frozen=True)
class Machine:
    """The size of the machine a trial runs on."""

    cpus: float
    memory_bytes: int

    @classmethod
    def here(cls) -> "Machine":
        """This machine, or the share of it set in `CPUS_ENV` / `MEMORY_ENV` (a box that
        also does other work, a container smaller than what /proc shows, a Ray node started
        with them: its trials read the node's own setting)."""
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = 16 * 2**30
        cpus = float(os.environ.get(CPUS_ENV) or os.cpu_count() or 1)
        memory = os.environ.get(MEMORY_ENV)
        return cls(cpus=cpus, memory_bytes=int(float(memory) * 2**30) if memory else int(ram))


@dataclass
class LimitRequest:
    """Limits still to be fitted to a machine: what the person set (None: a share of the
    machine) and how many trials share its cores and RAM at once (None: as many as the
    machine holds, which only the machine running them knows, e.g. a Ray node)."""

    memory_bytes: int | None = None
    cpus: float | None = None
    share: int | None = 1

    def resolve(self, machine: Machine, share: int | None = None) -> Limits:
        limits = default_limits(machine, share or self.share or 1)
        if self.memory_bytes is not None:
            limits.memory_bytes = self.memory_bytes
        if self.cpus is not None:
            limits.cpus = self.cpus
        return limits


def default_limits(machine: Machine | None = None, share: int = 1) -> Limits:
    """Limits that fit `machine` (default: this one): no more RAM or cores than it has, split
    over `share` trials running at once."""
    machine = machine or Machine.here()
    base = Limits()
    return replace(base, cpus=float(min(base.cpus, max(machine.cpus / share, 0.5))),
                   memory_bytes=min(base.memory_bytes, int(machine.memory_bytes * 0.75 / share)),
                   score_memory_bytes=min(base.score_memory_bytes,
                                          int(machine.memory_bytes * 0.5 / share)))


def resolve(limits: "Limits | LimitRequest", machine: Machine | None = None,
            share: int | None = None) -> Limits:
    """`limits` as they apply on `machine` (default: this one)."""
    if isinstance(limits, Limits):
        return limits
    return limits.resolve(machine or Machine.here(), share)
