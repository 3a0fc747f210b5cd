"""Git for a run (gitpython): its own branch and worktree, never the user's checkout.

A run `<tag>` works on branch `autoresearch/<tag>` in the worktree `runs/<tag>/worktree`. Every
candidate is committed there before it trains (so its image can carry the commit). A kept
experiment leaves the branch where it is; a discarded one gets the ref
`refs/autoresearch/<tag>/discarded/<n>` and the branch is reset to its parent, so nothing an
agent wrote is ever lost. A reused tag resumes: the same branch, the same worktree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import git

from runner.paths import REPO_ROOT

TRAIN_REL = "target/train.py"
AUTHOR = git.Actor("autoresearch", "autoresearch@localhost")
MESSAGE = re.compile(r"^autoresearch (?P<tag>\S+) #(?P<number>\d+): ?(?P<description>.*)$")


class RepoError(RuntimeError):
    """A state of the repository the run cannot work with; the message says what to do."""


@dataclass
class RunRepo:
    repo: git.Repo            # the user's repository
    tag: str
    branch: str
    worktree: Path

    @property
    def wt(self) -> git.Repo:
        return git.Repo(self.worktree)

    def head(self) -> str:
        return self.wt.head.commit.hexsha

    def train_py(self) -> Path:
        return self.worktree / TRAIN_REL

    def read_train(self, commit: str | None = None) -> str:
        if commit is None:
            return self.train_py().read_text(encoding="utf-8")
        return self.repo.git.show(f"{commit}:{TRAIN_REL}")

    def commit_candidate(self, text: str, number: int, description: str) -> str:
        """Write and commit a candidate train.py on the run's branch; return the commit."""
        self.train_py().write_text(text, encoding="utf-8")
        wt = self.wt
        wt.index.add([TRAIN_REL])
        message = f"autoresearch {self.tag} #{number}: {description}"
        return wt.index.commit(message, author=AUTHOR, committer=AUTHOR).hexsha

    def discard(self, number: int, commit: str, back_to: str) -> None:
        """Keep `commit` reachable under refs/autoresearch/<tag>/discarded/<n>, then reset the
        branch to `back_to`. Safe to repeat (a resumed run may do it twice)."""
        self.repo.git.update_ref(self.discarded_ref(number), commit)
        self.wt.git.reset("--hard", back_to)

    def discarded_ref(self, number: int) -> str:
        return f"refs/autoresearch/{self.tag}/discarded/{number}"

    def pending_candidate(self, recorded: set[int]) -> tuple[int, str, str] | None:
        """A candidate committed at the branch tip whose trial never got recorded (the runner
        died in between): (number, commit, description), to be run again, else None."""
        commit = self.wt.head.commit
        m = MESSAGE.match(commit.message.strip().splitlines()[0]) if commit.message else None
        if m and m.group("tag") == self.tag and int(m.group("number")) not in recorded:
            return int(m.group("number")), commit.hexsha, m.group("description")
        return None

    def experiment_number(self, commit: str) -> int | None:
        m = MESSAGE.match(self.repo.commit(commit).message.strip().splitlines()[0])
        return int(m.group("number")) if m and m.group("tag") == self.tag else None

    def diff(self, parent: str, commit: str) -> str:
        return self.repo.git.diff(parent, commit, "--", TRAIN_REL)


def check_tag(tag: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tag) or ".." in tag or tag.endswith(".lock"):
        raise RepoError(f"tag {tag!r}: use letters, digits, '.', '_' and '-' (at most 64)")


def open_run(tag: str, runs_dir: Path, root: Path = REPO_ROOT, start: str = "HEAD") -> RunRepo:
    """The run's branch and worktree: created from `start` (default: the user's HEAD) for a
    new tag, reopened for an existing one."""
    check_tag(tag)
    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise RepoError(f"{root} is not a git repository: clone the project with git") from None
    if not repo.head.is_valid():
        raise RepoError(f"{root} has no commits yet: commit target/train.py first")
    branch = f"autoresearch/{tag}"
    worktree = (runs_dir / tag / "worktree").resolve()
    repo.git.worktree("prune")
    listed = worktree_branches(repo)
    exists = branch in [h.name for h in repo.branches]
    if exists:
        where = listed.get(branch)
        if where is not None and Path(where).resolve() != worktree:
            raise RepoError(f"branch {branch} is checked out at {where}; switch that checkout to "
                            "another branch, or pick another --tag")
        if where is None:
            if worktree.exists() and any(worktree.iterdir()):
                raise RepoError(f"{worktree} exists but is not the worktree of {branch}: "
                                "move it away, or pick another --tag")
            repo.git.worktree("add", str(worktree), branch)
    else:
        if worktree.exists() and any(worktree.iterdir()):
            raise RepoError(f"{worktree} exists but branch {branch} does not: move it away, "
                            "or pick another --tag")
        try:
            commit = repo.commit(start).hexsha
            repo.git.show(f"{commit}:{TRAIN_REL}")
        except (git.BadName, git.GitCommandError, ValueError):
            raise RepoError(f"{start} has no {TRAIN_REL} to start from") from None
        worktree.parent.mkdir(parents=True, exist_ok=True)
        repo.git.worktree("add", "-b", branch, str(worktree), commit)
    run = RunRepo(repo=repo, tag=tag, branch=branch, worktree=worktree)
    if run.wt.is_dirty(untracked_files=False):
        # Only the runner writes here; leftovers are a write cut short by a crash.
        run.wt.git.reset("--hard")
    return run


def worktree_branches(repo: git.Repo) -> dict[str, str]:
    """branch name -> worktree path, for every worktree of the repository."""
    out, path = {}, None
    for line in repo.git.worktree("list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            path = line[len("worktree "):]
        elif line.startswith("branch refs/heads/") and path:
            out[line[len("branch refs/heads/"):]] = path
    return out


def user_checkout_warning(root: Path = REPO_ROOT) -> str | None:
    """A one-line note when the user's own train.py has uncommitted changes: the run starts
    from the committed file, and those changes are not part of it."""
    try:
        repo = git.Repo(root)
        if TRAIN_REL in [d.a_path for d in repo.index.diff(None)]:
            return (f"note: {TRAIN_REL} has uncommitted changes in your checkout; the run starts "
                    "from the last commit (commit them first to include them)")
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        pass
    return None
