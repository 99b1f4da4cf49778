"""Seeing a fleet: counts by state, throughput and ETA from the status ledger; a self-contained
HTML report (loss curves, sample images, failures); and resetting failed subjects for a retry.
Everything is read from the output (any URI), so it works from anywhere the bucket is visible.
"""

from __future__ import annotations

import base64
import html
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from launcher import ledger, quality, storage
from launcher.ledger import STATES, SubjectStatus


STALE_AFTER_S = 600  # output.stale_after_s's default, when the job file is not at hand


def _first_start(s: SubjectStatus) -> float | None:
    """When the subject's first attempt began (a resumed attempt resets started_at)."""
    times = [h["at"] for h in s.history if isinstance(h.get("at"), (int, float)) and "attempt" in h]
    times += [s.started_at] if s.started_at else []
    return min(times) if times else None


def summarize(statuses: list[SubjectStatus], now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> dict:
    """Counts by state, throughput and ETA, failures and stale runs.

    Throughput counts what is finished over the time the fleet has been at work: from the first
    attempt's start to now while anything runs, else to the last finish. The ETA is the steps
    left (pending and running subjects) at the rate steps were trained over the same window,
    so that a fleet with one long subject left does not show "0 min"."""
    now = now or time.time()
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    done = [s for s in statuses if s.state == "done" and s.finished_at]
    starts = [t for s in statuses if (t := _first_start(s))]
    end = now if counts["running"] else max((s.finished_at for s in done), default=None)
    window_s = (end - min(starts)) if starts and end else 0.0
    trained = sum(s.steps if s.state == "done" else s.step for s in statuses)
    left = sum(max(s.steps - s.step, 0) for s in statuses if s.state in ("pending", "running"))
    throughput = len(done) / window_s * 3600 if done and window_s > 0 else None
    step_rate = trained / window_s if trained and window_s > 0 else None
    eta_s = 0.0 if not left else (left / step_rate if step_rate else None)
    failures = [{"id": s.id, "attempts": s.attempts, "invalid": s.invalid, "error": s.error}
                for s in statuses if s.state == "failed"]
    stale = [s.id for s in statuses if s.state == "running" and s.is_stale(stale_after_s, now)]
    flagged = [{"id": s.id, "reasons": s.flag_reasons} for s in statuses if s.state == "done" and s.flagged]
    return {"total": len(statuses), "counts": counts, "subjects_per_hour": throughput, "steps_left": left,
            "steps_per_s": step_rate, "eta_s": eta_s, "failures": failures, "stale_running": stale, "flagged": flagged}


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def job_statuses(job_uri: str, job=None) -> list[SubjectStatus]:
    """The ledger's statuses; with the job, also its subjects that have none yet (as pending,
    so that a job just submitted shows every subject), in id order, and the recorded scores
    gated by the job's current eval.min_* (launcher.quality.regate)."""
    statuses = ledger.list_statuses(job_uri)
    if job is None:
        return statuses
    quality.regate(statuses, job.eval)
    from launcher.subjects import resolve_subjects

    known = {s.id for s in statuses}
    statuses += [SubjectStatus(id=s.id, steps=s.steps or job.train.steps) for s in resolve_subjects(job)
                 if s.id not in known]
    return sorted(statuses, key=lambda s: s.id)


def status_json(statuses: list[SubjectStatus]) -> str:
    return json.dumps({"summary": summarize(statuses), "subjects": [asdict(s) for s in statuses]}, indent=2)


# what `retry-failed KEY=VALUE` may set per subject: {dotted key: Subject field}
RETRY_OVERRIDES = {"train.steps": "steps", "train.learning_rate": "learning_rate"}


def retry_overrides(items: list[str]) -> dict:
    """`retry-failed` overrides as Subject fields ({"steps": 1200}); a key that cannot differ
    between the subjects of one job (they share a loaded model and its adapters) is an error."""
    from pydantic import ValidationError

    from launcher.config import Subject, _format_errors, parse_override
    from launcher.errors import ConfigError

    fields, problems = {}, []
    for item in items:
        path, value = parse_override(item)
        key = ".".join(path)
        if key not in RETRY_OVERRIDES:
            problems.append(f"{key}: cannot differ per subject in a retry; valid keys: {', '.join(RETRY_OVERRIDES)}")
            continue
        fields[RETRY_OVERRIDES[key]] = value
    try:
        Subject(id="x", images="x", instance_prompt="x", **fields)
    except ValidationError as exc:
        names = {v: k for k, v in RETRY_OVERRIDES.items()}
        problems += [f"{names.get(p.split(': ', 1)[0], p.split(': ', 1)[0])}: {p.split(': ', 1)[1]}"
                     for p in _format_errors(exc, Subject)]
    if problems:
        raise ConfigError("retry-failed overrides are invalid", problems)
    return fields


def retry_failed(job_uri: str, flagged: bool = False, overrides: dict | None = None, job=None) -> list[str]:
    """Failed subjects (with `flagged`: the done ones flagged for review instead) go back to
    pending as a fresh attempt, with `overrides` (Subject fields) for their next training;
    returns their ids. A flagged subject's published adapter stays where it is, readable, until
    the new one is published over it; its checkpoints go (they are the old attempt's)."""
    reset = []
    statuses = ledger.list_statuses(job_uri)
    if flagged and job is not None:
        quality.regate(statuses, job.eval)
    for status in statuses:
        if flagged and status.state == "done" and status.flagged:
            status.history.append({"reset_by": "retry-failed --flagged", "at": time.time(), "scores": status.scores,
                                   "flag_reasons": status.flag_reasons, "overrides": overrides or {}})
            storage.remove(storage.join(ledger.subject_uri(job_uri, status.id), "checkpoints"))
            status.step, status.final_loss, status.scores, status.flagged, status.flag_reasons = 0, None, None, False, []
        elif not flagged and status.state == "failed":
            status.history.append({"reset_by": "retry-failed", "at": time.time(), "error": status.error,
                                   "overrides": overrides or {}})
        else:
            continue
        status.state, status.attempts, status.error, status.invalid = "pending", 0, None, False
        status.overrides = {**status.overrides, **(overrides or {})}
        if "steps" in status.overrides:
            status.steps = status.overrides["steps"]
        ledger.write_status(job_uri, status)
        reset.append(status.id)
    return reset


def record_invalid(job, subjects) -> dict[str, list[str]]:
    """Check every subject's images; mark the bad ones failed with the reason and `invalid` set
    (settled without an attempt: workers skip them, and no attempt is counted, since none ran).
    Returns {id: problems}."""
    from launcher.subjects import check_subjects

    bad = check_subjects(subjects)
    for sid, problems in bad.items():
        status = ledger.read_status(job.job_uri, sid) or SubjectStatus(id=sid)
        if status.state == "done":
            continue
        status.state, status.invalid = "failed", True
        status.error = "invalid input: " + "; ".join(problems)
        status.finished_at = time.time()
        ledger.write_status(job.job_uri, status)
    return bad


# --------------------------------------------------------------------------- report


def _metrics(job_uri: str, sid: str) -> list[dict]:
    try:
        text = storage.read_text(storage.join(ledger.subject_uri(job_uri, sid), "metrics.jsonl"))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _curve(points: list[dict], width: int = 320, height: int = 120) -> str:
    """An inline SVG line of loss against step."""
    if len(points) < 2:
        return "<p class='muted'>no loss curve</p>"
    xs, ys = [p["step"] for p in points], [p["loss"] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 10) / max(x1 - x0, 1e-9)
    sy = (height - 20) / max(y1 - y0, 1e-9)
    path = " ".join(f"{5 + (x - x0) * sx:.1f},{height - 10 - (y - y0) * sy:.1f}" for x, y in zip(xs, ys))
    return (f"<svg width='{width}' height='{height}' role='img' aria-label='loss curve'>"
            f"<polyline fill='none' stroke='#2a6fdb' stroke-width='2' points='{path}'/>"
            f"<text x='5' y='12' font-size='11'>loss {ys[0]:.3f} → {ys[-1]:.3f} over {x1} steps</text></svg>")


def _samples(job_uri: str, sid: str, limit: int = 4) -> str:
    folder = storage.join(ledger.subject_uri(job_uri, sid), "samples")
    names = [n for n in storage.list_names(folder) if n.endswith(".png")][:limit]
    imgs = []
    for name in names:
        data = base64.b64encode(storage.read_bytes(storage.join(folder, name))).decode()
        imgs.append(f"<img alt='{html.escape(sid)} sample {html.escape(name)}' src='data:image/png;base64,{data}'>")
    return "".join(imgs) or "<p class='muted'>no samples</p>"


REPORT_FILE = "report.html"  # in the job's output, beside subjects/


REPORT_CARDS = 200  # subjects with a card (curve, samples) in one page; the rest are counted


def _card(job_uri: str, s: SubjectStatus) -> str:
    esc = html.escape
    body = (f"{_curve(_metrics(job_uri, s.id))}<div class='samples'>{_samples(job_uri, s.id)}</div>"
            if s.state == "done" else f"<p class='error'>{esc(s.error or s.state)}</p>")
    loss = f", final loss {s.final_loss:.4f}" if s.final_loss is not None else ""
    return (f"<section class='card {esc(s.state)}' id='subject-{esc(s.id)}'><h2>{esc(s.id)}</h2>"
            f"<p class='meta'>{esc(s.state)}, step {s.step}/{s.steps}, attempts {s.attempts}{loss}</p>{body}</section>")


def render_report(job_uri: str) -> str:
    """The page for a fleet: every failure in a table, and a card for each subject up to
    REPORT_CARDS (failed and running first, then the most recently finished)."""
    statuses = ledger.list_statuses(job_uri)
    summary = summarize(statuses)
    esc = html.escape
    rate = f"{summary['subjects_per_hour']:.1f}" if summary["subjects_per_hour"] else "-"
    order = {"failed": 0, "running": 1}
    shown = sorted(statuses, key=lambda s: (order.get(s.state, 2), -(s.finished_at or 0)))[:REPORT_CARDS]
    shown.sort(key=lambda s: s.id)
    with ThreadPoolExecutor(max_workers=ledger.READERS) as pool:  # each card reads its metrics and samples
        cards = list(pool.map(lambda s: _card(job_uri, s), shown))
    more = (f"<p class='muted'>{len(statuses) - len(shown)} more subjects without a card here: "
            "<code>launcher status --json</code> lists every one</p>" if len(shown) < len(statuses) else "")
    counts = " · ".join(f"{k}: {v}" for k, v in summary["counts"].items())
    failures = "".join(f"<tr><td>{esc(f['id'])}</td><td>{f['attempts']}</td><td>{esc(f['error'] or '')}</td></tr>"
                       for f in summary["failures"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dreamfleet report: {esc(job_uri)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: 8px 12px; }}
.card.failed {{ border-color: #d33; background: #fff5f5; }}
.card h2 {{ font-size: 16px; margin: 4px 0; }} .meta, .muted {{ color: #666; font-size: 13px; }}
.samples img {{ width: 96px; height: 96px; image-rendering: pixelated; margin-right: 4px; }}
.error {{ color: #b00; font-family: monospace; font-size: 12px; white-space: pre-wrap; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 4px 8px; font-size: 13px; }}
</style></head><body>
<h1>dreamfleet: {esc(job_uri)}</h1>
<p>{summary['total']} subjects — {counts} — {rate} subjects/hour</p>
<h2>Failures</h2>
{'<table><tr><th>subject</th><th>attempts</th><th>error</th></tr>' + failures + '</table>' if failures else '<p>none</p>'}
<h2>Subjects</h2>
<div class="cards">{''.join(cards)}</div>{more}
</body></html>
"""
