"""The output layout and the per-subject status ledger.

    <output>/<job>/job.yaml
    <output>/<job>/subjects/<id>/status.json      state, step, attempts, error, heartbeat
    <output>/<job>/subjects/<id>/adapter/ ...     (see DESIGN.md, "The output contract")

`status.json` is the source of truth for `launcher status` and for skipping finished work.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from launcher import storage

State = Literal["pending", "running", "done", "failed"]
STATES: tuple[State, ...] = ("pending", "running", "done", "failed")


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


def list_statuses(job_uri: str) -> list[SubjectStatus]:
    out = []
    for sid in storage.list_names(subjects_uri(job_uri)):
        status = read_status(job_uri, sid)
        if status is not None:
            out.append(status)
    return out
