"""Write a trained adapter in the output contract's formats.

    adapter/unet/, adapter/text_encoder/, adapter/text_encoder_2/ (SDXL)   PEFT format (adapter_config.json + adapter_model.safetensors),
                                            keys as PeftModel.save_pretrained writes them
    pytorch_lora_weights.safetensors        diffusers format (LoRA): pipe.load_lora_weights(dir)
    <subject id>.safetensors                kohya / A1111 / ComfyUI single file (see training.kohya)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from launcher import __version__
from launcher.config import AdapterSpec, LoraSpec

log = logging.getLogger(__name__)
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PeftModel.save_pretrained names every tensor from the PeftModel wrapper down (PeftModel.base_model
# is the tuner, whose .model is the wrapped model), and PeftModel.from_pretrained places only keys
# under that prefix; without it every weight is "missing" and lora_B stays at its zero init.
PEFT_KEY_PREFIX = "base_model.model."


@dataclass
class Part:
    """One adapted model part's weights (our in-memory peft key form), peft config and job spec."""

    state: dict[str, torch.Tensor]
    config: object  # peft config
    spec: AdapterSpec


@dataclass
class TrainedAdapter:
    """One subject's adapters, by part (the denoiser first: "unet", then "text_encoder",
    "text_encoder_2"), with the model family that names their export keys."""

    parts: dict[str, Part]
    family: str = "sd"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def denoiser(self) -> Part:
        return next(iter(self.parts.values()))


FAMILY_METADATA = "dreamfleet_family"


def describe(base_model: str, spec: AdapterSpec, resolution: int, steps: int, instance_prompt: str,
             family: str) -> dict[str, str]:
    """Metadata stored in every safetensors header (strings only, as the format requires)."""
    return {
        "dreamfleet_version": __version__,
        "base_model": base_model,
        FAMILY_METADATA: family,
        "adapter_type": spec.type,
        "rank": str(spec.rank),
        "alpha": str(spec.effective_alpha),
        "resolution": str(resolution),
        "steps": str(steps),
        "instance_prompt": instance_prompt,
    }


def to_peft_file_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our in-memory keys (get_peft_model_state_dict of the bare model) -> the saved PeftModel's."""
    return {PEFT_KEY_PREFIX + k: v.contiguous() for k, v in state.items()}


def from_peft_file_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT folder's keys -> our in-memory keys. Accepts both the PeftModel form and the bare
    form that dreamfleet wrote before it matched save_pretrained (such outputs exist)."""
    return {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()}


def read_peft_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter weights of one part's adapter_model.safetensors, in our in-memory key form."""
    return from_peft_file_keys(load_file(str(path)))


def write_peft(adapter: TrainedAdapter, directory: Path) -> None:
    """One folder per part that `PeftModel.from_pretrained(model, directory / part)` loads as is."""
    for name, part in adapter.parts.items():
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        part.config.save_pretrained(str(target))
        save_file(to_peft_file_keys(part.state), str(target / PEFT_WEIGHTS), metadata={"format": "pt", **adapter.metadata})


def write_diffusers(adapter: TrainedAdapter, directory: Path) -> Path | None:
    """diffusers' LoRA file, with the peft configs (so alpha survives) in its metadata."""
    if not all(isinstance(part.spec, LoraSpec) for part in adapter.parts.values()):
        return None
    # peft-named keys under the part's name (unet., text_encoder., text_encoder_2.: the attribute names
    # of diffusers' pipelines, which its loaders route by): what diffusers' loader reads back
    # losslessly (its legacy "lora.down" naming loses the attention projections on the way back).
    # diffusers reads each model's peft config (rank, alpha, targets) from one JSON entry whose
    # keys carry the same prefix; without it, it assumes alpha = rank
    tensors, configs = {}, {}
    for name, part in adapter.parts.items():
        tensors.update({f"{name}.{k}": v for k, v in part.state.items()})
        configs.update({f"{name}.{k}": v for k, v in _peft_config_dict(part.config).items()})
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
        from training.kohya import NoKohyaForm, write_kohya

        try:
            written.append(write_kohya(adapter, directory / f"{subject_id}.safetensors"))
        except NoKohyaForm as exc:  # only the default formats reach here: validate refuses kohya named for it
            log.info("subject %s: no kohya/ComfyUI file for this %s adapter: %s", subject_id, adapter.family, exc)
    return written
