"""pytest plugin: one real two-node Slurm cluster per test session (slurm/cluster.sh).

Tests that use `slurm_cluster` skip without slurm-wlm/munge locally and fail under CI=true.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Environment (SLURM_CONF) for a running two-node cluster; torn down after the session."""
    from conftest import require_binary

    require_binary("slurmctld", "slurmd", "munged", "sbatch")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root")
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=120)
    if up.returncode:
        pytest.fail(f"slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    env = {"SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, timeout=60)


def wait_for_job(job_id: str, env: dict, timeout_s: float) -> None:
    """Until the job (all array tasks, requeues included) has left the queue."""
    deadline = time.time() + timeout_s
    full = dict(os.environ, **env)
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True, env=full)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=full)
    raise AssertionError(f"Slurm job {job_id} still queued after {timeout_s}s")
