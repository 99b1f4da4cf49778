"""Data-parallel strategies on CPU with 2 gloo processes under torchrun: DDP equals one process
on the same global batch; ZeRO-2 and ZeRO-3 with AdamW and AdamW8bit save full adapters that
diffusers loads; subject-parallel ranks each train their own subjects, equal to alone."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_worker

pytestmark = pytest.mark.slow


def adapter(tmp_path, name="t", sid="s0"):
    return load_file(tmp_path / "out" / name / "subjects" / sid / "adapter" / "unet" / "adapter_model.safetensors")


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_equals_one_process_with_the_same_global_batch(make_job, tmp_path):
    """AdamW with its usual eps=1e-8 moves an element with a near-zero gradient by +-lr on the
    sign alone, which turns 1e-9 reduction-order noise (a batch of 2 vs 2 ranks of 1) into a
    full step; eps=1.0 makes the update proportional to the gradient, so this compares what DDP
    must get right: the same objective and the exact average of the ranks' gradients."""
    train = {"steps": 4, "eps": 1.0, "learning_rate": 0.5}
    one = run_worker(make_job(name="one", train={**train, "batch_size": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_worker(make_job(name="ddp", train={**train, "batch_size": 1}, distributed={"strategy": "ddp", "nproc_per_node": 2}),
                     nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert max_diff(adapter(tmp_path, "one"), adapter(tmp_path, "ddp")) < 1e-5


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_zero_trains_and_saves_a_full_adapter_diffusers_loads(make_job, tmp_path, tiny_model, stage, optimizer):
    from diffusers import StableDiffusionPipeline

    job = make_job(name="z", train={"steps": 3, "optimizer": optimizer},
                   distributed={"strategy": "deepspeed", "zero_stage": stage, "nproc_per_node": 2})
    proc = run_worker(job, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = adapter(tmp_path, "z")
    assert saved and all(v.numel() > 0 for v in saved.values())
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "out" / "z" / "subjects" / "s0")
    status = json.loads((tmp_path / "out" / "z" / "subjects" / "s0" / "status.json").read_text())
    assert status["state"] == "done"


def test_zero3_adapter_equals_zero2(make_job, tmp_path):
    """ZeRO-3 shards every parameter; the saved adapter must be the gathered whole, the same as
    ZeRO-2's (which keeps parameters whole) for the same run."""
    for stage in (2, 3):
        proc = run_worker(make_job(name=f"z{stage}", train={"steps": 3},
                                   distributed={"strategy": "deepspeed", "zero_stage": stage, "nproc_per_node": 2}), nproc=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert max_diff(adapter(tmp_path, "z2"), adapter(tmp_path, "z3")) < 1e-5


def test_subject_parallel_ranks_train_their_own_subjects_like_alone(make_job, tmp_path):
    both = run_worker(make_job(n_subjects=4, name="par", distributed={"nproc_per_node": 2}), nproc=2)
    assert both.returncode == 0, both.stderr[-4000:]
    assert "rank 0/2: 2 subject(s)" in both.stderr and "rank 1/2: 2 subject(s)" in both.stderr
    for i in range(4):
        status = json.loads((tmp_path / "out" / "par" / "subjects" / f"s{i}" / "status.json").read_text())
        assert status["state"] == "done" and status["attempts"] == 1
    alone = run_worker(make_job(name="alone"))
    assert alone.returncode == 0
    assert max_diff(adapter(tmp_path, "par", "s0"), adapter(tmp_path, "alone", "s0")) < 1e-6


def test_two_torchrun_agents_rendezvous_and_train_with_zero2(make_job, tmp_path):
    """Two nodes on one machine: two torchrun agents meet in a c10d rendezvous on 127.0.0.1."""
    import socket
    import subprocess
    import sys

    from conftest import REPO, worker_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = make_job(name="nodes", train={"steps": 3},
                   distributed={"strategy": "deepspeed", "zero_stage": 2, "nnodes": 2, "nproc_per_node": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "-m", "training.worker", "--job", str(job)]
    agents = [subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [a.communicate(timeout=600)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "rank 0/2: 1 subject(s)" in errs[0] + errs[1] and "rank 1/2: 1 subject(s)" in errs[0] + errs[1]
    status = json.loads((tmp_path / "out" / "nodes" / "subjects" / "s0" / "status.json").read_text())
    assert status["state"] == "done"


def _assert_adapter_equals_the_shards(folder):
    """The checkpoint's adapter file (gathered on rank 0) against the adapter DeepSpeed's own
    zero_to_fp32 assembles from the per-rank optimizer shards in the same checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = load_file(folder / "adapter_unet.safetensors")
    shards = get_fp32_state_dict_from_zero_checkpoint(str(folder / "engine"), tag="state")
    assembled = {k.replace(".default", ""): v for k, v in shards.items() if "lora_" in k}
    assert saved and len(saved) == len(assembled), (sorted(saved)[:3], sorted(assembled)[:3])
    assert max_diff(saved, assembled) == 0.0


def _preempt_then_resume(job, tmp_path, name: str, min_step: int = 2):
    """Start a 2-process run, send SIGUSR1 to one worker once the heartbeat shows `min_step`
    (the other learns it in the step's all-reduce), check the checkpoint, then run it again."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO, worker_env

    subject = tmp_path / "out" / name / "subjects" / "s0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "training.worker", "--job", str(job)]
    agent = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None:
        status_path = subject / "status.json"
        if status_path.exists():
            status = json.loads(status_path.read_text())
            if status["state"] == "running" and status.get("step", 0) >= min_step:
                break
        time.sleep(0.1)
    workers = psutil.Process(agent.pid).children()
    assert workers, "torchrun has no workers"
    workers[0].send_signal(signal.SIGUSR1)
    _, stderr = agent.communicate(timeout=300)
    (tmp_path / "preempted.log").write_text(stderr)
    status = json.loads((subject / "status.json").read_text())
    assert status["state"] == "pending" and 0 < status["step"], (status, stderr[-4000:])
    assert (subject / "checkpoints" / "latest").exists()
    latest = (subject / "checkpoints" / "latest").read_text().strip()
    if "zero_stage" in job.read_text():
        _assert_adapter_equals_the_shards(subject / "checkpoints" / latest)
    again = run_worker(job, nproc=2)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {latest}" in again.stderr
    status = json.loads((subject / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 2
    return subject


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_preempted_run_resumes_to_the_straight_result(make_job, tmp_path, tiny_model, strategy):
    """Checkpoint at preemption (DeepSpeed: its own checkpoint with one optimizer shard per rank,
    and the gathered adapter), resume, and end where an uninterrupted run ends."""
    distributed = {"strategy": "ddp", "nproc_per_node": 2} if strategy == "ddp" else \
        {"strategy": "deepspeed", "zero_stage": int(strategy[-1]), "nproc_per_node": 2}
    train = {"steps": 40, "optimizer": "adamw8bit" if strategy == "zero3" else "adamw", "lr_scheduler": "cosine",
             "log_every": 10}
    straight = run_worker(make_job(name="straight", train=train, distributed=distributed), nproc=2)
    assert straight.returncode == 0, straight.stderr[-4000:]
    job = make_job(name="resumed", train=train, distributed=distributed, output={"heartbeat_s": 1})
    _preempt_then_resume(job, tmp_path, "resumed")
    assert max_diff(adapter(tmp_path, "straight"), adapter(tmp_path, "resumed")) < 1e-5
