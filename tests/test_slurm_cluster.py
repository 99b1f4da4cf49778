"""The Slurm backend on a real two-node Slurm cluster: multi-node torchrun, an array job,
preemption with requeue and resume, and hostile strings that stay data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FLEET_BAD, job_dict, run_cli, run_worker, subject_entry, write_job
from slurm_cluster import wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HOSTILE = "a photo of sks dog $(touch /tmp/pwned-by-prompt) `id` \"quoted\" 'single' ; echo x\nnext line ünïcødé"


def slurm_job(tmp_path, tiny_model, subjects, **sections) -> Path:
    slurm = {"runtime": "none", "venv": sys.prefix, "log_dir": str(tmp_path / "logs"), "time": "00:20:00"}
    cluster = {"backend": "slurm", "slurm": slurm, **sections.pop("cluster", {})}
    return write_job(tmp_path / "job.yaml", job_dict(tiny_model, subjects, tmp_path / "out", cluster=cluster, **sections))


def submit(job: Path, env: dict, tmp_path: Path) -> str:
    proc = run_cli("submit", str(job), "--backend", "slurm", "--out", str(tmp_path / "rendered"), env=env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), proc.stdout
    return job_id


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*")))


def states(tmp_path: Path, name: str = "t") -> dict[str, str]:
    root = tmp_path / "out" / name / "subjects"
    return {p.name: json.loads((p / "status.json").read_text())["state"] for p in root.iterdir()}


def wait_until_training(tmp_path: Path, ids: list[str], min_step: int, timeout_s: float = 300) -> None:
    """Until every subject's heartbeat shows at least `min_step` steps trained."""
    root = tmp_path / "out" / "t" / "subjects"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        paths = [root / sid / "status.json" for sid in ids]
        if all(p.exists() and json.loads(p.read_text()).get("step", 0) >= min_step for p in paths):
            return
        time.sleep(0.2)
    pytest.fail(f"{', '.join(ids)} never reached step {min_step}:\n" + logs(tmp_path)[-3000:])


def test_two_node_zero2_job_trains_and_keeps_hostile_prompts_as_data(slurm_cluster, tmp_path, tiny_model, subjects_root):
    if os.path.exists("/tmp/pwned-by-prompt"):
        os.remove("/tmp/pwned-by-prompt")
    subjects = [subject_entry(subjects_root, 0, instance_prompt=HOSTILE), subject_entry(subjects_root, 1)]
    job = slurm_job(tmp_path, tiny_model, subjects,
                    distributed={"nnodes": 2, "nproc_per_node": 1, "strategy": "deepspeed", "zero_stage": 2},
                    train={"samples": {"enabled": True, "num_inference_steps": 1, "prompts": ["{instance}"]}})
    started = time.time()
    job_id = submit(job, slurm_cluster, tmp_path)
    wait_for_job(job_id, slurm_cluster, 420)
    text = logs(tmp_path)
    assert states(tmp_path) == {"s0": "done", "s1": "done"}, text[-4000:]
    # one torchrun agent per node, world size 2: both ranks train every subject together (ZeRO-2)
    assert "rank 0/2: 2 subject(s)" in text and "rank 1/2: 2 subject(s)" in text, text[-4000:]
    out = tmp_path / "out" / "t" / "subjects"
    assert (out / "s0" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "s0" / "samples" / "prompts.txt").read_text() == HOSTILE + "\n"
    assert not os.path.exists("/tmp/pwned-by-prompt")
    print(f"\n2-node sbatch-to-adapter: {time.time() - started:.1f}s\n--- log tail ---\n" + "\n".join(text.splitlines()[-12:]))


