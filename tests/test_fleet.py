"""Fleets through the local backend with two processes.

Twenty subjects of two classes, three with bad images: the bad ones are recorded as failed with
their reason, every other one gets an adapter, class images are generated once per class
although both ranks need both classes (the prior lock), status and report.html (rendered in
headless Chromium, screenshot kept under test-artifacts/) show every subject; retry-failed.

A fleet whose workers are killed outright (SIGKILL, no chance to checkpoint) and resubmitted:
every subject ends with one adapter, published once (ledger history and artifact times)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FLEET_BAD, REPO, job_dict, require_binary, run_cli, worker_env, write_job
from launcher import fleet
from launcher.ledger import SubjectStatus

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"
PRIOR = {"enabled": True, "num_class_images": 2, "sample_steps": 1}


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def statuses(job_uri: Path) -> dict[str, dict]:
    root = job_uri / "subjects"
    return {p.name: json.loads((p / "status.json").read_text()) for p in root.iterdir() if (p / "status.json").exists()}


def test_fleet_of_twenty_with_bad_subjects_shared_priors_status_report_and_retry(tmp_path, tiny_model, fleet_subjects):
    job = write_job(tmp_path / "fleet.yaml", job_dict(
        tiny_model, fleet_subjects, tmp_path / "out", name="fleet", prior=PRIOR,
        train={"steps": 2, "samples": {"enabled": True, "num_inference_steps": 1}},
        distributed={"nproc_per_node": 2}))
    started = time.time()
    proc = run_cli("submit", str(job), "--backend", "local", "--skip-invalid", "--out", str(tmp_path / "r"))
    wall = time.time() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert all(f"skipping subject {sid}" in proc.stderr for sid in FLEET_BAD)
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert plan["num_shards"] == 1 and len(plan["subjects"]) == 20

    out = tmp_path / "out" / "fleet"
    summary = json.loads(run_cli("status", str(out), "--json").stdout)["summary"]
    assert summary["counts"] == {"pending": 0, "running": 0, "done": 17, "failed": 3}
    errors = {f["id"]: f["error"] for f in summary["failures"]}
    assert "000.png cannot be decoded" in errors["f03"] and "holds no images" in errors["f11"]
    assert "is not an image" in errors["f17"]
    # recorded at the input check: failed, but never trained, so no attempt is counted
    for sid in FLEET_BAD:
        status = statuses(out)[sid]
        assert status["invalid"] and status["attempts"] == 0, status
    assert "failed f03 (never trained): invalid input" in run_cli("status", str(out)).stdout
    for sid, status in statuses(out).items():
        if sid not in FLEET_BAD:
            assert (out / "subjects" / sid / "pytorch_lora_weights.safetensors").exists()
            assert status["attempts"] == 1 and status["lease"] == 1
    # both ranks needed both classes; each set was generated once, by whichever rank took its lock
    assert proc.stderr.count("generating 2 class images for") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("waiting for ") + proc.stderr.count("reusing 2 class images") >= 2
    sets = [p for p in (out / "priors").iterdir() if p.is_dir() and not p.name.endswith(".claims")]
    assert len(sets) == 2 and all(len(list(s.glob("*.png"))) == 2 for s in sets)
    rate = 17 / wall * 3600
    print(f"\nfleet: 17 of 20 subjects trained in {wall:.1f}s wall, {rate:.0f} subjects/hour with start-up "
          f"(ledger: {summary['subjects_per_hour']:.0f}/hour)")

    text = run_cli("status", str(job)).stdout
    assert "20 subjects: pending 0, running 0, done 17, failed 3" in text

    # the local submit left the report in the output (the contract's place); `report` rewrites it there
    assert f"report: {out / 'report.html'}" in proc.stdout
    (out / "report.html").unlink()
    made = run_cli("report", str(job))
    assert made.returncode == 0 and made.stdout.strip() == str(out / "report.html"), made.stderr[-2000:]
    report = tmp_path / "report.html"
    assert run_cli("report", str(job), "--out", str(report)).returncode == 0
    page = report.read_text()
    assert all(f"id='subject-{e['id']}'" in page for e in fleet_subjects)
    data = json.loads(page.split('<script type="application/json" id="fleet-data">')[1].split("</script>")[0])
    done = [d for d in data["subjects"] if d["state"] == "done"]
    assert len(done) == 17 and all(len(d["samples"]) == 1 and len(d["photos"]) >= 2 and d["curve"] for d in done)

    require_binary("chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fleet-report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert all(f'id="subject-{e["id"]}"' in dom.stdout for e in fleet_subjects), dom.stderr[-2000:]
    assert dom.stdout.count('data-drawn="1"') == 20 and dom.stdout.count('aria-label="loss curve"') == 17
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000

    retried = run_cli("retry-failed", str(job))
    assert "reset 3 failed subject(s): f03, f11, f17" in retried.stdout
    states = json.loads(run_cli("status", str(job), "--json").stdout)["summary"]["counts"]
    assert states["pending"] == 3 and states["failed"] == 0


def test_killed_fleet_resubmitted_publishes_every_subject_exactly_once(tmp_path, tiny_model, fleet_subjects):
    good = [e for e in fleet_subjects if e["id"] not in FLEET_BAD][:8]
    stale_after = 4
    job = write_job(tmp_path / "kill.yaml", job_dict(
        tiny_model, good, tmp_path / "out", name="kill", train={"steps": 40, "log_every": 10},
        output={"heartbeat_s": 1, "stale_after_s": stale_after}, distributed={"nproc_per_node": 2}))
    out = tmp_path / "out" / "kill"
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", "submit", str(job), "--backend", "local",
                              "--out", str(tmp_path / "r")], env=worker_env(), cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"))
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            states = [s["state"] for s in statuses(out).values()] if (out / "subjects").exists() else []
            if states.count("done") >= 2 and "running" in states:
                break
            if first.poll() is not None:
                pytest.fail("the fleet ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:])
            time.sleep(0.1)
        else:
            pytest.fail("the fleet never got going:\n" + (tmp_path / "first.log").read_text()[-3000:])
    finally:
        for pid in process_tree(first.pid):  # the launcher, torchrun and both workers, mid-subject
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait(timeout=60)
    killed_at = time.time()
    before = statuses(out)
    done_before = {sid for sid, s in before.items() if s["state"] == "done"}
    interrupted = {sid for sid, s in before.items() if s["state"] == "running"}
    assert len(done_before) >= 2 and interrupted
    manifest_times = {sid: (out / "subjects" / sid / "MANIFEST.json").stat().st_mtime_ns for sid in done_before}

    time.sleep(stale_after + 1)  # the dead workers' heartbeats go stale
    second = run_cli("submit", str(job), "--backend", "local", "--out", str(tmp_path / "r"))
    assert second.returncode == 0, second.stderr[-4000:]
    after = statuses(out)
    assert {sid: s["state"] for sid, s in after.items()} == {e["id"]: "done" for e in good}
    for sid, status in after.items():
        manifest = out / "subjects" / sid / "MANIFEST.json"
        assert (out / "subjects" / sid / "pytorch_lora_weights.safetensors").exists()
        if sid in done_before:  # finished before the kill: skipped, never republished
            assert manifest.stat().st_mtime_ns == manifest_times[sid]
            assert status["attempts"] == 1 and len(status["history"]) == 1
            assert f"subject {sid}: skipped (already done)" in second.stderr
        else:  # published once, by the second submit
            assert manifest.stat().st_mtime > killed_at and status["finished_at"] > killed_at
        if sid in interrupted:  # taken over from the dead worker under a new claim
            assert status["attempts"] == 2 and status["lease"] == 2
            assert "taking over a stale run" in second.stderr
            assert [h["lease"] for h in status["history"]] == [1, 2]


# ----------------------------------------------------------------------------- large fleets


def _ledger(job_uri: str, count: int, failed: int = 0, running: int = 0) -> None:
    from launcher import ledger
    from launcher.ledger import SubjectStatus

    for i in range(count):
        state = "failed" if i < failed else "running" if i < failed + running else "done"
        ledger.write_status(job_uri, SubjectStatus(id=f"c-{i:04d}", state=state, steps=10, step=10 if state == "done" else 3,
                                                   error="bad image" if state == "failed" else None,
                                                   started_at=1000.0 + i, finished_at=2000.0 + i if state == "done" else None))


def test_the_ledger_of_a_fleet_is_read_concurrently_and_in_order(s3):
    from launcher import ledger

    job_uri = f"s3://{s3['bucket']}/out/big"
    _ledger(job_uri, 120)
    s3["proxy"].reset()
    statuses = ledger.list_statuses(job_uri)
    assert [s.id for s in statuses] == [f"c-{i:04d}" for i in range(120)]
    assert s3["proxy"].count("GET", "status.json") == 120
    assert s3["proxy"].peak_in_flight > 1  # not one GET after another


def test_status_and_report_of_a_large_fleet_stay_readable(tmp_path, monkeypatch):
    """A fleet's status lists its unfinished subjects first, at most 40 (--all: every one); the
    report gives every failure in its table and every subject a card, the failed ones first (the
    cards are paged in the browser: tests/test_report.py)."""
    from launcher import report

    job_uri = str(tmp_path / "out" / "big")
    _ledger(job_uri, 250, failed=45, running=3)
    text = run_cli("status", job_uri).stdout
    rows = [line for line in text.splitlines() if "c-0" in line and not line.startswith(("failed c-", "stale: "))]
    assert len(rows) == 40 and all(" failed " in r or " running " in r for r in rows), rows
    assert "... and 210 more subjects" in text and "... and 5 more failures" in text
    assert "250 subjects: pending 0, running 3, done 202, failed 45" in text
    assert "stale: 3 running subject(s) with no heartbeat" in text  # _ledger's heartbeats are long past
    everything = run_cli("status", job_uri, "--all").stdout
    assert sum("c-0" in line and not line.startswith(("failed c-", "stale: ")) for line in everything.splitlines()) == 250
    page = report.render(job_uri)
    assert page.count("<section class='card") == 250
    assert all(f"<section class='card failed' id='subject-c-{i:04d}' data-i='{i}'" in page for i in range(45))
    failures = page[page.index("<section id=\"failures\">"):page.index("<section id=\"subjects\">")]
    assert failures.count("<tr><td><a href='#subject-c-") == 45


def test_status_throughput_and_eta_come_from_what_is_finished_and_what_is_left():
    t0 = 1_000_000.0
    done = SubjectStatus(id="a", state="done", step=100, steps=100, started_at=t0, finished_at=t0 + 100)
    # resumed after a preemption: started_at is the latest attempt's, the history keeps the first
    running = SubjectStatus(id="b", state="running", step=43, steps=300, started_at=t0 + 150, heartbeat_at=t0 + 199,
                            history=[{"attempt": 1, "at": t0 + 100}, {"attempt": 2, "at": t0 + 150}])
    summary = fleet.summarize([done, running], now=t0 + 200)
    assert summary["subjects_per_hour"] == pytest.approx(18.0)  # 1 done in 200 s of work
    assert summary["steps_left"] == 257
    assert summary["eta_s"] == pytest.approx(257 / (143 / 200))  # 6 min, not "0 min"
    assert fleet.format_duration(summary["eta_s"]) == "6 min" and fleet.format_duration(20) == "20 s"
    assert summary["stale_running"] == []
    assert fleet.summarize([done, running], now=t0 + 199 + 601)["stale_running"] == ["b"]
    assert fleet.summarize([done, running], now=t0 + 260, stale_after_s=30)["stale_running"] == ["b"]
