"""Reports: the status table, the progress plot and the self-contained HTML page, on a
synthetic ledger shaped like the loop's records (with hostile text in it) and a real git repo."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import git
import pytest
from rich.console import Console

from runner import report
from runner.repo import RunRepo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"
TAG = "night-1"


def rec(number: int, status: str, val_bpb: float | None, description: str, *,
        parent: str | None = None, commit: str | None = None, reason: str | None = None,
        cost: float = 0.0, log_tail: str = "") -> dict[str, Any]:
    """A record as runner.loop makes it (trial record + trial_status, decision, delta)."""
    scored = val_bpb is not None
    r: dict[str, Any] = {
        "version": 1, "id": f"{TAG}-{number}", "run": TAG, "number": number,
        "parent": parent, "commit": commit, "image_tag": f"autoresearch/exp:{TAG}-{number}-abc1234",
        "description": description, "status": status, "reason": reason, "val_bpb": val_bpb,
        "memory_gb": 11.25 if scored else None, "training_seconds": 300.2 if scored else None,
        "phases": {"propose": 4.5, "build": 2.0, "train": 310.0, "train_inside": 305.0, "score": 20.0},
        "wall_seconds": 333.0,
        "started_at": f"2025-06-01T{1 + number // 12:02d}:{(number * 5) % 60:02d}:00+00:00",
        "backend": "docker", "llm": {"model": "openai/gpt-x", "prompt_tokens": 1000,
                                     "completion_tokens": 200, "cost_usd": cost},
        "trial_status": "ok" if scored else status, "decision": "keep if val_bpb < best - 0.0005",
        "delta": None, "log_tail": log_tail,
    }
    if status == "invalid":                 # a proposal that never became a trial
        r.update(commit=None, wall_seconds=None, phases={"propose": 3.0}, memory_gb=None,
                 decision="no valid proposal")
    return r


def init_repo(tmp: Path) -> tuple[RunRepo, dict[str, str]]:
    """A git repo with target/train.py and the run's commits; returns it and commit ids."""
    repo = git.Repo.init(tmp / "repo")
    actor = git.Actor("t", "t@localhost")
    train = Path(repo.working_tree_dir) / "target" / "train.py"
    train.parent.mkdir(parents=True)
    lines = [f"LINE_{i} = {i}\n" for i in range(12)]

    def commit(edits: dict[int, str], message: str) -> str:
        for i, text in edits.items():
            lines[i] = text
        train.write_text("".join(lines))
        repo.index.add(["target/train.py"])
        return repo.index.commit(message, author=actor, committer=actor).hexsha

    ids = {"base": commit({0: "LEARNING_RATE = 0.01\n"}, "baseline")}
    ids["k3"] = commit({0: "LEARNING_RATE = 0.02\n"}, "keep 3")
    ids["k6"] = commit({5: "WARMUP_RATIO = 0.05  # & warm up\n"}, "keep 6")
    ids["k9"] = commit({9: "DEPTH = 10\n"}, "keep 9")
    run = RunRepo(repo=repo, tag=TAG, branch="master", worktree=Path(repo.working_tree_dir))
    return run, ids


