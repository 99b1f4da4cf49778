"""Data-parallel training of one subject at a time across all ranks: DDP, or DeepSpeed ZeRO-2/3
(optionally with ZeRO-Offload of the optimizer), both through accelerate, with torch AdamW or
bitsandbytes AdamW8bit as the client optimizer (DeepSpeed's CPU Adam under ZeRO-Offload).

Order of work, so that no rank waits in a collective while another prepares: every rank loads
the base and makes or reuses the class images *before* the process group exists; only then do
the ranks join. Rank 0 alone reads and writes the ledger and publishes; its decisions reach the
others by broadcast. Each subject gets fresh copies of the adapted models and a fresh engine, so
ZeRO-3 partitions never leak between subjects; the worker's own models wait in host memory while
a subject trains, so the device holds the base once. Under ZeRO-3 the adapter weights are gathered
(only them) and rank 0 exports them from the unpartitioned base, so the files are the same as a
single-process run's.

A text-encoder adapter trains jointly with the denoiser's: the models sit in one module (`loop.Denoiser`),
so that one DDP wrapper or one DeepSpeed engine (accelerate prepares one model per engine) holds
both adapters, with one optimizer of two parameter groups, as in a single-process run.

Checkpoints: every `train.checkpoint_every` steps and at preemption, every rank writes its engine
state (DeepSpeed: its own checkpoint, one optimizer shard per rank; DDP: rank 0 the optimizer)
into a staging folder on its own disk. Each node's local rank 0 publishes the parts of its own
ranks, and after that global rank 0 publishes the gathered adapters beside them in the
contract's checkpoint format, manifest last (layout in training.checkpoint). To resume, every
rank fetches the adapter files, rank 0's engine part and its own. Nodes need not share a disk.
"""

from __future__ import annotations

import copy
from functools import partial
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import ledger
from launcher.config import JobConfig, Subject
from launcher.deepspeed import deepspeed_config
from launcher.subjects import image_uris
from training import adapters, checkpoint, lease
from training.checkpoint import ENGINE
from training.env import Preemption, WorkerEnv
from training.failures import is_fatal, log_failure
from training.lease import Outcome
from training.loop import Denoiser, diffusion_loss, prepare_subject, subject_seed, trainable_groups
from training.optim import build_lr_scheduler, build_optimizer
from training.runner import Worker

log = logging.getLogger(__name__)

ENGINE_TAG = "state"  # DeepSpeed's checkpoint tag inside the engine folder
CPU_ADAM = "deepspeed_cpu_adam"  # the optimizer under ZeRO-Offload, as recorded in checkpoints


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _on_ranks(fn, what: str) -> list:
    """Run `fn` where one is given (None elsewhere) and gather the results from every rank. A
    failure on any rank raises on every rank, so that none is left waiting in a collective."""
    result, error = None, None
    if fn is not None:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below, so that no rank waits in a collective
            log.error("%s failed: %s", what, exc)
            error = f"rank {dist.get_rank()}: {exc}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (result, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise RuntimeError(f"{what} failed: {'; '.join(errors)}")
    return [r for r, _ in gathered]


def _subject_models(worker: Worker, job: JobConfig) -> dict[str, torch.nn.Module]:
    """Copies of the models a subject trains through, by part: the adapted ones with the adapters
    as Worker.setup initialised them from the job seed (a single-process run starts from the
    same weights), and every text encoder when any trains (loop.Denoiser runs them all).
    Copies, because a ZeRO-3 engine partitions what it is given and accelerate patches the
    forward of what it prepares. The worker's own models wait in host memory meanwhile
    (`_return_models` brings them back), so the device never holds the base twice: under ZeRO-3
    a rank holds only its partition."""
    models = {}
    for name in _copied(worker):
        own = worker.c.part(name).to("cpu")
        models[name] = copy.deepcopy(own).to(worker.c.device)
        if name in worker.init_state:
            adapters.restore(models[name], worker.init_state[name])
    if job.train.gradient_checkpointing:
        models[worker.c.family.denoiser].enable_gradient_checkpointing()
        log.info("gradient checkpointing on the %s", worker.c.family.denoiser)
    return models


def _copied(worker: Worker) -> list[str]:
    family = worker.c.family
    return [family.denoiser, *(family.tokenizers if worker.train_te else ())]


