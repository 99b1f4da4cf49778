"""The fleet report: one self-contained HTML page for a job's output, usable at 5,000 subjects.

    launcher report job.yaml            -> <output>/<job>/report.html

At the top, the distribution of the final loss and of each score (DINO, CLIP-I, CLIP-T) across
the fleet, as histograms with axes, and the worst subjects; then every failure; then a card per
subject, worst first (failed, flagged for review, then the lowest score relative to the fleet):
its instance photos beside its samples (and the base model's, with eval.base_model), its loss
curve with step and loss axes, its scores. Cards are paged: every card is in the file, with its
text, but only one page is shown, and a card's curve and thumbnails are drawn from the page's
embedded data when it is shown, so the page opens in about the same time for 50 subjects as for
5,000. Thumbnails are small JPEGs the worker wrote when it published (samples/thumbnails.json).
Nothing is loaded from elsewhere: the file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import bisect
import html
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launcher import ledger, quality, storage, thumbnails
from launcher.ledger import SubjectStatus

FILE = "report.html"  # in the job's output, beside subjects/
PAGE_SIZE = 48  # cards shown at once
CURVE_POINTS = 120  # loss points kept per subject
WORST = 20  # subjects in the "worst subjects" table
BINS = 20
SCRIPT = Path(__file__).with_name("report.js")
IMAGE_URI = ("data:image/jpeg;base64,", "data:image/png;base64,")


def _metrics(job_uri: str, sid: str) -> list[dict]:
    try:
        text = storage.read_text(storage.join(ledger.subject_uri(job_uri, sid), "metrics.jsonl"))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _curve(lines: list[dict]) -> list[list[float]]:
    """[[step, loss], ...], at most CURVE_POINTS of them, the last always kept."""
    points = [[m["step"], m["loss"]] for m in lines if "loss" in m and "step" in m]
    if len(points) > CURVE_POINTS:
        every = -(-len(points) // CURVE_POINTS)
        points = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    return points


def _thumbnails(job_uri: str, sid: str) -> dict:
    """The worker's thumbnails.json; for an output written before there was one, thumbnails of
    the sample PNGs (no photos: the output does not hold them)."""
    folder = storage.join(ledger.subject_uri(job_uri, sid), "samples")
    record = storage.read_json(storage.join(folder, thumbnails.FILE))
    if record is not None:  # only inline images reach the page, whatever the file holds
        return {kind: [uri for uri in record.get(kind, []) if isinstance(uri, str) and uri.startswith(IMAGE_URI)]
                for kind in ("photos", "samples", "base") if record.get(kind)}
    try:
        names = sorted(n for n in storage.list_names(folder) if n.endswith(".png"))[: thumbnails.MAX_IMAGES]
    except FileNotFoundError:
        return {}
    return {"samples": [thumbnails.from_bytes(storage.read_bytes(storage.join(folder, n))) for n in names]}


def _subject_data(job_uri: str, s: SubjectStatus) -> dict:
    scores = s.scores or {}
    data = {"id": s.id, "state": s.state, "loss": s.final_loss, **{k: scores.get(k) for k in quality.SCORES}}
    if s.state in ("done", "running"):
        data["curve"] = _curve(_metrics(job_uri, s.id))
    if s.state == "done":
        data.update(_thumbnails(job_uri, s.id))
    return data


def _ranks(records: list[dict]) -> None:
    """Each record's "rank", worst first: failed, then flagged, then the done subjects by their
    weakest dimension (the lowest percentile of any score, or of the final loss turned so that a
    high loss is low), then the unfinished ones."""
    done = [r for r in records if r["state"] == "done"]
    percentile: dict[str, dict[str, float]] = {}
    for key in (*quality.SCORES, "loss"):
        values = sorted(r[key] for r in done if r.get(key) is not None)
        if len(values) > 1:
            pct = {r["id"]: bisect.bisect_left(values, r[key]) / (len(values) - 1) for r in done if r.get(key) is not None}
            percentile[key] = {i: (1 - p if key == "loss" else p) for i, p in pct.items()}
    group = {"failed": 0, "done": 2, "running": 3, "pending": 4}
    for r in records:
        weakest = min((percentile[k][r["id"]] for k in percentile if r["id"] in percentile[k]), default=1.0)
        r["rank"] = (1 if r.get("flagged") else group.get(r["state"], 5), round(weakest, 6), r["id"])
    records.sort(key=lambda r: r["rank"])
    for i, r in enumerate(records):
        r["rank"] = i


def _histogram(title: str, values: list[float], width: int = 300, height: int = 150) -> str:
    """An inline SVG histogram with a value axis (min, middle, max) and a count axis."""
    esc = html.escape
    if not values:
        return f"<figure class='hist'><figcaption>{esc(title)}</figcaption><p class='muted'>no values yet</p></figure>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    counts = [0] * BINS
    for v in values:
        counts[min(int((v - lo) / span * BINS), BINS - 1)] += 1
    left, bottom, top = 36, 30, 8
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(counts)
    bar_w = plot_w / BINS
    bars = "".join(f"<rect x='{left + i * bar_w:.1f}' y='{top + plot_h - c / peak * plot_h:.1f}' width='{bar_w - 1:.1f}' "
                   f"height='{c / peak * plot_h:.1f}'><title>{lo + i * span / BINS:.4g}–{lo + (i + 1) * span / BINS:.4g}: "
                   f"{c}</title></rect>" for i, c in enumerate(counts) if c)
    y0 = top + plot_h
    ticks = "".join(f"<text x='{left + f * plot_w:.1f}' y='{y0 + 13}' text-anchor='{anchor}'>{lo + f * span:.3g}</text>"
                    for f, anchor in ((0, "start"), (0.5, "middle"), (1, "end")))
    axes = (f"<line x1='{left}' y1='{y0}' x2='{left + plot_w}' y2='{y0}'/><line x1='{left}' y1='{top}' x2='{left}' "
            f"y2='{y0}'/><text x='{left - 4}' y='{top + 8}' text-anchor='end'>{peak}</text><text x='{left - 4}' "
            f"y='{y0}' text-anchor='end'>0</text><text x='{left + plot_w / 2}' y='{height - 2}' text-anchor='middle' "
            f"class='label'>{esc(title)}</text><text x='10' y='{top + plot_h / 2}' class='label' transform='rotate(-90 10 "
            f"{top + plot_h / 2})' text-anchor='middle'>subjects</text>")
    median = statistics.median(values)
    return (f"<figure class='hist'><figcaption>{esc(title)}: n {len(values)}, median {median:.4g}, min {lo:.4g}, "
            f"max {hi:.4g}</figcaption><svg width='{width}' height='{height}' role='img' aria-label='{esc(title)} "
            f"histogram'>{axes}{ticks}<g class='bars'>{bars}</g></svg></figure>")


def _card(r: dict, s: SubjectStatus) -> str:
    esc = html.escape
    loss = f", final loss {s.final_loss:.4f}" if s.final_loss is not None else ""
    lines = [f"<h3>{esc(s.id)}</h3><p class='meta'>{esc(s.state)}, step {s.step}/{s.steps}, attempts {s.attempts}{loss}</p>"]
    if s.scores:
        base = s.scores.get("base")
        lines.append(f"<p class='scores'>{esc(quality.format_scores(s.scores))}"
                     + (f" <span class='muted'>(base model: {esc(quality.format_scores(base))})</span>" if base else "")
                     + "</p>")
    if s.state == "done" and s.flagged:
        lines.append(f"<p class='flag'>flagged for review: {esc('; '.join(s.flag_reasons))}</p>")
    if s.state == "failed":
        lines.append(f"<p class='error'>{esc(s.error or 'failed')}</p>")
    classes = " ".join(["card", s.state] + (["flagged"] if s.flagged and s.state == "done" else []))
    return (f"<section class='{classes}' id='subject-{esc(s.id)}' data-i='{r['rank']}' hidden>{''.join(lines)}"
            f"<div class='body'></div></section>")


def _worst_table(records: list[dict], by_id: dict[str, SubjectStatus]) -> str:
    esc = html.escape
    rows = []
    for r in records[:WORST]:
        s = by_id[r["id"]]
        if s.state not in ("done", "failed"):
            break
        why = "; ".join(s.flag_reasons) if s.flagged else (s.error or "")
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        rows.append(f"<tr><td><a href='#subject-{esc(s.id)}'>{esc(s.id)}</a></td><td>{esc(s.state)}</td><td>{loss}</td>"
                    f"<td>{esc(quality.format_scores(s.scores))}</td><td>{esc(why[:200])}</td></tr>")
    if not rows:
        return "<p class='muted'>no finished subjects yet</p>"
    return ("<table><tr><th>subject</th><th>state</th><th>final loss</th><th>scores</th><th>why</th></tr>"
            + "".join(rows) + "</table>")


def render(job_uri: str, statuses: list[SubjectStatus] | None = None) -> str:
    """The report page of the job output at `job_uri` (its ledger, or these statuses)."""
    from launcher.fleet import summarize

    statuses = ledger.list_statuses(job_uri) if statuses is None else statuses
    with ThreadPoolExecutor(max_workers=ledger.READERS) as pool:  # a bucket: one reader after another takes minutes
        records = list(pool.map(lambda s: _subject_data(job_uri, s), statuses))
    for r, s in zip(records, statuses):
        r["flagged"] = bool(s.flagged and s.state == "done")
    _ranks(records)
    by_id = {s.id: s for s in statuses}
    summary = summarize(statuses)
    esc = html.escape
    done = [by_id[r["id"]] for r in records if r["state"] == "done"]
    hists = [_histogram("final loss", [s.final_loss for s in done if s.final_loss is not None])]
    for key in quality.SCORES:
        values = [s.scores[key] for s in done if s.scores and s.scores.get(key) is not None]
        if values:
            hists.append(_histogram(quality.LABELS[key], values))
    rate = f"{summary['subjects_per_hour']:.1f}" if summary["subjects_per_hour"] else "-"
    counts = " · ".join(f"{k}: {v}" for k, v in summary["counts"].items())
    flagged = f" · flagged for review: {len(summary['flagged'])}" if summary["flagged"] else ""
    failures = "".join(f"<tr><td><a href='#subject-{esc(f['id'])}'>{esc(f['id'])}</a></td><td>{f['attempts']}</td>"
                       f"<td>{esc(f['error'] or '')}</td></tr>" for f in summary["failures"])
    data = [{k: r.get(k) for k in ("id", "state", "loss", *quality.SCORES, "curve", "photos", "samples", "base")
             if r.get(k) is not None} for r in records]
    payload = json.dumps({"page_size": PAGE_SIZE, "subjects": data}, separators=(",", ":")).replace("</", "<\\/")
    cards = "".join(_card(r, by_id[r["id"]]) for r in records)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dreamfleet report: {esc(storage.redact(job_uri))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h2 {{ margin-top: 28px; }}
.hists {{ display: flex; flex-wrap: wrap; gap: 16px; }}
.hist {{ margin: 0; }} .hist figcaption {{ font-size: 13px; }}
.hist svg line {{ stroke: #444; }} .hist svg text, .curve text {{ font-size: 10px; fill: #333; }}
.hist rect {{ fill: #2a6fdb; }} .label {{ font-weight: 600; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px; align-items: start; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: 8px 12px; }}
.card.failed {{ border-color: #d33; background: #fff5f5; }} .card.flagged {{ border-color: #e0a000; background: #fffbea; }}
.card h3 {{ font-size: 15px; margin: 4px 0; }} .meta, .muted, .scores {{ color: #555; font-size: 13px; margin: 2px 0; }}
.flag {{ color: #8a5a00; font-size: 13px; margin: 2px 0; }}
.row {{ display: flex; align-items: center; gap: 3px; margin: 4px 0; }} .row b {{ font-size: 11px; width: 54px; color: #666; }}
.row img {{ width: 56px; height: 56px; border-radius: 3px; }}
.curve line, .curve path.axis {{ stroke: #444; }} .curve polyline {{ fill: none; stroke: #2a6fdb; stroke-width: 1.5; }}
.error {{ color: #b00; font-family: monospace; font-size: 12px; white-space: pre-wrap; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; font-size: 13px; text-align: left; }}
.controls {{ display: flex; gap: 12px; align-items: center; margin: 8px 0; flex-wrap: wrap; }}
</style></head><body>
<h1>dreamfleet: {esc(storage.redact(job_uri))}</h1>
<p>{summary['total']} subjects — {counts}{flagged} — {rate} subjects/hour</p>
<section id="distributions"><h2>Distributions across the fleet</h2><div class="hists">{''.join(hists)}</div></section>
<section id="worst"><h2>Worst subjects</h2>{_worst_table(records, by_id)}</section>
<section id="failures"><h2>Failures</h2>
{'<table><tr><th>subject</th><th>attempts</th><th>error</th></tr>' + failures + '</table>' if failures else '<p>none</p>'}
</section>
<section id="subjects"><h2>Subjects</h2>
<div class="controls"><label>order <select id="order"><option value="rank">worst first</option>
<option value="id">subject id</option><option value="loss">final loss (highest first)</option>
{''.join(f'<option value="{k}">{quality.LABELS[k]} (lowest first)</option>' for k in quality.SCORES)}</select></label>
<label>subject <input id="filter" placeholder="id contains"></label>
<button id="prev">previous</button><span id="page-info"></span><button id="next">next</button></div>
<div class="cards" id="cards">{cards}</div></section>
<p class="muted" id="rendered"></p>
<script type="application/json" id="fleet-data">{payload}</script>
<script>{SCRIPT.read_text()}</script>
</body></html>
"""
