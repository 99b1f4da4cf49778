"""The job file: one typed, validated config tree (pydantic), loaded from YAML plus overrides.

A job file has the sections model, adapter, train, prior, eval, subjects, output, distributed
and cluster. `load_job(path, ["train.steps=400"])` returns a `JobConfig` or raises `ConfigError`
listing every problem with its dotted path. Relative paths in the file are taken relative to
the current working directory, as any command-line tool does.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from launcher.errors import ConfigError

# libyaml's safe loader and dumper where PyYAML has them (its wheels do): ten times the speed of
# the pure-Python ones, which took 20 s to read a 20,000-subject job file
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping: YAML would silently keep the last."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(f"key {key!r} appears twice in one mapping, at lines {first_line} and {second_line}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class JobLoader(YAML_LOADER):
    """The safe loader (libyaml's where present), refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: the constructor itself reports it
        return super().construct_mapping(node, deep=deep)

SUBJECT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole string (fullmatch)
JOB_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_TIME_RE = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|UNLIMITED|INFINITE",
                           re.I)
DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
QUANTITY_RE = re.compile(r"\d+(\.\d+)?([mkMGTPE]|[KMGTPE]i)?")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
IMAGE_FILE_RE = re.compile(r"/[A-Za-z0-9._/+-]+\.(sif|sqsh|squashfs)")
# A container image reference as the OCI distribution spec writes it:
# [registry[:port]/]path[:tag][@algorithm:hex], path components lower case
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
IMAGE_REF_RE = re.compile(rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
                          r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?")


def matching(pattern: re.Pattern, what: str):
    """A validator: the whole value matches `pattern`, else "<value> <what>"."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{value!r} {what}")
        return value

    return check


def image_reference(value: str) -> str:
    """A container image reference as runtimes and the Kubernetes API take it; on Slurm also the
    forms apptainer and pyxis read: docker://<reference>, registry#<reference>, or an image file
    (.sif, .sqsh) by absolute path."""
    ref = value.removeprefix("docker://")
    if "#" in ref:  # enroot/pyxis: registry#name[:tag]
        registry, _, ref = ref.partition("#")
        ref = f"{registry}/{ref}"
    match = IMAGE_REF_RE.fullmatch(ref)
    if match and len((match["domain"] or "") + match["path"]) < 256:
        return value
    if IMAGE_FILE_RE.fullmatch(value):
        return value
    raise ValueError(f"{value!r} is not a container image reference: [registry[:port]/]name[:tag][@digest] with a "
                     "lower-case name (letters and digits, '.', '_' or '-' between them, '/' between parts), e.g. "
                     "registry.example.com:5000/team/dreamfleet:1.2 or dreamfleet@sha256:<hex>; on Slurm also "
                     "docker://<reference>, registry#<reference> or the absolute path of a .sif/.sqsh image")


def one_line(value: str) -> str:
    """For strings that land in a batch script line or a file name: no newline, no control character."""
    if CONTROL_RE.search(value):
        raise ValueError(f"{value!r} must be one line of text (no newline or control character)")
    return value


def location(value: str) -> str:
    """A path or URI the job names: one line, well formed, and without a credential in it
    (credentials are referenced through the environment or a secret, never written in a job)."""
    one_line(value)
    if not value.strip():
        raise ValueError("must not be empty")
    scheme, sep, rest = value.partition("://")
    if sep:
        host = rest.split("/", 1)[0]
        if not host:
            raise ValueError(f"{value!r} names no bucket or host after {scheme}://")
        if "@" in host and ":" in host.split("@", 1)[0]:
            raise ValueError(f"{scheme}://<user>:<password>@... holds a credential; give it to the workers through the "
                             "environment or a secret instead (see docs/storage.md)")
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", value):
        raise ValueError(f"{value!r} is neither a path nor a URI (scheme://bucket/path)")
    return value


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        """`steps: true` is a mistake, not 1 (pydantic's lax mode takes a bool for a number)."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(value, bool) else None
                kinds = _scalar_types(field.annotation) if field else set()
                if bool not in kinds and Any not in kinds and kinds & {int, float}:
                    raise ValueError(f"{key} must be a number, not {str(value).lower()}")
        return data


def _scalar_types(annotation: Any) -> set:
    """The types a field takes at its top level: through unions, Annotated, Optional and literals
    (a literal gives its values' types), not into lists or dicts."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType, Annotated):
        return set().union(*(_scalar_types(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    return {annotation}


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    source: Annotated[str, AfterValidator(location)] = Field(description="Diffusers-layout model: a local path, an fsspec URI (s3://, gs://, az://) or a Hub repo id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when source is a Hub repo id.")
    variant: str | None = Field(None, description="Weights variant to load, e.g. 'fp16' for *.fp16.safetensors.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="Dtype of the frozen VAE and text encoder; 'auto' is bf16 on a GPU where supported, else fp16, and fp32 on a CPU; an explicit value applies on every device.")
    cache_dir: str | None = Field(None, description="Node-local staging cache for remote models (local NVMe, an emptyDir); default ~/.cache/dreamfleet/models.")
    family: Literal["auto", "sd", "sdxl", "flux"] = Field("auto", description="Model family: 'auto' detects it from the model's own files (model_index.json, the denoiser's config); 'sd' (1.x/2.x), 'sdxl' or 'flux' (Flux.1) where they cannot be read before the download (a Hub id).")
    quantize: Literal["none", "int8", "nf4"] = Field("none", description="Hold the frozen transformer's block layers in 8-bit or 4-bit NF4 through bitsandbytes, with the LoRA trained on top in full precision (QLoRA); Flux with LoRA only.")
    vae: Annotated[str, AfterValidator(location)] | None = Field(None, description="A separate VAE to load instead of the model's own (e.g. SDXL's fp16-fixed VAE): a folder holding the VAE's config.json (or a vae/ subfolder), a URI or a Hub repo id.")


# --------------------------------------------------------------------------- adapters

TargetPreset = Literal["minimal", "comprehensive"]


class _AdapterSpec(Section):
    rank: int = Field(8, gt=0, description="Adapter rank (dimension of the low-rank factors).")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; the update is scaled by alpha/rank. Default: equal to rank.")
    targets: TargetPreset | list[str] = Field("minimal", description="Module names to adapt: 'minimal', 'comprehensive', or an explicit list of module-name suffixes.")

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module")
        return value

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class LoraSpec(_AdapterSpec):
    type: Literal["lora"] = Field("lora", description="Adapter kind.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (peft lora_dropout).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train (peft bias).")


class _LycorisSpec(_AdapterSpec):
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping the whole adapter of a module during training.")
    use_effective_conv2d: bool = Field(False, description="Use the parameter-efficient Tucker form for convolutions with kernel > 1.")


class LohaSpec(_LycorisSpec):
    type: Literal["loha"] = Field("loha", description="Adapter kind.")


class LokrSpec(_LycorisSpec):
    type: Literal["lokr"] = Field("lokr", description="Adapter kind.")
    decompose_both: bool = Field(False, description="Also decompose the left Kronecker factor into low-rank matrices.")
    decompose_factor: int = Field(-1, description="Kronecker factor size; -1 picks the most square factorisation.")


AdapterSpec = Annotated[Union[LoraSpec, LohaSpec, LokrSpec], Field(discriminator="type")]


class LoraAdapter(LoraSpec):
    text_encoder: AdapterSpec | None = Field(None, description="Optional adapter on the (first) text encoder, with its own type, rank, alpha and targets.")
    text_encoder_2: AdapterSpec | None = Field(None, description="Optional adapter on the second text encoder (SDXL's OpenCLIP encoder), with its own type, rank, alpha and targets.")


class LohaAdapter(LohaSpec):
    text_encoder: AdapterSpec | None = Field(None, description="Optional adapter on the (first) text encoder, with its own type, rank, alpha and targets.")
    text_encoder_2: AdapterSpec | None = Field(None, description="Optional adapter on the second text encoder (SDXL's OpenCLIP encoder), with its own type, rank, alpha and targets.")


class LokrAdapter(LokrSpec):
    text_encoder: AdapterSpec | None = Field(None, description="Optional adapter on the (first) text encoder, with its own type, rank, alpha and targets.")
    text_encoder_2: AdapterSpec | None = Field(None, description="Optional adapter on the second text encoder (SDXL's OpenCLIP encoder), with its own type, rank, alpha and targets.")


UNetAdapter = Annotated[Union[LoraAdapter, LohaAdapter, LokrAdapter], Field(discriminator="type")]


# --------------------------------------------------------------------------- training


class SamplesConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["{instance} in a garden"], description="Validation prompts rendered at the end; '{instance}' is replaced by the subject's instance prompt.")
    num_inference_steps: int = Field(20, gt=0, description="Sampler steps per validation image.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale for validation images.")
    enabled: bool = Field(True, description="Render validation images into samples/ after training.")


class TrainConfig(Section):
    steps: int = Field(400, gt=0, description="Optimizer steps per subject.")
    batch_size: int = Field(1, gt=0, description="Instance images per step per process (prior images are added on top).")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of the UNet adapter.")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="Learning rate of the text-encoder adapter; default: learning_rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field("constant", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = Field("adamw8bit", description="Optimizer: torch AdamW, or bitsandbytes AdamW8bit (paged variant on GPU only).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="Autocast dtype of the forward; 'auto' is bf16 on a GPU where supported, else fp16, and fp32 (no autocast) on a CPU; an explicit value applies on every device. Adapters and optimizer state stay fp32.")
    seed: int = Field(0, description="Base seed; each subject's seed derives from it and the subject id.")
    resolution: int = Field(512, ge=8, description="Training image side in pixels (images are resized and cropped to a square).")
    center_crop: bool = Field(True, description="Center-crop after resizing (else a seeded random crop).")
    random_flip: bool = Field(False, description="Randomly flip images horizontally.")
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (0 disables).")
    guidance: float = Field(3.5, ge=0, description="Flux: the guidance value fed to a guidance-distilled transformer (FLUX.1-dev) in training; other models ignore it.")
    weighting_scheme: Literal["none", "logit_normal"] = Field("none", description="Flow-matching families (Flux): how training timesteps are drawn, 'none' uniformly, 'logit_normal' from a logit-normal density (train.logit_mean, train.logit_std).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep density (train.weighting_scheme logit_normal).")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal timestep density (train.weighting_scheme logit_normal).")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory (never on a text encoder with an adapter).")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: only at preemption).")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep per subject.")
    log_every: int = Field(10, gt=0, description="Write a metrics line (and a log line off-terminal) every N steps.")
    pack: int | Literal["auto"] = Field(1, description="Subjects trained together in one batch on one frozen base (1: one at a time; 'auto' on GPU picks from free memory).")
    compile: bool = Field(False, description="torch.compile the UNet after a one-time compile (later runs reuse TORCHINDUCTOR_CACHE_DIR). Meant for GPUs; on CPU at the tiny model's shape it measured no faster (benchmarks/RESULTS.md).")
    attention: Literal["auto", "sdpa"] = Field("auto", description="'auto': on CPU, attention with heads of up to 8 channels runs dreamfleet's fused kernel (built with the system C compiler on first use; SDPA without one), elsewhere PyTorch SDPA. 'sdpa': SDPA everywhere.")
    prompt_template: str = Field("{instance}", description="Training prompt of each image: '{instance}' is the subject's instance prompt, '{caption}' the image's caption (a sidecar .txt or the manifest's captions); a template with '{caption}' needs a caption for every image.")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="Probability that an instance image trains with the empty prompt instead of its own (for classifier-free guidance); 0 keeps every prompt.")
    buckets: bool = Field(False, description="Aspect-ratio buckets: each image is resized without distortion to the bucket (sides multiples of train.bucket_step, area at most resolution squared) nearest its aspect ratio, and each step draws its batch from one bucket; off: every image is square-cropped.")
    bucket_step: int = Field(64, gt=0, description="Side multiple of the aspect-ratio buckets in pixels (train.buckets); must divide train.resolution.")
    samples: SamplesConfig = Field(default_factory=SamplesConfig, description="Validation images rendered after training.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list, description="Experiment trackers, one run per subject tagged with the job and subject ids (training.trackers; the [trackers] extra); credentials and endpoints come from the workers' environment (WANDB_API_KEY, MLFLOW_TRACKING_URI), never from the job.")
    tracker_project: str | None = Field(None, description="W&B project and MLflow experiment of the trackers' runs; default: the job name.")

    @field_validator("pack")
    @classmethod
    def _pack_positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {value}")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        from launcher.captions import template_problem

        if problem := template_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _bucket_step_divides(self):
        if self.buckets and self.resolution % self.bucket_step:
            raise ValueError(f"train.bucket_step {self.bucket_step} must divide train.resolution {self.resolution} "
                             "(the square bucket is resolution x resolution)")
        return self


class PriorConfig(Section):
    enabled: bool = Field(False, description="Prior preservation with class images (DreamBooth's class-specific prior loss).")
    num_class_images: int = Field(100, gt=0, description="Class images per class prompt; missing ones are generated by the frozen base model.")
    loss_weight: float = Field(1.0, ge=0, description="Weight of the prior MSE in the combined loss.")
    sample_steps: int = Field(25, gt=0, description="Sampler steps when generating class images.")
    guidance_scale: float = Field(7.5, ge=0, description="Guidance scale when generating class images.")
    store: Annotated[str, AfterValidator(location)] | None = Field(None, description="Where class images live (any URI); default <output>/<job>/priors.")


# --------------------------------------------------------------------------- evaluation


class EvalConfig(Section):
    """Scores of every subject's samples (training.scores; DreamBooth's DINO, CLIP-I, CLIP-T) and
    the quality gate. Not part of the fingerprint: scoring and thresholds never change an adapter."""

    clip: Annotated[str, AfterValidator(location)] | None = Field(None, description="CLIP model (transformers CLIPModel layout) for CLIP-I and CLIP-T: a local path, an fsspec URI (staged into the node cache) or a Hub repo id; absent: no CLIP scores.")
    dino: Annotated[str, AfterValidator(location)] | None = Field(None, description="DINO or DINOv2 ViT model (transformers layout) for the DINO score: a local path, an fsspec URI (staged into the node cache) or a Hub repo id; absent: no DINO score.")
    revision: str | None = Field(None, description="Hub revision of eval.clip and eval.dino when they are Hub repo ids.")
    clip_t_text: Literal["class", "sample"] = Field("class", description="Text CLIP-T compares each sample with: 'class' the sample prompt with the instance prompt replaced by the subject's class prompt (identifier removed; the sample prompt where a subject has no class prompt), 'sample' the prompt as rendered (identifier kept).")
    base_model: bool = Field(False, description="Also render the same prompts with the adapter switched off and score them (scores.base), to show the adapter's gain.")
    min_dino: float | None = Field(None, ge=-1, le=1, description="Flag a subject for review when its DINO score is below this.")
    min_clip_i: float | None = Field(None, ge=-1, le=1, description="Flag a subject for review when its CLIP-I score is below this.")
    min_clip_t: float | None = Field(None, ge=-1, le=1, description="Flag a subject for review when its CLIP-T score is below this.")

    @model_validator(mode="after")
    def _thresholds_need_their_model(self):
        missing = [f"eval.{key} needs eval.{model}" for key, model in
                   (("min_dino", "dino"), ("min_clip_i", "clip"), ("min_clip_t", "clip"))
                   if getattr(self, key) is not None and getattr(self, model) is None]
        if missing:
            raise ValueError("; ".join(missing) + " (no model, no score to compare)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.clip or self.dino)


# --------------------------------------------------------------------------- subjects


class Subject(Section):
    id: str = Field(description="Unique subject id, safe as a path component and a label: [A-Za-z0-9][A-Za-z0-9._-]*.")
    images: Annotated[str, AfterValidator(location)] | list[Annotated[str, AfterValidator(location)]] = Field(description="A folder (path or URI) of instance images, or a list of image paths/URIs.")
    instance_prompt: str = Field(description="Prompt with the rare identifier, e.g. 'a photo of sks dog'.")
    class_prompt: str | None = Field(None, description="Class prompt for prior preservation, e.g. 'a photo of a dog'.")
    steps: int | None = Field(None, gt=0, description="Per-subject override of train.steps.")
    learning_rate: float | None = Field(None, gt=0, description="Per-subject override of train.learning_rate.")
    captions: dict[str, str] | None = Field(None, description="Per-image captions: image file name (or its path/URI as listed) -> caption; they take precedence over sidecar .txt files.")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if not SUBJECT_ID_RE.fullmatch(value) or value in (".", ".."):
            raise ValueError(
                f"{value!r} is not a safe subject id: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit, at most 128 characters"
            )
        return value

    @field_validator("instance_prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("images")
    @classmethod
    def _images_not_empty(cls, value):
        if (isinstance(value, list) and not value) or (isinstance(value, str) and not value.strip()):
            raise ValueError("must name a folder or at least one image")
        return value


# --------------------------------------------------------------------------- output / distributed


class OutputConfig(Section):
    uri: Annotated[str, AfterValidator(location)] = Field("./outputs", description="Where results go (any fsspec URI or a local path); results land under <uri>/<job name>/.")
    formats: list[Literal["peft", "diffusers", "kohya"]] = Field(default_factory=lambda: ["peft", "diffusers", "kohya"], description="Adapter formats written for each subject.")
    max_attempts: int = Field(3, gt=0, description="Attempts per subject before it stays failed.")
    heartbeat_s: int = Field(60, gt=0, description="How often a running subject's status.json heartbeat is refreshed.")
    stale_after_s: int = Field(600, gt=0, description="A 'running' subject whose heartbeat is older than this is taken over.")


class DistributedConfig(Section):
    strategy: Literal["subject", "ddp", "deepspeed"] = Field("subject", description="subject: each rank trains its own subjects; ddp: data-parallel per subject; deepspeed: ZeRO per subject.")
    nnodes: int = Field(1, gt=0, description="Nodes (one torchrun agent per node).")
    nproc_per_node: int = Field(1, gt=0, description="Worker processes per node (one per GPU on GPU nodes).")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage when strategy is deepspeed.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer state to CPU (uses DeepSpeed's CPU Adam).")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    deepspeed_config: dict[str, Any] | None = Field(None, description="Raw DeepSpeed config merged over the generated one.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend; auto is nccl on GPU, gloo on CPU.")
    timeout_s: int = Field(1800, gt=0, description="Collective timeout in seconds.")
    rdzv_port: int = Field(29500, gt=0, lt=65536, description="Rendezvous port on the first node (Slurm derives one from the job id).")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


# --------------------------------------------------------------------------- cluster


class SlurmConfig(Section):
    partition: str | None = Field(None, description="#SBATCH --partition.")
    account: str | None = Field(None, description="#SBATCH --account.")
    qos: str | None = Field(None, description="#SBATCH --qos.")
    time: str = Field("04:00:00", description="#SBATCH --time (wall-clock limit).")
    gpus_per_node: int = Field(0, ge=0, description="#SBATCH --gpus-per-node (0: none).")
    gres: str | None = Field(None, description="#SBATCH --gres, instead of gpus_per_node (e.g. 'gpu:a100:8').")
    cpus_per_task: int | None = Field(None, gt=0, description="#SBATCH --cpus-per-task.")
    mem: str | None = Field(None, description="#SBATCH --mem (e.g. '64G').")
    constraint: str | None = Field(None, description="#SBATCH --constraint.")
    exclusive: bool = Field(False, description="#SBATCH --exclusive.")
    log_dir: str = Field("slurm-logs", description="Directory of the job's stdout/stderr files.")
    extra: list[str] = Field(default_factory=list, description="Extra #SBATCH options, e.g. ['--reservation=foo'].")
    runtime: Literal["none", "pyxis", "apptainer", "podman", "docker"] = Field("none", description="How workers run: bare venv, or a container runtime.")
    venv: str | None = Field(None, description="Virtualenv on shared storage to activate for runtime 'none'.")
    mounts: list[str] = Field(default_factory=list, description="Container bind mounts 'SRC:DST[:ro]'.")
    array_throttle: int | None = Field(None, gt=0, description="Max array tasks running at once (the %N of --array).")
    signal_grace_s: int = Field(120, gt=0, description="Seconds before the time limit at which workers are told to checkpoint.")
    max_requeues: int = Field(3, ge=0, description="Requeues after preemption or time limit before giving up.")

    @field_validator("partition", "account", "qos", "time", "gres", "mem", "constraint", "log_dir", "venv")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return value if value is None else one_line(value)  # each lands in a line of the batch script

    @field_validator("extra", "mounts")
    @classmethod
    def _one_line_each(cls, value: list[str]) -> list[str]:
        return [one_line(v) for v in value]

    _time = field_validator("time")(matching(SLURM_TIME_RE, "is not a Slurm time limit: minutes, MM:SS, HH:MM:SS, "
                                                            "D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED"))


class KubernetesConfig(Section):
    namespace: str = Field("default", description="Namespace of the rendered objects.")
    flavour: Literal["indexed-job", "pytorchjob", "jobset", "trainjob"] = Field("indexed-job", description="Workload kind: a plain Indexed Job (no operator), a Kubeflow PyTorchJob, a JobSet, or a Kubeflow Trainer v2 TrainJob.")
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime a trainjob references (k8s/runtime/ has dreamfleet's).")
    queue: str | None = Field(None, description="Kueue LocalQueue name; the workload is created suspended for Kueue to admit.")
    gpus_per_pod: int = Field(0, ge=0, description="nvidia.com/gpu per pod.")
    cpu: str = Field("4", description="CPU request and limit per pod.")
    memory: str = Field("32Gi", description="Memory request and limit per pod.")
    shm_size: str = Field("8Gi", description="Size of the memory-backed /dev/shm.")
    cache_size: str = Field("100Gi", description="Size of the scratch volume holding the node-local model cache.")
    cache_claim: str | None = Field(None, description="PersistentVolumeClaim for the model cache instead of an emptyDir.")
    credentials_secret: str | None = Field(None, description="Secret whose keys become the bucket credentials' environment (by reference only).")
    service_account: str | None = Field(None, description="ServiceAccount, e.g. for workload identity.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity.")
    priority_class: str | None = Field(None, description="priorityClassName.")
    parallelism: int | None = Field(None, gt=0, description="Shards running at once in a fleet (default: all).")
    backoff_limit: int = Field(3, ge=0, description="Retries of the job (per index for fleets).")
    termination_grace_s: int = Field(300, gt=0, description="Grace period from SIGTERM to kill: time to checkpoint and exit.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Container imagePullPolicy.")

    _namespace = field_validator("namespace")(
        matching(DNS_LABEL_RE, "is not a namespace name: lowercase letters, digits and '-', at most 63"))
    _quantities = field_validator("cpu", "memory", "shm_size", "cache_size")(
        matching(QUANTITY_RE, "is not a Kubernetes quantity, e.g. 8, 500m, 64Gi"))


class ClusterConfig(Section):
    backend: Literal["local", "slurm", "kubernetes"] = Field("local", description="Default backend for submit/render when --backend is not given.")
    image: Annotated[str, AfterValidator(image_reference)] = Field("dreamfleet:latest", description="Worker container image: [registry[:port]/]name[:tag][@digest].")
    shards: int | None = Field(None, gt=0, description="Subject shards (array tasks / job indexes) for fleets; default: one per node group.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra non-secret environment for workers (never put credentials here).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Slurm settings.")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig, description="Kubernetes settings.")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits and '_', "
                                 "not starting with a digit)")
        return value


# --------------------------------------------------------------------------- job


class JobConfig(Section):
    name: str = Field(description="Job name: lowercase letters, digits and '-', used in paths, Slurm and Kubernetes names.")
    model: ModelConfig = Field(description="The base Stable Diffusion model.")
    adapter: UNetAdapter = Field(default_factory=LoraAdapter, description="The adapter trained for each subject.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    prior: PriorConfig = Field(default_factory=PriorConfig, description="Prior preservation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Scores of each subject's samples and the quality gate.")
    subjects: list[Subject] | Annotated[str, AfterValidator(location)] = Field(description="Subjects inline, or a JSONL/CSV manifest path or URI.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where and what to write.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Processes, nodes and parallel strategy.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Scheduler-specific settings.")

    @model_validator(mode="before")
    @classmethod
    def _adapter_type_defaults_to_lora(cls, data):
        adapter = data.get("adapter") if isinstance(data, dict) else None
        if isinstance(adapter, dict):
            adapter = data["adapter"] = {"type": "lora", **adapter}
            for part in ("text_encoder", "text_encoder_2"):
                if isinstance(adapter.get(part), dict):
                    adapter[part] = {"type": "lora", **adapter[part]}
        return data

    _name = field_validator("name")(matching(JOB_NAME_RE, "must be lowercase letters, digits and '-', 1-52 characters, "
                                                         "not starting or ending with '-'"))

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one subject, or name a manifest")
            seen: set[str] = set()
            dupes = sorted({s.id for s in value if s.id in seen or seen.add(s.id)})
            if dupes:
                raise ValueError(f"duplicate subject ids: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self):
        if isinstance(self.subjects, list) and (problem := self.class_prompts_missing(self.subjects)):
            raise ValueError(problem)
        return self

    def class_prompts_missing(self, subjects: list[Subject]) -> str | None:
        """What is wrong when prior preservation is on and subjects lack a class prompt (checked
        here for inline subjects, by launcher.subjects for a manifest's)."""
        missing = [s.id for s in subjects if not s.class_prompt] if self.prior.enabled else []
        if not missing:
            return None
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        return f"prior.enabled needs a class_prompt for every subject; missing for: {', '.join(missing[:20])}{more}"

    @property
    def job_uri(self) -> str:
        """Where this job's results live: <output.uri>/<name>."""
        return self.output.uri.rstrip("/") + "/" + self.name


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.steps=400' -> (['train', 'steps'], 400). Values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        also = " (one job file per command: run it once for each file)" if item.endswith((".yaml", ".yml")) else ""
        raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. train.steps=400{also}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (lists are indexed by number: subjects.0.steps=5)."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of the list")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                if node is None:
                    node = {}
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last} is not an index of the list")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(path[:-1])} is not a section")
    return data


