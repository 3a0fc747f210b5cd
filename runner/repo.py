"""Git for a run (gitpython): its own branch and worktree, never the user's checkout.

A run `<tag>` works on branch `autoresearch/<tag>` in the worktree `runs/<tag>/worktree`. Every
candidate is committed before it trains (so its image can carry the commit), *off* the branch:
its parent is the best when it was proposed, and the ref `refs/autoresearch/<tag>/candidates/<n>`
keeps it, so several can train at once without touching the worktree. When its record is
written the refs move (`settle`): kept, the branch advances to it (or to a new commit with its
train.py on top of the branch, when the best moved meanwhile; the candidate itself then stays
under `.../kept/<n>`); discarded, its ref moves to `.../discarded/<n>` and the branch does not
move. Nothing an agent wrote is ever lost. A reused tag resumes: the same branch, the same
worktree.
"""

from __future__ import annotations

import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git
from gitdb.base import IStream

from runner.paths import REPO_ROOT, TRAIN_REL, branch_name, ref_prefix, run_worktree

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
        # The file byte for byte: GitPython strips the output's last newline unless told not to,
        # and a trial of the kept file must hash as the trial of the candidate that made it did.
        return self.repo.git.show(f"{commit}:{TRAIN_REL}", strip_newline_in_stdout=False)

    # ---- candidates: commits off the branch, kept reachable under refs (module docstring) ----

    def ref(self, kind: str, number: int) -> str:
        return f"{ref_prefix(self.tag, kind)}{number}"

    def commit_file(self, text: str, parent: str, message: str) -> str:
        """A commit whose tree is `parent`'s with train.py replaced; touches no worktree
        (a private index file), so candidates can be made while others train."""
        data = text.encode("utf-8")
        blob = self.repo.odb.store(IStream("blob", len(data), io.BytesIO(data))).hexsha.decode()
        env = {"GIT_AUTHOR_NAME": AUTHOR.name, "GIT_AUTHOR_EMAIL": AUTHOR.email,
               "GIT_COMMITTER_NAME": AUTHOR.name, "GIT_COMMITTER_EMAIL": AUTHOR.email}
        with tempfile.TemporaryDirectory() as tmp:
            with self.repo.git.custom_environment(GIT_INDEX_FILE=str(Path(tmp) / "index"), **env):
                self.repo.git.read_tree(parent)
                self.repo.git.update_index("--add", "--cacheinfo", f"100644,{blob},{TRAIN_REL}")
                tree = self.repo.git.write_tree()
                return self.repo.git.commit_tree(tree, "-p", parent, "-m", message)

    def add_candidate(self, text: str, parent: str, number: int, description: str) -> str:
        commit = self.commit_file(text, parent, f"autoresearch {self.tag} #{number}: {description}")
        self.repo.git.update_ref(self.ref("candidates", number), commit)
        return commit

    def candidates(self) -> dict[int, tuple[str, str, str]]:
        """Candidates not yet settled: number -> (commit, parent, description)."""
        out = {}
        prefix = ref_prefix(self.tag, "candidates")
        for line in self.repo.git.for_each_ref("--format=%(refname) %(objectname)", prefix).splitlines():
            ref, sha = line.split()
            commit = self.repo.commit(sha)
            m = MESSAGE.match(str(commit.message).strip().splitlines()[0])
            out[int(ref[len(prefix):])] = (sha, commit.parents[0].hexsha, m.group("description") if m else "")
        return out

    def keep_commit(self, number: int, commit: str, description: str) -> str:
        """The commit the branch will stand on once `commit` is kept: itself when it grew from
        the current head, else a new commit with its train.py on top of the head."""
        head = self.head()
        if self.repo.commit(commit).parents[0].hexsha == head:
            return commit
        return self.commit_file(self.read_train(commit), head,
                                f"autoresearch {self.tag} #{number}: {description} "
                                f"(proposed on an older best)")

    def settle(self, number: int, commit: str | None, kept_at: str | None) -> None:
        """Move refs after the record is written: kept -> the branch to `kept_at`; discarded ->
        the candidate's ref to discarded/<n>. Safe to repeat."""
        if commit:
            if kept_at is None:
                self.repo.git.update_ref(self.ref("discarded", number), commit)
            elif kept_at != commit:
                self.repo.git.update_ref(self.ref("kept", number), commit)
            try:
                self.repo.git.update_ref("-d", self.ref("candidates", number))
            except git.GitCommandError:
                pass
        if kept_at is not None and self.head() != kept_at:
            self.wt.git.reset("--hard", kept_at)

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
    branch = branch_name(tag)
    worktree = run_worktree(runs_dir, tag).resolve()
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
