"""Checks of a job's inputs that need no torch: the model layout, the subjects' images, and
settings that combine badly. `check_job` returns (errors, notes); errors stop a run, notes
explain a choice the tool makes (never a silent fallback)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from launcher import families, storage
from launcher.config import JobConfig, Subject
from launcher.errors import StorageError
from launcher.inputs_check import MIN_SIDE, SubjectReport, check_inputs, check_subjects
from launcher.subjects import resolve_subjects

HUB_FAMILY = ("model.source: {source} is a Hub repo id, whose files are read only when a worker downloads it: "
              "name its family with model.family (sd, sdxl or flux)")


def model_family(source: str, override: str = "auto") -> tuple[str | None, list[str]]:
    """(family, problems) of the model at source: the family from its files (launcher.families),
    or the override. A Hub repo id is not read here (the worker detects it after the download)."""
    if "://" not in source and not storage.local_path(source).exists():
        if source.count("/") == 1 and not source.startswith((".", "/")):
            if override == "auto":
                return None, [HUB_FAMILY.format(source=source)]
            return override, []  # a Hub repo id of a named family; its layout is checked when it is downloaded
        return None, [f"model.source: {source} does not exist"]
    if "://" not in source and storage.local_path(source).is_file():
        return None, [f"model.source: {source} is a file; name the model's folder (the diffusers layout: "
                      "model_index.json and a subfolder per component)"]
    try:
        present = set(storage.list_names(source))
        model_index = storage.read_json(storage.join(source, "model_index.json")) if "model_index.json" in present else None
        unet = storage.read_json(storage.join(source, "unet", "config.json")) if "unet" in present else None
        transformer = (storage.read_json(storage.join(source, "transformer", "config.json"))
                       if "transformer" in present else None)
    except (StorageError, ValueError) as exc:  # ValueError: a config that is not JSON
        return None, [f"model.source: {storage.redact(source)}: {exc}"]
    try:
        family = families.detect(present, model_index, unet, transformer) if override == "auto" else override
    except families.UnknownFamily as exc:
        return None, [f"model.source: {storage.redact(source)}: {exc}"]
    return family, [f"model.source: {storage.redact(source)} {p}" for p in families.check(family, present, unet)]


def check_model(job: JobConfig, remote: bool = True) -> list[str]:
    """The model's layout, and what the job asks of it that its family does not have.
    remote=False leaves a remote model unread (a worker: it stages the model and checks the
    staged copy, so a fleet does not read the configs once per worker)."""
    if not remote and "://" in job.model.source:
        return []
    family, problems = model_family(job.model.source, job.model.family)
    return problems + family_problems(job, family)


def family_problems(job: JobConfig, family: str | None) -> list[str]:
    """What the job asks of a model of `family` (None: not known yet) that the family does not have."""
    problems = []
    if job.adapter.text_encoder_2 is not None and family == "flux":
        problems.append("adapter.text_encoder_2: Flux's T5 encoder stays frozen (as in diffusers' reference "
                        "trainer); adapt the CLIP encoder with adapter.text_encoder")
    elif job.adapter.text_encoder_2 is not None and family not in (None, "sdxl"):
        problems.append(f"adapter.text_encoder_2: a {families.LAYOUTS[family].title} model has one text encoder; "
                        "use adapter.text_encoder")
    if job.model.quantize != "none":
        problems += _quantize_problems(job, family)
    if family == "flux" and "kohya" in job.output.formats and "formats" in job.output.model_fields_set:
        problems += _flux_kohya_problems(job.adapter)
    return problems


def _quantize_problems(job: JobConfig, family: str | None) -> list[str]:
    """What a quantized frozen transformer (QLoRA) cannot be trained with."""
    q = f"model.quantize={job.model.quantize}"
    if family not in (None, "flux"):
        return [f"{q}: quantizing the frozen denoiser is offered for Flux's transformer only (this is a "
                f"{families.LAYOUTS[family].title} model); use model.quantize=none"]
    problems = []
    if job.adapter.type != "lora":
        problems.append(f"adapter.type: {q} trains LoRA on the quantized layers (QLoRA); a {job.adapter.type} "
                        "adapter is not supported there")
    if job.train.pack != 1:
        problems.append(f"train.pack: {q} trains one subject at a time; set train.pack=1")
    if job.distributed.strategy == "deepspeed":
        problems.append(f"distributed.strategy: {q} cannot run under DeepSpeed ZeRO (it shards full-precision "
                        "weights); use subject or ddp")
    return problems


def _flux_kohya_problems(adapter) -> list[str]:
    """What keeps an adapter out of Flux's kohya/ComfyUI file (BFL's naming, with fused q/k/v)."""
    if adapter.type != "lora":
        return [f"output.formats: Flux's kohya/ComfyUI file holds LoRA only (adapter.type is {adapter.type}: no "
                "agreed form for it on BFL's fused layers); use peft and diffusers"]
    targets = [] if isinstance(adapter.targets, str) else adapter.targets
    if outside := [t for t in targets if t not in families.FLUX_KOHYA_TARGETS]:
        return [f"output.formats: adapter.targets {', '.join(outside)} have no place in Flux's kohya/ComfyUI file "
                f"(BFL's naming takes {', '.join(families.FLUX_KOHYA_TARGETS)}); drop kohya or those targets"]
    return []


def notes_for(job: JobConfig) -> list[str]:
    d, t = job.distributed, job.train
    notes = []
    if d.strategy == "deepspeed" and d.offload_optimizer:
        if t.optimizer != "adamw":
            notes.append(f"train.optimizer={t.optimizer} cannot run with ZeRO-Offload (offload_optimizer): the "
                         "optimizer step runs on the CPU, where DeepSpeed's own CPU Adam is used instead (AdamW, fp32 "
                         "state on the host)")
        notes.append("distributed.offload_optimizer: DeepSpeed compiles its CPU Adam with the node's C++ compiler on "
                     "first use (about 2 minutes on 2 cores; cached in TORCH_EXTENSIONS_DIR, default "
                     "~/.cache/torch_extensions) unless the image has it prebuilt (DS_BUILD_CPU_ADAM=1)")
    if t.optimizer == "paged_adamw8bit":
        notes.append("train.optimizer=paged_adamw8bit pages state only on GPU; on CPU it runs as AdamW8bit")
    if t.compile:
        notes.append("train.compile: a worker's first subject waits for the compile (minutes on CPU); put "
                     "TORCHINDUCTOR_CACHE_DIR on persistent storage so later runs reuse it")
    if t.compile and t.buckets:
        notes.append("train.compile with train.buckets: the UNet compiles once for each bucket shape a subject "
                     "draws (a few shapes per subject; dynamic shapes are not used)")
    return notes


def _is_relative(path: str | None) -> bool:
    return bool(path) and "://" not in path and not path.startswith("/")


def container_notes(job: JobConfig, backend: str) -> list[str]:
    """Relative paths where the workers run in a container (Kubernetes, or Slurm with a container
    runtime): they resolve against the container's working directory, not the submit directory."""
    if backend == "local" or (backend == "slurm" and job.cluster.slurm.runtime == "none"):
        return []
    source = job.model.source
    hub_id = source.count("/") == 1 and not source.startswith(".")
    named = [("model.source", None if hub_id else source), ("output.uri", job.output.uri), ("prior.store", job.prior.store),
             ("eval.clip", job.eval.clip), ("eval.dino", job.eval.dino)]
    if isinstance(job.subjects, str):
        named.append(("subjects", job.subjects))
    else:
        named += [(f"subjects ({s.id}).images", p) for s in job.subjects
                  for p in ([s.images] if isinstance(s.images, str) else s.images)]
    relative = [f"{key} {value}" for key, value in named if _is_relative(value)]
    if not relative:
        return []
    shown = "; ".join(relative[:5]) + (f"; and {len(relative) - 5} more" if len(relative) > 5 else "")
    where = "the pod" if backend == "kubernetes" else "the container"
    return [f"relative paths resolve inside {where}, not in this directory: {shown}. Use absolute paths on storage "
            "mounted there, or URIs (s3://...)"]


