"""Packed multi-subject training: K subjects in one forward/backward over one frozen denoiser.

Semantics match K independent `loop.train_subject` runs: each slot draws its batch from its
own subject's generator in the same order as `loop.diffusion_loss`, the loss is the sum of the
per-subject mean losses (so each slot's gradient is its own run's gradient), and each slot has
its own optimizer, gradient clipping, LR schedule and step count. The optimizer of a slot
works on views of the stacked parameters (one AdamW/AdamW8bit per slot over `param[slot]`),
so its state is per subject slice. Continuous batching: a subject that finishes is exported
and published, and the next waiting subject takes its slot, reset to the shared init.

Each slot checkpoints in the single-run format (`train.checkpoint_every`, and every live slot
when preempted) and resumes in a pack or alone. Not in packed mode: text-encoder adapters,
LoHa/LoKr, fp16 GradScaler (bf16/fp32 only), data-parallel strategies.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher import ledger
from launcher.config import JobConfig, Subject
from launcher.errors import ConfigError
from launcher.subjects import image_uris
from training import adapters, buckets, checkpoint, lease, packed
from training.loop import Stepper, SubjectData, draw_batch, dreambooth_loss, prepare_subject, subject_seed
from training.failures import is_fatal, log_failure
from training.lease import Outcome, StatusKeeper
from training.precision import refuse_loss_scaling
from training.runner import Worker

log = logging.getLogger(__name__)


@dataclass
class Slot:
    subject: Subject
    steps: int
    gen: torch.Generator
    stepper: Stepper
    views: list[torch.nn.Parameter]
    has_prior: bool
    data: SubjectData
    step: int = 0
    pending: list = field(default_factory=list)
    final_loss: float | None = None
    keeper: StatusKeeper | None = None
    work: tempfile.TemporaryDirectory | None = None
    metrics: object = None
    started: float = 0.0


class PackedTrainer:
    """Holds the packed UNet and the slots; `step()` trains every occupied slot one step."""

    def __init__(self, c, job: JobConfig, num_slots: int, init: dict[str, torch.Tensor]):
        self.c, self.job, self.num_slots, self.init = c, job, num_slots, init
        self.router, self.layers = packed.install(c.denoiser, num_slots)
        self.params = packed.slot_parameters(self.layers)
        self.slots: list[Slot | None] = [None] * num_slots

    def open(self, slot: int, subject: Subject, data: SubjectData) -> Slot:
        job = self.job
        packed.reset_slot(self.layers, slot, self.init)
        steps = subject.steps or job.train.steps
        lr = subject.learning_rate or job.train.learning_rate
        seed = subject_seed(job.train.seed, subject.id)
        torch.manual_seed(seed)
        gen = torch.Generator(self.c.device).manual_seed(seed)
        views = [torch.nn.Parameter(p.data[slot]) for p in self.params]  # share storage with the stack
        stepper = Stepper([{"params": views, "lr": lr}], job, self.c.device, steps)
        s = Slot(subject, steps, gen, stepper, views, data.prior is not None, data)
        self.slots[slot] = s
        return s

    def step(self) -> list[int]:
        """One optimizer step for every occupied slot; returns the slots that finished."""
        c, t = self.c, self.job.train
        live = [i for i, s in enumerate(self.slots) if s is not None]
        totals = {i: torch.zeros((), device=c.device) for i in live}
        for _ in range(t.gradient_accumulation):
            # each slot's batch in the order of a single run (loop.draw_batch); one forward per shape
            drawn = {i: draw_batch(c, self.job, self.slots[i].data, self.slots[i].gen) for i in live}
            # with train.buckets the slots' batches may differ in shape: each shape is its own forward
            # and backward (nothing padded, nothing mixed); without, one group holds every slot
            for group in buckets.group([drawn[i].latents.shape for i in live]):
                self._forward_backward(c, t, [live[j] for j in group], drawn, totals)
        finished = []
        for i in live:
            s = self.slots[i]
            for view, p in zip(s.views, self.params):
                view.grad = p.grad[i] if p.grad is not None else None
            lr_now = s.stepper.lr
            norm = s.stepper.step()  # per-subject clipping, optimizer and schedule
            s.step += 1
            s.pending.append((torch.stack([totals[i], norm]), lr_now))
            if s.step >= s.steps:
                finished.append(i)
        for p in self.params:
            p.grad = None
        return finished

    def _forward_backward(self, c, t, slots: list[int], drawn: dict, totals: dict) -> None:
        parts = [drawn[i] for i in slots]
        rows = [p.latents.shape[0] for p in parts]
        latents, noise, timesteps = (torch.cat([getattr(p, k) for p in parts]) for k in ("latents", "noise", "timesteps"))
        conditioning = {k: torch.cat([p.conditioning[k] for p in parts]) for k in parts[0].conditioning}
        self.router.index = torch.repeat_interleave(torch.tensor(slots), torch.tensor(rows)).to(c.device)
        noisy, target = c.family.noisy_and_target(c.noise_scheduler, latents, noise, timesteps)
        with self.slots[slots[0]].stepper.autocast():
            pred = c.family.predict(c.denoiser, noisy, timesteps, conditioning)
        total = torch.zeros((), device=c.device)
        for i, p_i, t_i in zip(slots, pred.split(rows), target.split(rows)):  # per-subject means
            loss = dreambooth_loss(p_i, t_i, self.slots[i].has_prior, self.job.prior.loss_weight)
            loss = loss / t.gradient_accumulation
            totals[i] += loss.detach()
            total = total + loss
        total.backward()  # the sum of per-subject means: each slot gets its own run's gradient

    def restore(self, slot: int, resumed: checkpoint.Resume) -> None:
        """Continue a subject from its checkpoint (a packed slot's or a single run's)."""
        s = self.slots[slot]
        packed.load_slot(self.layers, slot, resumed.adapters[self.c.family.denoiser])
        s.stepper.resume(resumed.trainer_state, s.subject.id)
        s.gen.set_state(resumed.trainer_state["rng"]["generator"])
        s.step = resumed.step

    def stage_checkpoint(self, slot: int) -> Path:
        s = self.slots[slot]
        s.metrics.flush()
        work = Path(s.work.name)
        return checkpoint.stage(work, s.step, {self.c.family.denoiser: packed.slot_state_dict(self.layers, slot)},
                                s.stepper.state_dict(), s.gen, work / "metrics.jsonl")

    def close(self) -> None:
        packed.uninstall(self.c.denoiser, self.layers)


def resolve_pack(job: JobConfig, device: torch.device) -> int:
    refuse_loss_scaling(job.train, job.model, device, f"train.pack={job.train.pack}")  # the backward is unscaled
    if job.train.pack == "auto":
        rows = job.train.batch_size * (2 if job.prior.enabled else 1)
        return packed.auto_pack(device, job.train.resolution, rows, job.model)
    return int(job.train.pack)


def run_packed(worker: Worker, subjects: list[Subject], num_slots: int) -> list[Outcome]:
    """The worker's subjects, `num_slots` at a time, with continuous batching."""
    job = worker.job
    class_images = worker.setup(subjects)
    c = worker.c
    trainer = PackedTrainer(c, job, num_slots, worker.init_state[c.family.denoiser])
    c.denoiser.train()
    if job.train.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
    queue = list(subjects)
    outcomes: list[Outcome] = []
    uploader = checkpoint.Uploader()
    every, keep = job.train.checkpoint_every, job.train.keep_checkpoints
    try:
        while True:
            for slot in range(num_slots):
                while trainer.slots[slot] is None and queue and not worker.preemption.requested:
                    _admit(worker, trainer, slot, queue.pop(0), class_images, outcomes)
            if all(s is None for s in trainer.slots):
                break
            if worker.preemption.requested:
                _preempt(worker, trainer, uploader, outcomes)
                outcomes += [Outcome(s.id, "preempted", "not started") for s in queue]
                break
            finished = trainer.step()
            for i, s in enumerate(trainer.slots):
                if s is not None:
                    _log(s, job)
                    if every and s.step % every == 0 and s.step < s.steps:
                        uploader.submit(trainer.stage_checkpoint(i), _subject_uri(worker, s), s.step, keep)
            if finished:
                uploader.wait()  # a subject's adapter never lands before its last checkpoint
            for i in finished:
                _finish(worker, trainer, i, outcomes)
    finally:
        if job.train.gradient_checkpointing:
            c.denoiser.disable_gradient_checkpointing()
        trainer.close()
        c.denoiser.eval()
    return outcomes


