"""report.html opened in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright. The plot, the table and the diffs render, the console stays clean, nothing is
fetched, and descriptions, reasons, log tails and diffs that hold HTML or script are shown as
text, never run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import git
import pytest

sync_api = pytest.importorskip("playwright.sync_api")

from runner.ledger import Ledger  # noqa: E402
from runner.report import write_report  # noqa: E402
from runner.repo import RunRepo  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="no chromium (Debian's package; `make install` installs it)")

XSS = ('<script>window.__pwned = "script"</script><img src=x onerror="window.__pwned=\'img\'">'
       '<b>bold</b>')
TRAIN_V1 = "LR = 0.01\nDEPTH = 4\n"
TRAIN_V2 = "LR = 0.02\nDEPTH = 4\n# </pre><script>window.__pwned = 'diff'</script>\n"
TRAIN_V3 = "LR = 0.02\nDEPTH = 6\n# </pre><script>window.__pwned = 'diff'</script>\n"


def commit(repo: git.Repo, text: str, message: str) -> str:
    path = Path(repo.working_tree_dir) / "target" / "train.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    repo.index.add(["target/train.py"])
    return repo.index.commit(message).hexsha


def make_run(tmp_path: Path) -> tuple[Path, RunRepo, list[dict]]:
    """A run of five experiments: baseline, two kept changes (real commits, real diffs), a
    discard and a crash, with hostile text wherever the agent or a candidate writes."""
    repo = git.Repo.init(tmp_path / "project", initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "t").set_value("user", "email", "t@example.invalid")
    c0, c1, c2 = (commit(repo, TRAIN_V1, "base"), commit(repo, TRAIN_V2, "lr"),
                  commit(repo, TRAIN_V3, "depth"))
    rows = [  # number, parent, commit, status, val_bpb, description, reason, log tail
        (0, None, c0, "keep", 2.10, "baseline", "", ""),
        (1, c0, c1, "keep", 2.00, f"raise LR {XSS}", "", ""),
        (2, c1, c1, "discard", 2.05, f"try warmup {XSS}", "", ""),
        (3, c1, c1, "crash", None, f"broken {XSS}", f"exit code 1 {XSS}", f"Traceback\n{XSS}\n"),
        (4, c1, c2, "keep", 1.95, "deeper model", "", ""),
    ]
    run_dir = tmp_path / "runs" / "web"
    ledger = Ledger.open(run_dir)
    records = []
    for n, parent, sha, status, bpb, desc, reason, tail in rows:
        rec = {"version": 1, "id": f"web-{n}", "run": "web", "number": n, "parent": parent,
               "commit": sha, "status": status, "val_bpb": bpb, "description": desc,
               "reason": reason, "log_tail": tail, "memory_gb": 1.5, "training_seconds": 2.0,
               "wall_seconds": 9.0, "phases": {"build": 1.0, "train": 5.0, "score": 3.0},
               "started_at": f"2026-11-29T22:0{n}:00+00:00",
               "role": "baseline" if n == 0 else "candidate",
               "llm": {"model": None, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}}
        ledger.append(rec)
        records.append(rec)
    run_repo = RunRepo(repo=repo, tag="web", branch="autoresearch/web", worktree=run_dir / "worktree")
    return run_dir, run_repo, records


def test_report_renders_in_chromium_and_shows_hostile_text_as_text(tmp_path: Path):
    run_dir, run_repo, records = make_run(tmp_path)
    _, page_path = write_report(run_dir, run_repo)
    problems: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True,
                                    timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")

            # Nothing ran and nothing was fetched: the page has no script, the plot is inline.
            assert page.evaluate("window.__pwned === undefined")
            assert page.evaluate("document.scripts.length") == 0
            assert page.locator("img[onerror], b").count() == 0
            assert [u for u in requests if not u.startswith(("file:", "data:"))] == []

            # The plot: a decoded, visible image.
            img = page.locator("figure img")
            assert img.count() == 1 and img.is_visible()
            size = page.evaluate("(() => { const i = document.querySelector('figure img');"
                                 " return [i.complete, i.naturalWidth, i.naturalHeight]; })()")
            assert size[0] and size[1] > 400 and size[2] > 200
            box = img.bounding_box()
            assert box["width"] > 300 and box["height"] > 150

            # The table: one row per experiment, in order, the hostile text as visible text.
            rows = page.locator("table tbody tr")
            assert rows.count() == len(records)
            for i, rec in enumerate(records):
                row = rows.nth(i)
                assert row.is_visible()
                assert row.locator("td").first.inner_text().strip() == str(rec["number"])
                assert rec["status"] in row.inner_text()
                assert rec["description"] in row.locator("td.desc").inner_text()
            assert XSS in rows.nth(3).locator(".reason").inner_text()
            rows.nth(3).locator("details summary").click()           # the crash's log tail
            tail = rows.nth(3).locator("details pre")
            assert tail.is_visible() and XSS in tail.inner_text()
            assert "2.000000" in rows.nth(1).inner_text() and "-0.100000" in rows.nth(1).inner_text()

            # The diffs: one section per kept change, coloured lines, the script a '+' line.
            changes = page.locator("section.change")
            assert changes.count() == 2
            first = page.locator("#diff-1")
            assert first.is_visible() and XSS in first.locator("h3").inner_text()
            added = first.locator("pre.diff span.add").all_inner_texts()
            removed = first.locator("pre.diff span.del").all_inner_texts()
            assert "+LR = 0.02" in added and "-LR = 0.01" in removed
            assert "+# </pre><script>window.__pwned = 'diff'</script>" in added
            colour = first.locator("pre.diff span.add").first.evaluate(
                "e => getComputedStyle(e).backgroundColor")
            assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
            assert "+DEPTH = 6" in page.locator("#diff-4 pre.diff span.add").all_inner_texts()
            # The table links to the diffs.
            page.locator('table a[href="#diff-4"]').click()
            page.wait_for_function("location.hash === '#diff-4'")
            assert page.locator("#diff-4").is_visible()
            assert page.evaluate("window.__pwned === undefined")
        finally:
            browser.close()
    assert problems == []
    assert json.loads(json.dumps(records))           # the records themselves were plain data
