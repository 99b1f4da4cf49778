"""Data-parallel strategies on CPU with 2 gloo processes under torchrun: DDP equals one process
on the same global batch; ZeRO-2 and ZeRO-3 with AdamW and AdamW8bit save full adapters that
diffusers loads; subject-parallel ranks each train their own subjects, equal to alone."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_worker

pytestmark = pytest.mark.slow


def adapter(tmp_path, name="t", sid="s0", part="unet"):
    return load_file(tmp_path / "out" / name / "subjects" / sid / "adapter" / part / "adapter_model.safetensors")


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_equals_one_process_with_the_same_global_batch(make_job, tmp_path):
    """AdamW with its usual eps=1e-8 moves an element with a near-zero gradient by +-lr on the
    sign alone, which turns 1e-9 reduction-order noise (a batch of 2 vs 2 ranks of 1) into a
    full step; eps=1.0 makes the update proportional to the gradient, so this compares what DDP
    must get right: the same objective and the exact average of the ranks' gradients. Two
    subjects in one run: the second starts from the same adapter as alone (nothing carries over
    from the first's engine); DDP recomputes activations (gradient checkpointing), which changes
    memory, not the result."""
    train = {"steps": 4, "eps": 1.0, "learning_rate": 0.5}
    one = run_worker(make_job(n_subjects=2, name="one", train={**train, "batch_size": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_worker(make_job(n_subjects=2, name="ddp", train={**train, "batch_size": 1, "gradient_checkpointing": True},
                              distributed={"strategy": "ddp", "nproc_per_node": 2}), nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert "gradient checkpointing on the unet" in ddp.stderr
    for sid in ("s0", "s1"):
        assert max_diff(adapter(tmp_path, "one", sid=sid), adapter(tmp_path, "ddp", sid=sid)) < 1e-5, sid


def test_ddp_with_a_text_encoder_adapter_equals_one_process(make_job, tmp_path):
    """The text encoder's adapter trains jointly with the UNet's under DDP (one wrapper, one
    optimizer with two parameter groups): both adapters equal one process on the same global
    batch, and the published folder has the same files as the single-process run's. The cosine
    schedule must advance once per step (accelerate's default steps it once per process)."""
    te = {"adapter": {"type": "lora", "rank": 4, "text_encoder": {"type": "lora", "rank": 2, "targets": "comprehensive"}}}
    train = {"steps": 4, "eps": 1.0, "learning_rate": 0.5, "text_encoder_learning_rate": 0.25, "lr_scheduler": "cosine"}
    one = run_worker(make_job(name="one", train={**train, "batch_size": 2}, **te))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_worker(make_job(name="ddp", train={**train, "batch_size": 1}, distributed={"strategy": "ddp", "nproc_per_node": 2},
                              **te), nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    for part in ("unet", "text_encoder"):
        assert max_diff(adapter(tmp_path, "one", part=part), adapter(tmp_path, "ddp", part=part)) < 1e-5, part
    trained = adapter(tmp_path, "ddp", part="text_encoder")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # trained, not the zero init
    files = {name: sorted(p.relative_to(tmp_path / "out" / name / "subjects" / "s0").as_posix()
                          for p in (tmp_path / "out" / name / "subjects" / "s0").rglob("*")
                          if p.is_file() and p.name not in ("status.json", "MANIFEST.json") and "checkpoints" not in p.parts)
             for name in ("one", "ddp")}
    assert files["one"] == files["ddp"] and "adapter/text_encoder/adapter_model.safetensors" in files["ddp"]


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


def test_zero3_adapters_equal_zero2_with_a_text_encoder_adapter(make_job, tmp_path):
    """ZeRO-3 shards every parameter; the saved adapters, the UNet's and the text encoder's (both
    trained in one engine), must be the gathered whole, the same as ZeRO-2's (which keeps
    parameters whole) for the same run, and not empty. ZeRO-3 recomputes the UNet's activations
    (gradient checkpointing re-gathers the partitioned weights in backward): the same result."""
    te = {"type": "lora", "rank": 2, "targets": "comprehensive"}
    for stage in (2, 3):
        proc = run_worker(make_job(name=f"z{stage}", train={"steps": 3, "gradient_checkpointing": stage == 3},
                                   adapter={"type": "lora", "rank": 4, "text_encoder": te},
                                   distributed={"strategy": "deepspeed", "zero_stage": stage, "nproc_per_node": 2}), nproc=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("gradient checkpointing on the unet" in proc.stderr) == (stage == 3)
    for part in ("unet", "text_encoder"):
        saved = adapter(tmp_path, "z2", part=part)
        assert saved and all(v.numel() > 0 for v in saved.values()), part
        assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k), part  # trained, not the zero init
        assert max_diff(saved, adapter(tmp_path, "z3", part=part)) < 1e-5, part


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


def _start_two_agents(job, tmp_dirs):
    """Two nodes on one machine: two torchrun agents meet in a c10d rendezvous on 127.0.0.1, each
    with its own TMPDIR, so that each node stages files where the other cannot look."""
    import socket
    import subprocess
    import sys

    from conftest import REPO, worker_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}", "-m", "training.worker", "--job", str(job)]
    for tmp in tmp_dirs:
        tmp.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(cmd, env=worker_env({"TMPDIR": str(tmp)}), cwd=REPO, stderr=subprocess.PIPE, text=True)
            for tmp in tmp_dirs]


def _rank_of(stderr: str) -> int:
    import re

    ranks = set(re.findall(r" rank(\d) INFO ", stderr))
    assert len(ranks) == 1, ranks
    return int(ranks.pop())


def test_two_nodes_publish_their_own_shards_and_resume_to_the_straight_result(make_job, tmp_path):
    """Two torchrun agents (nodes) with separate TMPDIRs train one subject with ZeRO-2 and are
    preempted: each node publishes its own rank's optimizer shard to the checkpoint (no shared
    staging disk), rank 0 writes the manifest last; the resumed two-node run fetches, per rank,
    rank 0's part and its own, and ends where a straight run ends."""
    import signal
    import time

    import psutil

    train = {"steps": 40, "lr_scheduler": "cosine", "log_every": 10}
    straight = run_worker(make_job(name="straight", train=train,
                                   distributed={"strategy": "deepspeed", "zero_stage": 2, "nproc_per_node": 2}), nproc=2)
    assert straight.returncode == 0, straight.stderr[-4000:]
    job = make_job(name="nodes", train=train, output={"heartbeat_s": 1},
                   distributed={"strategy": "deepspeed", "zero_stage": 2, "nnodes": 2, "nproc_per_node": 1})
    subject = tmp_path / "out" / "nodes" / "subjects" / "s0"
    tmp_dirs = [tmp_path / "node-a-tmp", tmp_path / "node-b-tmp"]

    agents = _start_two_agents(job, tmp_dirs)
    deadline = time.time() + 240
    while time.time() < deadline and all(a.poll() is None for a in agents):
        if (subject / "status.json").exists():
            status = json.loads((subject / "status.json").read_text())
            if status["state"] == "running" and status.get("step", 0) >= 2:
                break
        time.sleep(0.1)
    workers = psutil.Process(agents[1].pid).children()
    assert workers, "the second agent has no worker"
    workers[0].send_signal(signal.SIGUSR1)  # one node is preempted; the other learns it in the step's all-reduce
    errs = [a.communicate(timeout=300)[1] for a in agents]
    (tmp_path / "preempted-a.log").write_text(errs[0])
    (tmp_path / "preempted-b.log").write_text(errs[1])
    status = json.loads((subject / "status.json").read_text())
    assert status["state"] == "pending" and 0 < status["step"] < 40, (status, errs[0][-3000:], errs[1][-3000:])
    latest = (subject / "checkpoints" / "latest").read_text().strip()
    for err, tmp in zip(errs, tmp_dirs):
        rank = _rank_of(err)
        assert f"rank {rank} stages checkpoints in {tmp}/" in err, err[-3000:]
        assert f"published the engine files of rank(s) {rank}\n" in err, err[-3000:]  # its own node's, only
    _assert_adapter_equals_the_shards(subject / "checkpoints" / latest, tmp_path)

    agents = _start_two_agents(job, tmp_dirs)
    errs = [a.communicate(timeout=300)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    for err in errs:
        rank = _rank_of(err)
        assert f"resuming from {latest}" in err
        fetched = "0" if rank == 0 else "0, 1"  # rank 0's part (module file) and its own shard
        assert f"rank {rank} fetched the engine part(s) of rank(s) {fetched}\n" in err, err[-3000:]
    status = json.loads((subject / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 2
    assert max_diff(adapter(tmp_path, "straight"), adapter(tmp_path, "nodes")) < 1e-5
    assert not any(any(tmp.rglob("dreamfleet-*")) for tmp in tmp_dirs)  # staging cleaned up


def _engine_from_parts(folder, dest):
    """One DeepSpeed checkpoint folder assembled from the per-rank parts of a published checkpoint
    (each part a complete artifact with its own manifest)."""
    import shutil

    parts = sorted((folder / "engine").glob("rank-*"))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert [int(p.name.removeprefix("rank-")) for p in parts] == manifest["engine_ranks"]
    for part in parts:
        assert (part / "MANIFEST.json").exists(), part
        shutil.copytree(part, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("MANIFEST.json"))
    return dest


def _assert_adapter_equals_the_shards(folder, tmp_path):
    """The checkpoint's adapter files (gathered on rank 0) against the adapters DeepSpeed's own
    zero_to_fp32 assembles from the per-rank optimizer shards in the same checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = _engine_from_parts(folder, tmp_path / "assembled-engine")
    shards = get_fp32_state_dict_from_zero_checkpoint(str(engine), tag="state")
    files = sorted(folder.glob("adapter_*.safetensors"))
    prefixes = {"unet": "unet.", "text_encoder": "text_encoder."} if len(files) > 1 else {"unet": ""}
    for file in files:
        part = file.stem.removeprefix("adapter_")
        saved = load_file(file)
        assembled = {k.removeprefix(prefixes[part]).replace(".default", ""): v for k, v in shards.items()
                     if "lora_" in k and k.startswith(prefixes[part])}
        assert saved and len(saved) == len(assembled), (part, sorted(saved)[:3], sorted(assembled)[:3])
        assert max_diff(saved, assembled) == 0.0, part


def _preempt_then_resume(job, tmp_path, name: str, min_step: int = 2, on_preempted=None):
    """Start a 2-process run, send SIGUSR1 to one worker as soon as its progress line shows
    `min_step` (the other learns it in the step's all-reduce), check the checkpoint, then run it
    again (after `on_preempted(checkpoint_name)`, if given). The progress line, not the heartbeat:
    a heartbeat is a second apart, in which a fast machine trains the whole run."""
    import re
    import signal
    import subprocess
    import sys
    import threading

    import psutil

    from conftest import REPO, worker_env

    subject = tmp_path / "out" / name / "subjects" / "s0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "training.worker", "--job", str(job)]
    agent = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in agent.stderr:
            lines.append(line)
            step = re.search(r" step (\d+)/\d+ ", line)
            if step and int(step.group(1)) >= min_step:
                reached.set()
        reached.set()  # the run ended: nothing more to wait for

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert reached.wait(240) and agent.poll() is None, "the run ended before it could be preempted:\n" + "".join(lines)[-4000:]
    workers = psutil.Process(agent.pid).children()
    assert workers, "torchrun has no workers"
    workers[0].send_signal(signal.SIGUSR1)
    agent.wait(timeout=300)
    reader.join(timeout=60)
    stderr = "".join(lines)
    (tmp_path / "preempted.log").write_text(stderr)
    status = json.loads((subject / "status.json").read_text())
    assert status["state"] == "pending" and 0 < status["step"], (status, stderr[-4000:])
    assert (subject / "checkpoints" / "latest").exists()
    latest = (subject / "checkpoints" / "latest").read_text().strip()
    if "zero_stage" in job.read_text():
        _assert_adapter_equals_the_shards(subject / "checkpoints" / latest, tmp_path)
    if on_preempted:
        on_preempted(latest)
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
    # ZeRO-3 with a text-encoder adapter too: one engine restores both adapters
    te = {"adapter": {"type": "lora", "rank": 4, "text_encoder": {"type": "lora", "rank": 2}}} if strategy == "zero3" else {}
    straight = run_worker(make_job(name="straight", train=train, distributed=distributed, **te), nproc=2)
    assert straight.returncode == 0, straight.stderr[-4000:]
    job = make_job(name="resumed", train=train, distributed=distributed, output={"heartbeat_s": 1}, **te)

    def a_single_process_takes_it_up(latest: str) -> None:
        """The same preempted subject, resumed by a single-process run (the job's strategy
        changed): it continues from the DDP checkpoint's adapter, schedule and step."""
        import shutil

        shutil.copytree(tmp_path / "out" / "resumed", tmp_path / "out" / "single")
        one = run_worker(make_job(name="single", train={**train, "batch_size": 2}))
        assert one.returncode == 0, one.stderr[-4000:]
        assert f"resuming from {latest} at step" in one.stderr
        assert "the checkpoint is a ddp run's; the adapter and the LR schedule resume" in one.stderr
        status = json.loads((tmp_path / "out" / "single" / "subjects" / "s0" / "status.json").read_text())
        assert status["state"] == "done" and status["attempts"] == 2

    _preempt_then_resume(job, tmp_path, "resumed", on_preempted=a_single_process_takes_it_up if strategy == "ddp" else None)
    for part in ("unet", "text_encoder") if te else ("unet",):
        assert max_diff(adapter(tmp_path, "straight", part=part), adapter(tmp_path, "resumed", part=part)) < 1e-5, part


def test_zero2_offload_trains_with_deepspeed_cpu_adam_saves_and_resumes(make_job, tmp_path):
    """ZeRO-Offload: the optimizer state and step live on the host, in DeepSpeed's own CPU Adam
    (JIT-built with the system compiler on first use), which replaces a requested AdamW8bit with
    a logged warning (and a `launcher validate` note). Preempted and resumed, the run ends where
    a straight one ends, and the saved adapter is complete and trained."""
    from launcher.config import load_job
    from launcher.validate import check_job

    distributed = {"strategy": "deepspeed", "zero_stage": 2, "offload_optimizer": True, "nproc_per_node": 2}
    train = {"steps": 40, "optimizer": "adamw8bit", "lr_scheduler": "cosine", "log_every": 10}
    errors, notes = check_job(load_job(make_job(name="straight", train=train, distributed=distributed)), check_inputs=False)
    assert not errors and any("DeepSpeed's own CPU Adam is used instead" in n for n in notes), notes
    straight = run_worker(make_job(name="straight", train=train, distributed=distributed), nproc=2)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert "train.optimizer=adamw8bit replaced by DeepSpeed's CPU Adam under ZeRO-Offload" in straight.stderr
    assert "DeepSpeed ZeRO-2 engine: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam, optimizer offloaded to the CPU: " \
           "True" in straight.stderr, straight.stderr[-4000:]
    job = make_job(name="resumed", train=train, distributed=distributed, output={"heartbeat_s": 1})
    _preempt_then_resume(job, tmp_path, "resumed")
    saved = adapter(tmp_path, "resumed")
    assert saved and all(v.numel() > 0 for v in saved.values())
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    assert max_diff(adapter(tmp_path, "straight"), saved) < 1e-5