def test_twenty_subject_fleet_as_an_array_job(slurm_cluster, tmp_path, tiny_model, fleet_subjects):
    job = slurm_job(tmp_path, tiny_model, fleet_subjects, cluster={"shards": 4})
    proc = run_cli("submit", str(job), "--backend", "slurm", "--skip-invalid", "--out", str(tmp_path / "rendered"),
                   env=slurm_cluster)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3" in (tmp_path / "rendered" / "job.sbatch").read_text()
    plan = json.loads((tmp_path / "rendered" / "plan.json").read_text())
    assert max(plan["shard_work"]) - min(plan["shard_work"]) <= max(s["work"] for s in plan["subjects"].values())
    started = time.time()
    wait_for_job(proc.stdout.strip().splitlines()[-1], slurm_cluster, 600)
    wall = time.time() - started
    text = logs(tmp_path)
    expected = {e["id"]: "failed" if e["id"] in FLEET_BAD else "done" for e in fleet_subjects}
    assert states(tmp_path) == expected, text[-4000:]
    # every shard ran as its own array task and trained exactly the subjects the plan gave it
    for shard in range(4):
        mine = sorted(sid for sid, s in plan["subjects"].items() if s["shard"] == shard)
        listed = next(line for line in text.splitlines() if f"shard {shard}/4, rank 0/1" in line)
        assert listed.endswith(", ".join(mine)), listed
    print(f"\nSlurm array of 4 shards: 17 of 20 subjects in {wall:.0f}s ({17 / wall * 3600:.0f} subjects/hour)")

    # one subject of shard 2 is given another attempt: the resubmitted array runs that shard alone
    again_sid = min(sid for sid, s in plan["subjects"].items() if s["shard"] == 2 and sid not in FLEET_BAD)
    status_file = tmp_path / "out" / "t" / "subjects" / again_sid / "status.json"
    status = json.loads(status_file.read_text())
    status.update(state="failed", error="simulated: trained on a bad node")
    status_file.write_text(json.dumps(status))
    again = run_cli("submit", str(job), "--backend", "slurm", "--out", str(tmp_path / "rendered"), env=slurm_cluster)
    assert again.returncode == 0, again.stderr
    assert "#SBATCH --array=2" in (tmp_path / "rendered" / "job.sbatch").read_text().splitlines()
    job_id = again.stdout.strip().splitlines()[-1]
    wait_for_job(job_id, slurm_cluster, 300)
    assert states(tmp_path) == expected
    assert json.loads(status_file.read_text())["attempts"] == 2
    second = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob(f"*-{job_id}_*")))
    assert sorted(p.name.rsplit("_", 1)[1] for p in (tmp_path / "logs").glob(f"*-{job_id}_*")) == ["2.err", "2.out"]
    assert f"subject {again_sid}: training (retrying after failure" in second, second[-3000:]


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, tiny_model, subjects_root):
    steps = 300
    train = {"steps": steps, "log_every": 50}
    subjects = [subject_entry(subjects_root, 0)]
    straight = write_job(tmp_path / "straight.yaml", job_dict(tiny_model, subjects, tmp_path / "straight", train=train))
    assert run_worker(straight).returncode == 0

    job = slurm_job(tmp_path, tiny_model, subjects, train=train, output={"heartbeat_s": 1})
    job_id = submit(job, slurm_cluster, tmp_path)
    status_path = tmp_path / "out" / "t" / "subjects" / "s0" / "status.json"
    wait_until_training(tmp_path, ["s0"], 10)
    env = dict(os.environ, **slurm_cluster)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    # Slurm holds a requeued job back until the old run's credential expires (cred_expire: 10 s
    # on the test cluster). Forcing an earlier start races the node's cleanup of the old run
    # ("Job credential revoked": the new run dies before it starts)
    wait_for_job(job_id, slurm_cluster, 600)
    text = logs(tmp_path)
    status = json.loads(status_path.read_text())
    assert status["state"] == "done" and status["attempts"] == 2, text[-4000:]
    assert "asking workers to checkpoint" in text and "requeueing job" in text and "resuming from step-" in text
    a = load_file(tmp_path / "straight" / "t" / "subjects" / "s0" / "adapter" / "unet" / "adapter_model.safetensors")
    b = load_file(tmp_path / "out" / "t" / "subjects" / "s0" / "adapter" / "unet" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")))
            except OSError:
                continue
    return found


def test_a_workers_exit_75_alone_requeues_the_job(slurm_cluster, tmp_path, tiny_model, subjects_root):
    """No USR1, no scancel: the worker itself stops with 75 (here SIGTERM straight to the worker
    process, as a node agent or an operator might send). The code must pass through torchrun and
    srun to the batch script, which requeues; the job then finishes from its checkpoint."""
    job = slurm_job(tmp_path, tiny_model, [subject_entry(subjects_root, 0)], train={"steps": 300, "log_every": 50},
                    output={"heartbeat_s": 1})
    job_id = submit(job, slurm_cluster, tmp_path)
    wait_until_training(tmp_path, ["s0"], 10)
    # the workers alone: not srun or the agent, whose command lines also name training.worker
    workers = [pid for pid, argv in _processes() if "training.worker" in argv and "training.agent" not in argv
               and argv[0] != "srun" and str(tmp_path / "rendered" / "job.yaml") in argv]
    assert workers, "no worker process found"
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    wait_for_job(job_id, slurm_cluster, 600)
    text = logs(tmp_path)
    status = json.loads((tmp_path / "out" / "t" / "subjects" / "s0" / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 2, text[-4000:]
    assert "requeueing job" in text and "resuming from step-" in text, text[-4000:]
    assert "asking workers to checkpoint" not in text  # the batch shell never got a signal


def test_cancel_by_job_file_stops_every_running_array_task_without_requeue(slurm_cluster, tmp_path, tiny_model,
                                                                           subjects_root):
    """`launcher cancel job.yaml` while both array tasks train: scancel's SIGTERM is a stop, not a
    preemption: the workers checkpoint and exit, the job leaves the queue and is not requeued."""
    subjects = [subject_entry(subjects_root, i) for i in range(2)]
    job = slurm_job(tmp_path, tiny_model, subjects, train={"steps": 5000, "log_every": 50},
                    output={"heartbeat_s": 1}, cluster={"shards": 2})
    job_id = submit(job, slurm_cluster, tmp_path)
    wait_until_training(tmp_path, ["s0", "s1"], 5)
    status_root = tmp_path / "out" / "t" / "subjects"
    proc = run_cli("cancel", str(job), env=slurm_cluster)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cancelled {job_id} (t)", proc.stdout + proc.stderr
    wait_for_job(job_id, slurm_cluster, 120)
    text = logs(tmp_path)
    assert text.count("not requeueing") == 2 and "requeueing job" not in text, text[-4000:]
    for sid in ("s0", "s1"):
        status = json.loads((status_root / sid / "status.json").read_text())
        # checkpointed and left for a resubmission, after one attempt: nothing trained on
        assert status["state"] == "pending" and status["attempts"] == 1 and status["step"] < 5000, status
        assert (status_root / sid / "checkpoints" / "latest").exists()
    again = run_cli("cancel", str(job), env=slurm_cluster)
    assert again.returncode == 0 and "no Slurm job named t in the queue" in again.stdout, again.stderr