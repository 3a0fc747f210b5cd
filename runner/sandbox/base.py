"""What every backend shares: the trial's spec, its outcome, the backend's interface, and the
error that means "not the candidate's fault"."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from runner.sandbox.limits import LimitRequest, Limits

Log = Callable[[str], None]

TRAINING_FILES = ("manifest.json", "tokenizer.json", "token_bytes.npy", "train")  # never val/


@dataclass
class TrialSpec:
    """Everything a backend needs to build, train and score one candidate."""

    train_py: Path
    data_dir: Path
    budget: int                                  # wall seconds of the candidate, all of them
    run: str = "trial"                           # run name: labels, tags, container names
    number: int = 0                              # experiment number within the run
    seed: int = 0
    gpu: str | None = None                       # one GPU id, or None for CPU
    # A request is fitted to the machine that runs the trial (`runner.trial.run_trial`).
    limits: Limits | LimitRequest = field(default_factory=Limits)
    labels: dict[str, str] = field(default_factory=dict)   # extra image labels (git commit...)
    artifact_dir: Path | None = None             # where model.pt2 is copied out, if anywhere
    # The compile cache (runner.sandbox.cache): the trial starts on a private copy of
    # `cache_from` (the run's) and, when scored, leaves its own in `cache_to`.
    cache_from: Path | None = None
    cache_to: Path | None = None
    eval_tokens: int | None = None               # AUTORESEARCH_EVAL_TOKENS for the scorer (tests)
    base_image: str | None = None                # docker: the base tag (default: the current one)
    image: str | None = None                     # docker: rerun this experiment image, no build

    @property
    def fixed_limits(self) -> Limits:
        """The limits a backend applies: they must have been resolved on this machine."""
        if not isinstance(self.limits, Limits):
            raise TypeError("resolve the spec's limits first (runner.sandbox.limits.resolve)")
        return self.limits


@dataclass
class Outcome:
    """What a backend found. `status` is ok (scored; the loop turns it into keep or discard),
    crash, timeout, oom or invalid. `training_seconds` is the runner's own count of the
    candidate's wall time, from the moment it started it to its exit or to the deadline at
    which the runner froze it (the budget: nothing is outside it). `phases` holds wall seconds
    of build, train, score (and, for the docker backend, the steps inside them); `summary` is
    the candidate's own `key: value` summary: informative, never trusted for the decision."""

    status: str
    reason: str = ""
    val_bpb: float | None = None
    score: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, str] = field(default_factory=dict)
    log_tail: str = ""
    training_seconds: float | None = None               # the runner's clock: start to exit or stop
    stopped_at_deadline: bool = False                   # frozen and killed when the budget ran out
    exit_code: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    image_tag: str | None = None
    image_id: str | None = None
    peak_memory_bytes: int | None = None
    gpu: dict[str, Any] = field(default_factory=dict)   # NVML summary of the train phase
    compile_cache: dict[str, Any] = field(default_factory=dict)   # cold or warm, bytes
    backend: str = ""
    scoring: str = "not scored"                         # alone, shared, rescored alone (`Lane`)
    slot_seconds: float | None = None                   # shared lane: seconds it held the slot
                                                        # (to its hand-on, + a rescoring alone)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lane:
    """A trial's place on its slot (a GPU), as the backend sees it. This one, `ALONE`, holds the
    slot from build to clean-up: the trial is scored alone, the slot waits for it.

    The loop's lanes (`runner.loop.SlotLane`) are `shared`: at `trained()` (the candidate is
    frozen and killed, its GPU memory given back) the slot starts its next trial while this one
    is scored, so the scorer shares the GPU with the next candidate's first seconds. Then the
    scorer may use at most `SHARED_SCORER_MEMORY` of the GPU's memory, and a scoring that ran
    out of memory or time is done again `alone()`: once nothing trains on the slot. A model's
    own verdicts (not causal, not pure, a bad file) are never retried: a second draw of the
    scorer's random cuts would be a second chance."""

    shared = False

    def trained(self) -> None:
        """Training is over: the slot may start its next trial (shared lanes)."""

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Wait until nothing trains on the slot, and keep it so until the block ends."""
        yield

    def check(self) -> None:
        """Raise (InfrastructureError) if nothing may start any more on the slot (the loop is
        stopping); called before each scoring."""


ALONE = Lane()
SHARED_SCORER_MEMORY = 0.2      # share of the GPU's memory a scorer may use beside a candidate
# The `cause` of a failure a co-tenant may explain: the scorer's own ("memory", "time"), or the
# runner's when the scorer gave no result at all (killed, crashed: "no result").
RETRY_CAUSES = ("memory", "time", "no result")


def scorer_options(memory_fraction: float | None, cuts_seed: int | None) -> list[str]:
    """The scorer's command-line options for a cap on its GPU memory and the trial's cuts."""
    options = ["--memory-fraction", str(memory_fraction)] if memory_fraction else []
    return options + (["--cuts-seed", str(cuts_seed)] if cuts_seed is not None else [])


def score_in_lane(lane: Lane, outcome: Outcome, score_once: Callable[[float | None], None]
                  ) -> None:
    """Score through `score_once(memory_fraction)` (None: no cap): shared with the slot's next
    trial when the lane is shared, again alone when that failed for memory or time."""
    if not lane.shared:
        outcome.scoring = "alone"
        score_once(None)
        return
    outcome.scoring = "shared"
    lane.check()
    score_once(SHARED_SCORER_MEMORY)
    cause = outcome.score.get("cause")
    if outcome.status != "invalid" or cause not in RETRY_CAUSES:
        return
    t = time.perf_counter()
    with lane.alone():
        alone = time.perf_counter()
        outcome.phases["score_wait"] = alone - t
        first = outcome.reason
        outcome.status, outcome.reason, outcome.score = "crash", "", {}
        score_once(None)
        if outcome.slot_seconds is not None:      # the slot was this trial's again meanwhile
            outcome.slot_seconds += time.perf_counter() - alone
    outcome.scoring = f"rescored alone (shared: {first})"[:300]


class InfrastructureError(RuntimeError):
    """The trial could not run for reasons that are not the candidate's: no engine, no base
    image, no data. The message says what to do."""


def _none_swept(log: Log) -> int:
    return 0


def _none_aborted(run: str) -> int:
    return 0


def _as_it_is(spec: TrialSpec) -> TrialSpec:
    return spec


@dataclass(frozen=True)
class Backend:
    """How a trial runs on this machine, with its lifecycle:

    - `run(spec, log, lane) -> Outcome`: build, train and score one candidate (its
      `spec.limits` already resolved), telling `lane` when training is over and scoring
      through `score_in_lane`; a candidate's failure is an Outcome, InfrastructureError is not;
    - `sweep_orphans(log) -> int`: remove what runners that are gone left behind (at start);
    - `abort(run) -> int`: stop this process's trials of `run` at once, from another thread
      (Ctrl-C): each trial's `run` then returns or raises soon and cleans up after itself;
    - `pin(spec) -> spec`: before a spec travels to another machine, fix here what must be
      the same on every machine (docker: the base image tag).
    """

    name: str
    run: Callable[[TrialSpec, Log, Lane], Outcome]
    sweep_orphans: Callable[[Log], int] = _none_swept
    abort: Callable[[str], int] = _none_aborted
    pin: Callable[[TrialSpec], TrialSpec] = _as_it_is


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


DEADLINE_ENV = "AUTORESEARCH_DEADLINE"          # when the runner stops the candidate (epoch s)


def deadline_env(budget: float, lead_s: float = 0.0) -> tuple[float, dict[str, str]]:
    """The candidate's deadline, fixed now: (a `time.monotonic()` deadline for the runner,
    the environment that tells the candidate the same moment as a `time.time()` epoch).
    `lead_s` is the runner's own overhead between now and the candidate's start. A container
    shares the host's clock (there is no time namespace), so the epoch means the same inside."""
    mono, wall = time.monotonic(), time.time()
    return mono + lead_s + budget, {DEADLINE_ENV: f"{wall + lead_s + budget:.3f}",
                                    "AUTORESEARCH_TIME_BUDGET": str(budget)}
