"""Write a trained adapter in the output contract's formats.

    adapter/unet/, adapter/text_encoder/    PEFT format (adapter_config.json + adapter_model.safetensors)
    pytorch_lora_weights.safetensors        diffusers format (LoRA): pipe.load_lora_weights(dir)
    <subject id>.safetensors                kohya / A1111 / ComfyUI single file (see training.kohya)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher import __version__
from launcher.config import AdapterSpec, LoraSpec

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class TrainedAdapter:
    """One subject's adapter weights (peft key format) with what is needed to describe them."""

    unet: dict[str, torch.Tensor]
    unet_config: object  # peft config
    unet_spec: AdapterSpec
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_config: object | None = None
    text_encoder_spec: AdapterSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def describe(base_model: str, spec: AdapterSpec, resolution: int, steps: int, instance_prompt: str) -> dict[str, str]:
    """Metadata stored in every safetensors header (strings only, as the format requires)."""
    return {
        "dreamfleet_version": __version__,
        "base_model": base_model,
        "adapter_type": spec.type,
        "rank": str(spec.rank),
        "alpha": str(spec.effective_alpha),
        "resolution": str(resolution),
        "steps": str(steps),
        "instance_prompt": instance_prompt,
    }


def write_peft(adapter: TrainedAdapter, directory: Path) -> None:
    parts = [("unet", adapter.unet, adapter.unet_config)]
    if adapter.text_encoder is not None:
        parts.append(("text_encoder", adapter.text_encoder, adapter.text_encoder_config))
    for name, state, config in parts:
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(target))
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"),
                  metadata={"format": "pt", **adapter.metadata})


def write_diffusers(adapter: TrainedAdapter, directory: Path) -> Path | None:
    """diffusers' LoRA file, with the peft configs (so alpha survives) in its metadata."""
    if not isinstance(adapter.unet_spec, LoraSpec):
        return None
    if adapter.text_encoder is not None and not isinstance(adapter.text_encoder_spec, LoraSpec):
        return None
    # peft-named keys under unet./text_encoder.: what diffusers' loader reads back losslessly
    # (its legacy "lora.down" naming loses the attention projections on the way back)
    tensors = {f"unet.{k}": v for k, v in adapter.unet.items()}
    # diffusers reads each model's peft config (rank, alpha, targets) from one JSON entry whose
    # keys carry the model prefix; without it, it assumes alpha = rank
    configs = {f"unet.{k}": v for k, v in _peft_config_dict(adapter.unet_config).items()}
    if adapter.text_encoder is not None:
        tensors.update({f"text_encoder.{k}": v for k, v in adapter.text_encoder.items()})
        configs.update({f"text_encoder.{k}": v for k, v in _peft_config_dict(adapter.text_encoder_config).items()})
    metadata = {"lora_adapter_metadata": json.dumps(configs, sort_keys=True), **adapter.metadata}
    metadata["format"] = "pt"
    path = directory / DIFFUSERS_WEIGHTS
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _peft_config_dict(config) -> dict:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def write_all(adapter: TrainedAdapter, directory: Path, formats: list[str], subject_id: str) -> list[Path]:
    """Every requested format that applies to this adapter; returns the paths written."""
    written = []
    if "peft" in formats:
        write_peft(adapter, directory / "adapter")
        written.append(directory / "adapter")
    if "diffusers" in formats and (path := write_diffusers(adapter, directory)) is not None:
        written.append(path)
    if "kohya" in formats:
        from training.kohya import write_kohya

        written.append(write_kohya(adapter, directory / f"{subject_id}.safetensors"))
    return written
