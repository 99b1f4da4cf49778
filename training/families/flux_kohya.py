"""Flux's kohya / ComfyUI / Forge single file: LoRA keys in Black Forest Labs' own module naming.

ComfyUI, Forge, kohya's sd-scripts and diffusers' Flux converter read `lora_unet_` keys named after
BFL's original modules, not diffusers' (`lora_unet_double_blocks_0_img_attn_qkv`, not
`..._transformer_blocks_0_attn_to_q`). Three differences matter:

- BFL fuses q, k and v into one `qkv` layer (both streams of a double block), and a single block's
  q, k, v and MLP input into one `linear1`. A LoRA per diffusers module becomes one LoRA on the
  fused layer whose rank is the sum of theirs: the down matrices stacked, the up matrix
  block-diagonal. Its alpha keeps the per-module scale (alpha / rank), so the fused update is
  exactly the separate ones side by side. A slot the adapter does not train (k, when the
  targets name only to_q and to_v) is a zero block of the same rank. diffusers' converter
  recognises the block-diagonal form and splits it back exactly; ComfyUI applies it as is.
- The final layer's modulation holds (shift, scale) where diffusers' `norm_out.linear` holds
  (scale, shift): the up matrix is written with its halves swapped.
- diffusers' converter ignores the final layer's alpha, so those modules carry their scale in
  the up matrix and alpha = rank, which every loader reads the same way.

`to_bfl` maps the keys `training.kohya.to_kohya` writes for the transformer (flattened diffusers
paths) into this naming, and `from_bfl` maps a file in it (ours or kohya's: a fused LoRA that is
not block-diagonal splits into one LoRA per slot with the shared down matrix) back. LoRA only: a
LoHa or LoKr on a fused layer has no agreed form, so validate refuses that combination.
"""

from __future__ import annotations

import re

import torch

from training.kohya import NoKohyaForm

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
MLP_RATIO = 4  # a Flux single block's MLP input is 4x the attention width (FluxSingleTransformerBlock)

# flattened diffusers module path <-> BFL module, "{}" standing for the block index
PLAIN = [
    ("transformer_blocks_{}_attn_to_out_0", "double_blocks_{}_img_attn_proj"),
    ("transformer_blocks_{}_attn_to_add_out", "double_blocks_{}_txt_attn_proj"),
    ("transformer_blocks_{}_ff_net_0_proj", "double_blocks_{}_img_mlp_0"),
    ("transformer_blocks_{}_ff_net_2", "double_blocks_{}_img_mlp_2"),
    ("transformer_blocks_{}_ff_context_net_0_proj", "double_blocks_{}_txt_mlp_0"),
    ("transformer_blocks_{}_ff_context_net_2", "double_blocks_{}_txt_mlp_2"),
    ("transformer_blocks_{}_norm1_linear", "double_blocks_{}_img_mod_lin"),
    ("transformer_blocks_{}_norm1_context_linear", "double_blocks_{}_txt_mod_lin"),
    ("single_transformer_blocks_{}_proj_out", "single_blocks_{}_linear2"),
    ("single_transformer_blocks_{}_norm_linear", "single_blocks_{}_modulation_lin"),
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed_timestep_embedder_linear_1", "time_in_in_layer"),
    ("time_text_embed_timestep_embedder_linear_2", "time_in_out_layer"),
    ("time_text_embed_guidance_embedder_linear_1", "guidance_in_in_layer"),
    ("time_text_embed_guidance_embedder_linear_2", "guidance_in_out_layer"),
    ("time_text_embed_text_embedder_linear_1", "vector_in_in_layer"),
    ("time_text_embed_text_embedder_linear_2", "vector_in_out_layer"),
    ("proj_out", FINAL_LINEAR := "final_layer_linear"),
    ("norm_out_linear", FINAL_MODULATION := "final_layer_adaLN_modulation_1"),
]
# fused layers: (flattened diffusers path of each slot, "{slot}" standing for it; BFL module; kind)
FUSED = [
    ("transformer_blocks_{}_attn_to_{slot}", "double_blocks_{}_img_attn_qkv", "qkv"),
    ("transformer_blocks_{}_attn_add_{slot}_proj", "double_blocks_{}_txt_attn_qkv", "qkv"),
    ("single_transformer_blocks_{}_attn_to_{slot}", "single_blocks_{}_linear1", "linear1"),
]
# the slots of each fused layer, in the order of its output rows
SLOTS = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "proj_mlp")}
PROJ_MLP = "single_transformer_blocks_{}_proj_mlp"  # the single blocks' fourth linear1 slot
def _match(template: str, name: str) -> re.Match | None:
    pattern = re.escape(template).replace(r"\{\}", r"(\d+)").replace(r"\{slot\}", "([qkv])")
    return re.fullmatch(pattern, name)


