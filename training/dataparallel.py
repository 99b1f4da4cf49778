"""Data-parallel training of one subject at a time across all ranks: DDP, or DeepSpeed ZeRO-2/3,
both through accelerate, with torch AdamW or bitsandbytes AdamW8bit as the client optimizer.

Order of work, so that no rank waits in a collective while another prepares: every rank loads
the base and makes or reuses the class images *before* the process group exists; only then do
the ranks join. Rank 0 alone reads and writes the ledger and publishes; its decisions reach the
others by broadcast. Each subject gets a fresh UNet and a fresh engine, so ZeRO-3 partitions
never leak between subjects. Under ZeRO-3 the adapter weights are gathered (only them) and
rank 0 exports them from an unpartitioned copy of the base, so the files are the same as a
single-process run's.

Checkpoints: every `train.checkpoint_every` steps and at preemption, all ranks write the optimizer
state (under DeepSpeed its own checkpoint: each rank's optimizer shard) into `engine/` of the
checkpoint folder, and the gathered adapter goes beside it as `adapter_unet.safetensors` (the
contract's checkpoint format, which a single-process run can also resume from, and vice versa
for the adapter). Rank 0 publishes the folder. Every rank fetches the checkpoint itself to
resume. Not yet: the ranks of *other nodes* write their shards to their own disks, so a
multi-node ZeRO checkpoint is complete only where nodes share the staging path (TMPDIR); and a
text-encoder adapter under these strategies (rejected with a message).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import ledger, storage
from launcher.config import JobConfig, Subject
from launcher.deepspeed import deepspeed_config
from launcher.errors import ConfigError, UserError
from launcher.subjects import image_uris
from training import adapters, checkpoint, lease
from training.components import Components
from training.env import Preemption, WorkerEnv
from training.loop import diffusion_loss, prepare_subject, subject_seed
from training.optim import build_lr_scheduler, build_optimizer
from training.runner import Outcome, Worker

log = logging.getLogger(__name__)

ENGINE = "engine"  # the optimizer state (DeepSpeed: its checkpoint) inside a checkpoint folder
ENGINE_TAG = "state"


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
        return Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin)
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
    # DDP on CPU: cpu=True makes accelerate treat several CPU processes as MULTI_CPU (gloo).
    # DeepSpeed: no cpu=True (it would silently turn the run into plain DDP); ENVIRONMENT.md's
    # recipe (ACCELERATE_USE_DEEPSPEED + this PartialState first) gives a real DeepSpeedEngine
    on_cpu_ddp = device.type == "cpu" and job.distributed.strategy == "ddp"
    PartialState(cpu=on_cpu_ddp, backend=backend, timeout=timedelta(seconds=job.distributed.timeout_s))
    accelerator = _accelerator(job, device)
    log.info("accelerate: %s over %d process(es), backend %s", accelerator.distributed_type,
             accelerator.num_processes, backend)
    expected = "DEEPSPEED" if job.distributed.strategy == "deepspeed" else ("MULTI_GPU" if device.type == "cuda" else "MULTI_CPU")
    if env.world_size > 1 and accelerator.distributed_type.name != expected:
        raise RuntimeError(f"accelerate set up {accelerator.distributed_type.name}, not {expected}, "
                           f"for distributed.strategy {job.distributed.strategy}")
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
    keeper, why = lease.begin(job, subject, worker.owner) if env.is_main else (None, None)
    go, why = _broadcast((keeper is not None, why) if env.is_main else None)
    if not go:
        log.info("subject %s: skipped (%s)", subject.id, why)
        return Outcome(subject.id, "skipped", why)
    steps = subject.steps or job.train.steps
    try:
        result = _train(job, env, preemption, worker, accelerator, subject, class_images, steps, keeper)
    except (UserError, ValueError, RuntimeError, OSError) as exc:
        log.error("subject %s failed: %s", subject.id, exc)
        if keeper:
            keeper.fail(exc)
        return Outcome(subject.id, "failed", str(exc))
    finally:
        accelerator.free_memory()
        if keeper:
            keeper.stop()
    return result


def _train(job, env, preemption, worker: Worker, accelerator, subject, class_images, steps, keeper) -> Outcome:
    c = worker.c
    t = job.train
    lr = subject.learning_rate or t.learning_rate
    subject_uri = ledger.subject_uri(worker.job_uri, subject.id)
    # rank 0 alone looks in the bucket (find_latest prunes incomplete checkpoints); every rank
    # then fetches the same checkpoint itself, so nodes need not share a disk to resume
    latest = _broadcast(checkpoint.find_latest(subject_uri) if env.is_main else None)
    with tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-resume-") as fetched:
        resume = None
        if latest is not None:
            storage.fetch_dir(latest, fetched)
            resume = Path(fetched)
        unet = _fresh_unet(job, c)
        if resume is not None and (job.distributed.strategy != "deepspeed" or not (resume / ENGINE).is_dir()):
            # DDP, or a checkpoint of a single-process run (the optimizer then starts anew): the
            # adapter comes from the contract file; DeepSpeed restores it from its own checkpoint
            adapters.load_adapter_state_dict(unet, checkpoint.read_local(resume)[0]["unet"])
        params = adapters.adapter_parameters(unet)
        optimizer = _client_optimizer(job, params, lr, c.device)
        scheduler = build_lr_scheduler(optimizer, t, steps)
        model, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
        seed = subject_seed(t.seed, subject.id)
        torch.manual_seed(seed)
        gen = torch.Generator(c.device).manual_seed(seed)
        step = 0
        if resume is not None:
            trainer_state = checkpoint.read_local(resume)[1]
            if (resume / ENGINE).is_dir():
                _load_engine(job, model, optimizer, resume / ENGINE)
            scheduler.load_state_dict(trainer_state["scheduler"])
            checkpoint.set_rng_state(trainer_state["rng"], gen)
            step = trainer_state["step"]
            log.info("subject %s: resuming from %s at step %d/%d", subject.id, latest.rsplit("/", 1)[-1], step, steps)
    view = dataclasses.replace(c, unet=model)
    data = prepare_subject(c, job, subject, image_uris(subject), class_images, False)
    shard = (env.rank, env.world_size)
    amp = _Autocast(accelerator)
    worker.progress.start_subject(subject.id, steps)
    # one staging folder for the engine's per-rank files, chosen by rank 0 (ranks on other nodes
    # write their shards to the same path on their own disk; see the module docstring)
    staging = Path(_broadcast(tempfile.mkdtemp(prefix=f"dreamfleet-{subject.id}-ckpt-") if env.is_main else None))
    model.train()
    last = torch.zeros((), device=c.device)
    try:
        while step < steps:
            stop = torch.tensor(int(preemption.requested), device=c.device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if stop.item():
                _save_checkpoint(job, env, accelerator, model, optimizer, scheduler, gen, step, staging, subject_uri)
                if keeper:
                    keeper.update(state="pending", step=step, error="preempted; resumes from its checkpoint")
                return Outcome(subject.id, "preempted", f"checkpointed at step {step}")
            loss = diffusion_loss(view, job, data, gen, amp, False, shard=shard)
            accelerator.backward(loss)
            if t.max_grad_norm > 0 and job.distributed.strategy != "deepspeed":
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = loss.detach()
            if keeper:
                keeper.status.step = step  # picked up by the next heartbeat
            if step % t.log_every == 0 or step == steps:
                value = last.clone()
                dist.all_reduce(value)
                worker.progress.step(step, steps, value.item() / env.world_size)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                _save_checkpoint(job, env, accelerator, model, optimizer, scheduler, gen, step, staging, subject_uri)
    finally:
        dist.barrier()
        if env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
    worker.progress.end_subject()
    state = _gathered_adapter(job, accelerator.unwrap_model(model))
    final_loss = float(last.item())
    if not _broadcast(keeper.held() if env.is_main else None):
        return Outcome(subject.id, "skipped", "taken over by another worker; not published")
    if env.is_main:
        _publish(job, worker, subject, state, steps)
        keeper.update(state="done", step=steps, final_loss=final_loss, finished_at=time.time())
    dist.barrier()
    return Outcome(subject.id, "done", f"{steps} steps", final_loss)


def _save_checkpoint(job, env, accelerator, model, optimizer, scheduler, gen, step: int, staging: Path,
                     subject_uri: str) -> None:
    """A collective: every rank writes its engine state (DeepSpeed: its optimizer shard) and the
    gathered adapter goes beside it in the contract's checkpoint format; rank 0 publishes."""
    local = staging / checkpoint.step_name(step)
    _save_engine(job, env, model, optimizer, local / ENGINE)
    state = _gathered_adapter(job, accelerator.unwrap_model(model))
    dist.barrier()  # every rank's files are written before rank 0 uploads the folder
    if env.is_main:
        checkpoint.write_local(local, {"unet": state}, {"step": step, "rng": checkpoint.rng_state(gen),
                                                        "scheduler": scheduler.state_dict(),
                                                        "strategy": job.distributed.strategy})
        checkpoint.publish(local, subject_uri, step, job.train.keep_checkpoints)
        shutil.rmtree(local, ignore_errors=True)
    dist.barrier()


def _client_optimizer(job: JobConfig, params, lr: float, device: torch.device):
    """The job's optimizer, except under ZeRO-Offload: the step runs on the host there, so it is
    DeepSpeed's CPU Adam (what `launcher validate` announces for an 8-bit optimizer)."""
    d, t = job.distributed, job.train
    if d.strategy == "deepspeed" and d.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if t.optimizer != "adamw":
            log.warning("train.optimizer=%s replaced by DeepSpeed's CPU Adam under ZeRO-Offload", t.optimizer)
        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                adamw_mode=True)
    return build_optimizer([{"params": params, "lr": lr}], t, device)


def _save_engine(job, env, model, optimizer, directory: Path) -> None:
    """DeepSpeed: its own checkpoint, one optimizer shard per rank, frozen base weights left out.
    DDP: the optimizer state is the same on every rank; rank 0 writes it."""
    if job.distributed.strategy == "deepspeed":
        model.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    elif env.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def _load_engine(job, model, optimizer, directory: Path) -> None:
    if job.distributed.strategy == "deepspeed":
        # the module file holds only the adapter (frozen weights excluded), hence not strict
        loaded, _ = model.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{ENGINE_TAG}' in {directory}")
    else:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False))


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
