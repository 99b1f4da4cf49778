"""Seeing a fleet: counts by state, throughput and ETA from the status ledger (the HTML report is
launcher.report); and resetting failed or flagged subjects for a retry.
Everything is read from the output (any URI), so it works from anywhere the bucket is visible.
"""

from __future__ import annotations

import json
import time
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
    from launcher.inputs_check import check_subjects

    bad = check_subjects(subjects, job.train.prompt_template)
    for sid, problems in bad.items():
        status = ledger.read_status(job.job_uri, sid) or SubjectStatus(id=sid)
        if status.state == "done":
            continue
        status.state, status.invalid = "failed", True
        status.error = "invalid input: " + "; ".join(problems)
        status.finished_at = time.time()
        ledger.write_status(job.job_uri, status)
    return bad
