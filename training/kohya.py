"""The kohya / AUTOMATIC1111 / ComfyUI single-file format, with LyCORIS keys for LoHa and LoKr.

Keys are `lora_unet_<module path with '_'>` and `lora_te_<...>` followed by the factor name:
LoRA `lora_down.weight` / `lora_up.weight`, LoHa `hada_w1_a` ... `hada_t2`, LoKr `lokr_w1` ...,
and one `.alpha` scalar per module. This is the naming that kohya's sd-scripts, A1111,
ComfyUI, LyCORIS and diffusers' non-diffusers LoRA loader all read for SD 1.x/2.x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_LORA_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KOHYA_TO_LORA = {v: k for k, v in _LORA_TO_KOHYA.items()}
_FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _split(key: str) -> tuple[str, str]:
    """peft key -> (module path, factor name in kohya/LyCORIS terms)."""
    for peft_suffix, kohya in _LORA_TO_KOHYA.items():
        if key.endswith("." + peft_suffix):
            return key[: -len(peft_suffix) - 1], kohya
    module, _, factor = key.rpartition(".")
    if factor in _FACTOR_NAMES:
        return module, factor
    if key.endswith(".lora_magnitude_vector") or key.endswith(".bias"):
        raise ValueError(f"{key}: DoRA and bias weights have no kohya equivalent")
    raise ValueError(f"{key}: not an adapter weight peft writes for LoRA, LoHa or LoKr")


def to_kohya(state: dict[str, torch.Tensor], part: str, alpha: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, factor = _split(key)
        if part == "text_encoder" and not module.startswith("text_model."):
            # transformers 5 flattened CLIPTextModel; kohya/A1111/ComfyUI keys keep "text_model"
            module = "text_model." + module
        name = PREFIX[part] + module.replace(".", "_")
        out[f"{name}.{factor}"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_kohya(adapter, path: Path) -> Path:
    """Write one subject's adapter (an export.TrainedAdapter) as a single kohya-style file."""
    tensors = to_kohya(adapter.unet, "unet", adapter.unet_spec.effective_alpha)
    if adapter.text_encoder is not None:
        tensors.update(to_kohya(adapter.text_encoder, "text_encoder", adapter.text_encoder_spec.effective_alpha))
    metadata = {"ss_network_module": _network_module(adapter.unet_spec.type),
                "ss_network_dim": str(adapter.unet_spec.rank),
                "ss_network_alpha": str(adapter.unet_spec.effective_alpha), **adapter.metadata}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _network_module(kind: str) -> str:
    return "networks.lora" if kind == "lora" else "lycoris.kohya"
