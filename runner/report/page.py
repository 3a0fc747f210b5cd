"""The HTML report of a run: one self-contained page (inline CSS, the plot as a data: URI, no
script). Descriptions, reasons and log tails are untrusted text (from the agent and from
candidate output): every one goes through `html.escape`."""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.record import FAILED, Record
from runner.report.plot import render_png
from runner.report.summary import (annotate, cost_of, date_text, duration, finite, fmt,
                                   gpu_hours, gpus_of, is_kept, money, number_of, one_line,
                                   rule_text, run_scores, status_of, summary, tokens_of,
                                   train_seconds,
                                   wall_seconds)
from runner.report.table import hours

CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; --soft:#f9fafb;
        --green:#15803d; --greenbg:#dcfce7; --red:#b91c1c; --redbg:#fee2e2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 14px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue",
       Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 12px; }
.sub { color: var(--muted); margin-bottom: 18px; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 2px; }
.card .v.good { color: var(--green); }
.card .n { color: var(--muted); font-size: 12px; }
figure { margin: 18px 0 0; background: var(--bg); border: 1px solid var(--line); border-radius: 10px;
         padding: 10px; }
figure img { width: 100%; height: auto; display: block; }
.tablewrap { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; text-align: left; }
th { position: sticky; top: 0; background: #f3f4f6; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.discard td { color: var(--muted); }
tr.keep td { background: #f0fdf4; }
tr.failed td { background: #fef2f2; }
td.desc { min-width: 260px; max-width: 520px; overflow-wrap: anywhere; }
.reason { color: var(--red); font-size: 12px; margin-top: 2px; overflow-wrap: anywhere; }
.decision { color: var(--muted); font-size: 12px; margin-top: 2px; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; }
.pill.keep { background: var(--greenbg); color: var(--green); }
.pill.discard { background: #f3f4f6; color: var(--muted); }
.pill.failed, .pill.other { background: var(--redbg); color: var(--red); }
.better { color: var(--green); } .worse { color: var(--red); }
details { margin-top: 4px; } summary { cursor: pointer; color: var(--muted); font-size: 12px; }
details pre { max-height: 320px; overflow: auto; background: #111827; color: #e5e7eb; padding: 8px;
              border-radius: 6px; font-size: 11.5px; white-space: pre-wrap; overflow-wrap: anywhere; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.change { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; margin: 0 0 16px;
          overflow: hidden; }
.change h3 { font-size: 14px; margin: 0; padding: 10px 14px; background: #f3f4f6;
             border-bottom: 1px solid var(--line); font-weight: 600; }
.change h3 .meta { color: var(--muted); font-weight: 400; margin-left: 8px; }
pre.diff { margin: 0; padding: 8px 0; overflow-x: auto; font-size: 12.5px; line-height: 1.4; }
pre.diff span { display: block; padding: 0 14px; white-space: pre; }
pre.diff .add { background: #e6ffec; color: #116329; }
pre.diff .del { background: #ffebe9; color: #82071e; }
pre.diff .hunk { background: #ddf4ff; color: #0550ae; }
pre.diff .meta { color: var(--muted); }
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status_class(status: str) -> str:
    if status in ("keep", "discard"):
        return status
    return "failed" if status in FAILED else "other"


def diff_html(diff: str) -> str:
    """A unified diff as escaped, coloured lines."""
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---", "diff ", "index ", "new file", "deleted file")):
            cls = "meta"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        else:
            cls = "ctx"
        out.append(f'<span class="{cls}">{_e(line) or " "}</span>')
    return '<pre class="diff">' + "".join(out) + "</pre>"


def _table_html(records: list[Record], diffs: dict[int, str]) -> str:
    head = ("<tr><th class=num>#</th><th>status</th><th class=num>val_bpb</th>"
            "<th class=num>Δ best</th><th class=num>mem GB</th><th class=num>train s</th>"
            "<th class=num>wall s</th><th class=num>tokens</th><th class=num>LLM $</th>"
            "<th class=num>GPU h</th><th>started</th><th>commit</th><th>description</th></tr>")
    rows = []
    for rec, bpb, best_before in annotate(records):      # bpb: the score decided on
        status = status_of(rec)
        cls = _status_class(status)
        n = number_of(rec)
        if bpb is not None and best_before is not None:
            d = bpb - best_before
            delta = f'<span class="{"better" if d < 0 else "worse"}">{d:+.6f}</span>'
        elif status == "keep" and bpb is not None:
            delta = '<span class="decision">baseline</span>'
        else:
            delta = "-"
        number = "?" if n is None else str(n)
        if n is not None and n in diffs:
            number = f'<a href="#diff-{n}">{n}</a>'
        commit = _e(str(rec.get("commit") or "-")[:7])
        desc = f"<div>{_e(rec.get('description') or '-')}</div>"
        if runs := run_scores(rec):
            desc += (f'<div class="decision">runs: {_e(", ".join(f"{v:.6f}" for v in runs))}'
                     f"{' (val_bpb: the mean)' if finite(rec.get('mean_bpb')) is not None else ''}"
                     "</div>")
        if test := rule_text(rec):
            desc += f'<div class="decision">{_e(test)}</div>'
        if rec.get("reason"):
            desc += f'<div class="reason">{_e(one_line(rec.get("reason"), 600))}</div>'
        tail = rec.get("log_tail")
        if status in FAILED and tail:
            lines = str(tail).splitlines()[-60:]
            desc += ("<details><summary>log tail (candidate output, untrusted)</summary>"
                     f"<pre>{_e(chr(10).join(lines))}</pre></details>")
        anchor = f' id="exp-{n}"' if n is not None else ""
        gpu_cell = hours(gpu_hours(rec)) if gpus_of(rec) else ("cpu" if train_seconds(rec) else "-")
        rows.append(
            f'<tr class="{cls}"{anchor}>'
            f"<td class=num>{number}</td>"
            f'<td><span class="pill {cls}">{_e(status)}</span></td>'
            f"<td class=num>{fmt(bpb, '.6f')}</td><td class=num>{delta}</td>"
            f"<td class=num>{fmt(finite(rec.get('memory_gb')), '.1f')}</td>"
            f"<td class=num>{fmt(finite(rec.get('training_seconds')), '.0f')}</td>"
            f"<td class=num>{fmt(wall_seconds(rec), '.0f')}</td>"
            f"<td class=num>{f'{tokens_of(rec):,}' if tokens_of(rec) else '-'}</td>"
            f"<td class=num>{f'{cost_of(rec):.4f}' if cost_of(rec) else '-'}</td>"
            f"<td class=num>{gpu_cell}</td>"
            f"<td class=mono>{_e(date_text(rec.get('started_at')))}</td>"
            f"<td class=mono>{commit}</td><td class=desc>{desc}</td></tr>")
    return (f'<div class="tablewrap"><table><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _changes_html(records: list[Record], diffs: dict[int, str], have_repo: bool) -> str:
    parts = []
    for rec, bpb, best_before in annotate(records):
        n = number_of(rec)
        if not is_kept(rec) or n is None or bpb is None or best_before is None:   # the baseline
            continue
        runs = run_scores(rec)
        meta = (f"mean val_bpb {bpb:.6f} of {len(runs)} runs" if runs else f"val_bpb {bpb:.6f}")
        meta += f" ({bpb - best_before:+.6f})"
        if test := rule_text(rec):
            meta += f" · kept on {test}"
        if rec.get("commit"):
            meta += f" · {str(rec['commit'])[:7]}"
        body = diff_html(diffs[n]) if diffs.get(n) else (
            '<p class="empty" style="padding:0 14px">no diff available'
            + ("" if have_repo else " (the run's git repository was not found)") + "</p>")
        parts.append(f'<section class="change" id="diff-{n}"><h3>#{n} {_e(rec.get("description") or "")}'
                     f'<span class="meta">{_e(meta)}</span></h3>{body}</section>')
    if not parts:
        return '<p class="empty">no kept change yet</p>'
    return "".join(parts)


def report_html(records: list[Record], tag: str, diffs: dict[int, str], path: Path,
                png: bytes | None = None, have_repo: bool = True) -> Path:
    """Write a self-contained HTML report (inline CSS, the plot as a data: URI, no script) to
    `path`; returns `path`. `png` reuses an already rendered plot."""
    path = Path(path)
    s = summary(records)
    png = png if png is not None else render_png(records, tag)
    img = base64.b64encode(png).decode("ascii")

    def card(key: str, value: str, note: str = "", good: bool = False) -> str:
        return (f'<div class="card"><div class="k">{_e(key)}</div>'
                f'<div class="v{" good" if good else ""}">{_e(value)}</div>'
                f'<div class="n">{_e(note)}</div></div>')

    failed_note = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items()) if k in FAILED)
    cards = [card("experiments", str(s["experiments"]),
                  f"{duration(s['wall_seconds'])} of wall time" if s["wall_seconds"] else ""),
             card("kept", str(s["kept"]), f"{s['kept_changes']} changes + baseline"
                  if s["baseline"] is not None else "", good=s["kept"] > 0),
             card("discarded", str(s["discarded"])),
             card("failed", str(s["failed"]), failed_note)]
    if s["best"] is not None:
        cards.append(card("best val_bpb", f"{s['best_bpb']:.6f}", f"experiment #{number_of(s['best'])}",
                          good=True))
        if s["baseline_bpb"] is not None:
            imp = s["improvement"] or 0.0
            pct = 100 * imp / s["baseline_bpb"] if s["baseline_bpb"] else 0.0
            cards.append(card("improvement", f"{-imp:+.6f}",
                              f"{-pct:+.2f}% vs baseline {s['baseline_bpb']:.6f}", good=imp > 0))
    else:
        cards.append(card("best val_bpb", "-", "no scored experiment yet"))
    noise = s["noise"]
    if noise is not None:
        cards.append(card("noise (sd)", fmt(noise.seed_sd, ".6f"),
                          f"over {len(noise.seeds)} seeds; "
                          + (f"{fmt(noise.same_seed_sd, '.6f')} {noise.same_seed_text()}"
                             if noise.same_seed else "no same-seed rerun")))
    if s["rerun_share"] is not None:
        cards.append(card("reruns", f"{100 * s['rerun_share']:.0f}%",
                          f"{duration(s['rerun_seconds'])} of trial time"))
    cards.append(card("LLM cost", money(s["cost_usd"]),
                      (f"{s['tokens']:,} tokens · " if s["tokens"] else "") + ", ".join(s["models"])))
    cards.append(card("GPU-hours", hours(s["gpu_hours"]),
                      f"train phases x GPUs; {hours(s['train_hours'])} h of train phases in all"))
    per = s["per_kept"]
    cards.append(card("per kept improvement",
                      f"{money(per['cost_usd'])} · {hours(per['gpu_hours'])} GPU h" if per else "-",
                      (f"{per['tokens']:,.0f} LLM tokens; the run's spending / "
                       f"{s['kept_changes']} kept change(s)") if per else "no kept improvement yet"))
    dates = f"{date_text(s['first'])} → {date_text(s['last'])}" if s["first"] else "no experiment yet"
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoresearch · {_e(tag)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>autoresearch run <span class="mono">{_e(tag)}</span></h1>
<div class="sub">{_e(dates)}</div>
<div class="cards">{"".join(cards)}</div>
<figure><img alt="val_bpb by experiment" src="data:image/png;base64,{img}"></figure>
<h2>Experiments</h2>
{_table_html(records, diffs)}
<h2>Kept changes</h2>
<p class="sub">Each kept experiment's change to <code>target/train.py</code>, against its parent.</p>
{_changes_html(records, diffs, have_repo)}
<footer>Generated {_e(generated)} by <code>autoresearch report</code>. Descriptions, reasons and
log tails are untrusted text (from the agent and from candidate output), shown escaped.</footer>
</main></body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