def _return_models(worker: Worker) -> None:
    """The worker's own models back on the device (for samples, the next subject's caching)."""
    for name in _copied(worker):
        worker.c.part(name).to(worker.c.device)


def _parts(job: JobConfig, family, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapted models inside what accelerate prepared (a Denoiser, or the bare denoiser), by
    checkpoint name."""
    inside = module.parts() if isinstance(module, Denoiser) else {family.denoiser: module}
    return {name: inside[name] for name in adapters.specs(job.adapter, family)}


def _accelerate_precision(job: JobConfig, device: torch.device) -> str:
    """accelerate's `mixed_precision` for this run. DDP follows training.precision (an explicit
    bf16 runs CPU autocast, as a single process does; `auto` is fp32 on a CPU); DeepSpeed follows
    launcher.deepspeed's config (`auto` is bf16 on a GPU, a CPU run fp32)."""
    on_gpu = device.type == "cuda"
    if job.distributed.strategy == "deepspeed":
        mixed = job.train.mixed_precision if on_gpu else "no"
        return "bf16" if mixed == "auto" else mixed
    from training.precision import resolve

    mixed = resolve(job.train, job.model, device).accelerate
    if mixed == "fp16" and not on_gpu:  # accelerate would run fp32 without a word: it scales fp16 on GPUs only
        log.warning("train.mixed_precision fp16: accelerate runs fp16 on a GPU only; this CPU run is fp32")
        return "no"
    return mixed


def _accelerator(job: JobConfig, device: torch.device, text_encoders_train: bool = False):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs

    on_gpu = device.type == "cuda"
    mixed = _accelerate_precision(job, device)
    log.info("accelerate mixed precision: %s", mixed)
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the LR schedule once per
    # process at every step (it assumes a per-process data loader); here a step is one step of
    # the global batch, and the schedule must run as in a single-process run
    if job.distributed.strategy == "deepspeed":
        # no zero.Init: the models are built before the engine (which partitions them itself)
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(job, on_gpu), zero3_init_flag=False)
        return Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin, step_scheduler_with_optimizer=False)
    # a family may condition on an inner layer of a text encoder (SDXL: the penultimate hidden
    # states), which leaves the adapters of the layers above out of the loss; DDP must then look
    # for unused parameters, or it waits for their gradients forever
    ddp = DistributedDataParallelKwargs(find_unused_parameters=text_encoders_train)
    return Accelerator(mixed_precision=mixed, cpu=not on_gpu, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[ddp])


def _zero3(job: JobConfig) -> bool:
    return job.distributed.strategy == "deepspeed" and job.distributed.zero_stage == 3


