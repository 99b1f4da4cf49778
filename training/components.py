"""Load a Stable Diffusion model component by component and freeze it.

Each of unet, vae, text_encoder, tokenizer and scheduler is loaded with
`from_pretrained(path, subfolder=...)`. Base weights are frozen; the frozen VAE and text encoder
are loaded in `model.dtype` (training.precision: half precision on GPU under `auto`, and on any
device when named), while the UNet stays fp32 so that adapter weights and their optimizer state
stay fp32 (autocast runs the forward in half precision).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from launcher.config import ModelConfig
from launcher.validate import COMPONENTS
from training.precision import dtype_of

log = logging.getLogger(__name__)


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    path: str
    device: torch.device

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def frozen_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype of the frozen VAE and text encoder (training.precision's rule)."""
    return dtype_of(cfg.dtype, device)


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory holding the model: staged into the node-local cache if it is remote."""
    from launcher import storage

    if storage.is_local(cfg.source):
        return str(storage.local_path(cfg.source))
    if "://" in cfg.source:
        from training.staging import stage_model

        return str(stage_model(cfg.source, cfg.cache_dir))
    return cfg.source  # a Hub repo id: from_pretrained downloads it (needs Hub access)


def load_components(cfg: ModelConfig, device: torch.device) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(cfg)
    common = {"revision": cfg.revision} if cfg.revision else {}
    weights = dict(common, **({"variant": cfg.variant} if cfg.variant else {}))
    half = frozen_dtype(cfg, device)

    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=half, **weights)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=half, **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32, **weights)

    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    log.info("loaded %s from %s (frozen parts in %s on %s)", ", ".join(COMPONENTS), path, half, device)
    return Components(unet, vae, text_encoder, tokenizer, noise_scheduler, path, device)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