def _subject_uri(worker: Worker, s: Slot) -> str:
    return ledger.subject_uri(worker.job_uri, s.subject.id)


def _preempt(worker: Worker, trainer: PackedTrainer, uploader: checkpoint.Uploader, outcomes: list[Outcome]) -> None:
    """Checkpoint every live slot, wait until the checkpoints are in the bucket, hand the subjects back."""
    job = worker.job
    for i, s in enumerate(trainer.slots):
        if s is None:
            continue
        uploader.submit(trainer.stage_checkpoint(i), _subject_uri(worker, s), s.step, job.train.keep_checkpoints)
        uploader.wait()
        s.keeper.update(state="pending", step=s.step, error="preempted; resumes from its checkpoint")
        _close_slot(trainer, i)
        outcomes.append(Outcome(s.subject.id, "preempted", f"checkpointed at step {s.step}"))


def _admit(worker, trainer, slot, subject, class_images, outcomes) -> None:
    job = worker.job
    keeper, why = lease.begin(job, subject, worker.owner)
    if keeper is None:
        outcomes.append(Outcome(subject.id, "skipped", why))  # as runner: the exit code reflects this run
        return
    subject = keeper.subject  # with a retry's per-subject overrides
    log.info("subject %s: training in packed slot %d (%s)", subject.id, slot, why)
    try:
        data = prepare_subject(worker.c, job, subject, image_uris(subject), class_images.get(subject.class_prompt),
                               False)
        s = trainer.open(slot, subject, data)
    except Exception as exc:  # this subject's alone (training.failures), unless the process is unusable
        log_failure(log, subject.id, exc)
        keeper.fail(exc)
        keeper.stop()
        outcomes.append(Outcome(subject.id, "failed", str(exc)))
        if isinstance(exc, ConfigError) or is_fatal(exc):
            raise
        return
    s.keeper, s.work, s.started = keeper, tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-"), time.perf_counter()
    s.metrics = open(Path(s.work.name) / "metrics.jsonl", "wb")
    resumed = checkpoint.resume(ledger.subject_uri(worker.job_uri, subject.id))
    if resumed is not None:
        trainer.restore(slot, resumed)
        s.metrics.write(resumed.metrics or b"")
        log.info("subject %s: resuming from %s at step %d/%d in packed slot %d", subject.id, resumed.name, s.step,
                 s.steps, slot)


