"""The DreamBooth training loop for one subject: prepare (cache latents and embeddings), train
(a plain `while` loop), checkpoint on schedule or preemption, and hand back the adapter.

The step never syncs with the host except every `log_every` steps: losses accumulate on the
device and are read in one go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from launcher.config import JobConfig, Subject
from training import adapters, checkpoint
from training.components import Components
from training.data import LatentCache, encode_latents, encode_prompts, load_images, tokenize
from training.env import Preemption
from training.optim import build_lr_scheduler, build_optimizer
from training.precision import resolve

log = logging.getLogger(__name__)


def subject_seed(base_seed: int, subject_id: str) -> int:
    """Each subject's seed depends only on the job seed and its id, never on rank or order."""
    return (base_seed * 1_000_003 + int(hashlib.sha256(subject_id.encode()).hexdigest()[:8], 16)) % (2**31)


@dataclass
class SubjectData:
    instance: LatentCache
    instance_ids: torch.Tensor
    instance_emb: torch.Tensor | None  # cached when the text encoder is frozen
    prior: LatentCache | None = None
    class_ids: torch.Tensor | None = None
    class_emb: torch.Tensor | None = None


@torch.no_grad()
def prepare_subject(c: Components, job: JobConfig, subject: Subject, image_uris: list[str],
                    class_image_uris: list[str] | None, train_text_encoder: bool) -> SubjectData:
    t = job.train
    gen = torch.Generator("cpu").manual_seed(subject_seed(t.seed, subject.id))
    source = subject.images if isinstance(subject.images, str) else ", ".join(subject.images)
    instance = encode_latents(c.vae, load_images(image_uris, t, gen, source), c.device, t.random_flip)
    instance_ids = tokenize(c.tokenizer, [subject.instance_prompt])
    data = SubjectData(instance, instance_ids, None)
    if class_image_uris:
        data.prior = encode_latents(c.vae, load_images(class_image_uris, t, gen), c.device, t.random_flip)
        data.class_ids = tokenize(c.tokenizer, [subject.class_prompt])
    if not train_text_encoder:
        data.instance_emb = encode_prompts(c.text_encoder, instance_ids).float()
        if data.class_ids is not None:
            data.class_emb = encode_prompts(c.text_encoder, data.class_ids).float()
    return data


class Stepper:
    """Optimizer, LR schedule, gradient scaling and clipping for plain (single-process or
    subject-parallel) training. `step()` returns the pre-clip gradient norm as a device tensor."""

    def __init__(self, groups: list[dict], job: JobConfig, device: torch.device, total_steps: int):
        self.params = [p for g in groups for p in g["params"]]
        self.max_grad_norm = job.train.max_grad_norm
        self.optimizer = build_optimizer(groups, job.train, device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, job.train, total_steps)
        self.precision = resolve(job.train, job.model, device)
        self.scaler = self.precision.grad_scaler()
        self.device = device

    def autocast(self):
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def resume(self, trainer_state: dict, subject_id: str) -> None:
        """Continue from a checkpoint's trainer state: this loop's own, or a data-parallel run's
        (its optimizer state is in engine files for its own world size): then the LR schedule
        continues and the optimizer starts anew."""
        if "stepper" in trainer_state:
            self.load_state_dict(trainer_state["stepper"])
            return
        self.lr_scheduler.load_state_dict(trainer_state["scheduler"])
        log.warning("subject %s: the checkpoint is a %s run's; the adapter and the LR schedule resume, the "
                    "optimizer state starts anew", subject_id, trainer_state.get("strategy", "data-parallel"))


