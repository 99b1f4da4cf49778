"""Taking a subject and keeping its status: the one sequence every training loop (sequential,
packed, data-parallel) goes through before it trains a subject and before it publishes one.

    keeper, why = begin(job, subject, owner)     # decide from status + claims, claim, mark running
    if keeper is None: skip (why)
    ... train, with keeper.status.step updated as it goes (the heartbeat thread writes it) ...
    if keeper.held(): publish; keeper.update(state="done")   # else a successor took it over
    keeper.stop()

The claim protocol itself (exclusive claim files as fencing tokens) is described in
launcher.ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from launcher import ledger, liveness
from launcher.config import JobConfig, Subject
from launcher.errors import UserError
from launcher.ledger import Claim, SubjectStatus

log = logging.getLogger(__name__)


def should_train(status: SubjectStatus | None, latest: Claim | None, job: JobConfig, owner: str,
                 now: float | None = None) -> tuple[bool, str]:
    """Whether this worker may try to claim the subject, and why (or why not)."""
    now = now or time.time()
    if why := ledger.settled(status, job.output.max_attempts):
        return False, why
    if latest is not None and (status is None or status.lease < latest.seq):
        # claimed, and the claimant has not written its status yet
        if latest.owner == owner:
            return True, "restarting own claim"
        if liveness.provably_gone(latest.process):
            return True, f"taking over the claim of {latest.owner}, whose process is gone"
        if now - latest.at <= job.output.stale_after_s:
            return False, f"claimed by {latest.owner}"
        return True, f"taking over an unstarted claim of {latest.owner}"
    if status is None or status.state == "pending":
        return True, "new" if status is None else "pending"
    if status.state == "running":
        if status.worker == owner:
            return True, "restarting own run"
        if status.is_stale(job.output.stale_after_s, now):
            return True, f"taking over a stale run of {status.worker}"
        if liveness.provably_gone(status.process):
            return True, f"taking over the run of {status.worker}, whose process is gone"
        return False, f"running on {status.worker}"
    return True, f"retrying after failure ({status.attempts}/{job.output.max_attempts})"


@dataclass
class Outcome:
    """What this run did with one subject: done, failed, skipped (and why) or preempted."""

    subject: str
    state: str
    detail: str = ""
    final_loss: float | None = None


def summarize(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def without_settled(job: JobConfig, subjects: list[Subject]) -> tuple[list[Subject], list[Outcome]]:
    """The subjects that still need training, and a "skipped" outcome for each of the others
    (done, or out of attempts). Checked before the base model loads, so that the workers of a
    resubmitted job with nothing left to do exit in seconds."""
    found = ledger.settled_subjects(job.job_uri, [s.id for s in subjects], job.output.max_attempts)
    return [s for s in subjects if s.id not in found], [Outcome(sid, "skipped", why) for sid, why in found.items()]


class Heartbeat:
    """Calls `beat` every `every_s` seconds on a daemon thread until stopped. A failed beat is
    logged, never raised: a missed heartbeat must not stop the work it vouches for."""

    def __init__(self, beat: Callable[[], None], every_s: float, what: str):
        self.beat, self.every_s, self.what = beat, every_s, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=what)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except (OSError, UserError) as exc:
                log.warning("%s failed: %s", self.what, exc)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class StatusKeeper:
    """Writes a subject's status.json while this worker holds its claim, and refreshes the
    heartbeat from a background thread. Once a successor has taken the subject over, nothing
    more is written (`lost`)."""

    def __init__(self, job_uri: str, status: SubjectStatus, claim: Claim, every_s: float, subject: Subject | None = None):
        self.job_uri, self.status, self.claim, self.every_s = job_uri, status, claim, every_s
        self.subject = subject  # what is trained: the job's subject with the status's overrides (with_overrides)
        self.lost = False
        self._lock = threading.Lock()
        self._heart = Heartbeat(self.update, every_s, f"heartbeat of {status.id}")

    def held(self) -> bool:
        """Whether the claim is still the latest; checked before publishing."""
        if not self.lost and not ledger.holds(ledger.claims_uri(self.job_uri, self.status.id), self.claim):
            self.lost = True
            log.warning("subject %s: taken over by another worker; this run stops writing", self.status.id)
        return not self.lost

    def update(self, **changes) -> None:
        with self._lock:
            if not self.held():
                return
            for key, value in changes.items():
                setattr(self.status, key, value)
            self.status.heartbeat_at = time.time()
            ledger.write_status(self.job_uri, self.status)

    def start(self) -> "StatusKeeper":
        self._heart.start()
        return self

    def stop(self) -> None:
        self._heart.stop()

    def __enter__(self) -> "StatusKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, exc: BaseException) -> None:
        from training.failures import one_line

        self.update(state="failed", error=one_line(exc), finished_at=time.time())


def with_overrides(subject: Subject, overrides: dict | None) -> Subject:
    """The subject with a retry's per-subject settings (SubjectStatus.overrides: Subject fields,
    e.g. {"steps": 1200}, set by `launcher retry-failed KEY=VALUE`)."""
    return subject.model_copy(update=overrides) if overrides else subject


def begin(job: JobConfig, subject: Subject, owner: str) -> tuple[StatusKeeper | None, str]:
    """Claim the subject and mark it running (heartbeat started), or say why not."""
    job_uri = job.job_uri
    claims = ledger.claims_uri(job_uri, subject.id)
    latest = ledger.latest_claim(claims)
    status = ledger.read_status(job_uri, subject.id)
    go, why = should_train(status, latest, job, owner)
    if not go:
        return None, why
    if latest is not None and latest.owner == owner:
        claim = latest  # our own run, restarted (a requeue keeps the owner)
    else:
        claim = ledger.try_claim(claims, (latest.seq if latest else 0) + 1, owner)
        if claim is None:
            return None, "claimed by another worker first"
        status = ledger.read_status(job_uri, subject.id)  # it may have finished since we looked
        if status is not None and status.state == "done":
            return None, "already done"
    status = status or SubjectStatus(id=subject.id)
    subject = with_overrides(subject, status.overrides)
    now = time.time()
    keeper = StatusKeeper(job_uri, status, claim, job.output.heartbeat_s, subject)
    keeper.update(state="running", attempts=status.attempts + 1, worker=owner, process=liveness.current(), error=None,
                  started_at=now,
                  steps=subject.steps or job.train.steps, lease=claim.seq,
                  history=status.history + [{"attempt": status.attempts + 1, "lease": claim.seq, "worker": owner,
                                             "at": now}])
    return keeper.start(), why
