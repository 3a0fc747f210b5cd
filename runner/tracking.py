"""Experiment tracking: every record of a run mirrored into MLflow or Weights & Biases.

The ledger (`experiments.jsonl`) stays the truth; a tracker is a copy of it that researchers
read in the tools they already use. What a tracker receives per experiment:

- **params**: tag, number, id, role, parent and candidate commit, image tag, budget, seed,
  backend, agent and LLM model, the GPU's name; the keep rule and its test, and the val_bpb of
  each of a candidate's runs (`runs_val_bpb`, comma-separated);
- **metrics**: val_bpb, delta, training seconds, tokens/s, MFU, peak memory, wall seconds per
  phase, the GPU telemetry summary, LLM tokens and cost; the keep decision's figures
  (`mean_bpb`, and `test_*`: runs, mean, best_runs, best_mean, difference, sd, df, statistic,
  critical, p_value, alpha, alpha_per_look, max_runs, margin, limit);
- **tags**: status, decision, reason, trial status, description, the test's `effect`;
- **artifacts**: the candidate's diff of train.py (`diff.patch`) and its log tail (`log_tail.txt`);

and, per overnight run, a summary (experiments, keeps, failures, the best's and the baseline's
scores as decided (means of their runs), the measured noise: `noise_seed_sd`, `noise_seeds`,
`noise_same_seed_sd`, `noise_same_seed_runs`, and the reruns' share of trial time, LLM cost)
updated after every record. MLflow: one experiment per overnight run (`autoresearch/<tag>`, or
`$MLFLOW_EXPERIMENT_NAME`), a parent run `<tag>` holding the summary, one child run per
experiment. W&B: project `$WANDB_PROJECT` (default `autoresearch`), group `<tag>`, one run per
experiment (id `<tag>-<n>`) and a `<tag>-summary` run. Both libraries read their own standard
configuration (`MLFLOW_TRACKING_URI`, `WANDB_MODE`, `WANDB_DIR`, `WANDB_API_KEY`, ...).

**Failures never stop the loop or lose a record.** Records are sent by a background thread;
`runs/<tag>/tracking.json` remembers which ids reached which destination. A failing tracker is
logged once, retried after a pause (and whenever a new record arrives), and logged again when it
recovers. What was never sent is sent by the next run with `--track`, or by
`autoresearch track --tag T` (which back-fills a whole run from its ledger).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from runner import decide
from runner.record import Record, finite_number

Log = Callable[[str], None]
DiffFn = Callable[[str, str], str]

TRACKERS = ("mlflow", "wandb")
EXTRA_HINT = "pip install 'autoresearch[tracking]'"
RETRY_FIRST_S = 15.0              # pause after a failure, doubled per failure up to RETRY_MAX_S
RETRY_MAX_S = 300.0
MAX_TEXT = 500                    # characters of a reason or description in a tag
FAILED = ("crash", "timeout", "oom", "invalid")


class TrackingError(RuntimeError):
    """A tracker cannot be used at all (library missing, unknown name)."""


# ---------------------------------------------------------------------------------------------
# What a record becomes
# ---------------------------------------------------------------------------------------------



def params(rec: Record) -> dict[str, str]:
    """The record's settings, as strings (absent ones left out)."""
    llm = rec.get("llm") or {}
    role = rec.get("role") or "candidate"
    values = {
        "tag": rec.get("run"), "number": rec.get("number"), "id": rec.get("id"), "role": role,
        "parent_commit": rec.get("parent"), "commit": rec.get("commit"),
        "candidate_commit": rec.get("candidate_commit") or rec.get("commit"),
        "image_tag": rec.get("image_tag"), "budget_s": rec.get("budget"), "seed": rec.get("seed"),
        "backend": rec.get("backend"),
        "agent": ("llm" if llm.get("model") else "search") if role == "candidate" else "none",
        "llm_model": llm.get("model"),
        "gpu_name": (rec.get("gpu") or {}).get("name"),
        "keep_rule": _test(rec).get("rule"), "test": _test(rec).get("test"),
        "runs_val_bpb": ",".join(str(v) for v in _run_values(rec)) or None,
    }
    return {k: str(v) for k, v in values.items() if v is not None and v != ""}


TEST_NUMBERS = ("mean", "best_mean", "difference", "sd", "df", "statistic", "critical", "p_value",
                "alpha", "alpha_per_look", "max_runs", "margin", "limit")


def _test(rec: Record) -> dict[str, Any]:
    t = rec.get("test")
    return t if isinstance(t, dict) else {}