def ledger(ids: dict[str, str]) -> list[dict[str, Any]]:
    b, k3, k6, k9 = ids["base"], ids["k3"], ids["k6"], ids["k9"]
    return [
        rec(0, "keep", 1.100000, "baseline", commit=b),
        rec(1, "discard", 1.104000, "lower weight decay", parent=b, commit="1" * 40, cost=0.01),
        rec(2, "crash", None, "bigger batch", parent=b, commit="2" * 40, cost=0.01,
            reason="exit code 1 & CUDA error", log_tail=f"Traceback\n{XSS}\nRuntimeError: boom"),
        rec(3, "keep", 1.090000, "double the learning rate", parent=b, commit=k3, cost=0.02),
        rec(4, "invalid", None, "[red]no[/red] markup", parent=k3, reason="SyntaxError at line 3 & more",
            cost=0.005),
        rec(5, "discard", 1.300000, "diverged run", parent=k3, commit="5" * 40),
        rec(6, "keep", 1.072500, f"warmup {XSS}", parent=k3, commit=k6, cost=0.02),
        rec(7, "timeout", None, "huge model", parent=k6, commit="7" * 40, reason="killed at the cap"),
        rec(8, "discard", 1.073000, "tiny tweak", parent=k6, commit="8" * 40),
        rec(9, "keep", 1.061234, "deeper model (10 layers)", parent=k6, commit=k9, cost=0.03),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[RunRepo, list[dict[str, Any]]]:
    run, ids = init_repo(tmp_path_factory.mktemp("report"))
    return run, ledger(ids)


def render(table) -> str:
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(table)
    return console.export_text()


def write_ledger(run_dir: Path, records: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "experiments.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---- the terminal table ----

def test_status_table_rows_and_caption(setup):
    _, records = setup
    table = report.status_table(records, TAG)
    assert table.row_count == len(records)
    text = render(table)
    caption = str(table.caption)
    assert "10 experiments" in caption and "4 kept" in caption and "3 failed" in caption
    assert "best 1.061234 (#9)" in caption
    assert "LLM cost $0.10" in caption
    # the delta is against the best before it: #8 is 1.073000 vs #6's 1.072500
    row8 = next(line for line in text.splitlines() if "tiny tweak" in line)
    assert "+0.000500" in row8 and "1.073000" in row8
    row9 = next(line for line in text.splitlines() if "deeper model" in line)
    assert "-0.011266" in row9
    assert "[red]no[/red] markup" in text          # shown as text, not interpreted
    assert "crash" in text and "invalid" in text and "timeout" in text


def test_status_table_empty():
    table = report.status_table([], "empty")
    assert table.row_count == 0
    assert "no scored experiment yet" in str(table.caption)
    render(table)


def test_latest_tag(tmp_path):
    assert report.latest_tag(tmp_path / "missing") is None
    assert report.latest_tag(tmp_path) is None
    for i, tag in enumerate(["b", "a", "c"]):
        write_ledger(tmp_path / tag, [])
        os.utime(tmp_path / tag / "experiments.jsonl", (time.time() - 100 + i * 10,) * 2)
    assert report.latest_tag(tmp_path) == "c"
    os.utime(tmp_path / "a" / "experiments.jsonl")
    assert report.latest_tag(tmp_path) == "a"


def test_load_records_leaves_a_torn_line_alone(tmp_path, setup):
    _, records = setup
    write_ledger(tmp_path, records[:3])
    path = tmp_path / "experiments.jsonl"
    with open(path, "a") as f:
        f.write('{"number": 3, "sta')
    before = path.read_bytes()
    assert [r["number"] for r in report.load_records(tmp_path)] == [0, 1, 2]
    assert path.read_bytes() == before                 # read-only: the loop may be writing


# ---- the plot ----

@pytest.mark.parametrize("case", ["full", "one", "unscored", "empty", "many"])
def test_progress_png(tmp_path, setup, case):
    _, records = setup
    rows = {
        "full": records,
        "one": records[:1],
        "unscored": [records[2], records[4], records[7]],
        "empty": [],
        "many": [rec(i, "keep" if i % 37 == 0 else ("crash" if i % 11 == 0 else "discard"),
                     None if i % 11 == 0 and i % 37 else 1.2 - i * 1e-4 + (i % 7) * 1e-3,
                     f"experiment number {i} with a long description")
                 for i in range(400)],
    }[case]
    path = report.progress_png(rows, tmp_path / "p.png", tag=TAG)
    data = path.read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 400
    assert 10_000 < len(data) < 1_500_000


# ---- the page ----

def test_report_html(tmp_path, setup):
    run, records = setup
    diffs = report.collect_diffs(records, run)
    assert sorted(diffs) == [3, 6, 9]
    assert "+LEARNING_RATE = 0.02" in diffs[3]
    path = report.report_html(records, TAG, diffs, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "<script" not in page.lower()               # no script at all, raw or ours
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "exit code 1 &amp; CUDA error" in page and "SyntaxError at line 3 &amp; more" in page
    for r in records:
        n = r["number"]
        cls = "failed" if r["status"] in report.FAILED else r["status"]
        assert f'<tr class="{cls}" id="exp-{n}">' in page
        assert f"<td class=num>{n}</td>" in page or f'<a href="#diff-{n}">{n}</a>' in page
    # the diffs of kept changes, escaped and coloured
    assert '<span class="add">+LEARNING_RATE = 0.02</span>' in page
    assert '<span class="del">-LEARNING_RATE = 0.01</span>' in page
    assert "+WARMUP_RATIO = 0.05  # &amp; warm up" in page
    assert 'id="diff-9"' in page and 'id="diff-1"' not in page
    assert "1.061234" in page and "-0.038766" in page          # best and improvement


def test_write_report(tmp_path, setup):
    run, records = setup
    run_dir = tmp_path / "runs" / TAG
    write_ledger(run_dir, records)
    png, page = report.write_report(run_dir, run)
    assert png == run_dir / "progress.png" and page == run_dir / "report.html"
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = page.read_text(encoding="utf-8")
    assert "+DEPTH = 10" in text and "<script" not in text.lower()
    # no repository: the page still comes, without diffs
    out = tmp_path / "out"
    png2, page2 = report.write_report(run_dir, None, out_dir=out)
    assert png2.parent == out and "git repository was not found" in page2.read_text()
    # a repository that lacks the commits: skipped, not fatal
    other, _ = init_repo(tmp_path / "other")
    _, page3 = report.write_report(run_dir, other, out_dir=tmp_path / "out3")
    assert "no diff available" in page3.read_text()


def test_write_report_one_and_no_record(tmp_path, setup):
    _, records = setup
    for name, rows in [("one", records[:1]), ("none", []), ("failed", [records[2]])]:
        run_dir = tmp_path / name
        write_ledger(run_dir, rows)
        png, page = report.write_report(run_dir, None)
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert "no kept change yet" in page.read_text()


def test_status_and_page_show_the_noise_and_each_keeps_test(tmp_path: Path):
    """The measured noise (over seeds and over one seed's reruns), the reruns' share of trial
    time, and the statistics a sequential keep was decided on."""
    records = [rec(0, "keep", 1.00, "baseline", commit="a" * 40),
               {**rec(1, "discard", 1.01, "noise: seed 1001", commit="a" * 40), "role": "noise"},
               {**rec(2, "discard", 0.99, "noise: seed 1002", commit="a" * 40), "role": "noise"},
               {**rec(3, "discard", 1.0003, "noise: same seed 0", commit="a" * 40),
                "role": "noise", "same_seed": True},
               {**rec(4, "keep", 0.975, "warmup 5%", commit="b" * 40),
                "runs": [{"seed": 0, "val_bpb": 0.975, "wall_seconds": 333.0},
                         {"seed": 1, "val_bpb": 0.976, "wall_seconds": 333.0}],
                "test": {"rule": "sequential", "runs": [0.975, 0.976], "mean": 0.9755,
                         "best_mean": 1.0, "statistic": 4.25, "critical": 2.97,
                         "p_value": 0.0027, "alpha": 0.05}}]
    for r in records[:4]:
        r["role"] = r.get("role", "baseline")
        r["seed"] = {0: 0, 1: 1001, 2: 1002, 3: 0}[r["number"]]
    out = io.StringIO()
    Console(file=out, width=200).print(report.status_table(records, TAG))
    text = " ".join(out.getvalue().split())                     # the caption wraps
    assert "noise sd 0.010000 over 3 seeds, 0.000212 over 2 runs of one seed" in text
    assert "reruns 17% of trial time" in text                    # 333 of 6 x 333 s
    assert "warmup 5% [2 runs]" in text
    records[4]["mean_bpb"] = 0.9755
    out = io.StringIO()
    Console(file=out, width=200).print(report.status_table(records, TAG))
    # both scores are means: the baseline's over its 3 seeds (not the same-seed rerun), #4's runs
    assert "best 0.975500 (#4), -0.024500 vs baseline" in " ".join(out.getvalue().split())
    page = report.report_html(records, TAG, {}, tmp_path / "r.html").read_text()
    assert "2 runs, mean 0.975500 vs best 1.000000, t 4.25 (critical 2.97, p 0.0027, alpha 0.05)" in page
    assert "noise (sd)" in page and "0.010000" in page


# ---- cost per result ----

def test_cost_per_result_in_status_and_report(setup, tmp_path):
    import copy
    _, records = setup
    gpu_run = copy.deepcopy(records)
    for r in gpu_run:
        if r["status"] != "invalid":                     # NVML sampled one GPU while it trained
            r["gpu"] = {"index": 0, "name": "H200", "util_gpu_mean": 91.0}
    gpu_run[9]["cluster"] = {"node": "n1", "gpu": "0,1"}    # a Ray trial on two GPUs
    s = report.summary(gpu_run)
    assert s["tokens"] == 10 * 1200 and s["cost_usd"] == pytest.approx(0.095)
    assert s["gpu_hours"] == pytest.approx((8 * 310 + 2 * 310) / 3600)
    assert s["train_hours"] == pytest.approx(9 * 310 / 3600)
    per = s["per_kept"]                                  # three kept changes (#3, #6, #9)
    assert per["cost_usd"] == pytest.approx(0.095 / 3) and per["tokens"] == pytest.approx(4000)
    assert per["gpu_hours"] == pytest.approx(3100 / 3600 / 3)
    table = report.status_table(gpu_run, TAG)
    caption = str(table.caption)
    assert ("LLM 12,000 tokens $0.10 · GPU 0.861 h (train phases 0.775 h) · per kept "
            "improvement: $0.03, 4,000 tokens, 0.287 GPU h") in caption
    text = render(table)
    row9 = next(line for line in text.splitlines() if "deeper model" in line)
    assert "1,200" in row9 and "0.0300" in row9 and "0.172" in row9       # 2 GPUs x 310 s
    row4 = next(line for line in text.splitlines() if "markup" in line)
    assert "1,200" in row4 and "0.0050" in row4 and "0.086" not in row4     # nothing trained
    # A CPU run: no GPU-hours, the train phases still counted.
    cpu = str(report.status_table(records, TAG).caption)
    assert "GPU 0.000 h (train phases 0.775 h)" in cpu and "0.000 GPU h" in cpu
    assert "cpu" in render(report.status_table(records, TAG))
    # Before the first kept change there is no cost per improvement to give.
    assert report.summary(records[:3])["per_kept"] is None
    assert "no kept improvement yet" in str(report.status_table(records[:3], TAG).caption)
    page = report.report_html(gpu_run, TAG, {}, tmp_path / "r.html", png=b"x").read_text()
    assert "GPU-hours" in page and ">0.861<" in page
    assert "$0.03 · 0.287 GPU h" in page and "3 kept change(s)" in page
    assert "<td class=num>0.172</td>" in page and "<td class=num>0.0300</td>" in page


# ---- what was decided: means, not first runs ----

def decided_records() -> list[dict[str, Any]]:
    """A baseline whose first seed is its luckiest (0.97; its mean over 3 seeds is 0.99), a
    candidate kept on the mean of two runs (first run 0.975, mean 0.98), and one discarded after
    three runs (first run 0.96, the lowest single number in the run, mean 0.99)."""
    records = [rec(0, "keep", 0.97, "baseline", commit="a" * 40),
               {**rec(1, "discard", 1.01, "noise: seed 1001", commit="a" * 40), "role": "noise"},
               {**rec(2, "discard", 0.99, "noise: seed 1002", commit="a" * 40), "role": "noise"},
               {**rec(3, "discard", 0.9701, "noise: same seed 0", commit="a" * 40),
                "role": "noise", "same_seed": True},
               {**rec(4, "keep", 0.975, "warmup 5%", commit="b" * 40), "role": "candidate",
                "mean_bpb": 0.98,
                "runs": [{"seed": 0, "val_bpb": 0.975, "wall_seconds": 333.0},
                         {"seed": 1, "val_bpb": 0.985, "wall_seconds": 333.0}],
                "test": {"rule": "sequential", "runs": [0.975, 0.985], "mean": 0.98,
                         "best_mean": 0.99, "statistic": 3.1, "critical": 2.9,
                         "p_value": 0.01, "alpha": 0.05}},
               {**rec(5, "discard", 0.96, "lr x2", commit="c" * 40), "role": "candidate",
                "mean_bpb": 0.99,
                "runs": [{"seed": 0, "val_bpb": 0.96, "wall_seconds": 333.0},
                         {"seed": 1, "val_bpb": 1.0, "wall_seconds": 333.0},
                         {"seed": 2, "val_bpb": 1.01, "wall_seconds": 333.0}]}]
    for r in records[:4]:
        r.setdefault("role", "baseline")
        r["seed"] = {0: 0, 1: 1001, 2: 1002, 3: 0}[r["number"]]
    return records


def test_plot_draws_the_decided_means_and_the_reruns():
    from runner.report.plot import plot_points
    records = decided_records()
    pts = plot_points(records)
    approx = pytest.approx
    assert pts["kept"] == [(0, approx(0.99)), (4, approx(0.98))]     # baseline: mean of 3 seeds
    assert pts["discarded"] == [(5, approx(0.99))]                   # not its lucky first run
    assert [n for n, _ in pts["noise"]] == [1, 2, 3]
    assert pts["runs"] == [(4, 0.975), (4, 0.985), (5, 0.96), (5, 1.0), (5, 1.01)]
    assert pts["best"] == [(0, approx(0.99)), (4, approx(0.98))]
    assert report.render_png(records, TAG)[:8] == PNG_MAGIC


def test_table_and_page_show_the_decided_means(tmp_path):
    records = decided_records()
    s = report.summary(records)
    assert s["best"] is records[4]                  # 0.98 beats the baseline's mean 0.99
    assert s["best_bpb"] == pytest.approx(0.98) and s["improvement"] == pytest.approx(0.01)
    out = io.StringIO()
    Console(file=out, width=220).print(report.status_table(records, TAG))
    rows = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines()
            if line.count("│") > 5 and line.split("│")[1].strip().isdigit()}
    assert "0.990000" in rows["0"] and "baseline" in rows["0"]
    assert "0.980000" in rows["4"] and "-0.010000" in rows["4"] and "[mean of 2 runs]" in rows["4"]
    assert "0.990000" in rows["5"] and "+0.010000" in rows["5"] and "0.960000" not in rows["5"]
    text = report.report_html(records, TAG, {}, tmp_path / "r.html").read_text()
    assert "runs: 0.960000, 1.000000, 1.010000 (val_bpb: the mean)" in text
    assert "mean val_bpb 0.980000 of 2 runs (-0.010000)" in text