def _model_at(loc: tuple, root: type[BaseModel] = None) -> type[BaseModel] | None:
    """The section class addressed by a pydantic error location (for listing valid keys). In a
    discriminated union the location carries the tag ("adapter", "loha", ...): the member of
    that type is the one meant."""
    from typing import get_args

    def models_in(annotation) -> list[type[BaseModel]]:
        found, todo = [], [annotation]
        while todo:
            a = todo.pop(0)
            if isinstance(a, type) and issubclass(a, BaseModel):
                found.append(a)
            else:
                todo.extend(get_args(a))
        return found

    cls: Any = root or JobConfig
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            continue  # a union's tag, used below
        members = models_in(field.annotation)
        if not members:
            return None
        tag = loc[i + 1] if i + 1 < len(loc) else None
        tagged = [m for m in members if "type" in m.model_fields and m.model_fields["type"].default == tag]
        cls = tagged[0] if tagged else members[0]
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


GENERIC_TYPE_ERROR = ("Input should be a valid list", "Input should be a valid string",
                      "Input should be a valid dictionary")


def _is_branch_label(part) -> bool:
    """Parts of an error location that name a union's branch, not a key: "lora", "list[Subject]",
    "function-after[location(), str]", "str"."""
    return isinstance(part, str) and ("[" in part or part in ("str", "lora", "loha", "lokr"))


