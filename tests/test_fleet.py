"""A small fleet through the local backend with two processes: bad subjects are recorded as
failed with their reason, the rest get adapters; status counts and report.html (rendered in
headless Chromium, screenshot kept under test-artifacts/) show every subject; retry-failed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, job_dict, require_binary, run_cli, subject_entry, write_job
from training.tiny import write_subject_images

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"


def test_fleet_with_bad_subjects_status_report_and_retry(tmp_path, tiny_model):
    root = tmp_path / "subjects"
    for i in range(6):
        write_subject_images(root / f"subject-{i}", i, count=2, size=40)
    data = (root / "subject-4" / "000.png").read_bytes()
    (root / "subject-4" / "000.png").write_bytes(data[:50])  # truncated
    shutil.rmtree(root / "subject-5")
    (root / "subject-5").mkdir()  # empty
    subjects = [subject_entry(root, i) for i in range(6)]
    job = write_job(tmp_path / "fleet.yaml", job_dict(
        tiny_model, subjects, tmp_path / "out", name="fleet",
        train={"steps": 2, "samples": {"enabled": True, "num_inference_steps": 1}},
        distributed={"nproc_per_node": 2}))
    started = time.time()
    proc = run_cli("submit", str(job), "--backend", "local", "--skip-invalid", "--out", str(tmp_path / "r"))
    wall = time.time() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "skipping subject s4" in proc.stderr and "skipping subject s5" in proc.stderr

    status = run_cli("status", str(tmp_path / "out" / "fleet"), "--json")
    summary = json.loads(status.stdout)["summary"]
    assert summary["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 2}
    errors = {f["id"]: f["error"] for f in summary["failures"]}
    assert "000.png cannot be decoded" in errors["s4"] and "holds no images" in errors["s5"]
    assert summary["subjects_per_hour"] > 0
    print(f"\nfleet: 4 subjects trained in {wall:.1f}s wall ({4 / wall * 3600:.0f} subjects/hour with start-up)")

    text = run_cli("status", str(job)).stdout
    assert "6 subjects: pending 0, running 0, done 4, failed 2" in text

    report = tmp_path / "report.html"
    assert run_cli("report", str(job), "--out", str(report)).returncode == 0
    page = report.read_text()
    assert all(f"id='subject-s{i}'" in page for i in range(6)) and page.count("<svg") == 4
    assert page.count("data:image/png;base64,") == 4

    require_binary("chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fleet-report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert all(f'id="subject-s{i}"' in dom.stdout for i in range(6)), dom.stderr[-2000:]
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000

    retried = run_cli("retry-failed", str(job))
    assert "reset 2 failed subject(s): s4, s5" in retried.stdout
    states = json.loads(run_cli("status", str(job), "--json").stdout)["summary"]["counts"]
    assert states["pending"] == 2 and states["failed"] == 0
