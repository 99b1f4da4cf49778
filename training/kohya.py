"""The kohya / AUTOMATIC1111 / ComfyUI single-file format, with LyCORIS keys for LoHa and LoKr.

Keys are `lora_unet_<module path with '_'>` and `lora_te_<...>` (SDXL: `lora_te1_`, `lora_te2_`;
the prefixes are the model family's `kohya_prefix`) followed by the factor name:
LoRA `lora_down.weight` / `lora_up.weight`, LoHa `hada_w1_a` ... `hada_t2`, LoKr `lokr_w1` ...,
and one `.alpha` scalar per module. This is the naming that kohya's sd-scripts, A1111,
ComfyUI, LyCORIS and diffusers' non-diffusers LoRA loader all read for SD 1.x/2.x and SDXL.

A text-encoder LoRA without any `out_proj` module (the `minimal` targets, q_proj and v_proj) gets one
zero LoRA on an `out_proj` so that diffusers can read the file (see `_anchor`); it is a no-op in
every loader, listed in the header under ANCHORS_METADATA and dropped again by `drop_anchors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT_ENCODER_PREFIX = "lora_te"  # the text encoders' prefixes (lora_te_, lora_te1_, lora_te2_) start so
_LORA_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KOHYA_TO_LORA = {v: k for k, v in _LORA_TO_KOHYA.items()}
# header entry naming the no-op modules written only so that diffusers can read the file
ANCHORS_METADATA = "dreamfleet_noop_modules"
_FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class NoKohyaForm(ValueError):
    """The adapter has no form in the family's kohya naming (Flux: a LoHa/LoKr, or a module BFL's
    naming lacks); the other formats are still written."""


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


def _text_encoder(prefix: str) -> bool:
    return prefix.startswith(TEXT_ENCODER_PREFIX)


def to_kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """peft adapter keys of one model -> kohya/LyCORIS keys under `prefix` (the family's
    kohya_prefix of the part) with a per-module `.alpha`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, factor = _split(key)
        modules.setdefault(module, {})[factor] = value
    out: dict[str, torch.Tensor] = {}
    for module, factors in modules.items():
        if _text_encoder(prefix) and not module.startswith("text_model."):
            # transformers 5 flattened CLIPTextModel; kohya/A1111/ComfyUI keys keep "text_model"
            module = "text_model." + module
        name = prefix + module.replace(".", "_")
        if _lokr_full(factors):
            factors = {**factors, "lokr_w2": factors["lokr_w2"] * (alpha / rank)}
        for factor, value in factors.items():
            out[f"{name}.{factor}"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(tensors: dict[str, torch.Tensor], prefix: str, module_names: list[str], alpha: float, rank: int
               ) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS keys of one model -> peft keys, for a peft config with this alpha and rank.

    `module_names` are the model's module paths (named_modules()); kohya keys flatten '.' to '_',
    so the model is needed to undo it. Per-module alphas that differ from `alpha` are folded
    into the up/second factor so that the peft adapter computes the same update.
    """
    by_flat = {}
    for name in module_names:
        by_flat[prefix + name.replace(".", "_")] = name
        if _text_encoder(prefix):
            by_flat[prefix + ("text_model." + name).replace(".", "_")] = name
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        flat, _, factor = key.partition(".")
        if flat not in by_flat:
            raise ValueError(f"{key}: no module of the model part is named {flat!r}")
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


def _anchor(tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Add a zero `out_proj` LoRA to a text-encoder part that has attention LoRAs but none on an
    out_proj; returns the kohya module names added.

    diffusers' non-diffusers loader renames a text encoder's q/k/v/out_proj LoRAs to its legacy
    `to_q_lora`/.../`to_out_lora` names and then recognises that naming by a `to_out_lora` key
    alone (`convert_state_dict_to_diffusers` in diffusers 0.42): q/v alone, or q/v beside fc1,
    fails with "Could not automatically infer state dict type". kohya's sd-scripts always trains
    out_proj, so its files never meet this.
    Down and up are zero, so the module adds exactly nothing; the shapes are the attention module's
    (CLIP's q/k/v/out projections are all hidden x hidden).
    """
    if not _text_encoder(prefix):
        return []
    modules = {k.partition(".")[0] for k in tensors if k.startswith(prefix)}
    attention = sorted(m for m in modules if m.endswith(("_q_proj", "_k_proj", "_v_proj"))
                       and f"{m}.lora_down.weight" in tensors)
    if not attention or any(m.endswith("_out_proj") for m in modules):
        return []
    source = attention[0]
    name = source.rsplit("_", 2)[0] + "_out_proj"  # ..._self_attn_q_proj -> ..._self_attn_out_proj
    for factor in ("lora_down.weight", "lora_up.weight"):
        tensors[f"{name}.{factor}"] = torch.zeros_like(tensors[f"{source}.{factor}"])
    tensors[f"{name}.alpha"] = tensors[f"{source}.alpha"].clone()
    return [name]


def drop_anchors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The file's tensors without the no-op modules `_anchor` added (named in its header)."""
    anchors = set(filter(None, metadata.get(ANCHORS_METADATA, "").split(",")))
    return {k: v for k, v in tensors.items() if k.partition(".")[0] not in anchors}


def write_kohya(adapter, path: Path) -> Path:
    """Write one subject's adapter (an export.TrainedAdapter) as a single kohya-style file, with
    the key prefixes of its model family (SD: lora_unet_, lora_te_; SDXL: lora_te1_, lora_te2_;
    Flux: lora_unet_ in BFL's module naming, lora_te1_). NoKohyaForm: the adapter has none."""
    from training import families

    family = families.get(adapter.family)
    prefixes = family.kohya_prefix
    tensors: dict[str, torch.Tensor] = {}
    anchors: list[str] = []
    for part, p in adapter.parts.items():
        own = to_kohya(p.state, prefixes[part], p.spec.effective_alpha, p.spec.rank)
        if part in family.kohya_names:  # the family's own module naming (Flux: BFL's, with fused layers)
            own = family.kohya_names[part][0](own, prefixes[part])
        anchors += _anchor(own, prefixes[part])
        tensors.update(own)
    spec = adapter.denoiser.spec
    metadata = {"ss_network_module": _network_module(spec.type), "ss_network_dim": str(spec.rank),
                "ss_network_alpha": str(spec.effective_alpha), **adapter.metadata}
    if anchors:
        metadata[ANCHORS_METADATA] = ",".join(anchors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _network_module(kind: str) -> str:
    return "networks.lora" if kind == "lora" else "lycoris.kohya"