def _run_values(rec: Record) -> list[Any]:
    runs = r if isinstance(r := rec.get("runs"), list) else []
    return [run.get("val_bpb") for run in runs if isinstance(run, dict)]


def metrics(rec: Record) -> dict[str, float]:
    """The record's numbers (absent or non-numeric ones left out)."""
    summary = rec.get("summary") or {}
    llm = rec.get("llm") or {}
    values: dict[str, Any] = {
        "val_bpb": rec.get("val_bpb"), "delta": rec.get("delta"),
        "training_seconds": rec.get("training_seconds"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "mfu_percent": summary.get("mfu_percent"),
        "num_steps": summary.get("num_steps"), "num_params_M": summary.get("num_params_M"),
        "memory_gb": rec.get("memory_gb"), "reported_memory_gb": rec.get("reported_memory_gb"),
        "wall_seconds": rec.get("wall_seconds"),
        "llm_prompt_tokens": llm.get("prompt_tokens"),
        "llm_completion_tokens": llm.get("completion_tokens"),
        "llm_cost_usd": llm.get("cost_usd"),
    }
    values["mean_bpb"] = rec.get("mean_bpb")
    t = _test(rec)
    for key in TEST_NUMBERS:                   # the keep decision's figures
        values[f"test_{key}"] = t.get(key)
    for key in ("runs", "best_runs"):          # how many runs each side of the test had
        if isinstance(t.get(key), list):
            values[f"test_{key}"] = len(t[key])
    for phase, seconds in (rec.get("phases") or {}).items():
        values[f"phase_{phase}_seconds"] = seconds
    for key, value in (rec.get("gpu") or {}).items():
        values[f"gpu_{key}"] = value
    return {k: v for k, v in ((k, finite_number(v)) for k, v in values.items()) if v is not None}


def tags(rec: Record) -> dict[str, str]:
    values = {"status": rec.get("status"), "decision": rec.get("decision"),
              "reason": rec.get("reason"), "trial_status": rec.get("trial_status"),
              "description": rec.get("description"), "effect": _test(rec).get("effect")}
    return {k: str(v)[:MAX_TEXT] for k, v in values.items() if v not in (None, "")}


def artifacts(rec: Record, diff: DiffFn | None) -> dict[str, str]:
    """name -> text: the candidate's diff of train.py from its parent, and its log tail."""
    out: dict[str, str] = {}
    commit = rec.get("candidate_commit") or rec.get("commit")
    if diff is not None and commit and rec.get("parent") and commit != rec.get("parent"):
        try:
            out["diff.patch"] = diff(str(rec["parent"]), str(commit))
        except Exception:                       # noqa: BLE001 - a gone commit: no diff
            pass
    if rec.get("log_tail"):
        out["log_tail.txt"] = str(rec["log_tail"])
    return out


def run_summary(records: Iterable[Record]) -> dict[str, float]:
    """The overnight run so far: experiments, keeps, failures, the best's and the baseline's
    scores as they were decided on (a rerun candidate's mean, the baseline's mean over its
    seeds), the noise and the reruns' share of trial time, cost."""
    records = list(records)
    kept = [r for r in records if r.get("status") == "keep" and finite_number(r.get("val_bpb")) is not None]
    base = next((r for r in records if r.get("role") == "baseline"), None)
    out = {
        "experiments": float(len(records)),
        "keeps": float(sum(1 for r in kept if r.get("role") != "baseline")),
        "failures": float(sum(1 for r in records if r.get("status") in FAILED)),
        "llm_cost_usd": sum(finite_number((r.get("llm") or {}).get("cost_usd")) or 0.0 for r in records),
    }

    def score(r: Record) -> float:
        """What a kept record was decided on: its mean where it has one; the baseline's mean
        over its seeds (the noise runs of its commit that are not same-seed reruns)."""
        if r is base:
            seeds = [v for x in records if x.get("role") in ("baseline", "noise")
                     and x.get("commit") == r.get("commit") and not x.get("same_seed")
                     and (v := finite_number(x.get("val_bpb"))) is not None]
            if seeds:
                return sum(seeds) / len(seeds)
        mean = finite_number(r.get("mean_bpb"))
        return mean if mean is not None else float(r["val_bpb"] or 0.0)   # kept: a number

    if kept:
        out["best_val_bpb"] = score(kept[-1])        # each keep beat the best before it
        out["best_number"] = float(kept[-1]["number"])
    if base is not None and finite_number(base.get("val_bpb")) is not None:
        out["baseline_val_bpb"] = score(base)
    try:
        noise = decide.noise_of(records)
        reruns, total = decide.rerun_share(records)
    except (TypeError, ValueError):                  # a hand-edited ledger: no noise figures
        noise, reruns, total = None, 0.0, 0.0
    if noise is not None:
        out["noise_seeds"] = float(len(noise.seeds))
        out["noise_same_seed_runs"] = float(noise.n_same_seed)
        for key, value in (("noise_seed_sd", noise.seed_sd), ("noise_same_seed_sd", noise.same_seed_sd)):
            if value is not None:
                out[key] = value
    if total:
        out["rerun_share"] = reruns / total
    return out


def _start_ms(rec: Record) -> int | None:
    from datetime import datetime
    try:
        return int(datetime.fromisoformat(str(rec["started_at"])).timestamp() * 1000)
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------

class MLflowSink:
    """One MLflow experiment per overnight run; a parent run with the summary; one child run per
    experiment, found again by its `autoresearch.id` tag (so a resend never duplicates it)."""

    name = "mlflow"

    def __init__(self, tag: str):
        import logging
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TrackingError(f"--track mlflow needs MLflow: {EXTRA_HINT} ({e})") from None
        # MLflow's store logs each database error with a traceback, every retry; the failure
        # is reported here, once. (Its INFO lines would also land in the live view.)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.tag = tag
        self.uri = mlflow.get_tracking_uri()
        self.experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"autoresearch/{tag}"
        self._client_cls = MlflowClient
        self._client: Any = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._summarised = False

    @property
    def destination(self) -> str:
        return f"mlflow {self.uri} {self.experiment_name}"

    def _ready(self):
        if self._client is None:
            self._client = self._client_cls(tracking_uri=self.uri)
        client = self._client
        if self._experiment_id is None:
            found = client.get_experiment_by_name(self.experiment_name)
            self._experiment_id = (found.experiment_id if found is not None else
                                   client.create_experiment(self.experiment_name,
                                                            tags={"autoresearch.tag": self.tag}))
        if self._parent_id is None:
            runs = client.search_runs([self._experiment_id],
                                      "tags.`autoresearch.kind` = 'summary' and "
                                      f"tags.`autoresearch.tag` = '{self.tag}'", max_results=1)
            if runs:
                self._parent_id = runs[0].info.run_id
                if runs[0].info.status != "RUNNING":              # the run resumed
                    client.update_run(self._parent_id, status="RUNNING")
            else:
                self._parent_id = client.create_run(
                    self._experiment_id, run_name=self.tag,
                    tags={"autoresearch.kind": "summary", "autoresearch.tag": self.tag}).info.run_id
        return client

    def send(self, rec: Record, diff: DiffFn | None) -> None:
        from mlflow.entities import Metric, Param, RunTag
        client = self._ready()
        rid = str(rec.get("id") or f"{self.tag}-{rec.get('number')}")
        for old in client.search_runs([self._experiment_id], f"tags.`autoresearch.id` = '{rid}'"):
            if old.info.status == "FINISHED" or old.info.status == "FAILED":
                return                                   # sent before; the state file lost it
            client.delete_run(old.info.run_id)           # cut short by a crash: send it again
        start = _start_ms(rec)
        run = client.create_run(self._experiment_id, start_time=start, run_name=rid, tags={
            "autoresearch.id": rid, "autoresearch.tag": self.tag, "autoresearch.kind": "experiment",
            "mlflow.parentRunId": self._parent_id,
            **({"mlflow.note.content": str(rec["description"])} if rec.get("description") else {})})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        step = int(rec.get("number") or 0)
        client.log_batch(run_id,
                         metrics=[Metric(k, v, now, step) for k, v in metrics(rec).items()],
                         params=[Param(k, v[:6000]) for k, v in params(rec).items()],
                         tags=[RunTag(k, v) for k, v in tags(rec).items()])
        for name, text in artifacts(rec, diff).items():
            client.log_text(run_id, text, name)
        status = "FAILED" if rec.get("status") in FAILED else "FINISHED"
        wall = finite_number(rec.get("wall_seconds"))
        end = start + int(wall * 1000) if start is not None and wall is not None else None
        client.set_terminated(run_id, status, end_time=end)

    def summarise(self, summary: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        client = self._ready()
        now = int(time.time() * 1000)
        client.log_batch(self._parent_id,
                         metrics=[Metric(k, v, now, step) for k, v in summary.items()])
        self._summarised = True

    def close(self) -> None:
        if self._summarised:
            self._summarised = False
            self._client.set_terminated(self._parent_id, "FINISHED")


class WandbSink:
    """W&B: group <tag>, one run per experiment (id <tag>-<n>), and a <tag>-summary run."""

    name = "wandb"

    def __init__(self, tag: str):
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise TrackingError(f"--track wandb needs wandb: {EXTRA_HINT} ({e})") from None
        self.tag = tag
        self.project = os.environ.get("WANDB_PROJECT") or "autoresearch"
        self.mode = os.environ.get("WANDB_MODE") or "online"
        self._summary_run: Any = None

    @property
    def destination(self) -> str:
        entity = os.environ.get("WANDB_ENTITY") or ""
        return f"wandb {self.mode} {entity}/{self.project}"

    def _init(self, **kw):
        import wandb
        # Quiet (the loop owns the terminal), no console capture, no system sampling, no code.
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                  save_code=False, disable_git=True)
        return wandb.init(project=self.project, group=self.tag, reinit="create_new",
                          settings=settings, **kw)

    def send(self, rec: Record, diff: DiffFn | None) -> None:
        rid = str(rec.get("id") or f"{self.tag}-{rec.get('number')}")
        run = self._init(id=rid, name=rid, job_type=str(rec.get("role") or "candidate"),
                         notes=str(rec.get("description") or ""), resume="allow",
                         config=params(rec),
                         tags=[t for t in (rec.get("status"), rec.get("role")) if t])
        try:
            run.log(metrics(rec), step=int(rec.get("number") or 0))
            run.summary.update(tags(rec))
            for name, text in artifacts(rec, diff).items():
                path = Path(run.dir) / name
                path.write_text(text, encoding="utf-8")
                run.save(str(path), base_path=run.dir, policy="now")
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish(exit_code=1 if rec.get("status") in FAILED else 0)

    def summarise(self, summary: dict[str, float], step: int) -> None:
        if self._summary_run is None:
            self._summary_run = self._init(id=f"{self.tag}-summary", name=f"{self.tag} summary",
                                           job_type="summary", resume="allow")
        self._summary_run.log(summary, step=step)

    def close(self) -> None:
        if self._summary_run is not None:
            run, self._summary_run = self._summary_run, None
            run.finish()


def check(names: Iterable[str]) -> None:
    """Raise TrackingError when a tracker is unknown or its library is not installed."""
    import importlib.util
    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise TrackingError(f"--track {name} needs the {name} package: {EXTRA_HINT}")


def used_before(run_dir: Path) -> list[str]:
    """The trackers that hold records of the run in `run_dir` (from its tracking.json)."""
    names = [d.split(" ", 1)[0] for d in SentState(run_dir).sent]
    return [n for n in TRACKERS if n in names]


def make_sink(name: str, tag: str):
    if name == "mlflow":
        return MLflowSink(tag)
    if name == "wandb":
        return WandbSink(tag)
    raise TrackingError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")


# ---------------------------------------------------------------------------------------------
# What reached where: runs/<tag>/tracking.json
# ---------------------------------------------------------------------------------------------

class SentState:
    """destination -> the record ids it holds. Written (then renamed) after every send."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "tracking.json"
        self.lock = threading.Lock()
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self.sent = {k: set(v) for k, v in raw.items() if isinstance(v, list)}
        except (OSError, ValueError, AttributeError):
            self.sent = {}

    def has(self, destination: str, rid: str) -> bool:
        with self.lock:
            return rid in self.sent.get(destination, set())

    def add(self, destination: str, rid: str) -> None:
        with self.lock:
            self.sent.setdefault(destination, set()).add(rid)
            data = {k: sorted(v) for k, v in self.sent.items()}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)


def _rid(rec: Record) -> str:
    return str(rec.get("id") or f"{rec.get('run')}-{rec.get('number')}")


# ---------------------------------------------------------------------------------------------
# The trackers of one run
# ---------------------------------------------------------------------------------------------

class Tracking:
    """Sends a run's records to its trackers, in order, from one background thread.

    `submit(record)` never blocks and never raises. Each tracker keeps its own place: a failing
    one is logged once, paused (15 s, doubling up to 5 min; a new record also retries), and its
    records wait; the others go on. `close()` makes a last attempt within a bounded time and
    says what is left for `autoresearch track`.
    """

    def __init__(self, names: Iterable[str], tag: str, run_dir: Path, records: Iterable[Record] = (),
                 diff: DiffFn | None = None, log: Log = print, retry_s: float = RETRY_FIRST_S):
        names = list(dict.fromkeys(names))
        self.sinks = [make_sink(n, tag) for n in names]       # TrackingError: fail at start
        self.tag, self.diff, self.log, self.retry_s = tag, diff, log, retry_s
        self.state = SentState(run_dir)
        self.records: list[Record] = list(records)
        self._cond = threading.Condition()
        self._failing: dict[str, float] = {}          # sink name -> current pause (s)
        self._retry_at: dict[str, float] = {}
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---- the loop's side ----
    def start(self) -> "Tracking":
        self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
        self._thread.start()
        return self

    def submit(self, rec: Record) -> None:
        with self._cond:
            self.records.append(rec)
            self._retry_at.clear()                    # a new record: retry a failing tracker now
            self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> int:
        """Last attempt within `timeout` seconds; the number of (record, tracker) pairs unsent."""
        with self._cond:
            self._closing = True
            self._retry_at.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.unsent()
        if left:
            self.log(f"tracking: {left} record(s) not sent ({self._describe_failing()}); they stay in "
                     f"the ledger: `autoresearch track --tag {self.tag}` sends them")
        return left

    # ---- questions ----
    def pending(self, sink) -> list[Record]:
        with self._cond:
            records = list(self.records)
        return [r for r in records if not self.state.has(sink.destination, _rid(r))]

    def unsent(self) -> int:
        return sum(len(self.pending(s)) for s in self.sinks)

    def _describe_failing(self) -> str:
        return ", ".join(sorted(self._failing)) or "stopped before done"

    # ---- sending ----
    def sync(self, progress: Callable[[int], None] | None = None) -> int:
        """Send what is pending to every tracker now, in this thread, then close them; returns
        the number of (record, tracker) pairs sent. `progress(1)` is called after each."""
        try:
            return sum(self._drain(sink, progress) for sink in self.sinks)
        finally:
            self._close_sinks()

    def _drain(self, sink, progress: Callable[[int], None] | None = None) -> int:
        sent = 0
        for rec in self.pending(sink):
            try:
                sink.send(rec, self.diff)
                self.state.add(sink.destination, _rid(rec))
                with self._cond:
                    upto = next((i for i, r in enumerate(self.records) if r is rec),
                                len(self.records) - 1) + 1
                    so_far = self.records[:upto]
                sink.summarise(run_summary(so_far), step=upto)
            except Exception as e:                      # noqa: BLE001 - never stop the loop
                self._failed(sink, e)
                return sent
            sent += 1
            if progress is not None:
                progress(1)
        with self._cond:
            recovered = self._failing.pop(sink.name, None) is not None
            self._retry_at.pop(sink.name, None)
        if recovered:
            self.log(f"tracking: {sink.name} works again; the records it missed are sent")
        return sent

    def _failed(self, sink, error: Exception) -> None:
        with self._cond:
            previous = self._failing.get(sink.name)
            first = previous is None
            pause = self.retry_s if previous is None else min(previous * 2, RETRY_MAX_S)
            self._failing[sink.name] = pause
            self._retry_at[sink.name] = time.monotonic() + pause
        if first:
            text = " ".join(str(error).split())[:300]
            self.log(f"tracking: {sink.name} failed ({type(error).__name__}: {text}); the ledger "
                     f"keeps every record, and {sink.name} is retried later")

    def _work(self) -> None:
        while True:
            for sink in self.sinks:
                with self._cond:
                    due = time.monotonic() >= self._retry_at.get(sink.name, 0.0)
                if due:
                    self._drain(sink)
            with self._cond:
                if any(self.pending(s) for s in self.sinks if s.name not in self._retry_at):
                    continue                            # arrived while sending
                if self._closing:
                    break
                waits = [t - time.monotonic() for t in self._retry_at.values()]
                self._cond.wait(max(min(waits), 0.05) if waits else None)
        self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:                      # noqa: BLE001
                self.log(f"tracking: closing {sink.name} failed ({type(e).__name__}: {e})")


def open_tracking(names: Iterable[str], tag: str, run_dir: Path, records: Iterable[Record] = (),
                  diff: DiffFn | None = None, log: Log = print) -> Tracking | None:
    """The started trackers of a run (None without any): earlier records of the run that no
    tracker holds yet are sent first."""
    names = list(names)
    if not names:
        return None
    return Tracking(names, tag, run_dir, records, diff=diff, log=log).start()


def backfill(names: Iterable[str], run_dir: Path, records: list[Record], diff: DiffFn | None = None,
             log: Log = print, console=None) -> tuple[int, int]:
    """Send every record of a run that a tracker does not hold yet, with a progress bar (count,
    rate, time left). Returns (sent, left unsent)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    tag = next((str(r["run"]) for r in records if r.get("run")), Path(run_dir).name)
    tracking = Tracking(names, tag, run_dir, records, diff=diff, log=log)
    total = tracking.unsent()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"tracking {tag}", total=total)
        sent = tracking.sync(progress=lambda k: bar.advance(task, k))
    return sent, tracking.unsent()
