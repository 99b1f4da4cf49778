"""The CLI as a user runs it: fast help without torch, local submit, dry run, status, the demo,
and every shipped example validates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, worker_env


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from launcher.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'training')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_shipped_example_validates(example):
    proc = run_cli("validate", str(REPO / "examples" / example), "--no-inputs")
    assert proc.returncode == 0, proc.stderr


def test_local_submit_dry_run_prints_the_command(make_job, tmp_path):
    job = make_job()
    proc = run_cli("submit", str(job), "--backend", "local", "--dry-run", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "training.agent --standalone --nnodes=1 --nproc-per-node=1 -m training.worker" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing trained


@pytest.mark.slow
def test_local_submit_trains_and_status_reports(make_job, tmp_path):
    job = make_job(n_subjects=2)
    proc = run_cli("submit", str(job), "--backend", "local", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit 0" in proc.stdout and "s0" in proc.stdout and "done" in proc.stdout
    proc = run_cli("status", str(tmp_path / "out" / "t"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    states = {s["id"]: s["state"] for s in report["subjects"]}
    assert states == {"s0": "done", "s1": "done"}
    assert report["summary"]["counts"]["done"] == 2


@pytest.mark.slow
def test_demo_builds_its_assets_and_trains(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "demo", "train.steps=3", "prior.num_class_images=1",
                           "prior.sample_steps=1", "train.samples.num_inference_steps=1"],
                          cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    root = tmp_path / "outputs" / "quickstart" / "subjects"
    for sid in ("red-ball", "green-box", "blue-ball"):
        assert (root / sid / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((root / sid / "status.json").read_text())["state"] == "done"
    assert "adapters under ./outputs/quickstart/subjects/" in proc.stdout
    assert "report: ./outputs/quickstart/report.html" in proc.stdout
    # the first run a user sees: no progress-bar noise, no warnings about parts it does not use
    assert not any(noise in proc.stderr for noise in ("Loading weights", " WARNING ", "[transformers]")), proc.stderr[-3000:]
    page = (tmp_path / "outputs" / "quickstart" / "report.html").read_text()
    assert all(f"id='subject-{sid}'" in page for sid in ("red-ball", "green-box", "blue-ball"))
