"""The overnight loop: propose, commit, build, train, score, keep or discard; repeat.

Nothing is lost and a restart resumes. The order of writes makes every crash recoverable:
a candidate is committed on the run's branch *before* it trains, its record is appended (and
synced) *after*, and the branch is moved (discard: ref, then reset) last. On start,
`reconcile` makes the branch agree with the ledger: a committed candidate with no record is
trained again under its own number; a recorded discard whose reset never happened is redone.
So `kill -9` at any moment, then the same command, loses and duplicates nothing.
"""

from __future__ import annotations

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
    min_delta: float = 0.0005             # a keep must beat the best by more than this
    seed: int = 0
    gpu: str | None = None
    limits: Limits = field(default_factory=default_limits)
    eval_tokens: int | None = None        # tests only
    agent_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopState:
    """What the live view shows; the loop updates it as it goes."""

    tag: str
    number: int = 0
    phase: str = "starting"
    phase_started: float = field(default_factory=time.time)
    best: float | None = None
    recent: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0                          # experiments finished by this process
    total: int = 0                         # experiments in the ledger
    message: str = ""

    def enter(self, phase: str, number: int | None = None) -> None:
        self.phase, self.phase_started = phase, time.time()
        if number is not None:
            self.number = number


Observer = Callable[[LoopState], None]


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
    failures = [r for r in ledger.records if r.get("status") in ("crash", "timeout", "oom", "invalid")]
    best = ledger.best()
    return History(best=[row(r) for r in scored[:5]], recent=[row(r) for r in ledger.records[-8:]],
                   last_failure=(failures[-1].get("log_tail") or "") if failures else "",
                   best_val_bpb=best["val_bpb"] if best else None)


def reconcile(run: RunRepo, ledger: Ledger) -> tuple[int, str, str] | None:
    """Make the branch agree with the ledger after a crash. Returns a committed candidate that
    still has to be trained (number, commit, description), if any."""
    best = ledger.best()
    if best is None:
        return None
    head = run.head()
    if head == best["commit"]:
        return None
    number = run.experiment_number(head)
    recorded = ledger.numbers()
    if (number is not None and number not in recorded
            and run.repo.commit(head).parents[0].hexsha == best["commit"]):
        return number, head, run.pending_candidate(recorded)[2]
    if number is not None and number in recorded:
        run.discard(number, head, best["commit"])          # the reset that never happened
    else:                                                  # keep whatever it is reachable
        run.repo.git.update_ref(f"refs/autoresearch/{run.tag}/orphaned/{head[:12]}", head)
        run.wt.git.reset("--hard", best["commit"])
    return None


def decide(outcome_status: str, val_bpb: float | None, best: float, min_delta: float
           ) -> tuple[str, str]:
    """keep or discard (or the trial's failure status), and the rule that decided."""
    if outcome_status != "ok" or val_bpb is None:
        return outcome_status, "not scored"
    rule = f"keep if val_bpb < best - {min_delta:g} ({best - min_delta:.6f})"
    return ("keep" if val_bpb < best - min_delta else "discard"), rule


