"""Hold a frozen model's linear layers in 8-bit or 4-bit (NF4) through bitsandbytes, so that a
LoRA trains on top of them in full precision (the QLoRA pattern): `model.quantize: int8 | nf4`.

Only the layers inside the family's repeated blocks are quantized (Flux: the double- and
single-stream blocks, where nearly all of the 12B parameters are); the embedders and the final
layer stay in the frozen dtype, as diffusers' and the reference trainers' QLoRA setups keep them.
bitsandbytes 0.50 runs both kinds on the CPU too (slowly), so the same path is tested there.
Quantizing happens when the layer's weights move to the device (bitsandbytes' Params.to).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _quantized(linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype, device) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    elif mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"model.quantize must be none, int8 or nf4, got {mode!r}")
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)


def quantize_blocks(model: torch.nn.Module, mode: str, blocks: tuple[str, ...], compute_dtype: torch.dtype,
                    device) -> int:
    """Replace every nn.Linear under the submodules named `blocks` with its bitsandbytes form, on
    `device`; returns how many were replaced."""
    count = 0
    for block in blocks:
        root = model.get_submodule(block)
        for name, module in list(root.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, _quantized(module, mode, compute_dtype, device))
            count += 1
    log.info("holding %d linear layers of %s in %s (bitsandbytes); the adapter trains on top in full precision",
             count, ", ".join(blocks), mode)
    return count


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights count at their packed size)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
