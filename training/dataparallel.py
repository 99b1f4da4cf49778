"""Data-parallel training of one subject at a time across all ranks: DDP, or DeepSpeed ZeRO-2/3,
both through accelerate, with torch AdamW or bitsandbytes AdamW8bit as the client optimizer.

Order of work, so that no rank waits in a collective while another prepares: every rank loads
the base and makes or reuses the class images *before* the process group exists; only then do
the ranks join. Rank 0 alone reads and writes the ledger and publishes; its decisions reach the
others by broadcast. Each subject gets a fresh UNet and a fresh engine, so ZeRO-3 partitions
never leak between subjects. Under ZeRO-3 the adapter weights are gathered (only them) and
rank 0 exports them from an unpartitioned copy of the base, so the files are the same as a
single-process run's.

Not yet: resumable checkpoints under ddp/deepspeed (a preempted subject restarts from step 0),
and a text-encoder adapter under these strategies (launcher validate rejects it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import ledger
from launcher.config import JobConfig, Subject
from launcher.deepspeed import deepspeed_config
from launcher.errors import ConfigError, UserError
from launcher.ledger import SubjectStatus
from launcher.subjects import image_uris
from training import adapters
from training.components import Components, load_components
from training.env import Preemption, WorkerEnv
from training.loop import diffusion_loss, prepare_subject, subject_seed
from training.optim import build_lr_scheduler, build_optimizer
from training.runner import Outcome, StatusKeeper, Worker, should_train

log = logging.getLogger(__name__)


class _Autocast:
    def __init__(self, accelerator):
        self.autocast = accelerator.autocast


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _fresh_unet(job: JobConfig, c: Components) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(c.path, subfolder="unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    torch.manual_seed(job.train.seed)  # the same initial adapter as a single-process run
    adapters.attach(unet, job.adapter, adapters.UNET_TARGETS, "unet")
    return unet.to(c.device)


def _accelerator(job: JobConfig, device: torch.device):
    from accelerate import Accelerator, DeepSpeedPlugin

    on_gpu = device.type == "cuda"
    mixed = job.train.mixed_precision if on_gpu else "no"
    mixed = "bf16" if mixed == "auto" else mixed
    if job.distributed.strategy == "deepspeed":
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(job, on_gpu))
        return Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin, cpu=not on_gpu)
    return Accelerator(mixed_precision=mixed, cpu=not on_gpu)


def _gathered_adapter(job: JobConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter weights on every rank (a collective under ZeRO-3)."""
    params = adapters.adapter_parameters(model)
    if job.distributed.strategy == "deepspeed" and job.distributed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return adapters.adapter_state_dict(model)
    return adapters.adapter_state_dict(model)


def run_data_parallel(job: JobConfig, env: WorkerEnv, preemption: Preemption, subjects: list[Subject],
                      device: torch.device, owner: str) -> list[Outcome]:
    if job.adapter.text_encoder is not None:
        raise ConfigError("a text-encoder adapter is not supported with distributed.strategy ddp/deepspeed yet; "
                          "use strategy subject, or drop adapter.text_encoder")
    worker = Worker(job, env, preemption, device, owner)
    class_images = worker.setup(subjects)  # load and priors before any collective
    if job.distributed.strategy == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate reads this; set before PartialState
    from accelerate import PartialState

    backend = job.distributed.backend if job.distributed.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    # cpu=True is what makes accelerate treat several CPU processes as MULTI_CPU (DDP over gloo)
    PartialState(cpu=device.type == "cpu", backend=backend, timeout=timedelta(seconds=job.distributed.timeout_s))
    accelerator = _accelerator(job, device)
    log.info("accelerate: %s over %d process(es), backend %s", accelerator.distributed_type,
             accelerator.num_processes, backend)
    if accelerator.num_processes != env.world_size:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es) but torchrun started "
                           f"{env.world_size}: gradients would not be averaged")
    outcomes = []
    for subject in subjects:
        outcomes.append(_run_subject(job, env, preemption, worker, accelerator, subject,
                                     class_images.get(subject.class_prompt)))
        if any(o.state == "preempted" for o in outcomes[-1:]):
            break
    dist.barrier()
    return outcomes


