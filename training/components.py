"""Load a diffusion model part by part and freeze it.

The model's family (training.families) names the parts; each is loaded with
`from_pretrained(path, subfolder=...)`, with the VAE, the tokenizers and the scheduler. Base
weights are frozen; the frozen VAE and text encoders are loaded in `model.dtype`
(training.precision: half precision on GPU under `auto`, and on any device when named; the
family may keep its VAE in fp32), while the denoiser stays fp32 so that adapter weights and
their optimizer state stay fp32 (autocast runs the forward in half precision).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher.config import ModelConfig, TrainConfig
from training import families
from training.families import Family
from training.precision import dtype_of

log = logging.getLogger(__name__)


@dataclass
class Components:
    family: Family
    denoiser: torch.nn.Module  # the UNet or a DiT's transformer (its part name is family.denoiser)
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # by part name, in the family's order
    tokenizers: dict[str, object]  # by the text encoder they feed
    noise_scheduler: object
    path: str
    device: torch.device
    # prompt -> its cached conditioning, filled where a frozen text encoder is freed (free_after_caching)
    prompts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def part(self, name: str) -> torch.nn.Module:
        return self.denoiser if name == self.family.denoiser else self.text_encoders[name]

    def models(self) -> dict[str, torch.nn.Module]:
        """The denoiser and the text encoders by part name."""
        return {self.family.denoiser: self.denoiser, **self.text_encoders}


def frozen_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype of the frozen VAE and text encoders (training.precision's rule)."""
    return dtype_of(cfg.dtype, device)


def resolve_model_path(cfg: ModelConfig, source: str | None = None) -> str:
    """A local directory holding the model (or `source`, e.g. model.vae): staged into the
    node-local cache if it is remote."""
    from launcher import storage

    source = source or cfg.source
    if storage.is_local(source):
        return str(storage.local_path(source))
    if "://" in source:
        from training.staging import stage_model

        return str(stage_model(source, cfg.cache_dir))
    return source  # a Hub repo id: from_pretrained downloads it (needs Hub access)


def load_components(cfg: ModelConfig, device: torch.device, train: TrainConfig | None = None) -> Components:
    """Every part the model's family names, each from its subfolder; the base frozen. `train`:
    the job's train settings, which the family reads what it needs from (Family.configure)."""
    path = resolve_model_path(cfg)
    family = families.for_model(cfg, path, train)
    common = {"revision": cfg.revision} if cfg.revision else {}
    weights = dict(common, **({"variant": cfg.variant} if cfg.variant else {}))
    half = frozen_dtype(cfg, device)

    tokenizers = {te: families.class_of(family.tokenizer_classes[te]).from_pretrained(path, subfolder=sub, **common)
                  for te, sub in family.tokenizers.items()}
    noise_scheduler = families.class_of(family.scheduler).from_pretrained(path, subfolder="scheduler", **common)
    models = {}
    for part, spec in family.parts.items():
        dtype = torch.float32 if part == family.denoiser else half
        models[part] = families.class_of(spec).from_pretrained(path, subfolder=part, torch_dtype=dtype, **weights)
    vae_dtype = family.vae_dtype(half, cfg.vae is not None)
    vae = _load_vae(cfg, path, vae_dtype, common, weights)
    denoiser = models.pop(family.denoiser)
    if cfg.quantize != "none":  # the frozen blocks in 8/4-bit, the LoRA on top (validate allows it for such families)
        from training.quantize import quantize_blocks

        quantize_blocks(denoiser, cfg.quantize, family.quantized_blocks, half, device)
    for module in (denoiser, vae, *models.values()):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    log.info("loaded a %s model from %s: %s (frozen text encoders in %s, VAE in %s, on %s)", family.name, path,
             ", ".join([*family.parts, "vae"]), half, vae_dtype, device)
    return Components(family, denoiser, vae, models, tokenizers, noise_scheduler, path, device)


def _load_vae(cfg: ModelConfig, path: str, dtype: torch.dtype, common: dict, weights: dict):
    """The model's own VAE, or the one model.vae names (a VAE folder, or a model with a vae/)."""
    from diffusers import AutoencoderKL

    if cfg.vae is None:
        return AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **weights)
    vae_path = resolve_model_path(cfg, cfg.vae)
    sub = {"subfolder": "vae"} if (Path(vae_path) / "vae" / "config.json").is_file() else {}
    log.info("VAE from %s", cfg.vae)
    return AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype, **sub, **common)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


@torch.no_grad()
def cache_prompts_and_free(c: Components, prompts: set[str]) -> list[str]:
    """Encode every prompt the worker will train on, keep the conditioning, and drop the text
    encoders the family frees once that is cached (Flux: the T5 encoder, about 9 GB in bf16);
    returns the parts dropped. Only for frozen text encoders and no samples (which need them)."""
    for prompt in sorted(prompts):
        ids = c.family.tokenize(c.tokenizers, [prompt])
        c.prompts[prompt] = {k: v.float() for k, v in c.family.encode(c.text_encoders, ids).items()}
    freed = [part for part in c.family.free_after_caching if part in c.text_encoders]
    for part in freed:
        size = sum(p.numel() * p.element_size() for p in c.text_encoders.pop(part).parameters())
        log.info("freed %s after caching %d prompt(s) (%.1f MB)", part, len(prompts), size / 2**20)
    return freed

