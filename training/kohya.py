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


def _lokr_full(factors) -> bool:
    # LyCORIS (and ComfyUI/A1111) ignore alpha and use scale 1 when both Kronecker factors are full
    # matrices; peft always scales by alpha / r. The scale is baked into w2 for such modules.
    return "lokr_w1" in factors and "lokr_w2" in factors


def to_kohya(state: dict[str, torch.Tensor], part: str, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """peft adapter keys of one model -> kohya/LyCORIS keys with a per-module `.alpha`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, factor = _split(key)
        modules.setdefault(module, {})[factor] = value
    out: dict[str, torch.Tensor] = {}
    for module, factors in modules.items():
        if part == "text_encoder" and not module.startswith("text_model."):
            # transformers 5 flattened CLIPTextModel; kohya/A1111/ComfyUI keys keep "text_model"
            module = "text_model." + module
        name = PREFIX[part] + module.replace(".", "_")
        if _lokr_full(factors):
            factors = {**factors, "lokr_w2": factors["lokr_w2"] * (alpha / rank)}
        for factor, value in factors.items():
            out[f"{name}.{factor}"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(tensors: dict[str, torch.Tensor], part: str, module_names: list[str], alpha: float, rank: int
               ) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS keys of one model -> peft keys, for a peft config with this alpha and rank.

    `module_names` are the model's module paths (named_modules()); kohya keys flatten '.' to '_',
    so the model is needed to undo it. Per-module alphas that differ from `alpha` are folded
    into the up/second factor so that the peft adapter computes the same update.
    """
    by_flat = {}
    for name in module_names:
        by_flat[PREFIX[part] + name.replace(".", "_")] = name
        if part == "text_encoder":
            by_flat[PREFIX[part] + ("text_model." + name).replace(".", "_")] = name
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX[part]):
            continue
        flat, _, factor = key.partition(".")
        if flat not in by_flat:
            raise ValueError(f"{key}: no module of the {part} is named {flat!r}")
        modules.setdefault(by_flat[flat], {})[factor] = value
    out: dict[str, torch.Tensor] = {}
    for module, factors in modules.items():
        file_alpha = float(factors.pop("alpha")) if "alpha" in factors else None
        if _lokr_full(factors):
            ratio = 1.0 / (alpha / rank)
            second = "lokr_w2"
        else:
            dim = _module_rank(factors)
            own = dim if file_alpha is None or file_alpha == 0 else file_alpha
            ratio = (own / dim) / (alpha / rank)
            second = next(f for f in ("lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_a", "lokr_w1") if f in factors)
        if ratio != 1.0:
            factors[second] = factors[second] * ratio
        for factor, value in factors.items():
            out[f"{module}.{_KOHYA_TO_LORA.get(factor, factor)}"] = value.contiguous()
    return out


def _module_rank(factors: dict[str, torch.Tensor]) -> int:
    if "lora_down.weight" in factors:
        return factors["lora_down.weight"].shape[0]
    if "hada_w1_b" in factors:
        return factors["hada_w1_b"].shape[0]
    for name in ("lokr_w1_a", "lokr_w2_a"):
        if name in factors:
            return factors[name].shape[1]
    return 1


def write_kohya(adapter, path: Path) -> Path:
    """Write one subject's adapter (an export.TrainedAdapter) as a single kohya-style file."""
    tensors = to_kohya(adapter.unet, "unet", adapter.unet_spec.effective_alpha, adapter.unet_spec.rank)
    if adapter.text_encoder is not None:
        tensors.update(to_kohya(adapter.text_encoder, "text_encoder", adapter.text_encoder_spec.effective_alpha,
                                adapter.text_encoder_spec.rank))
    metadata = {"ss_network_module": _network_module(adapter.unet_spec.type),
                "ss_network_dim": str(adapter.unet_spec.rank),
                "ss_network_alpha": str(adapter.unet_spec.effective_alpha), **adapter.metadata}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _network_module(kind: str) -> str:
    return "networks.lora" if kind == "lora" else "lycoris.kohya"