def unsupported(job: JobConfig) -> list[str]:
    """Combinations the worker cannot run, reported before anything starts."""
    d = job.distributed
    errors = []
    for offload in ("offload_optimizer", "offload_params"):
        if getattr(d, offload) and d.strategy != "deepspeed":
            errors.append(f"distributed.{offload}: offloading is done by DeepSpeed and needs distributed.strategy "
                          f"deepspeed, got {d.strategy}")
    if job.train.compile and job.train.pack != 1:
        errors.append("train.compile cannot be combined with train.pack: the packed layers' routing changes shape "
                      "as subjects join and leave the pack, and every change would recompile the UNet")
    if job.train.pack != 1:
        errors += _unpackable(job)
    if job.eval.enabled and not (job.train.samples.enabled and job.train.samples.prompts):
        which = " and ".join(f"eval.{k}" for k in ("clip", "dino") if getattr(job.eval, k))
        errors.append(f"{which} scores the samples, and train.samples renders none: set train.samples.enabled true "
                      "(with at least one prompt), or drop the evaluator")
    workers = (job.cluster.shards or 1) * d.nnodes * d.nproc_per_node
    try:
        storage.require_exclusive_create(job.output.uri, workers)
    except StorageError as exc:
        errors.append(f"output.uri: {exc}")
    if d.strategy in ("ddp", "deepspeed") and job.train.gradient_accumulation > 1:
        errors.append(f"train.gradient_accumulation={job.train.gradient_accumulation} is not supported with "
                      f"distributed.strategy {d.strategy} yet: raise train.batch_size or add processes instead "
                      "(the global batch is batch_size x processes)")
    return errors


