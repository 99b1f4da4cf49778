"""Model families: what differs between SD 1.x/2.x, SDXL and (next) DiT models, behind one
narrow interface, one module per family. Every loop, the priors, the samples and the exporters
ask the family of the loaded model (`Components.family`) and never test for one.

A family says:

- `parts`: the model parts by subfolder and class (the denoiser first, then the text encoders),
  `tokenizers` (text encoder -> tokenizer subfolder) and `tokenizer_classes`, the training
  `scheduler` class, and the denoiser's part name;
- `configure(train)` -> the family with the job settings it reads (Flux: train.guidance and
  train.weighting_scheme), so that no loop passes them or tests for a family;
- `tokenize(tokenizers, prompts)` -> token ids per text encoder, and
  `encode(text_encoders, ids)` -> the prompt conditioning (a dict of batched tensors): what is
  cached while the text encoders are frozen;
- `image_conditioning(crops)` -> conditioning that depends on the image (SDXL's size and crop
  ids), from the crop that data loading really made;
- `predict(denoiser, noisy, timesteps, conditioning)` -> the denoiser's prediction;
  `draw_timesteps(...)` and `noisy_and_target(...)` -> the training objective: the noised
  latents and what the denoiser is trained to predict (epsilon, v-prediction; flow matching
  for a DiT family);
- `pipeline(components)` -> the inference pipeline for class images and samples, and
  `sampler(scheduler_config)` -> the scheduler it samples with;
- `targets(part)` -> the adapter target presets of a part; `kohya_prefix` -> export key prefixes
  and `kohya_names` -> a part's own kohya module naming (Flux's BFL names);
- `vae_dtype(frozen, separate_vae)` -> the VAE's dtype where the family's VAE needs another;
- `quantized_blocks` -> the denoiser's submodules whose linear layers `model.quantize` holds in
  8/4-bit (none: refused at validate), and `free_after_caching` -> the frozen text encoders dropped
  once every prompt's conditioning is cached (Flux: T5).

`for_model(cfg, path, train)` picks the family from the model's files (launcher.families.detect) or
`model.family`. Adding a family is adding one module here and its tiny model in training.tiny.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from launcher import families as layouts
from launcher.config import ModelConfig
from launcher.errors import InputError


class Family(Protocol):
    name: str
    denoiser: str  # the denoiser's part name (its subfolder): "unet", or "transformer" for a DiT
    parts: dict[str, str]  # part -> "library:Class", the denoiser first
    tokenizers: dict[str, str]  # text encoder part -> tokenizer subfolder
    tokenizer_classes: dict[str, str]  # text encoder part -> "library:Class" of its tokenizer
    scheduler: str  # "library:Class" of the training noise scheduler (scheduler/)
    kohya_prefix: dict[str, str]  # part -> kohya/A1111/ComfyUI key prefix
    # part -> (write, read): the family's own kohya module naming, from and to the flattened paths
    # kohya.to_kohya writes (Flux: BFL's, with fused layers); absent: the flattened paths themselves
    kohya_names: dict[str, tuple]
    quantized_blocks: tuple[str, ...]  # the denoiser's submodules whose linear layers model.quantize holds in 8/4-bit
    free_after_caching: tuple[str, ...]  # frozen text encoders dropped once every prompt is encoded (no samples)

    def configure(self, train) -> "Family": ...

    def targets(self, part: str) -> dict[str, list[str]]: ...

    def tokenize(self, tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]: ...

    def encode(self, text_encoders: dict[str, torch.nn.Module], ids: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]: ...

    def image_conditioning(self, crops: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def draw_timesteps(self, scheduler, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def noisy_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pipeline(self, c): ...

    def sampler(self, config): ...

    def vae_dtype(self, frozen: torch.dtype, separate_vae: bool) -> torch.dtype: ...


PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # every family's adaptable parts, in export order


def get(name: str) -> Family:
    from training.families import flux, sd, sdxl

    return {"sd": sd.FAMILY, "sdxl": sdxl.FAMILY, "flux": flux.FAMILY}[name]


def for_model(cfg: ModelConfig | None, path: str | Path, train=None) -> Family:
    """The family of the model in the local folder `path` (model.family, else its files),
    configured with the job's train settings where given."""
    path = Path(path)
    cfg = cfg or ModelConfig(source=str(path))
    if not path.is_dir():  # a Hub repo id: from_pretrained downloads each part, so only model.family can say
        if cfg.family == "auto":
            from launcher.validate import HUB_FAMILY

            raise InputError(HUB_FAMILY.format(source=cfg.source))
        return get(cfg.family) if train is None else get(cfg.family).configure(train)
    present = {p.name for p in path.iterdir()} if path.is_dir() else set()
    model_index, unet = _json(path / "model_index.json"), _json(path / "unet" / "config.json")
    transformer = _json(path / "transformer" / "config.json")
    try:
        name = layouts.detect(present, model_index, unet, transformer) if cfg.family == "auto" else cfg.family
    except layouts.UnknownFamily as exc:
        raise InputError(f"model {cfg.source}: {exc}") from None
    if problems := layouts.check(name, present, unet):
        raise InputError(f"model {cfg.source} {problems[0]}")
    return get(name) if train is None else get(name).configure(train)


def of_adapter(parts, metadata: dict[str, str]) -> str:
    """The family of an adapter read from a file or folder: its header's dreamfleet_family where
    it has one, else what its parts show (a transformer is Flux's, a second text encoder SDXL's)."""
    from training.export import FAMILY_METADATA

    shown = "flux" if "transformer" in parts else "sdxl" if "text_encoder_2" in parts else "sd"
    return metadata.get(FAMILY_METADATA) or shown


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None


def class_of(spec: str):
    """The class named by a family's "library:Class" part entry."""
    library, _, name = spec.partition(":")
    module = __import__(library)
    return getattr(module, name)