def _gathered_adapters(job: JobConfig, family, module: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The full adapter weights of every adapted model on every rank (a collective under ZeRO-3)."""
    parts = _parts(job, family, module)
    if _zero3(job):
        import deepspeed

        params = [p for model in parts.values() for p in adapters.adapter_parameters(model)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {name: adapters.adapter_state_dict(model) for name, model in parts.items()}
    return {name: adapters.adapter_state_dict(model) for name, model in parts.items()}


def _optimizer_kind(job: JobConfig) -> str:
    d = job.distributed
    return CPU_ADAM if d.strategy == "deepspeed" and d.offload_optimizer else job.train.optimizer


def run_data_parallel(job: JobConfig, env: WorkerEnv, preemption: Preemption, subjects: list[Subject],
                      device: torch.device, owner: str) -> list[Outcome]:
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
    accelerator = _accelerator(job, device, worker.train_te)
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
    go, why, overrides = _broadcast((keeper is not None, why, keeper.status.overrides if keeper else {})
                                    if env.is_main else None)
    if not go:
        log.info("subject %s: skipped (%s)", subject.id, why)
        return Outcome(subject.id, "skipped", why)
    subject = lease.with_overrides(subject, overrides)  # a retry's per-subject overrides, on every rank
    steps = subject.steps or job.train.steps
    try:
        result = _train(job, env, preemption, worker, accelerator, subject, class_images, steps, keeper)
    except Exception as exc:  # this subject's alone (training.failures), unless the process is unusable
        log_failure(log, subject.id, exc)
        if keeper:
            keeper.fail(exc)
        if is_fatal(exc):
            raise
        return Outcome(subject.id, "failed", str(exc))
    finally:
        accelerator.free_memory()
        _return_models(worker)
        if keeper:
            keeper.stop()
    return result


def _node_staging(env: WorkerEnv, staging: Path) -> dict[int, Path]:
    """The staging folders of this node's ranks, by rank: the node's local rank 0 publishes them.
    Ranks of other nodes stage on their own disks, never seen here."""
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, (env.node_rank, env.local_rank, str(staging)))
    here = {rank: Path(path) for rank, (node, _, path) in enumerate(everyone) if node == env.node_rank}
    leaders = [rank for rank, (node, local, _) in enumerate(everyone) if node == env.node_rank and local == 0]
    if len(leaders) != 1:
        raise RuntimeError(f"node {env.node_rank} has {len(leaders)} ranks of local rank 0 ({leaders}): the node "
                           "rank (GROUP_RANK or NODE_RANK) must tell the nodes apart to publish checkpoints")
    return here


def _train(job, env, preemption, worker: Worker, accelerator, subject, class_images, steps, keeper) -> Outcome:
    c = worker.c
    t = job.train
    lr = subject.learning_rate or t.learning_rate
    subject_uri = ledger.subject_uri(worker.job_uri, subject.id)
    # rank 0 alone looks in the bucket (find_latest prunes incomplete checkpoints); every rank
    # then fetches what it needs of the same checkpoint itself, so nodes need not share a disk
    latest = _broadcast(checkpoint.find_latest(subject_uri) if env.is_main else None)
    with tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-resume-") as fetched:
        resume, engine = None, False
        if latest is not None:
            manifest = checkpoint.fetch_for_rank(latest, Path(fetched), env.rank, all_parts=_elastic(job))
            resume = Path(fetched)
            states, trainer_state = checkpoint.read_local(resume)
            engine = _engine_usable(job, env, resume, trainer_state, manifest)
        models = _subject_models(worker, job)
        if resume is not None and (job.distributed.strategy != "deepspeed" or not engine):
            # DDP, or a checkpoint the engine cannot load (a single-process run's, another strategy
            # or world size): the adapters come from the contract files; DeepSpeed restores them
            # from its own checkpoint otherwise
            for name, model in models.items():
                if name not in states:
                    raise ValueError(f"checkpoint {latest.rsplit('/', 1)[-1]} has no {name} adapter")
                adapters.load_adapter_state_dict(model, states[name])
        family = c.family
        groups = trainable_groups(c, job, lr, {part: models[part] for part in worker.specs})
        params = [p for g in groups for p in g["params"]]
        # the bare denoiser when no text encoder trains: engine checkpoints keep its parameter names
        module = Denoiser(family, models) if worker.train_te else models[family.denoiser]
        client = _client_optimizer(job, groups, c.device)
        scheduler = build_lr_scheduler(client, t, steps)
        model, optimizer, scheduler = accelerator.prepare(module, client, scheduler)
        if job.distributed.strategy == "deepspeed":
            if model.basic_optimizer is not client:  # the schedule would drive an optimizer nobody steps
                raise RuntimeError(f"DeepSpeed replaced the optimizer ({type(client).__name__} by "
                                   f"{type(model.basic_optimizer).__name__}); check distributed.deepspeed_config "
                                   "(zero_force_ds_cpu_optimizer must stay false under offload_optimizer)")
            log.info("DeepSpeed ZeRO-%d engine: %s over %s, optimizer offloaded to the CPU: %s",
                     model.zero_optimization_stage(), type(model.optimizer).__name__,
                     type(model.basic_optimizer).__name__, model.zero_cpu_offload())
        seed = subject_seed(t.seed, subject.id)
        torch.manual_seed(seed)
        gen = torch.Generator(c.device).manual_seed(seed)
        step = 0
        metrics: list[str] = []  # metrics.jsonl lines (rank 0), carried through checkpoints
        if resume is not None:
            if (resume / "metrics.jsonl").exists():
                metrics = (resume / "metrics.jsonl").read_text().splitlines()
            if engine:
                _load_engine(job, model, optimizer, resume / ENGINE)
            scheduler.load_state_dict(trainer_state.get("scheduler") or trainer_state["stepper"]["lr_scheduler"])
            checkpoint.set_rng_state(trainer_state["rng"], gen)
            step = trainer_state["step"]
            log.info("subject %s: resuming from %s at step %d/%d", subject.id, latest.rsplit("/", 1)[-1], step, steps)
    data = prepare_subject(c, job, subject, image_uris(subject), class_images, worker.train_te)
    forward = model if worker.train_te else partial(c.family.predict, model)  # (noisy, timesteps, conditioning)
    shard = (env.rank, env.world_size)
    worker.progress.start_subject(subject.id, steps, step)
    # each rank stages its engine files on its own disk; the node's local rank 0 publishes them
    staging = Path(tempfile.mkdtemp(prefix=f"dreamfleet-{subject.id}-ckpt-rank{env.rank}-"))
    log.info("subject %s: rank %d stages checkpoints in %s", subject.id, env.rank, staging)
    node_staging = _node_staging(env, staging)

    def save_checkpoint() -> None:
        _save_checkpoint(job, c.family, env, accelerator, model, optimizer, scheduler, gen, step, node_staging, subject_uri,
                         metrics)

    model.train()
    pending: list[torch.Tensor] = []  # losses since the last log line, read in one go
    final_loss = None
    started = time.perf_counter()
    try:
        while step < steps:
            stop = torch.tensor(int(preemption.requested), device=c.device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if stop.item():
                save_checkpoint()
                if keeper:
                    keeper.update(state="pending", step=step, error="preempted; resumes from its checkpoint")
                return Outcome(subject.id, "preempted", f"checkpointed at step {step}")
            loss = diffusion_loss(c, job, data, gen, forward, accelerator.autocast, shard=shard)
            lr_now = scheduler.get_last_lr()[0]
            accelerator.backward(loss)
            if t.max_grad_norm > 0 and job.distributed.strategy != "deepspeed":
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(loss.detach())
            if keeper:
                keeper.status.step = step  # picked up by the next heartbeat
            if step % t.log_every == 0 or step == steps:
                losses = torch.stack(pending)
                pending.clear()
                summary = torch.stack([losses.mean(), losses[-1]])
                dist.all_reduce(summary)  # the mean over the ranks: the loss of the global batch
                mean_loss, last_loss = (summary / env.world_size).tolist()
                final_loss = mean_loss  # as training.loop: the last interval's mean
                worker.progress.step(step, steps, mean_loss)
                if env.is_main:
                    metrics.append(json.dumps({"step": step, "loss": round(mean_loss, 6), "last_loss": round(last_loss, 6),
                                               "lr": lr_now, "elapsed_s": round(time.perf_counter() - started, 3)}))
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                save_checkpoint()
    finally:
        dist.barrier()
        shutil.rmtree(staging, ignore_errors=True)
    worker.progress.end_subject()
    states = _gathered_adapters(job, family, accelerator.unwrap_model(model))
    model = optimizer = scheduler = None  # dropped (the checkpoint closure too) before the models return
    accelerator.free_memory()  # the engine's memory, before the worker's own models come back for publishing
    _return_models(worker)
    if not _broadcast(keeper.held() if env.is_main else None):
        return Outcome(subject.id, "skipped", "taken over by another worker; not published")
    if env.is_main:
        scored = _publish(worker, subject, states, steps, metrics)
        keeper.update(state="done", step=steps, final_loss=final_loss, finished_at=time.time(), **scored)
    dist.barrier()
    return Outcome(subject.id, "done", f"{steps} steps", final_loss)


def _save_checkpoint(job, family, env, accelerator, model, optimizer, scheduler, gen, step: int, staging: dict[int, Path],
                     subject_uri: str, metrics: list[str]) -> None:
    """A collective. Every rank writes its engine files (DeepSpeed: its optimizer shard) into its
    own staging folder; each node's local rank 0 publishes the parts of its node's ranks; then
    rank 0 publishes the gathered adapters and the trainer state, the folder's manifest last."""
    name = checkpoint.step_name(step)
    target = checkpoint.step_uri(subject_uri, step)
    _save_engine(job, env, model, optimizer, staging[env.rank] / name)
    states = _gathered_adapters(job, family, accelerator.unwrap_model(model))
    if env.is_main:
        checkpoint.unpublish(target)  # the same step written again: no manifest may vouch for old parts
    dist.barrier()  # every rank's engine files are written

    def publish_node_parts() -> list[int]:
        published = []
        for rank, root in sorted(staging.items()):
            part = root / name
            if part.is_dir() and any(p.is_file() for p in part.rglob("*")):
                checkpoint.publish_engine_part(part, target, rank)
                published.append(rank)
        log.info("checkpoint %s: node %d published the engine files of rank(s) %s", name, env.node_rank,
                 ", ".join(map(str, published)) or "-")
        return published

    parts = _on_ranks(publish_node_parts if env.is_local_main else None, f"publishing the engine parts of {name}")
    engine_ranks = sorted(rank for published in parts if published for rank in published)

    def publish_adapters() -> None:
        local = staging[env.rank] / "adapters" / name
        checkpoint.write_local(local, states, {"step": step, "rng": checkpoint.rng_state(gen),
                                               "scheduler": scheduler.state_dict(),
                                               "strategy": job.distributed.strategy,
                                               "zero_stage": job.distributed.zero_stage,
                                               "optimizer": _optimizer_kind(job)})
        if metrics:
            (local / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
        checkpoint.publish(local, subject_uri, step, job.train.keep_checkpoints,
                           extra={"engine_ranks": engine_ranks, "world_size": env.world_size})

    try:
        _on_ranks(publish_adapters if env.is_main else None, f"publishing checkpoint {name}")
    finally:
        shutil.rmtree(staging[env.rank] / name, ignore_errors=True)
        shutil.rmtree(staging[env.rank] / "adapters", ignore_errors=True)


def _elastic(job: JobConfig) -> bool:
    """Whether DeepSpeed reads every rank's optimizer shard on load (an elastic checkpoint)."""
    if job.distributed.strategy != "deepspeed":
        return False
    return bool(deepspeed_config(job, False)["zero_optimization"].get("elastic_checkpoint", False))


def _engine_usable(job: JobConfig, env: WorkerEnv, resume: Path, trainer_state: dict, manifest: dict) -> bool:
    """Whether this run's engine can load the checkpoint's engine state. When it cannot, the
    adapters resume from the contract files and the optimizer starts anew; the log says why."""
    if not (resume / ENGINE).is_dir():
        log.info("checkpoint has no engine state (a single-process run's?): the optimizer starts anew")
        return False
    d = job.distributed
    wrote = (trainer_state.get("strategy"), trainer_state.get("zero_stage", d.zero_stage),
             trainer_state.get("optimizer", _optimizer_kind(job)), manifest.get("world_size", env.world_size))
    runs = (d.strategy, d.zero_stage, _optimizer_kind(job), env.world_size)
    if d.strategy == "ddp":  # DDP's optimizer state is the same on every rank and any world size
        wrote, runs = wrote[:1] + wrote[2:3], runs[:1] + runs[2:3]
    if wrote != runs:
        log.warning("checkpoint engine state was written by (strategy, zero stage, optimizer, world size) %s, this run "
                    "is %s: the adapters resume, the optimizer state starts anew", wrote, runs)
        return False
    return True


def _client_optimizer(job: JobConfig, groups: list[dict], device: torch.device):
    """The job's optimizer, except under ZeRO-Offload: the step runs on the host there, so it is
    DeepSpeed's CPU Adam (what `launcher validate` announces for an 8-bit optimizer)."""
    d, t = job.distributed, job.train
    if d.strategy == "deepspeed" and d.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if t.optimizer != "adamw":
            log.warning("train.optimizer=%s replaced by DeepSpeed's CPU Adam under ZeRO-Offload", t.optimizer)
        return DeepSpeedCPUAdam(groups, lr=groups[0]["lr"], betas=tuple(t.betas), eps=t.eps,
                                weight_decay=t.weight_decay, adamw_mode=True)
    return build_optimizer(groups, t, device)


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
        # the module file holds only the adapters (frozen weights excluded), hence not strict
        loaded, _ = model.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{ENGINE_TAG}' in {directory}")
    else:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False))


def _publish(worker: Worker, subject: Subject, states: dict[str, dict[str, torch.Tensor]], steps: int,
             metrics: list[str]) -> dict:
    """Export from the worker's own (never partitioned) models carrying the gathered adapters:
    the same files, samples included, as a single-process run writes. Later subjects train
    fresh copies whose adapters are reset, so these weights go nowhere else."""
    for name, state in states.items():
        adapters.load_adapter_state_dict(worker.c.part(name), state)
    with tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-") as tmp:
        if metrics:
            (Path(tmp) / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
        return worker.publish(subject, Path(tmp), steps)
