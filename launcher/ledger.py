"""The output layout and the per-subject status ledger.

    <output>/<job>/job.yaml
    <output>/<job>/subjects/<id>/status.json      state, step, attempts, error, heartbeat, lease
    <output>/<job>/subjects/<id>/claims/<seq>.json who took lease <seq> on the subject, and when
    <output>/<job>/subjects/<id>/adapter/ ...     (see DESIGN.md, "The output contract")

`status.json` is the source of truth for `launcher status` and for skipping finished work.

Claims: a worker that decides to train a subject first creates `claims/<n+1>.json`, n being the
latest claim it saw, with an exclusive create (storage.create_exclusive). At most one worker
creates each claim, so two workers that both saw a subject as free, or both saw the same stale
run, cannot both go on: the second finds the claim taken and skips. The claim is a fencing
token: a worker writes status and publishes only while its claim is still the latest, so a
worker that was wrongly judged dead (a long pause) finds itself superseded and stops instead of
overwriting its successor.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

from launcher import liveness, storage
from launcher.errors import UserError

log = logging.getLogger(__name__)

State = Literal["pending", "running", "done", "failed"]
STATES: tuple[State, ...] = ("pending", "running", "done", "failed")
READERS = 32  # concurrent reads of status files
ALREADY_DONE = "already done"
INVALID_INPUT = "invalid input (never trained)"


def subjects_uri(job_uri: str) -> str:
    return storage.join(job_uri, "subjects")


def subject_uri(job_uri: str, subject_id: str) -> str:
    return storage.join(job_uri, "subjects", subject_id)


def status_uri(job_uri: str, subject_id: str) -> str:
    return storage.join(subject_uri(job_uri, subject_id), "status.json")


@dataclass
class SubjectStatus:
    id: str
    state: State = "pending"
    step: int = 0
    steps: int = 0
    attempts: int = 0
    error: str | None = None
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    final_loss: float | None = None
    lease: int = 0
    process: dict | None = None  # the worker's process (launcher.liveness), to tell a dead run from a slow one
    invalid: bool = False  # failed at the input check, never trained (launcher submit --skip-invalid)
    scores: dict | None = None  # launcher.quality: {"dino", "clip_i", "clip_t", "base": {...}, ...} of the published samples
    flagged: bool = False  # done, but a score is below its eval.min_* threshold: for review (retry-failed --flagged)
    flag_reasons: list[str] = field(default_factory=list)  # which score is below which threshold
    overrides: dict = field(default_factory=dict)  # per-subject settings of a retry (retry-failed KEY=VALUE), e.g. {"steps": 1200}
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "SubjectStatus":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def is_stale(self, stale_after_s: float, now: float | None = None) -> bool:
        beat = self.heartbeat_at or self.started_at or 0
        return (now or time.time()) - beat > stale_after_s


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_status(job_uri: str, subject_id: str) -> SubjectStatus | None:
    data = storage.read_json(status_uri(job_uri, subject_id))
    return SubjectStatus.from_dict(data) if data else None


def write_status(job_uri: str, status: SubjectStatus) -> None:
    storage.write_json(status_uri(job_uri, status.id), asdict(status))


def read_statuses(job_uri: str, subject_ids: list[str]) -> dict[str, SubjectStatus | None]:
    """These subjects' statuses (None: no status yet), READERS at a time: a fleet's ledger is
    thousands of small objects, and one GET after another from a bucket takes minutes."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return dict(zip(subject_ids, pool.map(lambda sid: read_status(job_uri, sid), subject_ids)))


def list_statuses(job_uri: str) -> list[SubjectStatus]:
    """Every subject's status, in id order."""
    ids = sorted(storage.list_names(subjects_uri(job_uri)))
    return [s for s in read_statuses(job_uri, ids).values() if s is not None]


def settled(status: SubjectStatus | None, max_attempts: int) -> str | None:
    """Why a subject needs no more training (done, or failed with no attempt left), else None.
    Both states are final until a user acts (`launcher retry-failed`, a new output)."""
    if status is None:
        return None
    if status.state == "done":
        return ALREADY_DONE
    if status.state == "failed" and status.invalid:
        return INVALID_INPUT
    if status.state == "failed" and status.attempts >= max_attempts:
        return f"failed {status.attempts} times (max_attempts={max_attempts})"
    return None


def settled_subjects(job_uri: str, subject_ids: list[str], max_attempts: int) -> dict[str, str]:
    """{id: why} for the subjects among these that need no more training. One listing first,
    so that only subjects with an entry in the ledger cost a read (a new job costs none). A
    ledger that cannot be read settles nothing (with a warning): whoever trains a subject
    checks its status again before claiming it."""
    try:
        known = set(storage.list_names(subjects_uri(job_uri)))
        found = read_statuses(job_uri, [sid for sid in subject_ids if sid in known])
    except (OSError, ValueError, UserError) as exc:
        log.warning("cannot read the status ledger in %s (%s); treating every subject as unfinished",
                    storage.redact(job_uri), exc)
        return {}
    return {sid: why for sid, status in found.items() if (why := settled(status, max_attempts))}


# --------------------------------------------------------------------------- claims


def claims_uri(job_uri: str, subject_id: str) -> str:
    return storage.join(subject_uri(job_uri, subject_id), "claims")


@dataclass(frozen=True)
class Claim:
    seq: int
    owner: str
    at: float
    process: dict | None = None  # launcher.liveness.current() of the claimant


def _claim_uri(claims: str, seq: int) -> str:
    return storage.join(claims, f"{seq:06d}.json")


def latest_claim(claims: str) -> Claim | None:
    """The highest-numbered claim in a claims folder (a subject's, or a prior set's lock)."""
    seqs = [int(n[:-5]) for n in storage.list_names(claims) if n.endswith(".json") and n[:-5].isdigit()]
    if not seqs:
        return None
    seq = max(seqs)
    data = storage.read_json(_claim_uri(claims, seq)) or {}
    return Claim(seq, data.get("owner", "?"), float(data.get("at", 0)), data.get("process"))


def try_claim(claims: str, seq: int, owner: str) -> Claim | None:
    """Create claim `seq`; the Claim if this call created it, None if another worker has it."""
    at, process = time.time(), liveness.current()
    body = json.dumps({"owner": owner, "at": at, "process": process, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()
    created = storage.create_exclusive(_claim_uri(claims, seq), body)
    return Claim(seq, owner, at, process) if created else None


def refresh_claim(claims: str, claim: Claim) -> None:
    """The holder's heartbeat on a claim (only the holder ever writes its own claim file)."""
    body = {"owner": claim.owner, "at": time.time(), "process": claim.process, "nonce": uuid.uuid4().hex}
    storage.write_json(_claim_uri(claims, claim.seq), body)


def holds(claims: str, claim: Claim) -> bool:
    """Whether `claim` is still the latest (nobody took over)."""
    latest = latest_claim(claims)
    return latest is not None and latest.seq == claim.seq and latest.owner == claim.owner