def overnight(cfg: LoopConfig, observe: Observer = lambda s: None, log: Callable[[str], None] = print
              ) -> Ledger:
    from runner.agents import make_agent

    check_tag(cfg.tag)                                  # before anything is created
    run_dir = cfg.runs_dir / cfg.tag
    ledger = Ledger.open(run_dir)
    run = open_run(cfg.tag, cfg.runs_dir, root=cfg.repo_root)
    state = LoopState(tag=cfg.tag)
    state.recent, state.total = ledger.records[-5:], len(ledger.records)
    if cfg.backend == "docker":
        from runner.sandbox.docker_backend import remove_orphans
        remove_orphans(log=log)
    options = dict(cfg.agent_options)
    if cfg.agent == "llm":
        options.update(model=cfg.model, api_base=cfg.api_base)
    else:
        options.setdefault("seed", cfg.seed)
        options.setdefault("device", "gpu" if cfg.gpu is not None else "cpu")   # the branch that runs
    propose = make_agent(cfg.agent, **options)
    program = PROGRAM_MD.read_text(encoding="utf-8") if PROGRAM_MD.exists() else ""

    def trial(number: int, commit: str, parent: str | None, description: str,
              llm: dict[str, Any] | None = None) -> dict[str, Any]:
        state.enter("training", number)
        observe(state)
        spec = TrialSpec(train_py=run.train_py(), data_dir=cfg.data_dir, budget=cfg.budget,
                         run=cfg.tag, number=number, seed=cfg.seed, gpu=cfg.gpu, limits=cfg.limits,
                         eval_tokens=cfg.eval_tokens,
                         labels={"autoresearch.commit": commit, "autoresearch.parent": parent or ""})
        return run_trial(spec, cfg.backend, log=log, description=description, commit=commit,
                         parent=parent, llm=llm)

    def record(rec: dict[str, Any]) -> None:
        ledger.append(rec)
        state.recent, state.total = ledger.records[-5:], len(ledger.records)
        state.done += 1
        observe(state)

    # ---- the baseline: the unmodified train.py, first ----
    if ledger.best() is None:
        if ledger.records:
            raise InfrastructureError(f"run {cfg.tag} has records but no baseline; its ledger "
                                      f"({ledger.jsonl}) was edited by hand: start another --tag")
        head = run.head()
        rec = trial(0, head, None, "baseline")
        rec["trial_status"] = rec["status"]
        if rec["status"] == "ok":
            rec["status"], rec["decision"], rec["delta"] = "keep", "baseline", 0.0
        record(rec)
        if rec["status"] != "keep":
            raise InfrastructureError(f"the baseline did not run ({rec['status']}: {rec['reason']}); "
                                      "fix target/train.py or the set-up before running overnight")
    pending = reconcile(run, ledger)
    state.best = ledger.best()["val_bpb"]

    def should_stop() -> str | None:
        if cfg.max_experiments is not None and len(ledger.records) >= cfg.max_experiments:
            return f"reached --max-experiments {cfg.max_experiments}"
        if cfg.until is not None and datetime.now() >= cfg.until:
            return f"reached --until {cfg.until:%H:%M}"
        if cfg.max_cost is not None and ledger.total_cost() >= cfg.max_cost:
            return f"spent ${ledger.total_cost():.2f} of --max-cost ${cfg.max_cost:.2f}"
        return None

    failed_proposals = 0
    while (why := should_stop()) is None:
        if failed_proposals >= MAX_FAILED_PROPOSALS:
            why = f"{failed_proposals} proposals in a row failed; see the last records' reasons"
            break
        best = ledger.best()
        number = ledger.next_number()
        llm_info: dict[str, Any] | None = None
        if pending:
            number, commit, description = pending
            pending = None
            log(f"resuming experiment {number}: {description}")
        else:
            state.enter("proposing", number)
            observe(state)
            proposal = propose(program, run.read_train(), history(ledger))
            llm_info = {"model": proposal.model, "prompt_tokens": proposal.prompt_tokens,
                        "completion_tokens": proposal.completion_tokens,
                        "cost_usd": proposal.cost_usd, "propose_seconds": round(proposal.seconds, 3)}
            if proposal.train_py is None:
                record({"version": 1, "id": f"{cfg.tag}-{number}", "run": cfg.tag, "number": number,
                        "parent": best["commit"], "commit": None, "status": "invalid",
                        "reason": proposal.error[:500], "description": proposal.description[:120],
                        "val_bpb": None, "memory_gb": None, "llm": llm_info,
                        "phases": {"propose": round(proposal.seconds, 3)},
                        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                        "trial_status": "invalid", "decision": "no valid proposal"})
                failed_proposals += 1
                continue
            failed_proposals = 0
            description = proposal.description[:120]
            commit = run.commit_candidate(proposal.train_py, number, description)
        rec = trial(number, commit, best["commit"], description, llm_info)
        if llm_info:
            rec["phases"]["propose"] = llm_info["propose_seconds"]
        rec["trial_status"] = rec["status"]
        status, rule = decide(rec["status"], rec["val_bpb"], best["val_bpb"], cfg.min_delta)
        rec["status"], rec["decision"] = status, rule
        rec["delta"] = (rec["val_bpb"] - best["val_bpb"]) if rec["val_bpb"] is not None else None
        record(rec)                                       # the truth first, then the branch
        if status != "keep":
            run.discard(number, commit, best["commit"])
        else:
            state.best = rec["val_bpb"]
    from runner.report import write_report
    write_report(run_dir, run)                          # progress.png and report.html
    state.enter("done")
    state.message = why
    observe(state)
    log(f"stopped: {why}")
    return ledger
