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
from training import adapters, buckets, checkpoint, prompts
from training.components import Components
from training.data import LatentCache, encode_latents, load_images
from training.prompts import IDS, PromptTable
from training.env import Preemption
from training.optim import build_lr_scheduler, build_optimizer
from training.precision import resolve

log = logging.getLogger(__name__)


def subject_seed(base_seed: int, subject_id: str) -> int:
    """Each subject's seed depends only on the job seed and its id, never on rank or order."""
    return (base_seed * 1_000_003 + int(hashlib.sha256(subject_id.encode()).hexdigest()[:8], 16)) % (2**31)


@dataclass
class SubjectData:
    """A subject's cached latents per bucket (one without train.buckets), and its prompt table;
    the class images' latents, when prior preservation is on, at each instance bucket's shape."""

    instance: list[LatentCache]
    instance_prompt: PromptTable
    prior: list[LatentCache] | None = None
    class_prompt: PromptTable | None = None
    caption_dropout: float = 0.0


@torch.no_grad()
def prepare_subject(c: Components, job: JobConfig, subject: Subject, image_uris: list[str],
                    class_image_uris: list[str] | None, train_text_encoder: bool) -> SubjectData:
    t = job.train
    gen = torch.Generator("cpu").manual_seed(subject_seed(t.seed, subject.id))
    source = subject.images if isinstance(subject.images, str) else ", ".join(subject.images)
    texts = prompts.image_prompts(subject, image_uris, t.prompt_template)
    distinct = list(dict.fromkeys(texts + ([prompts.EMPTY] if t.caption_dropout else [])))
    table = prompts.encode(c, distinct, train_text_encoder)
    prompts.report_overlong(subject.id, prompts.overlong(c, table, texts, image_uris))
    images = load_images(image_uris, t, gen, source, buckets.target(t))
    groups = buckets.group([tensor.shape for tensor, _ in images])
    instance = [encode_latents(c.vae, [images[i] for i in g], c.device, t.random_flip,
                               prompt=[table.index(texts[i]) for i in g]) for g in groups]
    data = SubjectData(instance, table, caption_dropout=t.caption_dropout)
    if class_image_uris:
        data.prior = [encode_latents(c.vae, rows, c.device, t.random_flip) for rows in
                      _class_rows(t, gen, class_image_uris, [images[g[0]][0].shape for g in groups])]
        data.class_prompt = prompts.encode(c, [subject.class_prompt], train_text_encoder)
    return data


def _class_rows(t, gen: torch.Generator, uris: list[str], shapes: list[torch.Size]) -> list[list]:
    """The class images for each instance bucket shape. A step's instance and prior rows share one
    shape (one forward), so a bucket trains with the class images of that bucket (the class set's
    own buckets); where the class set has none there (model-generated class images are all
    square), with every class image cropped to the bucket's shape."""
    if not t.buckets:
        return [load_images(uris, t, gen)]
    own = load_images(uris, t, gen, target=buckets.target(t))
    by_shape = {tuple(own[g[0]][0].shape): [own[i] for i in g] for g in buckets.group([x.shape for x, _ in own])}
    return [by_shape.get(tuple(shape)) or load_images(uris, t, gen, target=_fixed(shape)) for shape in shapes]


def _fixed(shape: torch.Size):
    """A crop target of one (channels, height, width) pixel shape for every image."""
    size = (int(shape[2]), int(shape[1]))
    return lambda w, h: size


class Denoiser(torch.nn.Module):
    """The denoiser with the text encoders, when any of them trains: what one training forward
    runs, and what one DDP wrapper or DeepSpeed engine holds (accelerate prepares one model per
    engine). It takes the prompts' token ids ("ids:<part>" entries of the conditioning) and
    encodes them inside the forward, where DDP and ZeRO-3 hook in. The parts are its children
    under their part names, so engine checkpoints name parameters `unet.*`, `text_encoder.*`."""

    def __init__(self, family, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.family = family
        for part, model in models.items():
            self.add_module(part, model)

    def parts(self) -> dict[str, torch.nn.Module]:
        return dict(self.named_children())

    def train(self, mode: bool = True) -> "Denoiser":
        """A part with nothing to train stays in eval mode: a frozen text encoder that runs in the
        step (Flux's T5 beside a CLIP adapter) would otherwise apply its dropout (T5's is 0.1)."""
        super().train(mode)
        for part in self.children():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        parts = self.parts()
        denoiser = parts.pop(self.family.denoiser)
        if parts:
            ids = {k[len(IDS):]: v for k, v in conditioning.items() if k.startswith(IDS)}
            conditioning = {k: v for k, v in conditioning.items() if not k.startswith(IDS)}
            conditioning.update(self.family.encode(parts, ids))
        return self.family.predict(denoiser, noisy, timesteps, conditioning)


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]  # per row: the prompt's (or its token ids) and the image's
    has_prior: bool

    def rows(self, index: torch.Tensor) -> "Batch":
        return Batch(self.latents[index.to(self.latents.device)], self.noise[index.to(self.noise.device)],
                     self.timesteps[index.to(self.timesteps.device)],
                     {k: v[index.to(v.device)] for k, v in self.conditioning.items()}, self.has_prior)


