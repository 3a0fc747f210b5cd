"""The process backend (no container engine): the real train.py end to end, and hostile or broken
candidates that must end as the right status, bounded in time and memory, leaving nothing behind.

Every attack is bounded: budgets of seconds (the runner's clock stops the candidate at its
deadline), fixed output sizes, children that sleep at most 120 s and are killed by this test (by
pid, found by a unique marker) if they survive."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO
from runner.sandbox import InfrastructureError, Limits, TrialSpec, process_backend
from runner.sandbox.base import Lane

TRAIN_PY = REPO / "target" / "train.py"


def candidate(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source))
    return path


def trial(train_py: Path, data: Path, budget: int = 10, **limits) -> tuple:
    lines: list[str] = []
    spec = TrialSpec(train_py=train_py, data_dir=data, budget=budget, eval_tokens=4096,
                     limits=Limits(**limits))
    t0 = time.monotonic()
    outcome = process_backend.run(spec, lines.append)
    return outcome, lines, time.monotonic() - t0


def with_marker(marker: str) -> list[int]:
    """Processes whose command line carries `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def survivors(marker: str, wait_s: float = 3.0) -> list[int]:
    """Processes with `marker` still alive after up to `wait_s` (SIGKILL is asynchronous)."""
    end = time.monotonic() + wait_s
    while (left := with_marker(marker)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def reap(marker: str) -> None:
    for pid in with_marker(marker):                    # only processes this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_real_train_py_scores(small_data, scratch, tmp_path):
    budget = 25                           # imports, a fallback export, training, the export
    outcome, lines, _ = trial(TRAIN_PY, small_data, budget=budget)
    assert outcome.status == "ok", (outcome.reason, outcome.log_tail[-3000:])
    assert outcome.backend == "process" and outcome.image_tag is None
    assert outcome.val_bpb is not None and outcome.val_bpb < outcome.score["uniform_bpb"]
    assert outcome.score["status"] == "ok" and outcome.score["tokens"] == 4096
    assert int(outcome.summary["num_steps"]) > 0
    assert float(outcome.summary["training_seconds"]) >= 3        # what it says it trained
    assert outcome.training_seconds <= budget + 0.5                # the runner's clock
    assert any("escapes it" in line for line in lines)             # the clock's limit, said
    assert {"build", "train", "score"} <= set(outcome.phases)
    assert outcome.exit_code == 0
    assert outcome.peak_memory_bytes and outcome.peak_memory_bytes > 50 * 2**20
    assert any("NOT a sandbox" in line for line in lines)


def test_artifact_copied_out(small_data, scratch, tmp_path):
    # A tiny valid model saves the training time: export a bigram table straight away.
    source = """
        import os, torch, prepare
        vocab = prepare.load_meta()["vocab_size"]
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(vocab, vocab)
            def forward(self, idx):
                return self.emb(idx).float()
        m = M().eval()
        x = torch.zeros(2, 16, dtype=torch.long)
        b, t = torch.export.Dim("b", max=1024), torch.export.Dim("t", max=1024)
        prog = torch.export.export(m, (x,), dynamic_shapes=({0: b, 1: t},))
        torch.export.save(prog, os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"))
        print("---"); print("num_steps: 0")
    """
    art = tmp_path / "art"
    spec = TrialSpec(train_py=candidate(tmp_path, source), data_dir=small_data, budget=60,
                     eval_tokens=4096, artifact_dir=art, limits=Limits())
    outcome = process_backend.run(spec, lambda line: None)
    assert outcome.status == "ok", (outcome.reason, outcome.log_tail[-3000:])
    assert outcome.summary == {"num_steps": "0"}
    assert (art / "model.pt2").is_file() and not (art / "model.pt2").is_symlink()


def test_no_model_is_invalid(small_data, scratch, tmp_path):
    outcome, _, _ = trial(candidate(tmp_path, "print('trained, honest')\n"), small_data)
    assert outcome.status == "invalid"
    assert "without writing model.pt2" in outcome.reason
    assert outcome.exit_code == 0 and "score" not in outcome.phases


def test_symlinked_model_is_invalid(small_data, scratch, tmp_path):
    source = """
        import os
        os.symlink("/etc/passwd", os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"))
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data)
    assert outcome.status == "invalid" and "score" not in outcome.phases


def test_garbage_model_is_invalid_by_the_scorer(small_data, scratch, tmp_path):
    source = """
        import os
        with open(os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"), "wb") as f:
            f.write(b"this is not a model archive" * 100)
        print("---"); print("val_bpb: 0.001")
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data)
    assert outcome.status == "invalid", outcome
    assert outcome.val_bpb is None and outcome.score["status"] == "invalid"
    assert outcome.reason and "score" in outcome.phases
    assert outcome.summary == {"val_bpb": "0.001"}      # its own claim: recorded, never trusted


def test_exception_is_crash_with_traceback(small_data, scratch, tmp_path):
    source = """
        def deep():
            raise RuntimeError("boom-7f3a")
        deep()
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data)
    assert outcome.status == "crash" and outcome.exit_code == 1
    assert "Traceback" in outcome.log_tail and "boom-7f3a" in outcome.log_tail
    assert "deep()" in outcome.log_tail


def test_memory_limit_is_oom(small_data, scratch, tmp_path):
    source = "hog = bytearray(2 * 2**30)\nprint('allocated')\n"
    outcome, _, _ = trial(candidate(tmp_path, source), small_data, memory_bytes=512 * 2**20)
    assert outcome.status == "oom", (outcome.reason, outcome.log_tail)
    assert "allocated" not in outcome.log_tail


def test_file_size_limit(small_data, scratch, tmp_path):
    source = """
        import os
        with open(os.path.join(os.environ["AUTORESEARCH_OUT"], "big"), "wb") as f:
            for _ in range(4):
                f.write(b"x" * 2**20)
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data, out_bytes=2**20)
    assert outcome.status == "crash"
    assert "File too large" in outcome.log_tail


def test_sigterm_ignoring_candidate_is_killed_with_its_children(small_data, scratch, tmp_path):
    marker = f"ar-marker-{uuid.uuid4().hex}"
    source = f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"]
        subprocess.Popen(sleeper)                                   # same group
        subprocess.Popen(sleeper + ["escaped"], start_new_session=True)   # its own session
        print("children started", flush=True)
        while True:
            time.sleep(1)
    """
    try:
        outcome, _, seconds = trial(candidate(tmp_path, source), small_data, budget=4)
        assert outcome.status == "timeout", outcome
        assert "children started" in outcome.log_tail
        assert outcome.stopped_at_deadline and 3.9 <= outcome.training_seconds <= 4.5
        assert seconds < 4 + 6
        assert outcome.phases["train"] >= 4
        assert survivors(marker) == []
    finally:
        reap(marker)


def test_escaped_pipe_holder_does_not_hang_the_runner(small_data, scratch, tmp_path):
    # A child in its own session with a scrubbed environment holds the output pipe open:
    # the process backend cannot find it (it says it isolates nothing), but it must not wait.
    marker = f"ar-marker-{uuid.uuid4().hex}"
    source = f"""
        import os, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"],
                         start_new_session=True, env={{}})
        print("left a child behind")
    """
    try:
        outcome, _, seconds = trial(candidate(tmp_path, source), small_data)
        assert outcome.status == "invalid" and "left a child behind" in outcome.log_tail
        assert seconds < 10
    finally:
        reap(marker)


def test_output_flood_is_bounded(small_data, scratch, tmp_path):
    source = """
        import sys
        line = "\\x1b[31mflood\\x1b[0m " + "x" * 1000 + "\\n"
        for _ in range(20 * 1024):            # about 20 MB
            sys.stdout.write(line)
        sys.stdout.flush()
        print("the end")
    """
    log_bytes = 64 * 1024
    outcome, _, seconds = trial(candidate(tmp_path, source), small_data, log_bytes=log_bytes)
    assert outcome.status == "invalid"                    # it finished, without a model
    assert outcome.log_tail.rstrip().endswith("the end")
    assert "earlier bytes of output dropped" in outcome.log_tail
    assert "\x1b" not in outcome.log_tail and "\\x1b[31m" in outcome.log_tail
    assert len(outcome.log_tail) <= 4 * log_bytes
    assert seconds < 30


def test_host_secrets_never_reach_the_candidate(small_data, scratch, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-dummy-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-dummy-456")
    source = """
        import os
        print(dict(os.environ))
        print("cwd", os.getcwd())
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data)
    assert "AUTORESEARCH_TIME_BUDGET" in outcome.log_tail    # it did print its environment
    assert "sk-test-dummy-123" not in outcome.log_tail
    assert "OPENAI_API_KEY" not in outcome.log_tail
    assert "aws-dummy-456" not in outcome.log_tail
    assert "'CUDA_VISIBLE_DEVICES': ''" in outcome.log_tail


def test_validation_split_is_not_in_the_view(small_data, scratch, tmp_path):
    source = """
        import os
        data = os.environ["AUTORESEARCH_DATA_DIR"]
        print("val", os.path.exists(data + "/val"))
        print("train", os.path.isdir(data + "/train"))
        print("listing", sorted(os.listdir(data)))
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data)
    assert "val False" in outcome.log_tail and "train True" in outcome.log_tail
    assert "'val'" not in outcome.log_tail


def test_missing_data_is_infrastructure_error(scratch, tmp_path):
    with pytest.raises(InfrastructureError):
        trial(candidate(tmp_path, "print('hi')\n"), tmp_path / "nothing")


def test_warning_on_stderr_once(monkeypatch, capsys):
    monkeypatch.setattr(process_backend, "_warned_stderr", False)
    lines: list[str] = []
    process_backend.warn(lines.append)
    process_backend.warn(lines.append)
    err = capsys.readouterr().err
    assert err.count("NOT a sandbox") == 1 and len(lines) == 2


def test_interrupt_kills_the_candidate_and_cleans_up(small_data, scratch, tmp_path, monkeypatch):
    marker = f"ar-marker-{uuid.uuid4().hex}"
    source = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
        time.sleep(120)
    """
    calls = []
    real = process_backend.group_rss

    def interrupted(pgid):                           # Ctrl-C arrives a second into training
        calls.append(pgid)
        if len(calls) >= 3:
            raise KeyboardInterrupt
        return real(pgid)

    monkeypatch.setattr(process_backend, "group_rss", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            trial(candidate(tmp_path, source), small_data)
        assert survivors(marker) == []
    finally:
        reap(marker)


CLOCK_BUDGET = 15                         # import torch and save twice on a busy host

SAVES = """
    import io, os, sys, time, torch, prepare
    vocab = prepare.load_meta()["vocab_size"]
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(vocab, vocab))
        def forward(self, idx):
            return self.table[idx]
    def program(module):
        b, t = torch.export.Dim("b", max=1024), torch.export.Dim("t", min=2, max=1024)
        return torch.export.export(module, (torch.zeros(2, 16, dtype=torch.long),),
                                   dynamic_shapes=({0: b, 1: t},))
    model = os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2")
    zeros = Table()
    with torch.no_grad():
        zeros.table.zero_()               # logits all 0: exactly the uniform bpb
    prepare.save_model(program(Table()), model)
    prepare.save_model(program(zeros), model)
    print("SAVED", flush=True)
"""


def test_candidate_that_ignores_the_clock_is_stopped_and_scored_on_its_last_save(
        small_data, scratch, tmp_path):
    source = SAVES + """
    while True:
        sum(i * i for i in range(100_000))
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data, budget=CLOCK_BUDGET)
    assert outcome.status == "ok", (outcome.reason, outcome.log_tail[-3000:])
    assert outcome.stopped_at_deadline and "stopped at the deadline" in outcome.reason
    assert CLOCK_BUDGET - 0.1 <= outcome.training_seconds <= CLOCK_BUDGET + 1
    uniform = outcome.score["uniform_bpb"]
    assert abs(outcome.val_bpb - uniform) < 0.01 * uniform       # the last save, the zeros


def test_model_half_written_in_place_at_the_deadline_is_not_scored(small_data, scratch, tmp_path):
    source = SAVES + """
    buf = io.BytesIO()
    torch.export.save(program(Table()), buf)
    while prepare.time_left() > 1:
        time.sleep(0.05)
    with open(model, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print("HALF WRITTEN", flush=True)
        time.sleep(120)
    """
    outcome, _, _ = trial(candidate(tmp_path, source), small_data, budget=CLOCK_BUDGET)
    assert "HALF WRITTEN" in outcome.log_tail, outcome.log_tail[-3000:]
    assert outcome.stopped_at_deadline
    assert outcome.status == "invalid" and outcome.val_bpb is None
    assert outcome.score["status"] == "invalid"


# ---- the trial's folder: one path from trial to trial ----
# cuDNN writes the working directory into the attention kernels it generates, so a new path in
# every trial missed the CUDA driver's cache and compiled them again (~2 s on an H200). Trials
# now take the lowest free folder of a per-user pool; these show the path is reused, never
# shared, fresh each time, and that a pool folder that is not safely this user's is not used.

SHOW_FOLDER = """
    import json, os, sys, time
    here = os.getcwd()
    print("FOLDER " + json.dumps({{"cwd": here, "found": sorted(os.listdir(here))}}), flush=True)
    with open("left-behind", "w") as f:
        f.write("for the next trial to find, if its folder were not fresh")
    meet = {meet!r}                       # wait (at most 8 s) until this many trials have begun
    if meet:
        with open({board!r}, "a") as f:
            f.write(here + "\\n")
        end = time.time() + 8
        while len(open({board!r}).read().split()) < meet and time.time() < end:
            time.sleep(0.05)
"""


def shown_folder(tmp_path: Path, name: str, meet: int = 0) -> Path:
    board = tmp_path / f"{name}-board"
    return candidate_named(tmp_path, name, SHOW_FOLDER.format(meet=meet, board=str(board)))


def candidate_named(tmp_path: Path, name: str, source: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return candidate(folder, source)


def seen(outcome) -> dict:
    lines = [line for line in outcome.log_tail.splitlines() if line.startswith("FOLDER ")]
    assert len(lines) == 1, outcome.log_tail[-2000:]
    return json.loads(lines[0][len("FOLDER "):])


def pool_of(scratch: Path) -> Path:
    return scratch / f"autoresearch-trials-{os.getuid()}"


def test_trials_reuse_one_fresh_folder_path_and_trials_at_once_get_their_own(
        small_data, scratch, tmp_path):
    show = shown_folder(tmp_path, "show")
    first, second = (seen(trial(show, small_data)[0]) for _ in range(2))
    assert first["cwd"] == second["cwd"] == str(pool_of(scratch) / "0")
    assert "left-behind" not in second["found"]          # the same path, a fresh folder
    both = shown_folder(tmp_path, "both", meet=2)
    with ThreadPoolExecutor(2) as run_two:
        a, b = run_two.map(lambda _: seen(trial(both, small_data)[0]), range(2))
    assert len((tmp_path / "both-board").read_text().split()) == 2      # they did run at once
    assert {a["cwd"], b["cwd"]} == {str(pool_of(scratch) / n) for n in ("0", "1")}
    assert "left-behind" not in a["found"] + b["found"]


def test_the_next_trial_trains_at_the_same_path_while_this_one_is_scored(
        small_data, scratch, tmp_path):
    # The loop starts a slot's next trial at `trained()`, while this one is scored: by then the
    # path is free, this trial's folder moved out of the way with everything in it.
    nested: list = []

    class Next(Lane):
        shared = True

        def trained(self) -> None:       # this trial is over and not yet scored: the next one
            nested.append(seen(trial(shown_folder(tmp_path, "next"), small_data)[0]))

    source = SHOW_FOLDER.format(meet=0, board="") + """
    import torch, prepare
    class Zeros(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, prepare.load_meta()["vocab_size"])
    program = torch.export.export(Zeros(), (torch.zeros(2, 16, dtype=torch.long),), dynamic_shapes=(
        {0: torch.export.Dim("b", max=1024), 1: torch.export.Dim("t", min=2, max=1024)},))
    prepare.save_model(program, os.path.join(os.environ["AUTORESEARCH_OUT"], "model.pt2"))
"""
    spec = TrialSpec(train_py=candidate_named(tmp_path, "first", source), data_dir=small_data,
                     budget=20, eval_tokens=4096, limits=Limits())
    lines: list[str] = []
    first = process_backend.run(spec, lines.append, Next())
    assert [n["cwd"] for n in nested] == [seen(first)["cwd"]] == [str(pool_of(scratch) / "0")]
    assert first.status == "ok", (first.reason, first.log_tail[-2000:])   # scored from where
    assert first.val_bpb == pytest.approx(first.score["uniform_bpb"])   # its folder went


def test_what_a_killed_runner_left_in_the_pool_is_cleared_and_a_planted_link_not_followed(
        small_data, scratch, tmp_path):
    pool = pool_of(scratch)
    (pool / "0").mkdir(parents=True)
    pool.chmod(0o700)
    (pool / "0" / "planted").write_text("left by a trial whose runner was killed")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("not the pool's to remove")
    (pool / "1").symlink_to(victim)
    (pool / "0.lock").touch()
    os.utime(pool / "0.lock", (0, 0))    # as old as can be: a temp cleaner's first pick
    assert seen(trial(shown_folder(tmp_path, "a"), small_data)[0]) == {
        "cwd": str(pool / "0"), "found": ["data", "home", "out", "prepare.py", "tmp", "train.py"]}
    assert (pool / "0.lock").stat().st_mtime > time.time() - 600   # touched when taken
    held = os.open(pool / "0.lock", os.O_RDWR | os.O_CREAT)   # as a trial running there would
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        shown = seen(trial(shown_folder(tmp_path, "b"), small_data)[0])
    finally:
        os.close(held)
    assert shown["cwd"] == str(pool / "1")      # the link was removed, not followed
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    assert not (pool / "1").exists()


def test_a_pool_folder_that_is_not_safely_this_users_is_not_used(small_data, scratch, tmp_path):
    pool = pool_of(scratch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cases = {"open to others": lambda: (pool.mkdir(), pool.chmod(0o755)),
             "a link to a folder of this user's": lambda: pool.symlink_to(elsewhere)}
    if os.getuid() == 0:                  # as root, a folder of another user's can be made
        cases["another user's"] = lambda: (pool.mkdir(mode=0o700), os.chown(pool, 4242, 4242))
    for name, make in cases.items():
        make()
        cwd = Path(seen(trial(shown_folder(tmp_path, name.replace(" ", "-")), small_data)[0])["cwd"])
        assert cwd.parent.parent == scratch and cwd.parent.name.startswith("autoresearch-"), name
        assert not cwd.parent.exists()                   # a random folder, removed as always
        assert list(elsewhere.iterdir()) == [], name
        if pool.is_symlink():
            pool.unlink()
        else:
            pool.rmdir()


def test_a_process_a_trial_left_running_keeps_its_path_from_later_trials(
        small_data, scratch, tmp_path):
    # A process of the candidate's that outlives its trial (here one that escaped the runner's
    # kill; an honest one whose runner was killed is the same) could write into a later trial's
    # folder at the same path: it holds the path's lock, inherited, as long as it lives.
    marker = f"ar-marker-{uuid.uuid4().hex}"
    source = SHOW_FOLDER.format(meet=0, board="") + f"""
    if os.fork() == 0:                   # out of the session, no marker: the runner misses it
        os.setsid()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)",
                                   "{marker}"], {{}})
    """
    pool = pool_of(scratch)
    try:
        first = seen(trial(candidate_named(tmp_path, "leaves", source), small_data)[0])
        assert with_marker(marker), "nothing escaped: this tests nothing"
        after = seen(trial(shown_folder(tmp_path, "after"), small_data)[0])
        assert (first["cwd"], after["cwd"]) == (str(pool / "0"), str(pool / "1"))
    finally:
        reap(marker)
    assert survivors(marker) == []
    assert seen(trial(shown_folder(tmp_path, "later"), small_data)[0])["cwd"] == str(pool / "0")


def test_a_candidate_that_swaps_its_folder_for_a_link_gets_nothing_removed_or_reused(
        small_data, scratch, tmp_path):
    # Mid-training the candidate moves its folder away and leaves a link to someone's folder at
    # the pooled path: the runner moves the link (not its target) out and removes it, the
    # target keeps everything, and the next trial at that path gets a real, fresh folder.
    victim = tmp_path / "victim"
    (victim / "out").mkdir(parents=True)
    (victim / "cache").mkdir()
    (victim / "precious").write_text("not the runner's to remove")
    source = f"""
        import os
        here = os.getcwd()
        os.chdir("/")
        os.rename(here, {str(tmp_path / "moved")!r})
        os.symlink({str(victim)!r}, here)
    """
    outcome = trial(candidate_named(tmp_path, "swaps", source), small_data)[0]
    assert outcome.status == "invalid"                   # no model where its folder went
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == [
        "cache", "out", "precious"]
    after = seen(trial(shown_folder(tmp_path, "after"), small_data)[0])
    assert after["cwd"] == str(pool_of(scratch) / "0") and "precious" not in after["found"]
    assert not (pool_of(scratch) / "0").exists()
