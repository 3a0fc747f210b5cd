"""The overnight loop: propose, commit, build, train, score, keep or discard; repeat.

**Slots.** One trial runs per slot (a GPU, or a share of the CPUs). The agent works ahead in its
own thread, keeping as many candidates ready as there are slots, so a slot never waits for it.
A fresh run starts with the baseline (and the noise runs, one per slot): the agent proposes
from the same train.py meanwhile and the other slots train those candidates at once; their keep
decisions wait until the baseline and noise runs are recorded.

**Keep rule.** A candidate is measured against the best *at the time it finishes*, not the one
it was proposed from: it is kept only if its val_bpb beats that best by more than the
threshold, `max(min_delta, noise_k x spread)`, where `spread` is the standard deviation of the
baseline over `noise_runs` seeds (measured at the start of a run, and again with
`remeasure_noise`). With `confirm`, an apparent win is trained again with another seed, on
its own slot while the others go on, and kept only if the mean of both runs still wins. A
kept candidate that was proposed on an older best replaces the whole train.py (its file is
committed on top of the branch). Every record says which rule decided it (`decision`).

**Nothing is lost.** A candidate is committed (off the branch, under
`refs/autoresearch/<tag>/candidates/<n>`) before it trains; its record is appended and synced
after; the refs and the branch move last (`RunRepo.settle`). On start, `reconcile` redoes the
last step for every record and returns the candidates that were committed but never recorded,
which train first. So `kill -9` at any moment, then the same command, loses and duplicates
nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from runner.ledger import Ledger
from runner.paths import REPO_ROOT
from runner.repo import RunRepo, check_tag, open_run
from runner.sandbox import InfrastructureError, Limits, TrialSpec
from runner.trial import default_limits, run_trial

PROGRAM_MD = REPO_ROOT / "program.md"
RUNS_DIR = REPO_ROOT / "runs"
MAX_FAILED_PROPOSALS = 10          # in a row: the agent or its server is broken, stop
FAILED = ("crash", "timeout", "oom", "invalid")


@dataclass
class LoopConfig:
    tag: str
    agent: str = "search"                 # "search" or "llm"
    model: str | None = None              # litellm model string for the llm agent
    api_base: str | None = None
    budget: int = 300
    max_experiments: int | None = None    # experiments in the run, the baseline included
    until: datetime | None = None
    max_cost: float | None = None         # USD of LLM calls over the whole run
    backend: str = "docker"
    data_dir: Path = REPO_ROOT / "data"
    runs_dir: Path = RUNS_DIR
    repo_root: Path = REPO_ROOT           # the repository whose train.py the run starts from
    min_delta: float = 0.0005             # a keep must beat the best by more than this...
    noise_runs: int = 1                   # ...and by noise_k x the spread of this many baselines
    noise_k: float = 2.0
    remeasure_noise: bool = False         # run noise_runs more baselines of the current best
    confirm: bool = False                 # retrain an apparent win with another seed first
    seed: int = 0
    gpus: list[str | None] = field(default_factory=lambda: [None])   # one slot per entry
    limits: Limits = field(default_factory=default_limits)          # per slot
    eval_tokens: int | None = None        # tests only
    agent_options: dict[str, Any] = field(default_factory=dict)
    trial: Callable[..., dict[str, Any]] | None = None   # run_trial, or a cluster's submit
    track: tuple[str, ...] = ()           # trackers that get a copy of every record (tracking.py)


@dataclass
class LoopState:
    """What the live view shows; the loop updates it as it goes."""

    tag: str
    number: int = 0
    phase: str = "starting"
    phase_started: float = field(default_factory=time.time)
    best: float | None = None
    threshold: float | None = None
    recent: list[dict[str, Any]] = field(default_factory=list)
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


def parse_until(text: str, now: datetime | None = None) -> datetime:
    """`HH:MM` -> the next time the local clock shows it."""
    now = now or datetime.now()
    try:
        t = datetime.strptime(text, "%H:%M")
    except ValueError:
        raise ValueError(f"--until {text!r}: use HH:MM (24-hour clock)") from None
    when = now.replace(hour=t.hour, minute=t.minute, second=0, microsecond=0)
    return when if when > now else when + timedelta(days=1)


def history(ledger: Ledger):
    from runner.agents import History

    def row(r: dict[str, Any]) -> dict[str, Any]:
        return {"number": r.get("number"), "status": r.get("status"), "val_bpb": r.get("val_bpb"),
                "delta": r.get("delta"), "description": r.get("description", "")}

    scored = sorted((r for r in ledger.records if r.get("val_bpb") is not None),
                    key=lambda r: r["val_bpb"])
    failures = [r for r in ledger.records if r.get("status") in FAILED]
    best = ledger.best()
    return History(best=[row(r) for r in scored[:5]], recent=[row(r) for r in ledger.records[-8:]],
                   last_failure=(failures[-1].get("log_tail") or "") if failures else "",
                   best_val_bpb=best["val_bpb"] if best else None)


def spread(ledger: Ledger) -> float:
    """Run-to-run standard deviation of the latest noise measurement (baseline and noise runs
    of one commit, different seeds); 0 with fewer than two scored runs."""
    runs = [r for r in ledger.records if r.get("role") in ("baseline", "noise")]
    if not runs:
        return 0.0
    commit = runs[-1]["commit"]
    values = [r["val_bpb"] for r in runs if r["commit"] == commit and r.get("val_bpb") is not None]
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def threshold(cfg: LoopConfig, ledger: Ledger) -> tuple[float, str]:
    s = spread(ledger)
    value = max(cfg.min_delta, cfg.noise_k * s)
    return value, f"max(min_delta {cfg.min_delta:g}, {cfg.noise_k:g} x spread {s:.6f})"


def decide(trial_status: str, val_bpb: float | None, best: float, limit: float, rule: str
           ) -> tuple[str, str]:
    """keep or discard (or the trial's failure status), and the rule that decided."""
    if trial_status != "ok" or val_bpb is None:
        return trial_status, "not scored"
    text = f"keep if val_bpb < best {best:.6f} - {rule} = {best - limit:.6f}"
    return ("keep" if val_bpb < best - limit else "discard"), text


def reconcile(run: RunRepo, ledger: Ledger) -> list[Candidate]:
    """Make refs and branch agree with the ledger after a crash; return the candidates that
    were committed but never recorded, oldest first, to be trained again."""
    by_number = {r["number"]: r for r in ledger.records}
    pending = []
    for number, (commit, parent, description) in sorted(run.candidates().items()):
        record = by_number.get(number)
        if record is None:
            pending.append(Candidate(number, commit, parent, description,
                                     text=run.read_train(commit)))
        else:
            run.settle(number, commit, record["commit"] if record["status"] == "keep" else None)
    best = ledger.best()
    if best is not None and run.head() != best["commit"]:
        run.settle(best["number"], None, best["commit"])
    return pending


def overnight(cfg: LoopConfig, observe: Observer = lambda s: None, log: Callable[[str], None] = print
              ) -> Ledger:
    from runner.agents import make_agent

    check_tag(cfg.tag)                                  # before anything is created
    run_dir = cfg.runs_dir / cfg.tag
    ledger = Ledger.open(run_dir)
    run = open_run(cfg.tag, cfg.runs_dir, root=cfg.repo_root)
    state = LoopState(tag=cfg.tag, recent=ledger.records[-5:], total=len(ledger.records))
    if cfg.backend == "docker" and cfg.trial is None:   # on a cluster, each node sweeps its own
        from runner.sandbox.docker_backend import remove_orphans
        remove_orphans(log=log)
    options = dict(cfg.agent_options)
    if cfg.agent == "llm":
        options.update(model=cfg.model, api_base=cfg.api_base)
    else:
        options.setdefault("seed", cfg.seed)
        gpu_slots = cfg.gpus[0] is not None or getattr(cfg.trial, "num_gpus", 0) > 0
        options.setdefault("device", "gpu" if gpu_slots else "cpu")     # the branch that runs
    propose = make_agent(cfg.agent, **options)
    program = PROGRAM_MD.read_text(encoding="utf-8") if PROGRAM_MD.exists() else ""
    lock = threading.RLock()                            # ledger, git, state
    work = run_dir / "candidates"
    trial_fn = cfg.trial or run_trial
    from runner.tracking import open_tracking           # None without --track
    tracking = open_tracking(cfg.track, cfg.tag, run_dir, ledger.records, diff=run.diff, log=log)

    def train(c: Candidate, gpu: str | None, seed: int | None = None) -> dict[str, Any]:
        path = work / f"{c.number}-{seed if seed is not None else c.seed}" / "train.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(c.text, encoding="utf-8")
        spec = TrialSpec(train_py=path, data_dir=cfg.data_dir, budget=cfg.budget, run=cfg.tag,
                         number=c.number, seed=c.seed if seed is None else seed, gpu=gpu,
                         limits=cfg.limits, eval_tokens=cfg.eval_tokens,
                         labels={"autoresearch.commit": c.commit or "",
                                 "autoresearch.parent": c.parent or ""})
        try:
            return trial_fn(spec, cfg.backend, log=log, description=c.description,
                            commit=c.commit, parent=c.parent, llm=c.llm)
        finally:
            path.unlink(missing_ok=True)
            path.parent.rmdir()

    def append(rec: dict[str, Any]) -> None:
        ledger.append(rec)
        if tracking is not None:                        # a copy, sent in the background
            tracking.submit(rec)
        state.recent, state.total = ledger.records[-5:], len(ledger.records)
        state.running.pop(rec["number"], None)
        state.done += 1
        observe(state)

    # ---- baseline and noise runs: the unmodified train.py, over several seeds ----
    def measurement_jobs(first: bool) -> list[Candidate]:
        commit = run.head() if first else ledger.best()["commit"]
        text = run.read_train(commit)
        start = ledger.next_number()
        return [Candidate(start + i, commit, None if first and i == 0 else commit,
                          "baseline" if first and i == 0 else f"noise: seed {cfg.seed + 1000 + i}",
                          text=text, role="baseline" if first and i == 0 else "noise",
                          seed=cfg.seed if first and i == 0 else cfg.seed + 1000 + i)
                for i in range(cfg.noise_runs)]

    def record_measurement(job: Candidate, rec: dict[str, Any]) -> None:
        rec["trial_status"], rec["role"] = rec["status"], job.role
        if job.role == "baseline":
            if rec["status"] == "ok":
                rec["status"], rec["decision"], rec["delta"] = "keep", "baseline", 0.0
        elif rec["status"] == "ok":
            rec["status"], rec["decision"] = "discard", "noise measurement, never kept"
        with lock:
            append(rec)

    def check_baseline() -> None:
        if ledger.best() is None:
            r = next(r for r in ledger.records if r.get("role") == "baseline")
            raise InfrastructureError(f"the baseline did not run ({r['status']}: {r['reason']}); "
                                      "fix target/train.py or the set-up before running overnight")

    def remeasure_noise() -> None:
        """More seeds of the current best, all slots at once, before anything else runs."""
        jobs = measurement_jobs(first=False)
        state.enter("measuring noise", jobs[0].number)
        observe(state)
        with cf.ThreadPoolExecutor(max_workers=len(cfg.gpus)) as pool:
            futures = {pool.submit(train, job, cfg.gpus[i % len(cfg.gpus)]): job
                       for i, job in enumerate(jobs)}
            for future in cf.as_completed(futures):
                record_measurement(futures[future], future.result())

    # A fresh run measures the baseline (and the noise) inside the slot loop below: the jobs
    # go first in the queue, the agent proposes from the same commit meanwhile, and free slots
    # train candidates at once. Their decisions wait until the measurement is recorded.
    measuring: list[Candidate] = []
    if ledger.best() is None:
        if ledger.records:
            raise InfrastructureError(f"run {cfg.tag} has records but no baseline; its ledger "
                                      f"({ledger.jsonl}) was edited by hand: start another --tag")
        measuring = measurement_jobs(first=True)
    pending = reconcile(run, ledger)
    if cfg.remeasure_noise and not measuring:
        remeasure_noise()
    if not measuring:
        state.best = ledger.best()["val_bpb"]
        state.threshold = threshold(cfg, ledger)[0]

    # ---- proposals, made ahead in their own thread ----
    reserved = [ledger.next_number() - 1, max((c.number for c in pending), default=-1),
                max((c.number for c in measuring), default=-1)]
    base_commit = run.head()                  # what the baseline measures, while it runs

    def make_candidate() -> Candidate:
        with lock:
            best = ledger.best() or {"commit": base_commit}
            number = max(reserved + [ledger.next_number() - 1]) + 1
            reserved.append(number)
            text, hist = run.read_train(best["commit"]), history(ledger)
        proposal = propose(program, text, hist)
        llm = {"model": proposal.model, "prompt_tokens": proposal.prompt_tokens,
               "completion_tokens": proposal.completion_tokens, "cost_usd": proposal.cost_usd,
               "propose_seconds": round(proposal.seconds, 3)}
        description = proposal.description[:120]
        if proposal.train_py is None:
            return Candidate(number, None, best["commit"], description, llm=llm,
                             error=proposal.error[:500], seed=cfg.seed)
        with lock:
            commit = run.add_candidate(proposal.train_py, best["commit"], number, description)
        return Candidate(number, commit, best["commit"], description, text=proposal.train_py,
                         llm=llm, seed=cfg.seed)

    def apparent_win(rec: dict[str, Any]) -> bool:
        """With --confirm: this result would be kept, so it is trained again first."""
        with lock:
            best, (limit, rule) = ledger.best(), threshold(cfg, ledger)
        return cfg.confirm and decide(rec["status"], rec["val_bpb"], best["val_bpb"], limit,
                                      rule)[0] == "keep"

    def finish(c: Candidate, rec: dict[str, Any], again: dict[str, Any] | None = None) -> None:
        """Decide against the best at this moment (with the confirming rerun `again`, on the
        mean of both runs); record; move refs."""
        with lock:
            best = ledger.best()
            limit, rule = threshold(cfg, ledger)
        rec["trial_status"], rec["role"] = rec["status"], "candidate"
        if c.llm:
            rec["phases"]["propose"] = c.llm["propose_seconds"]
        status, decision = decide(rec["status"], rec["val_bpb"], best["val_bpb"], limit, rule)
        if again is not None:
            rec["confirm"] = {k: again.get(k) for k in ("status", "val_bpb", "reason", "seed")}
            values = [rec["val_bpb"]] + ([again["val_bpb"]] if again.get("val_bpb") is not None else [])
            mean = sum(values) / len(values) if again["status"] == "ok" else float("inf")
            status, decision = decide("ok", mean, best["val_bpb"], limit, rule)
            decision = f"confirmed by a rerun (seed {c.seed + 1}): mean {mean:.6f}; {decision}"
        with lock:
            kept_at = run.keep_commit(c.number, c.commit, c.description) if status == "keep" else None
            rec["status"], rec["decision"] = status, decision
            rec["delta"] = (rec["val_bpb"] - best["val_bpb"]) if rec["val_bpb"] is not None else None
            rec["best_before"] = best["number"]
            if kept_at:
                rec["candidate_commit"], rec["commit"] = c.commit, kept_at
            append(rec)                                # the truth first, then refs and branch
            run.settle(c.number, c.commit, kept_at)
            if kept_at:
                state.best = rec["val_bpb"]
            state.threshold = threshold(cfg, ledger)[0]

    def record_failed_proposal(c: Candidate) -> None:
        with lock:
            append({"version": 1, "id": f"{cfg.tag}-{c.number}", "run": cfg.tag, "number": c.number,
                    "parent": c.parent, "commit": None, "status": "invalid", "reason": c.error,
                    "description": c.description, "val_bpb": None, "memory_gb": None, "llm": c.llm,
                    "phases": {"propose": c.llm["propose_seconds"] if c.llm else 0.0},
                    "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "trial_status": "invalid", "role": "candidate",
                    "decision": "no valid proposal"})

    def halt_reason() -> str | None:
        """Stop starting anything: the clock, the money, or a broken agent."""
        if cfg.until is not None and datetime.now() >= cfg.until:
            return f"reached --until {cfg.until:%H:%M}"
        if cfg.max_cost is not None and ledger.total_cost() >= cfg.max_cost:
            return f"spent ${ledger.total_cost():.2f} of --max-cost ${cfg.max_cost:.2f}"
        if failed_in_a_row >= MAX_FAILED_PROPOSALS:
            return f"{failed_in_a_row} proposals in a row failed; see the last records' reasons"
        return None

    # ---- the slots ----
    free = list(cfg.gpus)
    ready: list[Candidate] = measuring + list(pending)
    for c in pending:
        log(f"resuming experiment {c.number}: {c.description}")
    # future -> (candidate, its slot, the first result when the future is its confirming rerun)
    running: dict[cf.Future, tuple[Candidate, str | None, dict[str, Any] | None]] = {}
    deferred: list[tuple[Candidate, dict[str, Any], str | None]] = []   # finished while measuring
    proposing: cf.Future | None = None
    failed_in_a_row = 0
    why: str | None = None
    slots = cf.ThreadPoolExecutor(max_workers=len(cfg.gpus), thread_name_prefix="slot")
    agent = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent")
    clean_exit = False

    def settle_trial(c: Candidate, rec: dict[str, Any], gpu: str | None) -> None:
        """A candidate's trial ended: confirm an apparent win on the same slot (it stays
        taken), or decide now and free the slot."""
        if apparent_win(rec):
            state.running[c.number] = f"{c.description} (confirming)"
            running[slots.submit(train, c, gpu, c.seed + 1)] = (c, gpu, rec)
        else:
            finish(c, rec)
            free.append(gpu)

    def measured(job: Candidate, rec: dict[str, Any]) -> None:
        """A baseline or noise run ended; after the last, decide what waited for it."""
        record_measurement(job, rec)
        measuring.remove(job)
        if measuring:
            return
        check_baseline()
        state.best = ledger.best()["val_bpb"]
        state.threshold = threshold(cfg, ledger)[0]
        while deferred:
            c, rec, gpu = deferred.pop(0)
            if cfg.confirm:                           # its slot was held for a rerun
                settle_trial(c, rec, gpu)
            else:
                finish(c, rec)

    try:
        while True:
            with lock:
                why = why or halt_reason()
                planned = (len(ledger.records) + len(running) + len(ready) + len(deferred)
                           + (1 if proposing else 0))
            enough = cfg.max_experiments is not None and planned >= cfg.max_experiments
            if why is None and not enough and proposing is None and len(ready) < len(cfg.gpus):
                proposing = agent.submit(make_candidate)
                if not running:
                    state.enter("proposing")
                    observe(state)
            while why is None and free and ready:
                c, gpu = ready.pop(0), free.pop(0)
                state.running[c.number] = c.description
                if c.role == "candidate":
                    state.enter("training", c.number)
                else:
                    state.enter("measuring noise" if cfg.noise_runs > 1 else "baseline", c.number)
                observe(state)
                running[slots.submit(train, c, gpu)] = (c, gpu, None)
            if not running and proposing is None and (why is not None or (enough and not ready)):
                why = why or f"reached --max-experiments {cfg.max_experiments}"
                break
            waiting = list(running) + ([proposing] if proposing else [])
            done, _ = cf.wait(waiting, timeout=1.0, return_when=cf.FIRST_COMPLETED)
            for future in done:
                if future is proposing:
                    proposing = None
                    c = future.result()
                    if c.commit is None:
                        failed_in_a_row += 1
                        record_failed_proposal(c)
                    else:
                        failed_in_a_row = 0
                        ready.append(c)
                    continue
                c, gpu, first = running.pop(future)
                if c.role != "candidate":
                    free.append(gpu)
                    measured(c, future.result())
                elif first is not None:                    # the confirming rerun
                    finish(c, first, again=future.result())
                    free.append(gpu)
                elif measuring:
                    deferred.append((c, future.result(), gpu))
                    state.running.pop(c.number, None)
                    if not cfg.confirm:                   # a confirming rerun needs the slot
                        free.append(gpu)
                else:
                    settle_trial(c, future.result(), gpu)
            observe(state)
        clean_exit = True
    finally:
        if not clean_exit and running and hasattr(cfg.trial, "cancel_all"):
            cfg.trial.cancel_all()                      # trials on cluster nodes
        elif not clean_exit and running and cfg.backend == "docker":
            # Ctrl-C or an error: the trials in the slot threads cannot be interrupted, so
            # their containers go now; each thread then finds its container gone and returns.
            from runner.sandbox.docker_backend import abort_own
            abort_own(cfg.tag)
        agent.shutdown(wait=False, cancel_futures=True)
        slots.shutdown(wait=True, cancel_futures=True)
        if tracking is not None:                        # what is left: `autoresearch track`
            tracking.close(timeout=60.0 if clean_exit else 5.0)
    try:                                                # progress.png and report.html
        from runner.report import write_report
        write_report(run_dir, run)
    except Exception as e:                              # the ledger is whole: report later
        log(f"report not written ({type(e).__name__}: {e}); `autoresearch report` retries")
    state.enter("done")
    state.message = why or "done"
    observe(state)
    log(f"stopped: {state.message}")
    return ledger