def _conditioning(c: Components, cache: LatentCache, index: torch.Tensor, table: PromptTable,
                  which: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per row: its prompt's conditioning (`which`: the prompt indices, default each row's own) and its image's."""
    which = cache.prompt[index.to(cache.prompt.device)] if which is None else which
    rows = table.rows(which, c.device)
    rows.update(c.family.image_conditioning(cache.crops[index.to(cache.crops.device)]))
    return rows


def draw_batch(c: Components, job: JobConfig, data: SubjectData, gen: torch.Generator,
               shard: tuple[int, int] = (0, 1)) -> Batch:
    """One micro-batch of a subject: cached latents (and class latents) of one bucket, their noise,
    timesteps and conditioning, drawn from the subject's generator in one fixed order.

    Data-parallel ranks pass shard=(rank, world): every rank draws the same global batch
    (batch_size x world) from the same generator and keeps its own slice, so the averaged
    gradient equals one process training on the global batch (and every rank the same bucket)."""
    t = job.train
    rank, world = shard
    bs = t.batch_size * world
    on = {"generator": gen, "device": gen.device}  # the step's randomness is drawn where it is used
    bucket = buckets.draw([len(cache) for cache in data.instance], gen)
    instance = data.instance[bucket]
    index = torch.randint(len(instance), (bs,), **on)
    latents = instance.sample(index, gen)
    which = None
    if data.caption_dropout:  # drawn only when on: without it the generator runs as before captions
        which = instance.prompt[index.to(instance.prompt.device)]
        dropped = torch.rand((bs,), **on) < data.caption_dropout
        which = torch.where(dropped.to(which.device), data.instance_prompt.index(prompts.EMPTY), which)
    parts = [_conditioning(c, instance, index, data.instance_prompt, which)]
    if data.prior is not None:
        prior = data.prior[bucket]
        index = torch.randint(len(prior), (bs,), **on)
        latents = torch.cat([latents, prior.sample(index, gen)])
        parts.append(_conditioning(c, prior, index, data.class_prompt))
    noise = torch.randn(latents.shape, **on)
    if t.noise_offset:
        noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), **on)
    timesteps = c.family.draw_timesteps(c.noise_scheduler, latents.shape[0], gen)
    conditioning = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    batch = Batch(latents, noise, timesteps, conditioning, data.prior is not None)
    if world > 1:
        mine = torch.arange(rank * t.batch_size, (rank + 1) * t.batch_size)
        batch = batch.rows(torch.cat([mine, mine + bs]) if data.prior is not None else mine)
    return batch


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, has_prior: bool, prior_weight: float) -> torch.Tensor:
    """The mean squared error of the instance rows, plus the class rows' weighted (prior preservation)."""
    pred = pred.float()
    if not has_prior:
        return F.mse_loss(pred, target)
    pred_i, pred_p = pred.chunk(2)
    target_i, target_p = target.chunk(2)
    return F.mse_loss(pred_i, target_i) + prior_weight * F.mse_loss(pred_p, target_p)


