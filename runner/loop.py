"""The overnight loop: propose, commit, build, train, score, keep or discard; repeat.

**Slots.** One trial runs per slot (a GPU, or a share of the CPUs). The agent works ahead in its
own thread, keeping as many candidates ready as there are slots, so a slot never waits for it.
A fresh run starts with the baseline (and the noise runs, one per slot): the agent proposes
from the same train.py meanwhile and the other slots train those candidates at once; their keep
decisions wait until the baseline and noise runs are recorded.

**Noise.** A fresh run measures the unchanged train.py first: `noise_runs` seeds (the first is
the baseline) and `same_seed_runs` reruns of the baseline's seed (the machine's own
nondeterminism). `remeasure_noise` measures the current best the same way on a resumed run
and after every keep (decisions wait for it, as they do at the start).

**Keep rule.** A candidate is measured against the best *at the time it finishes*, not the one
it was proposed from. The default rule is sequential (`runner.decide.sequential`): the best's
score is the mean of its runs, and a candidate that looks better but is inside the noise is
rerun with other seeds, on its own slot while the others go on, until a one-sided t-test at
the false-keep rate `alpha` keeps it or it is clearly no better (at most `max_runs` runs;
reruns stop once they would take more than `rerun_share` of the run's trial time). The old
rule, `keep_rule="threshold"`, keeps one run that beats the best by `max(min_delta, noise_k x
spread)` (with `confirm`: and the mean of it and one rerun still does). A kept candidate that
was proposed on an older best replaces the whole train.py (its file is committed on top of the
branch). Every record says which rule decided it (`decision`), and with the sequential rule
carries its runs and the test's figures (`runs`, `mean_bpb`, `test`).

**Scoring beside the next trial.** With `overlap_scoring` (on by default for local GPU slots)
a slot starts its next trial as soon as the candidate is frozen and killed, while the trusted
scorer still runs on the same GPU (at most `runner.sandbox.base.SHARED_SCORER_MEMORY` of its
memory): the slot's time goes to training, not to waiting for the score. One trial is scored
at a time per slot (the next waits, holding its slot, if its own training ends first); a
scoring that failed for memory or time is done again alone (`SlotLane.alone`), a model's own
verdicts never. The next candidate is proposed before this score is known, as with several
slots. CPU slots share one lane, and the machine's cores: it is off there unless asked for.

**Compile cache.** Every trial starts on a private copy of the run's torch.compile cache
(`runs/<tag>/compile-cache`) and a scored one leaves its own in `runs/<tag>/trial-caches/`;
after the verdict, a keep's (the baseline's too) becomes the run's (`runner.sandbox.cache.promote`),
and so does a scored noise run's of the best's own train.py that started warm (its cache is
fuller: a trial on a cache that a cold trial made still compiles a few kernels); the others are
deleted. Only the kept line writes the cache the next candidates start on.

**Nothing is lost.** A candidate is committed (off the branch, under
`refs/autoresearch/<tag>/candidates/<n>`) before it trains; its record is appended and synced
after; the refs and the branch move last (`RunRepo.settle`). On start, `reconcile` redoes the
last step for every record and returns the candidates that were committed but never recorded,
which train first. So `kill -9` at any moment, then the same command, loses and duplicates
nothing. One runner per run (`hold_run`): a second one on the same tag stops at once, before it
sweeps a container or reads the ledger, instead of killing the first one's trials as orphans.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from runner import decide, record
from runner.agents import History, Propose, make_agent, memory
from runner.ledger import Ledger
from runner.paths import DEFAULT_BUDGET, PROGRAM_MD, REPO_ROOT, RUNS_DIR
from runner.record import KEEP, Record
from runner.repo import RunRepo, check_tag, open_run
from runner.sandbox import InfrastructureError, Lane, LimitRequest, Limits, TrialSpec, cache
from runner.trial import Executor, LocalTrials

MAX_FAILED_PROPOSALS = 10          # in a row: the agent or its server is broken, stop


@dataclass
class LoopConfig:
    tag: str
    agent: str = "search"                 # "search", "llm" or "exec" (options: agent_options)
    model: str | None = None              # litellm model string for the llm agent
    api_base: str | None = None
    budget: int = DEFAULT_BUDGET
    max_experiments: int | None = None    # experiments in the run, the baseline included
    until: datetime | None = None
    max_cost: float | None = None         # USD of LLM calls over the whole run
    data_dir: Path = REPO_ROOT / "data"
    runs_dir: Path = RUNS_DIR
    repo_root: Path = REPO_ROOT           # the repository whose train.py the run starts from
    keep_rule: str = "sequential"         # or "threshold" (runner.decide)
    min_delta: float = 0.0005             # a keep must beat the best by more than this
    noise_runs: int = 3                   # seeds of the unchanged train.py (the baseline's first)
    same_seed_runs: int = 1               # reruns of the baseline's seed (nondeterminism)
    remeasure_noise: bool = False         # measure the best's noise again: on resume, each keep
    alpha: float = decide.ALPHA           # sequential: the false-keep rate per decision
    max_runs: int = decide.MAX_RUNS       # sequential: runs of one candidate, at most
    rerun_share: float = decide.RERUN_SHARE   # sequential: of the run's trial seconds, at most
    futility: float = decide.FUTILITY     # sequential: discard once t is at most this
    noise_k: float = 2.0                  # threshold: beat the best by noise_k x spread
    confirm: bool = False                 # threshold: retrain an apparent win with another seed
    seed: int = 0
    gpus: list[str | None] = field(default_factory=lambda: [None])   # one slot per entry
    # per slot; a request is fitted to the machine that runs each trial
    limits: Limits | LimitRequest = field(default_factory=lambda: LimitRequest(share=None))
    eval_tokens: int | None = None        # tests only
    agent_options: dict[str, Any] = field(default_factory=dict)
    executor: Executor = field(default_factory=LocalTrials)   # where trials run
    track: tuple[str, ...] = ()           # trackers that get a copy of every record (tracking.py)
    compile_cache: bool = True            # trials start on the kept line's torch.compile cache
    overlap_scoring: bool | None = None   # the next trial trains while one is scored (None:
                                          # on for local GPU slots)

    def __post_init__(self) -> None:
        # CPU slots of a local run share this machine: split it between them.
        if isinstance(self.limits, LimitRequest) and self.limits.share is None \
                and isinstance(self.executor, LocalTrials):
            self.limits.share = len(self.gpus) if self.gpus[0] is None else 1


@dataclass
class LoopState:
    """What the live view shows; the loop updates it as it goes."""

    tag: str
    number: int = 0
    phase: str = "starting"
    phase_started: float = field(default_factory=time.time)
    best: float | None = None
    threshold: float | None = None
    noise: str = ""                        # the measured noise, in a few words
    recent: list[Record] = field(default_factory=list)
    running: dict[int, str] = field(default_factory=dict)   # number -> description
    done: int = 0                          # experiments finished by this process
    total: int = 0                         # experiments in the ledger
    message: str = ""

    def enter(self, phase: str, number: int | None = None) -> None:
        self.phase, self.phase_started = phase, time.time()
        if number is not None:
            self.number = number


Observer = Callable[[LoopState], None]


@dataclass
class Candidate:
    number: int
    commit: str | None                    # None: the proposal failed
    parent: str | None
    description: str
    text: str = ""
    role: str = "candidate"               # baseline | noise | candidate
    seed: int = 0
    llm: dict[str, Any] | None = None
    error: str = ""
    same_seed: bool = False               # a noise run that repeats the baseline's seed
    runs: list[Record] = field(default_factory=list)   # its trials so far (a rerun follows)

    @property
    def next_seed(self) -> int:
        return self.seed + len(self.runs)


def completes_cache(rec: Record, best: Record | None) -> bool:
    """Whether a measurement's cache may replace the run's: a scored run of the best's own
    train.py (same sha256: the cache has the keep's standing) that started warm. A trial on a
    cache that a cold trial made still compiles a few kernels (bench/RESULTS.md), so its cache
    is fuller; a cold one's adds nothing."""
    sha = rec.get("train_sha256")
    return (rec.get("trial_status") == "ok" and sha is not None and best is not None
            and best.get("train_sha256") == sha
            and (rec.get("compile_cache") or {}).get("start") == "warm")


class Slot:
    """What the trials of one slot share: how many train on it now, whether one is being
    scored alone, whether one is being scored at all (one at a time), and whether the loop
    stopped (Ctrl-C): then nothing that waited on the slot starts any more."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.training = 0
        self.exclusive = False
        self.busy = False                    # a trial of this slot is being scored
        self.stopped = False

    def stop(self) -> None:
        """The loop is stopping: whatever waits on this slot, or asks it later, is refused."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def check(self) -> None:                 # under cond
        if self.stopped:
            raise InfrastructureError("the run is stopping: nothing more starts on this slot")


class SlotLane(Lane):
    """A trial's place on its slot when scoring overlaps the next trial (`runner.sandbox.Lane`).
    In the slot's thread: `begin()` before the trial, `close()` after it, whatever happened.
    Once the loop stops (`Slot.stop`), `begin`, `trained`, `alone` and `check` raise
    InfrastructureError instead of waiting or letting anything start."""

    shared = True

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.freed: cf.Future = cf.Future()  # done: the slot may start its next trial
        self.training = self.scoring = False

    def begin(self) -> None:
        slot = self.slot
        with slot.cond:                      # not while a trial before is scored alone
            slot.cond.wait_for(lambda: slot.stopped or not slot.exclusive)
            slot.check()
            slot.training += 1
            self.training = True

    def trained(self) -> None:
        self.stop_training()
        if not self.scoring:
            slot = self.slot
            with slot.cond:                  # the slot's trial before is scored first
                slot.cond.wait_for(lambda: slot.stopped or not slot.busy)
                slot.check()
                slot.busy = True
                self.scoring = True
            self.freed.set_result(None)

    def check(self) -> None:
        with self.slot.cond:
            self.slot.check()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        slot = self.slot
        with slot.cond:
            slot.cond.wait_for(lambda: slot.stopped
                               or (slot.training == 0 and not slot.exclusive))
            slot.check()
            slot.exclusive = True
        try:
            yield
        finally:
            with slot.cond:
                slot.exclusive = False
                slot.cond.notify_all()

    def stop_training(self) -> None:
        with self.slot.cond:
            if self.training:
                self.training = False
                self.slot.training -= 1
                self.slot.cond.notify_all()

    def close(self) -> None:
        self.stop_training()
        if self.scoring:
            self.scoring = False
            with self.slot.cond:
                self.slot.busy = False
                self.slot.cond.notify_all()


Running = tuple[Candidate, "str | None", "SlotLane | None"]   # its slot, its lane if shared


def parse_until(text: str, now: datetime | None = None) -> datetime:
    """`HH:MM` -> the next time the local clock shows it."""
    now = now or datetime.now()
    try:
        t = datetime.strptime(text, "%H:%M")
    except ValueError:
        raise ValueError(f"--until {text!r}: use HH:MM (24-hour clock)") from None
    when = now.replace(hour=t.hour, minute=t.minute, second=0, microsecond=0)
    return when if when > now else when + timedelta(days=1)


def history(ledger: Ledger, diff: Callable[[str, str], str] | None = None) -> History:
    """What the agent knows of the run: every record (`runner.agents.memory.build`)."""
    return memory.build(ledger.records, diff)


def spread(ledger: Ledger) -> float:
    """Seed-to-seed standard deviation of the latest noise measurement (baseline and noise runs
    of one commit, different seeds); 0 with fewer than two scored runs."""
    noise = decide.noise_of(ledger.records)
    return (noise.seed_sd or 0.0) if noise else 0.0


def groups(ledger: Ledger) -> dict[str, list[float]]:
    """val_bpb of every commit's runs over different seeds: the noise measurements (without
    their same-seed reruns) and the runs of candidates that were rerun. The sd is pooled over
    them; the best's group is its score."""
    out: dict[str, list[float]] = {}
    for r in ledger.records:
        commit = r.get("commit")
        if commit is None:
            continue
        if r.get("role") in ("baseline", "noise"):
            if not r.get("same_seed") and r.get("val_bpb") is not None:
                out.setdefault(commit, []).append(float(r["val_bpb"]))  # type: ignore[arg-type]
        elif r.get("runs"):
            out.setdefault(commit, []).extend(
                float(run["val_bpb"]) for run in r["runs"] if run.get("val_bpb") is not None)
    return out


def best_runs(ledger: Ledger) -> list[float]:
    """The best's runs (its mean is its score): its group, else its one val_bpb."""
    best = ledger.best()
    assert best is not None
    return groups(ledger).get(str(best["commit"])) or [ledger.best_bpb()]


def run_entry(rec: Record) -> dict[str, Any]:
    return {k: rec.get(k) for k in ("seed", "status", "val_bpb", "wall_seconds", "reason")}


def threshold(cfg: LoopConfig, ledger: Ledger) -> tuple[float, str]:
    s = spread(ledger)
    value = max(cfg.min_delta, cfg.noise_k * s)
    return value, f"max(min_delta {cfg.min_delta:g}, {cfg.noise_k:g} x spread {s:.6f})"


def reconcile(run: RunRepo, ledger: Ledger) -> list[Candidate]:
    """Make refs and branch agree with the ledger after a crash; return the candidates that
    were committed but never recorded, oldest first, to be trained again."""
    by_number = {r["number"]: r for r in ledger.records}
    pending = []
    for number, (commit, parent, description) in sorted(run.candidates().items()):
        rec = by_number.get(number)
        if rec is None:
            pending.append(Candidate(number, commit, parent, description,
                                     text=run.read_train(commit)))
        else:
            run.settle(number, commit, rec["commit"] if rec["status"] == KEEP else None)
    best = ledger.best()
    if best is not None and run.head() != best["commit"]:
        run.settle(best["number"], None, best["commit"])
    return pending


RUN_LOCK = "runner.lock"


def hold_run(run_dir: Path, tag: str) -> int:
    """Take the run's lock (`runs/<tag>/runner.lock`, flock: the kernel lets it go when the
    process dies, however it dies) and note who holds it; returns its fd, which holds it until
    closed. A run that another live runner holds raises InfrastructureError, saying which."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a runner"
        os.close(fd)
        raise InfrastructureError(
            f"run {tag} is in use by another runner ({holder}): two runners on one run would "
            f"sweep each other's trials; stop that one first, or use another --tag") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, since {datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
    return fd


class Overnight:
    """One overnight run. Its fields are the state the steps share (under `lock` where the
    agent's thread and the slots' meet); its methods are the steps: `propose` (in the agent's
    thread), `train` (in a slot's thread), `settle` and `finish` a trial, `halt` to stop
    starting anything; `run` schedules them until a limit is reached."""

    def __init__(self, cfg: LoopConfig, observe: Observer = lambda s: None,
                 log: Callable[[str], None] = print):
        check_tag(cfg.tag)                              # before anything is created
        self.cfg, self.observe, self.log = cfg, observe, log
        self.executor = cfg.executor
        self.run_dir = cfg.runs_dir / cfg.tag
        self.work = self.run_dir / "candidates"
        self.compile_cache = self.run_dir / "compile-cache"     # the kept line's (promote)
        self.trial_caches = self.run_dir / "trial-caches"       # scored trials' until decided
        self.run_lock = hold_run(self.run_dir, cfg.tag)          # closed when run() ends
        try:
            self.setup(cfg, log)
        except BaseException:
            os.close(self.run_lock)
            raise

    def setup(self, cfg: LoopConfig, log: Callable[[str], None]) -> None:
        self.ledger = Ledger.open(self.run_dir)
        self.repo = open_run(cfg.tag, cfg.runs_dir, root=cfg.repo_root)
        self.state = LoopState(tag=cfg.tag, recent=self.ledger.records[-5:],
                               total=len(self.ledger.records))
        self.lock = threading.RLock()                   # ledger, git, state
        self.executor.sweep_orphans(log)
        self.agent: Propose = make_agent(cfg.agent, **self.agent_options())
        self.diff = memory.cached(self.repo.diff)      # kept changes' diffs, for the agent
        self.program = PROGRAM_MD.read_text(encoding="utf-8") if PROGRAM_MD.exists() else ""
        from runner.tracking import open_tracking       # None without --track
        self.tracking = open_tracking(cfg.track, cfg.tag, self.run_dir, self.ledger.records,
                                      diff=self.repo.diff, log=log)
        # scheduling state
        self.measuring: list[Candidate] = []           # baseline and noise runs not yet recorded
        self.ready: list[Candidate] = []                # proposed, waiting for a slot
        self.free: list[str | None] = list(cfg.gpus)    # idle slots
        self.running: dict[cf.Future, Running] = {}
        self.overlap = (cfg.overlap_scoring if cfg.overlap_scoring is not None
                        else isinstance(self.executor, LocalTrials)
                        and self.executor.uses_gpu(cfg.gpus[0]))
        self.lanes = {gpu: Slot() for gpu in cfg.gpus}  # CPU slots (None) share one
        self.freeing: dict[cf.Future, str | None] = {}   # a lane's `freed` -> its slot
        self.deferred: list[tuple[Candidate, str | None, bool]] = []   # finished while measuring
                                                        # (and whether it holds its slot)
        self.proposing: cf.Future | None = None
        self.failed_in_a_row = 0
        self.why: str | None = None
        self.reserved: list[int] = []                   # numbers handed out
        self.base_commit = ""                           # what the baseline measures, while it runs

    def agent_options(self) -> dict[str, Any]:
        cfg = self.cfg
        options = dict(cfg.agent_options)
        if cfg.agent == "llm":
            options.update(model=cfg.model, api_base=cfg.api_base)
        elif cfg.agent == "search":
            options.setdefault("seed", cfg.seed)
            on_gpu = self.executor.uses_gpu(cfg.gpus[0])
            options.setdefault("device", "gpu" if on_gpu else "cpu")   # the branch that runs
        return options

    # ---- start: measure the baseline (fresh run) or resume ----

    def start(self) -> None:
        """A fresh run measures the baseline (and the noise) inside the slot loop: the jobs go
        first in the queue, the agent proposes from the same commit meanwhile, and free slots
        train candidates at once. Their decisions wait until the measurement is recorded."""
        cache.sweep(self.compile_cache, self.trial_caches)     # what a crash left undecided
        if self.ledger.best() is None:
            if self.ledger.records:
                raise InfrastructureError(
                    f"run {self.cfg.tag} has records but no baseline; its ledger "
                    f"({self.ledger.jsonl}) was edited by hand: start another --tag")
            self.measuring = self.measurement_jobs(first=True)
        pending = reconcile(self.repo, self.ledger)
        self.base_commit = self.repo.head()
        if self.cfg.remeasure_noise and not self.measuring:
            # numbers after the candidates that were committed but never recorded
            self.remeasure_noise(max([self.ledger.next_number() - 1]
                                     + [c.number for c in pending]) + 1)
        if not self.measuring:
            self.update_best()
        self.reserved = [self.ledger.next_number() - 1, max((c.number for c in pending), default=-1),
                         max((c.number for c in self.measuring), default=-1)]
        self.ready = self.measuring + pending
        for c in pending:
            self.log(f"resuming experiment {c.number}: {c.description}")

    def measurement_jobs(self, first: bool, start: int | None = None) -> list[Candidate]:
        """The unmodified train.py (first) or the best over several seeds (the baseline and the
        noise runs), then reruns of the first seed (the same-seed spread)."""
        cfg, best = self.cfg, self.ledger.best()
        commit = self.repo.head() if first or best is None else str(best["commit"])
        text = self.repo.read_train(commit)
        start = self.ledger.next_number() if start is None else start
        jobs = []
        seeds = [cfg.seed if first and i == 0 else cfg.seed + 1000 + i
                 + (0 if first else start) for i in range(cfg.noise_runs)]
        for i in range(cfg.noise_runs + cfg.same_seed_runs):
            baseline = first and i == 0
            again = i >= cfg.noise_runs
            seed = seeds[0] if again else seeds[i]
            what = ("baseline" if baseline else f"noise: same seed {seed}" if again
                    else f"noise: seed {seed}")
            jobs.append(Candidate(start + i, commit, None if baseline else commit, what,
                                  text=text, role="baseline" if baseline else "noise", seed=seed,
                                  same_seed=again))
        return jobs

    def remeasure_noise(self, start: int) -> None:
        """More seeds of the current best, all slots at once, before anything else runs."""
        jobs = self.measurement_jobs(first=False, start=start)
        self.state.enter("measuring noise", jobs[0].number)
        self.observe(self.state)
        gpus = self.cfg.gpus
        with cf.ThreadPoolExecutor(max_workers=len(gpus)) as pool:
            futures = {pool.submit(self.train, job, gpus[i % len(gpus)]): job
                       for i, job in enumerate(jobs)}
            for future in cf.as_completed(futures):
                self.record_measurement(futures[future], future.result())

    # ---- the steps ----

    def propose(self) -> Candidate:
        """In the agent's thread: a new candidate from the best at this moment, committed."""
        cfg = self.cfg
        with self.lock:
            best = self.ledger.best() or {"commit": self.base_commit}
            parent = str(best["commit"])
            number = max(self.reserved + [self.ledger.next_number() - 1]) + 1
            self.reserved.append(number)
            text, hist = self.repo.read_train(parent), history(self.ledger, self.diff)
        proposal = self.agent(self.program, text, hist)
        llm = {"model": proposal.model, "prompt_tokens": proposal.prompt_tokens,
               "completion_tokens": proposal.completion_tokens, "cost_usd": proposal.cost_usd,
               "propose_seconds": round(proposal.seconds, 3)}
        description = proposal.description[:120]
        if proposal.train_py is None:
            return Candidate(number, None, parent, description, llm=llm,
                             error=proposal.error[:500], seed=cfg.seed)
        with self.lock:
            commit = self.repo.add_candidate(proposal.train_py, parent, number, description)
        return Candidate(number, commit, parent, description, text=proposal.train_py, llm=llm,
                         seed=cfg.seed)

    def train(self, c: Candidate, gpu: str | None, lane: SlotLane | None = None) -> Record:
        """In a slot's thread: one trial of `c` (after its first: a rerun with the next seed);
        with a `lane`, the slot is handed on when its training is over (`SlotLane`)."""
        cfg = self.cfg
        seed = c.next_seed
        path = self.work / f"{c.number}-{seed}" / "train.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(c.text, encoding="utf-8")
        spec = TrialSpec(train_py=path, data_dir=cfg.data_dir, budget=cfg.budget, run=cfg.tag,
                         number=c.number, seed=seed, gpu=gpu, limits=cfg.limits,
                         eval_tokens=cfg.eval_tokens,
                         labels={"autoresearch.commit": c.commit or "",
                                 "autoresearch.parent": c.parent or ""})
        if cfg.compile_cache:
            spec = dataclasses.replace(spec, cache_from=self.compile_cache,
                                       cache_to=self.trial_cache(c.number, seed))
        try:
            if lane is not None:
                lane.begin()
            shared = {"lane": lane} if lane is not None else {}
            return self.executor.run(spec, log=self.log, description=c.description,
                                     commit=c.commit, parent=c.parent, llm=c.llm, **shared)
        finally:
            if lane is not None:
                lane.close()
            path.unlink(missing_ok=True)
            path.parent.rmdir()

    def trial_cache(self, number: int, seed: int) -> Path:
        return self.trial_caches / f"{number}-{seed}"

    def settle_caches(self, number: int, seeds: list[int], kept: bool) -> None:
        """After the verdict on experiment `number` (its runs' `seeds`): a keep makes the
        first cache it left the run's (`cache.promote`); every other is deleted."""
        for seed in seeds:
            folder = self.trial_cache(number, seed)
            try:
                if kept and cache.promote(folder, self.compile_cache):
                    kept = False
                    self.log(f"#{number}: its compile cache is the run's now")
            except OSError as e:                        # a cache is worth no lost night
                self.log(f"#{number}: its compile cache was not kept ({e})")
            cache.discard(folder)

    def settle(self, c: Candidate, gpu: str | None, held: bool) -> None:
        """A candidate's trial ended (`c.runs` holds it): rerun it with the next seed (on the
        same slot when it still holds it, else first in the queue), or decide now."""
        verdict = self.judge(c)
        if verdict.action == decide.RERUN:
            self.state.running[c.number] = f"{c.description} (run {len(c.runs) + 1})"
            if held:
                self.start_trial(c, gpu, rerun=True)
                return
            self.ready.insert(0, c)
        else:
            self.finish(c, verdict)
        if held:
            self.free.append(gpu)

    def may_rerun(self, c: Candidate) -> bool:
        """Whether one more run of `c` keeps reruns within `rerun_share` of the trial time."""
        with self.lock:
            reruns, total = decide.rerun_share(self.ledger.records)
        for other, _, _ in self.running.values():
            total += sum(float(r.get("wall_seconds") or 0.0) for r in other.runs)
        total += sum(float(r.get("wall_seconds") or 0.0) for r in c.runs)
        reruns += sum(float(r.get("wall_seconds") or 0.0) for r in c.runs[1:])
        cost = float(c.runs[0].get("wall_seconds") or 0.0)
        return (reruns + cost) <= self.cfg.rerun_share * (total + cost)

    def judge(self, c: Candidate) -> decide.Verdict:
        """The verdict on `c`'s runs so far against the best at this moment."""
        cfg, runs = self.cfg, c.runs
        failed = next((r for r in runs if r["status"] != "ok" or r.get("val_bpb") is None), None)
        if failed is not None:
            if failed is runs[0]:
                return decide.Verdict(failed["status"], "not scored", {})
            return decide.Verdict(record.DISCARD, f"a rerun (seed {failed['seed']}) ended "
                                  f"{failed['status']}: {failed.get('reason', '')}"[:300], {})
        values = [float(r["val_bpb"]) for r in runs]  # type: ignore[arg-type]
        with self.lock:
            if cfg.keep_rule == "threshold":
                best_bpb = self.ledger.best_bpb()
                limit, rule = threshold(cfg, self.ledger)
            else:
                best = best_runs(self.ledger)
                pool = [g for k, g in groups(self.ledger).items() if k != c.commit]
        if cfg.keep_rule == "threshold":
            mean = sum(values) / len(values)
            v = decide.threshold(mean, best_bpb, limit, rule)
            if len(runs) > 1:
                v.text = f"confirmed by a rerun (seed {runs[1]['seed']}): mean {mean:.6f}; {v.text}"
            elif v.action == KEEP and cfg.confirm:
                v.action = decide.RERUN
            return v
        return decide.sequential(best, values, pool + [values], alpha=cfg.alpha,
                                 max_runs=cfg.max_runs, margin=cfg.min_delta,
                                 may_rerun=self.may_rerun(c), futility=cfg.futility)

    def finish(self, c: Candidate, verdict: decide.Verdict) -> None:
        """Record the verdict on `c` (its first run's record, with every run and the test's
        figures); move refs."""
        rec = c.runs[0]
        with self.lock:
            best = self.ledger.best()
            best_bpb = self.ledger.best_bpb()
        assert best is not None
        extra: dict[str, Any] = {"best_before": best["number"]}
        if c.llm:
            extra["phases"] = {**rec["phases"], "propose": c.llm["propose_seconds"]}
        status = verdict.action
        if self.cfg.keep_rule == "threshold":
            if len(c.runs) > 1:
                again = c.runs[1]
                extra["confirm"] = {k: again.get(k) for k in ("status", "val_bpb", "reason", "seed")}
            extra["delta"] = (rec["val_bpb"] - best_bpb) if rec["val_bpb"] is not None else None
        elif verdict.test:
            extra.update(runs=[run_entry(r) for r in c.runs], mean_bpb=verdict.test["mean"],
                         test=verdict.test,
                         delta=round(verdict.test["mean"] - verdict.test["best_mean"], 6))
        else:
            extra.update(runs=[run_entry(r) for r in c.runs], delta=None)
        with self.lock:
            kept_at = None
            if status == KEEP and c.commit is not None:
                kept_at = self.repo.keep_commit(c.number, c.commit, c.description)
                extra.update(candidate_commit=c.commit, commit=kept_at)
            rec = record.decided(rec, "candidate", status, verdict.text, **extra)
            self.append(rec)                            # the truth first, then refs and branch
            self.repo.settle(c.number, c.commit, kept_at)
            self.show_best()
        self.settle_caches(c.number, [int(r["seed"]) for r in c.runs], kept_at is not None)
        self.log(f"#{c.number} {status}: {verdict.text}")
        if kept_at and self.cfg.remeasure_noise:
            self.queue_remeasure()

    def queue_remeasure(self) -> None:
        """With --remeasure-noise, a new best is measured like the baseline was (its seeds and a
        same-seed rerun), first in the queue; decisions wait for it, as they did at the start."""
        with self.lock:
            start = max(self.reserved + [self.ledger.next_number() - 1]) + 1
            jobs = self.measurement_jobs(first=False, start=start)
            self.reserved.append(jobs[-1].number)
        self.log(f"measuring the noise of the new best: {len(jobs)} runs")
        self.measuring.extend(jobs)
        self.ready[:0] = jobs

    def show_best(self) -> None:
        """The best's score (the mean of its runs) and the one-run bar for the live view."""
        if self.cfg.keep_rule == "threshold":
            self.state.best = self.ledger.best_bpb()
            self.state.threshold = threshold(self.cfg, self.ledger)[0]
        else:
            runs = best_runs(self.ledger)
            self.state.best, self.state.threshold = sum(runs) / len(runs), None

    def halt(self) -> str | None:
        """Why to stop starting anything (the clock, the money, a broken agent), or None."""
        cfg, ledger = self.cfg, self.ledger
        if cfg.until is not None and datetime.now() >= cfg.until:
            return f"reached --until {cfg.until:%H:%M}"
        if cfg.max_cost is not None and ledger.total_cost() >= cfg.max_cost:
            return f"spent ${ledger.total_cost():.2f} of --max-cost ${cfg.max_cost:.2f}"
        if self.failed_in_a_row >= MAX_FAILED_PROPOSALS:
            return f"{self.failed_in_a_row} proposals in a row failed; see the last records' reasons"
        return None

    # ---- recording ----

    def append(self, rec: Record) -> None:
        self.ledger.append(rec)
        if self.tracking is not None:                   # a copy, sent in the background
            self.tracking.submit(rec)
        self.state.recent, self.state.total = self.ledger.records[-5:], len(self.ledger.records)
        self.state.running.pop(rec["number"], None)
        self.state.done += 1
        self.observe(self.state)

    def record_measurement(self, job: Candidate, rec: Record) -> None:
        extra = {"same_seed": True} if job.same_seed else {}
        if rec["status"] != "ok":
            rec = record.decided(rec, job.role, rec["status"], None, **extra)
        elif job.role == "baseline":
            rec = record.decided(rec, job.role, KEEP, "baseline", delta=0.0)
        else:
            rec = record.decided(rec, job.role, record.DISCARD, "noise measurement, never kept",
                                 **extra)
        with self.lock:
            self.append(rec)
            # Under the lock, so that a keep decided meanwhile is never replaced by an older
            # line's cache.
            self.settle_caches(job.number, [job.seed],
                               rec["status"] == KEEP or completes_cache(rec, self.ledger.best()))

    def record_failed_proposal(self, c: Candidate) -> None:
        with self.lock:
            self.append(record.failed_proposal(self.cfg.tag, c.number, c.parent, c.description,
                                               c.error, c.llm))

    def update_best(self) -> None:
        best = self.ledger.best()
        if best is None:
            r = next(r for r in self.ledger.records if r.get("role") == "baseline")
            raise InfrastructureError(f"the baseline did not run ({r['status']}: {r['reason']}); "
                                      "fix target/train.py or the set-up before running overnight")
        self.show_best()
        noise = decide.noise_of(self.ledger.records)
        if noise is not None:
            fmt = (lambda v: f"{v:.6f}" if v is not None else "- (fewer than 2 runs)")
            self.log(f"noise of {str(noise.commit)[:7]}: sd over {len(noise.seeds)} seeds "
                     f"{fmt(noise.seed_sd)}, {noise.same_seed_text()} {fmt(noise.same_seed_sd)}")
            if noise.seed_sd is not None:
                self.state.noise = f"noise sd {noise.seed_sd:.6f} ({len(noise.seeds)} seeds)"

    def measured(self, job: Candidate, rec: Record) -> None:
        """A baseline or noise run ended; after the last, decide what waited for it."""
        self.record_measurement(job, rec)
        self.measuring.remove(job)
        if self.measuring:
            return
        self.update_best()
        while self.deferred and not self.measuring:     # a keep may start a remeasurement
            c, gpu, held = self.deferred.pop(0)
            self.settle(c, gpu, held=held)

    def holds_slot(self) -> bool:
        """Whether a candidate that finished while the noise was measured keeps its slot for a
        rerun (the threshold rule's --confirm; the sequential rule queues its reruns first)."""
        return self.cfg.keep_rule == "threshold" and self.cfg.confirm

    # ---- scheduling ----

    def run(self) -> Ledger:
        """Schedule the steps until a limit is reached; then write the report. The run's lock
        goes when this returns or raises."""
        try:
            return self.schedule()
        finally:
            os.close(self.run_lock)

    def schedule(self) -> Ledger:
        self.start()
        workers = len(self.cfg.gpus) * (2 if self.overlap else 1)   # training + scoring
        self.slots = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slot")
        self.agent_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent")
        clean_exit = False
        try:
            while self.step():
                pass
            clean_exit = True
        finally:
            if not clean_exit and self.running:
                # Ctrl-C or an error: the trials in the slot threads cannot be interrupted, so
                # the executor stops them now; each thread then finds its trial gone and returns.
                # First the slots: a trial that waited for its slot's scorer, or to be scored
                # alone, must not start a scorer once the abort has passed.
                for slot in self.lanes.values():
                    slot.stop()
                self.executor.abort(self.cfg.tag)
            self.agent_pool.shutdown(wait=False, cancel_futures=True)
            self.slots.shutdown(wait=True, cancel_futures=True)
            if self.tracking is not None:               # what is left: `autoresearch track`
                self.tracking.close(timeout=60.0 if clean_exit else 5.0)
        self.write_report()
        self.state.enter("done")
        self.state.message = self.why or "done"
        self.observe(self.state)
        self.log(f"stopped: {self.state.message}")
        return self.ledger

    def step(self) -> bool:
        """Start what can start, wait up to a second, handle what finished; False: stop."""
        cfg = self.cfg
        with self.lock:
            self.why = self.why or self.halt()
            planned = (len(self.ledger.records) + len(self.running) + len(self.ready)
                       + len(self.deferred) + (1 if self.proposing else 0))
        enough = cfg.max_experiments is not None and planned >= cfg.max_experiments
        if self.why is None and not enough and self.proposing is None \
                and len(self.ready) < len(cfg.gpus):
            self.proposing = self.agent_pool.submit(self.propose)
            if not self.running:
                self.state.enter("proposing")
                self.observe(self.state)
        while self.why is None and self.free and self.ready:
            self.start_trial(self.ready.pop(0), self.free.pop(0))
        if not self.running and self.proposing is None and (self.why is not None
                                                            or (enough and not self.ready)):
            self.why = self.why or f"reached --max-experiments {cfg.max_experiments}"
            return False
        waiting = (list(self.running) + list(self.freeing)
                   + ([self.proposing] if self.proposing else []))
        done, _ = cf.wait(waiting, timeout=1.0, return_when=cf.FIRST_COMPLETED)
        for future in done:
            if future is self.proposing:
                self.proposing = None
                self.proposed(future.result())
            elif future in self.freeing:            # trained, now scored: the slot is free
                self.free.append(self.freeing.pop(future))
            else:
                self.trained(future)
        self.observe(self.state)
        return True

    def start_trial(self, c: Candidate, gpu: str | None, rerun: bool = False) -> None:
        if not rerun:
            self.state.running[c.number] = c.description
            if c.role == "candidate":
                self.state.enter("training", c.number)
            else:
                self.state.enter("measuring noise" if self.cfg.noise_runs > 1 else "baseline",
                                 c.number)
            self.observe(self.state)
        lane = SlotLane(self.lanes[gpu]) if self.overlap else None
        if lane is not None:
            self.freeing[lane.freed] = gpu
        self.running[self.slots.submit(self.train, c, gpu, lane)] = (c, gpu, lane)

    def proposed(self, c: Candidate) -> None:
        if c.commit is None:
            self.failed_in_a_row += 1
            self.record_failed_proposal(c)
        else:
            self.failed_in_a_row = 0
            self.ready.append(c)

    def trained(self, future: cf.Future) -> None:
        c, gpu, lane = self.running.pop(future)
        handed_on = lane is not None and lane.freed.done()   # the slot went on without it
        if lane is not None and not handed_on:
            self.freeing.pop(lane.freed, None)
        rec = future.result()
        if c.role != "candidate":
            if not handed_on:
                self.free.append(gpu)
            self.measured(c, rec)
            return
        c = dataclasses.replace(c, runs=c.runs + [rec])
        if self.measuring:
            held = self.holds_slot() and not handed_on
            self.deferred.append((c, gpu, held))
            self.state.running.pop(c.number, None)
            if not held and not handed_on:
                self.free.append(gpu)
        else:
            self.settle(c, gpu, held=not handed_on)

    def write_report(self) -> None:
        """progress.png and report.html; a failure is logged (the ledger is whole)."""
        try:
            from runner.report import write_report
            write_report(self.run_dir, self.repo)
        except Exception as e:
            self.log(f"report not written ({type(e).__name__}: {e}); `autoresearch report` retries")


def overnight(cfg: LoopConfig, observe: Observer = lambda s: None, log: Callable[[str], None] = print
              ) -> Ledger:
    """Run the loop of `cfg` until a limit is reached (or Ctrl-C); returns its ledger."""
    return Overnight(cfg, observe, log).run()
