"""Checks of a job's inputs that need no torch: the model layout, the subjects' images, and
settings that combine badly. `check_job` returns (errors, notes); errors stop a run, notes
explain a choice the tool makes (never a silent fallback)."""

from __future__ import annotations

from launcher import storage
from launcher.config import JobConfig
from launcher.errors import StorageError
from launcher.subjects import check_subjects, resolve_subjects

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model(source: str) -> list[str]:
    if "://" not in source and not storage.local_path(source).exists():
        if source.count("/") == 1 and not source.startswith((".", "/")):
            return []  # a Hub repo id; checked when it is downloaded
        return [f"model.source: {source} does not exist"]
    try:
        present = set(storage.list_names(source))
    except StorageError as exc:
        return [f"model.source: {exc}"]
    missing = [c for c in COMPONENTS if c not in present]
    if missing:
        return [f"model.source: {storage.redact(source)} lacks the component subfolder(s) {', '.join(missing)} "
                f"(a diffusers-layout model has {', '.join(COMPONENTS)})"]
    return []


def notes_for(job: JobConfig) -> list[str]:
    d, t = job.distributed, job.train
    notes = []
    if d.strategy == "deepspeed" and d.offload_optimizer and t.optimizer != "adamw":
        notes.append(f"train.optimizer={t.optimizer} cannot run with ZeRO-Offload (offload_optimizer): the optimizer "
                     "step runs on the CPU, where DeepSpeed's own CPU Adam is used instead (fp32 state on the host)")
    if t.optimizer == "paged_adamw8bit":
        notes.append("train.optimizer=paged_adamw8bit pages state only on GPU; on CPU it runs as AdamW8bit")
    if d.strategy in ("ddp", "deepspeed") and t.checkpoint_every:
        notes.append(f"train.checkpoint_every: strategy {d.strategy} writes no resumable checkpoints yet; a preempted "
                     "subject restarts from step 0 (strategy subject resumes)")
    if t.compile:
        notes.append("train.compile applies on GPU only; CPU runs are not compiled")
    return notes


def unsupported(job: JobConfig) -> list[str]:
    """Combinations the worker cannot run (yet), reported before anything starts."""
    d = job.distributed
    errors = []
    if d.strategy in ("ddp", "deepspeed") and job.adapter.text_encoder is not None:
        errors.append(f"adapter.text_encoder: a text-encoder adapter is not supported with distributed.strategy "
                      f"{d.strategy} yet; use strategy subject, or drop it")
    return errors


def check_job(job: JobConfig, check_inputs: bool = True) -> tuple[list[str], list[str]]:
    errors: list[str] = unsupported(job)
    if check_inputs:
        errors += check_model(job.model.source)
        subjects = resolve_subjects(job)
        errors += [f"subject {sid}: {p}" for sid, problems in check_subjects(subjects).items() for p in problems]
    return errors, notes_for(job)