def _bfl_name(flat: str) -> tuple[str, str | None, str | None]:
    """A flattened diffusers module path -> (BFL module, kind of fused layer, slot)."""
    for diffusers, bfl in PLAIN:
        if m := _match(diffusers, flat):
            return bfl.format(*m.groups()), None, None
    if m := _match(PROJ_MLP, flat):
        return "single_blocks_{}_linear1".format(m.group(1)), "linear1", "proj_mlp"
    for diffusers, bfl, kind in FUSED:
        if m := _match(diffusers, flat):
            return bfl.format(m.group(1)), kind, m.group(2)
    raise NoKohyaForm(f"transformer module {flat!r} has no place in the kohya/ComfyUI naming of Flux (BFL's modules); "
                     "adapt the modules the presets name, or write peft and diffusers only")


def _flat_name(name: str) -> tuple[str, str | None]:
    """A BFL module -> (its flattened diffusers path, or for a fused layer a template with {slot}; fused kind)."""
    for diffusers, bfl in PLAIN:
        if m := _match(bfl, name):
            return diffusers.format(*m.groups()), None
    for diffusers, bfl, kind in FUSED:
        if m := _match(bfl, name):
            return diffusers.replace("{}", m.group(1)), kind
    raise ValueError(f"lora_unet_{name}: not a Flux module in BFL's naming that a LoRA is read for")