def diffusion_loss(c: Components, job: JobConfig, data: SubjectData, gen: torch.Generator, model: torch.nn.Module,
                   autocast, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One micro-batch through `model` (a Denoiser, what DDP/DeepSpeed made of one, or any callable
    taking noisy latents, timesteps and conditioning): the DreamBooth loss."""
    batch = draw_batch(c, job, data, gen, shard)
    noisy, target = c.family.noisy_and_target(c.noise_scheduler, batch.latents, batch.noise, batch.timesteps)
    with autocast():
        pred = model(noisy, batch.timesteps, batch.conditioning)
    return dreambooth_loss(pred, target, batch.has_prior, job.prior.loss_weight)


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


@dataclass
class TrainResult:
    step: int
    steps: int
    final_loss: float | None  # the mean training loss of the last `train.log_every` steps (docs/fleet.md)
    preempted: bool
    resumed_from: int | None


def trainable_groups(c: Components, job: JobConfig, lr: float, trained: dict[str, torch.nn.Module] | None = None
                     ) -> list[dict]:
    """The optimizer's parameter groups: the denoiser's adapter at `lr`, the text encoders' at
    train.text_encoder_learning_rate (default `lr`). `trained`: the adapted models by part
    (default: the loaded ones)."""
    trained = trained or {part: c.part(part) for part in adapters.specs(job.adapter, c.family)}
    te_lr = job.train.text_encoder_learning_rate or lr
    return [{"params": adapters.adapter_parameters(model), "lr": lr if part == c.family.denoiser else te_lr}
            for part, model in trained.items()]


def adapter_states(c: Components, job: JobConfig) -> dict[str, dict[str, torch.Tensor]]:
    return {part: adapters.adapter_state_dict(c.part(part)) for part in adapters.specs(job.adapter, c.family)}


def training_model(c: Components, job: JobConfig) -> Denoiser:
    """The Denoiser over the loaded models: with every text encoder when any of them trains."""
    train_te = len(adapters.specs(job.adapter, c.family)) > 1
    return Denoiser(c.family, c.models() if train_te else {c.family.denoiser: c.denoiser})


def _save_checkpoint(c, job, stepper, gen, step, work: Path, subject_uri: str, metrics: Path,
                     uploader: checkpoint.Uploader) -> None:
    """Write the checkpoint locally (on the training path), then upload it in the background."""
    local = checkpoint.stage(work, step, adapter_states(c, job), stepper.state_dict(), gen, metrics)
    uploader.submit(local, subject_uri, step, job.train.keep_checkpoints)


def train_subject(c: Components, job: JobConfig, subject: Subject, data: SubjectData, work: Path, subject_uri: str,
                  preemption: Preemption, on_step: Callable[[int, int, float | None], None] | None = None,
                  on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the (freshly reset) adapters on one subject; resumes from its latest checkpoint.
    `on_step` sees every step (with the interval's mean loss at a logging step), `on_log` every
    metrics.jsonl line as it is written (the experiment trackers)."""
    t = job.train
    steps = subject.steps or t.steps
    lr = subject.learning_rate or t.learning_rate
    seed = subject_seed(t.seed, subject.id)
    torch.manual_seed(seed)
    gen = torch.Generator(c.device).manual_seed(seed)
    stepper = Stepper(trainable_groups(c, job, lr), job, c.device, steps)
    model = training_model(c, job)
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)

    step, resumed_from = 0, None
    resumed = checkpoint.resume(subject_uri)
    if resumed is not None:
        for part in adapters.specs(job.adapter, c.family):
            if part not in resumed.adapters:
                raise ValueError(f"checkpoint {resumed.name} has no {part} adapter")
            adapters.load_adapter_state_dict(c.part(part), resumed.adapters[part])
        stepper.resume(resumed.trainer_state, subject.id)
        checkpoint.set_rng_state(resumed.trainer_state["rng"], gen)
        step = resumed_from = resumed.step
        if resumed.metrics is not None:
            metrics.write_bytes(resumed.metrics)
        log.info("subject %s: resuming from %s at step %d/%d", subject.id, resumed.name, step, steps)

    model.train()
    if t.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
    uploader = checkpoint.Uploader()
    pending: list[torch.Tensor] = []
    final_loss: float | None = None  # the mean over the last logging interval (TrainResult.final_loss)
    started = time.perf_counter()
    try:
        with open(metrics, "a") as metrics_file:
            while step < steps:
                if preemption.requested:
                    _save_checkpoint(c, job, stepper, gen, step, work, subject_uri, metrics, uploader)
                    uploader.wait()  # preempted: the checkpoint must be in the bucket before the process exits
                    return TrainResult(step, steps, final_loss, True, resumed_from)
                total = torch.zeros((), device=c.device)
                for _ in range(t.gradient_accumulation):
                    loss = diffusion_loss(c, job, data, gen, model, stepper.autocast) / t.gradient_accumulation
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
                    if on_log:
                        on_log(line)
                    if on_step:
                        on_step(step, steps, mean_loss)
                elif on_step:
                    on_step(step, steps, None)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                    metrics_file.flush()
                    _save_checkpoint(c, job, stepper, gen, step, work, subject_uri, metrics, uploader)
        uploader.wait()  # the final publish happens after the last checkpoint upload
    finally:
        if t.gradient_checkpointing:
            c.denoiser.disable_gradient_checkpointing()
        model.eval()
    return TrainResult(step, steps, final_loss, False, resumed_from)
