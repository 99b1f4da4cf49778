"""Parallel strategies. `subject`: every rank trains its own subjects with no gradient
traffic and no process group. `ddp` / `deepspeed`: all ranks train each subject together
(see training.dataparallel)."""

from __future__ import annotations

import torch

from launcher.config import JobConfig, Subject
from launcher.errors import ConfigError
from training.env import Preemption, WorkerEnv
from training.lease import Outcome
from training.runner import Worker


def device_for(env: WorkerEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def owner_of(env: WorkerEnv) -> str:
    """Who holds a subject: stable across a requeue of the same scheduler job (so a restarted
    run takes its own subjects back at once), unique across concurrent workers."""
    from launcher.ledger import worker_name

    if env.job_id:
        return f"job {env.job_id} shard {env.shard_index} rank {env.rank}"
    return worker_name()


def run_strategy(job: JobConfig, env: WorkerEnv, preemption: Preemption, subjects: list[Subject]) -> list[Outcome]:
    strategy = job.distributed.strategy
    if strategy == "subject":
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        worker = Worker(job, env, preemption, device_for(env), owner_of(env))
        if job.train.pack != 1:  # packed multi-subject training (training.packed_loop)
            from training.packed_loop import resolve_pack, run_packed

            num_slots = resolve_pack(job, worker.device)
            if num_slots > 1:
                return run_packed(worker, subjects, num_slots)
        return worker.run(subjects)
    if strategy in ("ddp", "deepspeed"):
        from training.dataparallel import run_data_parallel

        return run_data_parallel(job, env, preemption, subjects, device_for(env), owner_of(env))
    raise ConfigError(f"distributed.strategy {strategy!r} is not known")
