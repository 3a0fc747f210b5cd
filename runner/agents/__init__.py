"""Agents: they read the brief, the current best train.py and the history, and propose a new one.

Three kinds share one interface, ``make_agent(kind, **options) -> propose``, where
``propose(program_md, current_train_py, history) -> Proposal``:

- ``llm``: any litellm model string (hosted APIs, or a local OpenAI-compatible server through
  ``api_base``), with retries (see `runner.agents.llm`);
- ``exec``: any coding agent (Claude Code, Codex CLI, aider, a script) run as a command once
  per proposal in a scratch folder, with a time limit and a pared-down environment (see
  `runner.agents.command`);
- ``search``: no LLM; perturbs the numeric UPPER_CASE constants of train.py, learning from the
  history which moves crash or help (see `runner.agents.search`). The offline default.

An agent never raises for a bad proposal or an unreachable model: it returns a Proposal with
``train_py=None`` and ``error`` saying why, and the loop records it as ``invalid`` and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class History:
    """What the agent may know; built by the loop from the ledger (`runner.agents.memory.build`)
    and rendered for a prompt by `runner.agents.memory.render`."""

    best: list[dict] = field(default_factory=list)     # {"number","status","val_bpb","delta","description"}
    recent: list[dict] = field(default_factory=list)   # the last few experiments, same fields
    last_failure: str = ""                             # the last failure's log tail: UNTRUSTED
    best_val_bpb: float | None = None
    experiments: list[dict] = field(default_factory=list)   # every experiment, by number (same fields)
    kept_diffs: list[dict] = field(default_factory=list)    # {"number","delta","description","diff"}
    best_training: dict = field(default_factory=dict)       # numbers of how the best trained
    failures: list[dict] = field(default_factory=list)      # the last few: {"number","status","reason","log_tail"}


@dataclass
class Proposal:
    train_py: str | None          # the new file, or None when no valid proposal came
    description: str              # one line
    error: str = ""               # why it was rejected / skipped (recorded as reason, status invalid)
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


Propose = Callable[[str, str, History], Proposal]

KINDS = ("search", "llm", "exec")


def make_agent(kind: str, **options: Any) -> Propose:
    """`kind` "search", "llm" or "exec"; options go to `SearchAgent` / `LLMAgent` / `ExecAgent`
    (unknown ones raise TypeError, so a typo fails at start-up, not at 3 a.m.)."""
    if kind == "search":
        from runner.agents.search import SearchAgent
        return SearchAgent(**options)
    if kind == "llm":
        from runner.agents.llm import LLMAgent         # imports litellm (slow): only when used
        return LLMAgent(**options)
    if kind == "exec":
        from runner.agents.command import ExecAgent
        return ExecAgent(**options)
    raise ValueError(f"unknown agent kind {kind!r}; expected one of {', '.join(KINDS)}")


__all__ = ["History", "Proposal", "Propose", "make_agent", "KINDS"]