def diffusion_loss(c: Components, job: JobConfig, data: SubjectData, gen: torch.Generator, stepper: Stepper,
                   train_text_encoder: bool, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One micro-batch: noise the cached latents, predict, and return the DreamBooth loss.

    Data-parallel ranks pass shard=(rank, world): every rank draws the same global batch
    (batch_size x world) from the same generator and keeps its own slice, so the averaged
    gradient equals one process training on the global batch."""
    t, device = job.train, c.device
    rank, world = shard
    bs = t.batch_size * world
    on = {"generator": gen, "device": gen.device}  # the step's randomness is drawn where it is used
    latents = data.instance.sample(torch.randint(len(data.instance), (bs,), **on), gen)
    prompts_ids, prompt_emb = [data.instance_ids] * bs, [data.instance_emb] * bs
    if data.prior is not None:
        latents = torch.cat([latents, data.prior.sample(torch.randint(len(data.prior), (bs,), **on), gen)])
        prompts_ids += [data.class_ids] * bs
        prompt_emb += [data.class_emb] * bs
    noise = torch.randn(latents.shape, **on)
    if t.noise_offset:
        noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), **on)
    timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), **on)
    if world > 1:
        mine = torch.arange(rank * t.batch_size, (rank + 1) * t.batch_size)
        rows = torch.cat([mine, mine + bs]) if data.prior is not None else mine
        latents, noise, timesteps = latents[rows.to(latents.device)], noise[rows.to(noise.device)], timesteps[rows.to(timesteps.device)]
        prompts_ids = [prompts_ids[i] for i in rows.tolist()]
        prompt_emb = [prompt_emb[i] for i in rows.tolist()]
    noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
    with stepper.autocast():
        if train_text_encoder:
            emb = encode_prompts(c.text_encoder, torch.cat(prompts_ids))
        else:
            emb = torch.cat(prompt_emb).to(device)
        pred = c.unet(noisy, timesteps, encoder_hidden_states=emb).sample
    if c.prediction_type == "v_prediction":
        target = c.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = pred.float()
    if data.prior is None:
        return F.mse_loss(pred, target)
    pred_i, pred_p = pred.chunk(2)
    target_i, target_p = target.chunk(2)
    return F.mse_loss(pred_i, target_i) + job.prior.loss_weight * F.mse_loss(pred_p, target_p)


@dataclass
class TrainResult:
    step: int
    steps: int
    final_loss: float | None  # the mean training loss of the last `train.log_every` steps (docs/fleet.md)
    preempted: bool
    resumed_from: int | None


def _trainable_groups(c: Components, job: JobConfig, lr: float, train_text_encoder: bool) -> list[dict]:
    groups = [{"params": adapters.adapter_parameters(c.unet), "lr": lr}]
    if train_text_encoder:
        groups.append({"params": adapters.adapter_parameters(c.text_encoder),
                       "lr": job.train.text_encoder_learning_rate or lr})
    return groups


def _adapter_states(c: Components, train_text_encoder: bool) -> dict[str, dict[str, torch.Tensor]]:
    states = {"unet": adapters.adapter_state_dict(c.unet)}
    if train_text_encoder:
        states["text_encoder"] = adapters.adapter_state_dict(c.text_encoder)
    return states


def _save_checkpoint(c, stepper, gen, step, work: Path, subject_uri: str, keep: int, train_te: bool, metrics: Path,
                     uploader: checkpoint.Uploader) -> None:
    """Write the checkpoint locally (on the training path), then upload it in the background."""
    local = checkpoint.stage(work, step, _adapter_states(c, train_te), stepper.state_dict(), gen, metrics)
    uploader.submit(local, subject_uri, step, keep)


def train_subject(c: Components, job: JobConfig, subject: Subject, data: SubjectData, work: Path, subject_uri: str,
                  preemption: Preemption, on_step: Callable[[int, int, float | None], None] | None = None) -> TrainResult:
    """Train the (freshly reset) adapter on one subject; resumes from its latest checkpoint."""
    t = job.train
    train_te = job.adapter.text_encoder is not None
    steps = subject.steps or t.steps
    lr = subject.learning_rate or t.learning_rate
    seed = subject_seed(t.seed, subject.id)
    torch.manual_seed(seed)
    gen = torch.Generator(c.device).manual_seed(seed)
    stepper = Stepper(_trainable_groups(c, job, lr, train_te), job, c.device, steps)
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)

    step, resumed_from = 0, None
    resumed = checkpoint.resume(subject_uri)
    if resumed is not None:
        adapters.load_adapter_state_dict(c.unet, resumed.adapters["unet"])
        if train_te:
            adapters.load_adapter_state_dict(c.text_encoder, resumed.adapters["text_encoder"])
        stepper.resume(resumed.trainer_state, subject.id)
        checkpoint.set_rng_state(resumed.trainer_state["rng"], gen)
        step = resumed_from = resumed.step
        if resumed.metrics is not None:
            metrics.write_bytes(resumed.metrics)
        log.info("subject %s: resuming from %s at step %d/%d", subject.id, resumed.name, step, steps)

    c.unet.train()
    if train_te:
        c.text_encoder.train()
    if t.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
    uploader = checkpoint.Uploader()
    pending: list[torch.Tensor] = []
    final_loss: float | None = None  # the mean over the last logging interval (TrainResult.final_loss)
    started = time.perf_counter()
    with open(metrics, "a") as metrics_file:
        while step < steps:
            if preemption.requested:
                _save_checkpoint(c, stepper, gen, step, work, subject_uri, t.keep_checkpoints, train_te, metrics,
                                 uploader)
                uploader.wait()  # preempted: the checkpoint must be in the bucket before the process exits
                return TrainResult(step, steps, final_loss, True, resumed_from)
            total = torch.zeros((), device=c.device)
            for _ in range(t.gradient_accumulation):
                loss = diffusion_loss(c, job, data, gen, stepper, train_te) / t.gradient_accumulation
                stepper.backward(loss)
                total += loss.detach()
            lr_now = stepper.lr
            grad_norm = stepper.step()
            step += 1
            pending.append(torch.stack([total, grad_norm]))
            if step % t.log_every == 0 or step == steps:
                values = torch.stack(pending).cpu().tolist()  # the one host sync per log interval
                pending.clear()
                final_loss = mean_loss = sum(v[0] for v in values) / len(values)
                line = {"step": step, "loss": round(mean_loss, 6), "last_loss": round(values[-1][0], 6),
                        "grad_norm": round(values[-1][1], 6), "lr": lr_now,
                        "elapsed_s": round(time.perf_counter() - started, 3)}
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                if on_step:
                    on_step(step, steps, mean_loss)
            elif on_step:
                on_step(step, steps, None)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                metrics_file.flush()
                _save_checkpoint(c, stepper, gen, step, work, subject_uri, t.keep_checkpoints, train_te, metrics,
                                 uploader)
    uploader.wait()  # the final publish happens after the last checkpoint upload
    if t.gradient_checkpointing:
        c.unet.disable_gradient_checkpointing()
    c.unet.eval()
    c.text_encoder.eval()
    return TrainResult(step, steps, final_loss, False, resumed_from)