def _log(s: Slot, job: JobConfig) -> None:
    s.keeper.status.step = s.step
    if s.step % job.train.log_every and s.step != s.steps:
        return
    values = torch.stack([v for v, _ in s.pending]).cpu().tolist()  # the one host sync per log interval
    s.final_loss = sum(v[0] for v in values) / len(values)  # as training.loop: the last interval's mean
    line = {"step": s.step, "loss": round(s.final_loss, 6),
            "last_loss": round(values[-1][0], 6), "grad_norm": round(values[-1][1], 6), "lr": s.pending[-1][1],
            "elapsed_s": round(time.perf_counter() - s.started, 3)}
    s.pending.clear()
    s.metrics.write((json.dumps(line) + "\n").encode())
    s.metrics.flush()


def _close_slot(trainer: PackedTrainer, i: int) -> None:
    s = trainer.slots[i]
    trainer.slots[i] = None
    s.metrics.close()
    s.keeper.stop()
    s.work.cleanup()


def _finish(worker: Worker, trainer: PackedTrainer, i: int, outcomes: list[Outcome]) -> None:
    """Export the slot as a single run would: swap the PEFT layers back, load the slice, publish."""
    s, c = trainer.slots[i], worker.c
    if not s.keeper.held():
        outcomes.append(Outcome(s.subject.id, "skipped", "taken over by another worker; not published"))
        _close_slot(trainer, i)
        return
    try:
        packed.uninstall(c.denoiser, trainer.layers)
        try:
            adapters.load_adapter_state_dict(c.denoiser, packed.slot_state_dict(trainer.layers, i))
            c.denoiser.eval()
            scored = worker.publish(s.subject, Path(s.work.name), s.steps)
        finally:
            c.denoiser.train()
            for name, layer in trainer.layers.items():
                packed._set_submodule(c.denoiser, name, layer)
        s.keeper.update(state="done", step=s.step, final_loss=s.final_loss, finished_at=time.time(), **scored)
        outcomes.append(Outcome(s.subject.id, "done", f"{s.step} steps", s.final_loss))
    except Exception as exc:  # this subject's alone (training.failures), unless the process is unusable
        log_failure(log, s.subject.id, exc)
        s.keeper.fail(exc)
        outcomes.append(Outcome(s.subject.id, "failed", str(exc)))
        if is_fatal(exc):
            raise
    finally:
        _close_slot(trainer, i)
