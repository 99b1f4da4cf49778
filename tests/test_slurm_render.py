"""Golden files of the rendered Slurm batch script. On a deliberate change, regenerate with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_slurm_render.py
"""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest

from launcher.config import job_from_dict
from launcher.plan import make_plan
from launcher.render.slurm import render_sbatch

GOLDEN = Path(__file__).parent / "golden" / "slurm"
JOB_FILE = "/shared/dreamfleet/jobs/pets/job.yaml"
SUBJECTS = [{"id": f"dog-{i}", "images": f"s3://photos/dog-{i}/", "instance_prompt": "a photo of sks dog"} for i in range(8)]


def job(**cluster) -> dict:
    slurm = cluster.pop("slurm", {})
    distributed = cluster.pop("distributed", {"nnodes": 1, "nproc_per_node": 8})
    return {"name": "pets", "model": {"source": "s3://models/sd15"}, "subjects": SUBJECTS,
            "output": {"uri": "s3://adapters"}, "distributed": distributed,
            "cluster": {"backend": "slurm", "image": "registry.example.com/dreamfleet:0.1.0",
                        "slurm": {"partition": "gpu", "account": "vision", "time": "08:00:00", "gpus_per_node": 8,
                                  "cpus_per_task": 64, "mem": "480G", **slurm}, **cluster}}


CASES = {
    "one-node-venv": job(slurm={"runtime": "none", "venv": "/shared/venvs/dreamfleet"}),
    "two-nodes-pyxis": job(distributed={"nnodes": 2, "nproc_per_node": 8, "strategy": "deepspeed"},
                           slurm={"runtime": "pyxis", "mounts": ["/lustre/models:/models:ro"], "exclusive": True,
                                  "qos": "high", "constraint": "h100", "extra": ["--reservation=pets"]}),
    "apptainer": job(slurm={"runtime": "apptainer", "mounts": ["/scratch:/scratch"], "gres": "gpu:a100:8"}),
    "podman": job(slurm={"runtime": "podman", "mounts": ["/data:/data:ro"], "max_requeues": 1, "signal_grace_s": 300}),
    "array": job(shards=4, slurm={"runtime": "pyxis", "array_throttle": 2}, env={"HF_HUB_OFFLINE": "1"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name):
    cfg = job_from_dict(CASES[name])
    text = render_sbatch(cfg, make_plan(cfg, len(SUBJECTS)), JOB_FILE)
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
        pytest.fail(f"{path.name} differs from the renderer; if intended, regenerate with "
                    f"UPDATE_GOLDEN=1 pytest {Path(__file__).name}\n{diff}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_is_valid_bash(name):
    cfg = job_from_dict(CASES[name])
    text = render_sbatch(cfg, make_plan(cfg, len(SUBJECTS)), JOB_FILE)
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_rendering_is_deterministic_and_secret_free(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")
    cfg = job_from_dict(CASES["array"])
    first = render_sbatch(cfg, make_plan(cfg, 8), JOB_FILE)
    assert first == render_sbatch(cfg, make_plan(cfg, 8), JOB_FILE)
    assert "planted-secret-value" not in first
    assert "#SBATCH --array=0-3%2" in first


def test_user_strings_are_quoted():
    data = job(slurm={"runtime": "podman", "mounts": ["/a b:/c;rm -rf /"], "venv": "/x"})
    cfg = job_from_dict(data)
    text = render_sbatch(cfg, make_plan(cfg, 1), "/jobs/it's here/job.yaml")
    assert "-v '/a b:/c;rm -rf /'" in text
    assert "--job '/jobs/it'\"'\"'s here/job.yaml'" in text
