"""The claim protocol: exclusive claims on a local filesystem and on a real S3 endpoint, racing
workers of which exactly one wins, stale takeover, and fencing (a superseded worker writes
nothing more and does not publish)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import job_dict
from launcher import fleet, ledger, storage
from launcher.config import Subject, job_from_dict
from launcher.ledger import Claim, SubjectStatus
from training import lease


def make_job(output_uri: str, **output):
    data = job_dict(Path("/nonexistent/model"), [{"id": "a", "images": "/nowhere", "instance_prompt": "sks"}],
                    output_uri, name="lease", output={"uri": output_uri, **output})
    return job_from_dict(data)


SUBJECT = Subject(id="a", images="/nowhere", instance_prompt="sks")


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3['bucket']}/out"


def test_create_exclusive_lets_one_writer_win(output_uri):
    uri = storage.join(output_uri, "x", "claim.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_racing_workers_exactly_one_claims(output_uri):
    job = make_job(output_uri)
    barrier = threading.Barrier(6)
    won: list[str] = []

    def contend(owner: str) -> None:
        barrier.wait()
        keeper, why = lease.begin(job, SUBJECT, owner)
        if keeper is not None:
            won.append(owner)
            keeper.stop()

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1
    status = ledger.read_status(job.job_uri, "a")
    assert status.state == "running" and status.worker == won[0] and status.lease == 1 and status.attempts == 1
    assert ledger.latest_claim(ledger.claims_uri(job.job_uri, "a")).owner == won[0]


def test_stale_takeover_fences_the_old_worker(tmp_path):
    job = make_job(str(tmp_path / "out"), stale_after_s=1, heartbeat_s=3600)
    old, why = lease.begin(job, SUBJECT, "old")
    assert old is not None and why == "new"
    busy, why = lease.begin(job, SUBJECT, "new")
    assert busy is None and why == "running on old"
    time.sleep(1.2)  # the old worker's heartbeat goes stale
    new, why = lease.begin(job, SUBJECT, "new")
    assert new is not None and why == "taking over a stale run of old"
    assert not old.held()
    old.update(state="done")  # a superseded worker writes nothing more
    status = ledger.read_status(job.job_uri, "a")
    assert status.state == "running" and status.worker == "new" and status.lease == 2 and status.attempts == 2
    assert [h["worker"] for h in status.history] == ["old", "new"]
    new.update(state="done")
    assert ledger.read_status(job.job_uri, "a").state == "done"
    again, why = lease.begin(job, SUBJECT, "third")
    assert again is None and why == "already done"
    old.stop()
    new.stop()


def test_requeued_owner_keeps_its_claim_and_retry_failed_continues_the_sequence(tmp_path):
    job = make_job(str(tmp_path / "out"), max_attempts=1)
    first, _ = lease.begin(job, SUBJECT, "job 7 shard 0 rank 0")
    first.stop()  # killed; the scheduler requeues the same job (same owner)
    again, why = lease.begin(job, SUBJECT, "job 7 shard 0 rank 0")
    assert again is not None and why == "restarting own run" and again.claim.seq == 1
    again.fail(RuntimeError("boom"))
    again.stop()
    no, why = lease.begin(job, SUBJECT, "other")
    assert no is None and "failed 2 times" in why  # the requeued restart was attempt 2
    assert fleet.retry_failed(job.job_uri) == ["a"]
    retried, why = lease.begin(job, SUBJECT, "other")
    assert retried is not None and retried.claim.seq == 2
    retried.stop()


def test_an_unstarted_claim_is_respected_until_stale():
    job = make_job("/tmp/unused", stale_after_s=60)
    claim = Claim(seq=3, owner="w1", at=1000.0)
    status = SubjectStatus(id="a", state="failed", attempts=1, lease=2)
    assert lease.should_train(status, claim, job, "w2", now=1030.0) == (False, "claimed by w1")
    assert lease.should_train(status, claim, job, "w2", now=1061.0) == (True, "taking over an unstarted claim of w1")
    assert lease.should_train(status, claim, job, "w1", now=1030.0) == (True, "restarting own claim")
    done = SubjectStatus(id="a", state="done", lease=2)
    assert lease.should_train(done, claim, job, "w2", now=1061.0) == (False, "already done")


def test_class_images_are_generated_once_by_racing_workers(tmp_path, tiny_model, monkeypatch):
    from launcher.config import PriorConfig
    from training import priors
    from training.components import load_components

    job = job_from_dict(job_dict(tiny_model, [{"id": "a", "images": "/nowhere", "instance_prompt": "sks"}], tmp_path / "out"))
    c = load_components(job.model, __import__("torch").device("cpu"))
    calls = []
    real = priors.generate

    def counted(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(1.0)  # long enough that the other worker finds the lock held
        return real(*args, **kwargs)

    monkeypatch.setattr(priors, "generate", counted)
    prior = PriorConfig(enabled=True, num_class_images=2, sample_steps=1)
    store = str(tmp_path / "priors")
    results = {}

    def worker(name: str) -> None:
        results[name] = priors.ensure_class_images(c, "a thing", "tiny", 32, prior, 0, store, name, poll_s=0.1)

    threads = [threading.Thread(target=worker, args=(f"w{i}",), name=f"w{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(calls) == 1
    assert sorted(generated for _, generated in results.values()) == [False, False, True]
    uris = {tuple(u) for u, _ in results.values()}
    assert len(uris) == 1 and len(next(iter(uris))) == 2

    # a dead generator's lock (no heartbeat) is taken over once it is stale
    other = PriorConfig(enabled=True, num_class_images=1, sample_steps=1)
    key = priors.prior_key("another", "tiny", 32, other, 0)
    dead = ledger.try_claim(storage.join(store, f"{key}.claims"), 1, "dead")
    assert dead is not None
    uris, generated = priors.ensure_class_images(c, "another", "tiny", 32, other, 0, store, "alive",
                                                 stale_after_s=0.5, poll_s=0.1)
    assert generated and len(uris) == 1 and len(calls) == 2
    assert ledger.latest_claim(storage.join(store, f"{key}.claims")).owner == "alive"


def test_settled_subjects_are_done_or_out_of_attempts_and_a_broken_ledger_settles_none(output_uri, caplog):
    job = make_job(output_uri, max_attempts=2)
    for sid, state, attempts in (("done", "done", 1), ("spent", "failed", 2), ("retry", "failed", 1),
                                 ("running", "running", 1), ("pending", "pending", 0)):
        ledger.write_status(job.job_uri, SubjectStatus(id=sid, state=state, attempts=attempts))
    ids = ["done", "spent", "retry", "running", "pending", "new"]
    assert ledger.settled_subjects(job.job_uri, ids, 2) == {
        "done": "already done", "spent": "failed 2 times (max_attempts=2)"}
    assert ledger.settled_subjects(job.job_uri, ["retry", "new"], 2) == {}
    assert ledger.settled_subjects(job.job_uri, ids, 3) == {"done": "already done"}
    # a failed subject out of attempts stays settled even behind a newer claim
    spent = ledger.read_status(job.job_uri, "spent")
    assert lease.should_train(spent, Claim(5, "w1", time.time()), job, "w2") == (False, "failed 2 times (max_attempts=2)")
    storage.write_text(ledger.status_uri(job.job_uri, "done"), "{not json")
    assert ledger.settled_subjects(job.job_uri, ids, 2) == {}
    assert "cannot read the status ledger" in caplog.text


# --------------------------------------------------------------------------- a holder that is gone


def test_a_holder_is_provably_gone_only_when_it_ran_here_and_its_process_is_not_there():
    import subprocess
    import sys

    from launcher import liveness

    me = liveness.current()
    assert not liveness.provably_gone(me)  # alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert liveness.provably_gone({**me, "pid": child.pid, "start": None})  # no such process now
    assert liveness.provably_gone({**me, "start": "1"})  # our pid, but another process's start time: reused
    for key, other in (("host", "elsewhere"), ("boot", "another-boot"), ("pidns", "pid:[1]")):
        assert not liveness.provably_gone({**me, "pid": child.pid, key: other})  # proves nothing
    assert not liveness.provably_gone(None) and not liveness.provably_gone({"host": me["host"]})


def test_a_worker_killed_mid_run_is_taken_over_at_once_by_the_next_on_its_host(tmp_path, tiny_model, subjects_root):
    """kill -9 during training leaves the subject `running` with a fresh heartbeat; the next
    worker on the same host sees that the holder's process is gone and trains it now, not after
    output.stale_after_s (600 s by default)."""
    import json
    import signal
    import subprocess
    import sys

    from conftest import REPO, subject_entry, worker_env, write_job

    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out",
                                                    train={"steps": 300, "log_every": 50}, output={"heartbeat_s": 1}))
    status_path = tmp_path / "out" / "t" / "subjects" / "s0" / "status.json"
    cmd = [sys.executable, "-m", "training.worker", "--job", str(job)]
    first = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (status_path.exists() and json.loads(status_path.read_text()).get("step", 0) >= 2):
        assert time.time() < deadline and first.poll() is None, "the first worker never trained"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads(status_path.read_text())["state"] == "running"
    second = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "whose process is gone" in second.stderr, second.stderr[-3000:]
    status = json.loads(status_path.read_text())
    assert status["state"] == "done" and status["attempts"] == 2