def _run_subject(job, env, preemption, worker: Worker, accelerator, subject: Subject, class_images) -> Outcome:
    main = env.is_main
    status = ledger.read_status(worker.job_uri, subject.id) if main else None
    go, why = _broadcast(should_train(status, job, worker.owner) if main else None)
    if not go:
        log.info("subject %s: skipped (%s)", subject.id, why)
        return Outcome(subject.id, "skipped", why)
    steps = subject.steps or job.train.steps
    keeper = None
    if main:
        status = status or SubjectStatus(id=subject.id)
        keeper = StatusKeeper(worker.job_uri, status, job.output.heartbeat_s)
        keeper.update(state="running", attempts=status.attempts + 1, worker=worker.owner, error=None,
                      started_at=time.time(), steps=steps, history=status.history + [{"worker": worker.owner, "at": time.time()}])
        keeper.__enter__()
    try:
        result = _train(job, env, preemption, worker, accelerator, subject, class_images, steps, keeper)
    except (UserError, ValueError, RuntimeError, OSError) as exc:
        log.error("subject %s failed: %s", subject.id, exc)
        if keeper:
            keeper.update(state="failed", error=f"{type(exc).__name__}: {exc}"[:2000], finished_at=time.time())
        return Outcome(subject.id, "failed", str(exc))
    finally:
        accelerator.free_memory()
        if keeper:
            keeper.__exit__(None, None, None)
    return result


def _train(job, env, preemption, worker: Worker, accelerator, subject, class_images, steps, keeper) -> Outcome:
    c = worker.c
    t = job.train
    lr = subject.learning_rate or t.learning_rate
    unet = _fresh_unet(job, c)
    params = adapters.adapter_parameters(unet)
    optimizer = build_optimizer([{"params": params, "lr": lr}], t, c.device)
    scheduler = build_lr_scheduler(optimizer, t, steps)
    model, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    view = dataclasses.replace(c, unet=model)
    data = prepare_subject(c, job, subject, image_uris(subject), class_images, False)
    seed = subject_seed(t.seed, subject.id)
    torch.manual_seed(seed)
    gen = torch.Generator(c.device).manual_seed(seed)
    shard = (env.rank, env.world_size)
    amp = _Autocast(accelerator)
    worker.progress.start_subject(subject.id, steps)
    model.train()
    last = torch.zeros((), device=c.device)
    step = 0
    while step < steps:
        stop = torch.tensor(int(preemption.requested), device=c.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if stop.item():
            if keeper:
                keeper.update(state="pending", step=step, error="preempted before the end (restarts from step 0)")
            return Outcome(subject.id, "preempted", f"stopped at step {step}")
        loss = diffusion_loss(view, job, data, gen, amp, False, shard=shard)
        accelerator.backward(loss)
        if t.max_grad_norm > 0 and job.distributed.strategy != "deepspeed":
            accelerator.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last = loss.detach()
        if step % t.log_every == 0 or step == steps:
            value = last.clone()
            dist.all_reduce(value)
            mean = value.item() / env.world_size
            worker.progress.step(step, steps, mean)
            if keeper:
                keeper.status.step = step
    worker.progress.end_subject()
    state = _gathered_adapter(job, accelerator.unwrap_model(model))
    final_loss = float(last.item())
    if env.is_main:
        _publish(job, worker, subject, state, steps)
        keeper.update(state="done", step=steps, final_loss=final_loss, finished_at=time.time())
    dist.barrier()
    return Outcome(subject.id, "done", f"{steps} steps", final_loss)


def _publish(job, worker: Worker, subject: Subject, state: dict, steps: int) -> None:
    """Export from an unpartitioned copy of the base carrying the gathered adapter: the same
    files, samples included, as a single-process run writes."""
    unet = _fresh_unet(job, worker.c)
    adapters.load_adapter_state_dict(unet, state)
    unet.eval()
    saved = worker.c
    worker.c = dataclasses.replace(saved, unet=unet)
    try:
        with tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-") as tmp:
            worker.publish(subject, Path(tmp), steps)
    finally:
        worker.c = saved