def _unpackable(job: JobConfig) -> list[str]:
    """What the packed LoRA layer (training.packed) cannot train exactly like a single run."""
    a, pack = job.adapter, job.train.pack
    problems = []
    if job.distributed.strategy != "subject":
        problems.append(f"train.pack={pack} needs distributed.strategy subject (each rank packs its own subjects), "
                        f"got {job.distributed.strategy}: a data-parallel run trains one subject at a time")
    if a.type != "lora":
        problems.append(f"train.pack={pack} trains LoRA only, got adapter.type {a.type} (train it with train.pack 1)")
    elif a.dropout or a.bias != "none":
        problems.append(f"train.pack={pack} needs adapter.dropout 0 and adapter.bias none, got {a.dropout} and {a.bias}")
    if a.text_encoder is not None or a.text_encoder_2 is not None:
        problems.append(f"train.pack={pack} trains the UNet only: drop adapter.text_encoder and adapter.text_encoder_2, "
                        "or use train.pack 1")
    if job.train.mixed_precision == "fp16":
        problems.append(f"train.pack={pack} needs bf16 or fp32 (train.mixed_precision), not fp16 (its loss scaling "
                        "would be shared by every subject in the pack)")
    return problems


def check_evaluators(job: JobConfig) -> list[str]:
    """eval.clip and eval.dino, where they can be read before a worker stages them: a folder (or a
    URI) holding a transformers config.json. A Hub repo id is read when a worker downloads it."""
    problems = []
    for key in ("clip", "dino"):
        source = getattr(job.eval, key)
        if not source:
            continue
        local = "://" not in source
        if local and not storage.local_path(source).exists() and source.count("/") == 1 and not source.startswith("."):
            continue  # a Hub repo id
        try:
            found = storage.exists(storage.join(source, "config.json"))
        except StorageError as exc:
            problems.append(f"eval.{key}: {storage.redact(source)}: {exc}")
            continue
        if not found:
            what = "does not exist" if local and not storage.local_path(source).exists() else "holds no config.json"
            problems.append(f"eval.{key}: {storage.redact(source)} {what} (a transformers model folder: config.json, "
                            "the weights, and its image processor and tokenizer files)")
    return problems


def check_job(job: JobConfig, check_inputs: bool = True) -> tuple[list[str], list[str]]:
    errors: list[str] = unsupported(job)
    if check_inputs:
        errors += check_model(job)
        errors += check_evaluators(job)
        subjects = resolve_subjects(job)
        errors += [f"subject {sid}: {p}" for sid, problems in check_subjects(subjects, job.train.prompt_template).items()
                   for p in problems]
    return errors, notes_for(job)


@dataclass
class DataCheck:
    """What `launcher validate` found: errors stop the job, warnings do not; `reports` per subject."""

    errors: list[str]
    warnings: list[str]
    notes: list[str]
    reports: list[SubjectReport]
    seconds: float


def check_data(job: JobConfig, subjects: list[Subject], min_side: int = MIN_SIDE, progress: bool = False) -> DataCheck:
    """The job's settings, its model, and the fleet data check of every subject (launcher.inputs_check)."""
    errors = unsupported(job) + check_model(job) + check_evaluators(job)
    started = time.perf_counter()
    reports = check_inputs(subjects, job.train.prompt_template, min_side, progress=progress)
    seconds = time.perf_counter() - started
    errors += [f"subject {r.id}: {p}" for r in reports for p in r.problems]
    warnings = [f"subject {r.id}: {w}" for r in reports for w in r.warnings]
    return DataCheck(errors, warnings, notes_for(job), reports, seconds)
