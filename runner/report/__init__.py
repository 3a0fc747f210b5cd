"""Reports on a run, for people: a terminal table (`autoresearch status`), a progress plot and a
self-contained HTML page (`autoresearch report`), one module each over `summary`.

Everything here reads the run; nothing writes to its ledger or its git branch. The ledger is
read without repair (`runner.record.read`; `Ledger.open` would truncate a torn last line in
place) so that `status` is safe while the loop is appending. Descriptions, reasons and log tails
come from an LLM and from candidate output: they are untrusted text, shown as plain text in the
terminal (never as rich markup) and escaped with `html.escape` in the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner import record
from runner.paths import REPO_ROOT, branch_name, run_worktree
from runner.record import FAILED, Record
from runner.repo import RunRepo
from runner.report.page import report_html
from runner.report.plot import progress_png, render_png
from runner.report.summary import is_kept, number_of, summary
from runner.report.table import caption, status_table


def load_records(run_dir: Path) -> list[Record]:
    """The run's records, read-only: a torn last line (a write in progress) is left out, not
    repaired; a line that is not a JSON object is skipped."""
    return record.read(Path(run_dir) / "experiments.jsonl")


def latest_tag(runs_dir: Path) -> str | None:
    """The run whose experiments.jsonl changed last, or None when there is none."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    found = [(p.stat().st_mtime, p.parent.name) for p in runs_dir.glob("*/experiments.jsonl")
             if p.is_file()]
    return max(found)[1] if found else None


def resolve_run(runs_dir: Path, tag: str | None = None) -> Path:
    """The folder of run `tag`, or of the run that changed last when `tag` is None. Raises
    LookupError with a message for people when there is no such run."""
    runs_dir = Path(runs_dir)
    if tag is None:
        tag = latest_tag(runs_dir)
        if tag is None:
            raise LookupError(f"no runs in {runs_dir}: start one with `autoresearch overnight`")
    run_dir = runs_dir / tag
    if not (run_dir / "experiments.jsonl").is_file():
        known = sorted(p.parent.name for p in runs_dir.glob("*/experiments.jsonl"))
        raise LookupError(f"no run {tag!r} in {runs_dir}"
                          + (f" (runs: {', '.join(known)})" if known else ""))
    return run_dir


def collect_diffs(records: list[Record], run_repo: RunRepo | Any | None) -> dict[int, str]:
    """number -> the unified diff of target/train.py from its parent, for every kept change.
    A missing repository or commit leaves the entry out."""
    diffs: dict[int, str] = {}
    if run_repo is None:
        return diffs
    for rec in records:
        n = number_of(rec)
        if not is_kept(rec) or n is None or n <= 0 or not rec.get("commit") or not rec.get("parent"):
            continue
        try:
            diffs[n] = run_repo.diff(str(rec["parent"]), str(rec["commit"]))
        except Exception:                       # noqa: BLE001 - gone commit, no repo: skip it
            continue
    return diffs


def run_repo_for(tag: str, runs_dir: Path, root: Path = REPO_ROOT) -> RunRepo | None:
    """The run's repository for reading diffs, without creating its branch or worktree (as
    `open_run` would); None when `root` is not a git repository."""
    import git

    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    return RunRepo(repo=repo, tag=tag, branch=branch_name(tag),
                   worktree=run_worktree(Path(runs_dir), tag))


def write_report(run_dir: Path, run_repo: RunRepo | Any | None,
                 out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write progress.png and report.html for the run in `run_dir` (into `out_dir`, default
    `run_dir`); returns (png, html)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(run_dir)
    tag = next((str(r["run"]) for r in records if r.get("run")), run_dir.name)
    diffs = collect_diffs(records, run_repo)
    png = render_png(records, tag)
    png_path = out / "progress.png"
    png_path.write_bytes(png)
    html_path = report_html(records, tag, diffs, out / "report.html", png=png,
                            have_repo=run_repo is not None)
    return png_path, html_path


__all__ = ["FAILED", "caption", "collect_diffs", "latest_tag", "load_records",
           "progress_png", "render_png", "report_html", "resolve_run", "run_repo_for", "status_table",
           "summary", "write_report"]