def _format_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, with its dotted path; `root` is the model validated (default the job).
    A union reports every branch; where one branch says what is wrong, the others' bare "should
    be a valid list/string" lines for the same key are left out."""
    found = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_branch_label(p))
        dotted = ".".join(str(p) for p in loc) or "(job file)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(tuple(err["loc"])[:-1], root)
            valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
            found.append((dotted, f"unknown key; valid keys here: {valid}"))
        elif err["type"] == "missing":
            found.append((dotted, "required"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if err["type"] in ("greater_than", "greater_than_equal", "less_than", "literal_error", "int_parsing", "float_parsing", "bool_parsing"):
                msg = f"{msg}, got {got!r}"
            found.append((dotted, msg))

    def explained(path: str) -> bool:
        return any(not m.startswith(GENERIC_TYPE_ERROR) and (p == path or p.startswith(path + ".")) for p, m in found)

    return [f"{p}: {m}" for p, m in found if not (m.startswith(GENERIC_TYPE_ERROR) and explained(p))]


def job_from_dict(data: Any, source: str = "job file") -> JobConfig:
    """Validate a job's raw dict; every string is first checked for credentials (launcher.secrets),
    and those problems are reported with the schema's, the schema's own about the same key left out."""
    from launcher.secrets import find_credentials

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (name, model, subjects, ...)")
    credentials = find_credentials(data)
    try:
        job = JobConfig.model_validate(data)
    except ValidationError as exc:
        named = {c.split(": ", 1)[0] for c in credentials}
        rest = [p for p in _format_errors(exc) if p.split(": ", 1)[0] not in named]
        raise ConfigError(f"{source} is invalid", credentials + rest) from None
    if credentials:
        raise ConfigError(f"{source} is invalid", credentials)
    return job


def read_file_text(path: Path) -> str:
    """A local file's text; a `.gz` file is decompressed (a large fleet's job file and plan travel
    gzipped in a Kubernetes ConfigMap)."""
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode()
    return path.read_text()


def read_job_dict(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = read_file_text(path)
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise ConfigError(f"job file {path} cannot be read: {exc or type(exc).__name__}") from None
    try:
        data = yaml.load(text, Loader=JobLoader)
    except DuplicateKey as exc:
        raise ConfigError(f"job file {path}:{exc.second_line}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        # libyaml says "found character that cannot start any token": name the tab instead
        tabbed = [i for i, line in enumerate(text.splitlines(), 1) if "\t" in line[: len(line) - len(line.lstrip())]]
        if tabbed:
            at = (mark.line + 1) if mark and mark.line + 1 in tabbed else tabbed[0]
            raise ConfigError(f"job file {path}:{at}: indented with a tab; YAML indents with spaces only "
                              "(replace the tabs with spaces)") from None
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"job file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise ConfigError(f"job file {path} is empty")
    return data


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply dotted overrides, validate; ConfigError lists every problem."""
    data = read_job_dict(path)
    if not isinstance(data, dict):
        raise ConfigError(f"job file {path}: the top level must be a mapping of sections (name, model, subjects, ...)")
    return job_from_dict(apply_overrides(data, overrides or []), source=f"job file {path}")


def dump_job(job: JobConfig) -> str:
    """The resolved job as YAML: what actually ran, saved next to the outputs."""
    return yaml.dump(job.model_dump(mode="json"), Dumper=YAML_DUMPER, sort_keys=False, allow_unicode=True)