def _modules(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        flat, _, factor = key.removeprefix(prefix).partition(".")
        if factor not in (DOWN, UP, ALPHA):
            raise NoKohyaForm(f"{key}: the Flux kohya/ComfyUI file holds LoRA only (no agreed form for a LoHa or "
                              "LoKr on BFL's fused layers)")
        modules.setdefault(flat, {})[factor] = value
    return modules


def _scale(factors) -> float:
    rank = factors[DOWN].shape[0]
    return float(factors[ALPHA]) / rank if ALPHA in factors else 1.0


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(scale, shift) rows <-> (shift, scale) rows: diffusers' norm_out against BFL's final layer."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_bfl(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """kohya LoRA keys of the transformer under `prefix` with flattened diffusers paths -> BFL's naming."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[str, dict[str, dict]]] = {}
    for flat, factors in _modules(tensors, prefix).items():
        name, kind, slot = _bfl_name(flat)
        if kind in SLOTS:
            fused.setdefault(name, (kind, {}))[1][slot] = factors
        elif name in (FINAL_LINEAR, FINAL_MODULATION):  # diffusers' converter ignores this alpha: scale into up
            up = factors[UP] * _scale(factors)
            up = swap_halves(up) if name == FINAL_MODULATION else up
            out.update({f"{prefix}{name}.{DOWN}": factors[DOWN], f"{prefix}{name}.{UP}": up.contiguous(),
                        f"{prefix}{name}.{ALPHA}": torch.tensor(float(factors[DOWN].shape[0]))})
        else:
            out.update({f"{prefix}{name}.{f}": v for f, v in factors.items()})
    for name, (kind, slots) in fused.items():
        out.update(_fuse(prefix + name, kind, slots))
    return out


def _fuse(name: str, kind: str, slots: dict[str, dict]) -> dict[str, torch.Tensor]:
    """One block-diagonal LoRA from the slots' LoRAs (a zero block of the same rank for a missing slot)."""
    first = next(iter(slots.values()))
    rank, dtype = first[DOWN].shape[0], first[DOWN].dtype
    scale = _scale(first)
    inner = _slot_width(kind, slots)
    downs, ups = [], []
    for slot in SLOTS[kind]:
        width = inner * MLP_RATIO if slot == "proj_mlp" else inner
        if slot in slots:
            f = slots[slot]
            if f[DOWN].shape[0] != rank:
                raise NoKohyaForm(f"{name}: the fused modules have different ranks; the kohya file needs one")
            downs.append(f[DOWN])
            ups.append(f[UP] * (_scale(f) / scale))
        else:
            downs.append(torch.zeros_like(first[DOWN]))
            ups.append(torch.zeros(width, rank, dtype=dtype))
    return {f"{name}.{DOWN}": torch.cat(downs).contiguous(), f"{name}.{UP}": torch.block_diag(*ups).contiguous(),
            f"{name}.{ALPHA}": torch.tensor(scale * rank * len(ups))}


def _slot_width(kind: str, slots: dict[str, dict]) -> int:
    """The attention width (the rows of one q/k/v slot), from whichever slot is present."""
    for slot, f in slots.items():
        rows = f[UP].shape[0]
        return rows // MLP_RATIO if slot == "proj_mlp" else rows
    raise AssertionError("a fused layer without slots")


def from_bfl(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """kohya LoRA keys in BFL's naming under `prefix` -> keys with flattened diffusers paths (what
    training.kohya.from_kohya reads). Fused layers split per slot: exactly, for a block-diagonal
    up matrix; else each slot takes the shared down matrix and its rows of the up matrix."""
    out: dict[str, torch.Tensor] = {}
    for name, factors in _modules(tensors, prefix).items():
        flat, kind = _flat_name(name)
        if kind is None:
            if name == FINAL_MODULATION:
                factors = {**factors, UP: swap_halves(factors[UP])}
            out.update({f"{prefix}{flat}.{f}": v for f, v in factors.items()})
            continue
        for slot, part in _split(kind, factors).items():
            module = flat.format(slot=slot) if slot != "proj_mlp" else flat.replace("_attn_to_{slot}", "_proj_mlp")
            out.update({f"{prefix}{module}.{f}": v for f, v in part.items()})
    return out


def _split(kind: str, factors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    slots = SLOTS[kind]
    down, up = factors[DOWN], factors[UP]
    rank = down.shape[0]
    alpha = float(factors[ALPHA]) if ALPHA in factors else float(rank)
    inner = up.shape[0] // (3 + (MLP_RATIO if kind == "linear1" else 0))
    widths = [inner * MLP_RATIO if s == "proj_mlp" else inner for s in slots]
    rows = torch.tensor([0, *widths]).cumsum(0).tolist()
    n = len(slots)
    if rank % n == 0:
        r = rank // n
        blocks = {s: (down[i * r:(i + 1) * r], up[rows[i]:rows[i + 1]]) for i, s in enumerate(slots)}
        if all((b[1][:, :i * r] == 0).all() and (b[1][:, (i + 1) * r:] == 0).all() for i, b in enumerate(blocks.values())):
            return {s: {DOWN: d.contiguous(), UP: u[:, i * r:(i + 1) * r].contiguous(), ALPHA: torch.tensor(alpha / n)}
                    for i, (s, (d, u)) in enumerate(blocks.items())
                    if d.abs().max() > 0 or u.abs().max() > 0}
    return {s: {DOWN: down.clone(), UP: up[rows[i]:rows[i + 1]].contiguous(), ALPHA: torch.tensor(alpha)}
            for i, s in enumerate(slots)}
