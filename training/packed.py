"""Packed LoRA: K subjects' adapters on one frozen base, trained in one forward/backward.

PEFT refuses mixed-adapter batches in training mode, so this is its own layer. Each packed
module holds every subject's LoRA factors stacked along a leading subject axis (A: [K, r, in],
B: [K, out, r]; conv A: [K, r, in, kh, kw]) and routes each sample of the batch to its slot
through a shared `Router` (one subject-index tensor per batch). The adapter path is batched:
a gather of the factors by slot, then einsum/bmm for Linear and one grouped conv (groups =
batch) for Conv2d. No Python loop over subjects runs in the forward, so the layer works under
gradient checkpointing (the router keeps its index for the recompute), autocast and SDPA.

Supported: LoRA on nn.Linear and nn.Conv2d (dropout 0, bias "none"). LoHa and LoKr are not
packed (their Hadamard/Kronecker products would need a per-slot weight rebuild); a packed job
with them is refused by `launcher.validate.unsupported` before training.

`install` swaps the PEFT LoRA layers that `adapters.attach` injected for packed ones (the PEFT
init becomes every slot's init, so packed and single runs start from the same weights);
`uninstall` swaps them back. `slot_state_dict` returns one slot in peft's key format, the same
keys `adapters.adapter_state_dict` gives for a single run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from launcher.errors import ConfigError
from training import adapters


class Router:
    """The subject slot of each sample in the current batch, shared by every packed module."""

    def __init__(self):
        self.index: torch.Tensor | None = None


class PackedLora(nn.Module):
    """LoRA for K subjects over one frozen Linear or Conv2d, routed per sample."""

    def __init__(self, peft_layer: nn.Module, num_slots: int, router: Router):
        super().__init__()
        name = adapters.ADAPTER_NAME
        self.peft_layer = [peft_layer]  # kept (unregistered) for `uninstall`
        self.base_layer = peft_layer.get_base_layer()
        self.router = router
        self.scaling = float(peft_layer.scaling[name])
        a = peft_layer.lora_A[name].weight.detach().float()
        b = peft_layer.lora_B[name].weight.detach().float()
        self.is_conv = isinstance(self.base_layer, nn.Conv2d)
        self.lora_A = nn.Parameter(a.unsqueeze(0).repeat(num_slots, *([1] * a.dim())).contiguous())
        self.lora_B = nn.Parameter(b.unsqueeze(0).repeat(num_slots, *([1] * b.dim())).contiguous())

    @property
    def weight(self):  # diffusers reads .weight.dtype of some layers
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        idx = self.router.index
        a, b = self.lora_A[idx], self.lora_B[idx]  # gather: one factor pair per sample
        dtype = out.dtype
        if self.is_conv:
            conv = self.base_layer
            n, c, h, w = x.shape
            # one grouped conv: sample i convolves with its own A (groups = batch)
            down = F.conv2d(x.reshape(1, n * c, h, w).to(dtype), a.reshape(-1, *a.shape[2:]).to(dtype),
                            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=n)
            down = down.reshape(n, a.shape[1], *down.shape[2:])
            up = torch.einsum("nrhw,nor->nohw", down, b.reshape(b.shape[0], b.shape[1], b.shape[2]).to(dtype))
        else:
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
            up = torch.bmm(torch.bmm(flat, a.transpose(1, 2).to(dtype)), b.transpose(1, 2).to(dtype))
            up = up.reshape(*out.shape)
        return out + up * self.scaling


def install(model: nn.Module, num_slots: int) -> tuple[Router, dict[str, PackedLora]]:
    """Replace every PEFT LoRA layer in `model` by a packed one with `num_slots` slots."""
    from peft.tuners.lora import LoraLayer

    router = Router()
    packed: dict[str, PackedLora] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and adapters.ADAPTER_NAME in module.lora_A:
            base = module.get_base_layer()
            if not isinstance(base, (nn.Linear, nn.Conv2d)):
                raise ConfigError(f"packed LoRA supports Linear and Conv2d, not {type(base).__name__} ({name})")
            packed[name] = PackedLora(module, num_slots, router)
    for name, layer in packed.items():
        _set_submodule(model, name, layer)
    return router, packed


def uninstall(model: nn.Module, packed: dict[str, PackedLora]) -> None:
    for name, layer in packed.items():
        _set_submodule(model, name, layer.peft_layer[0])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def slot_parameters(packed: dict[str, PackedLora]) -> list[nn.Parameter]:
    """The stacked parameters in the order of `adapters.adapter_parameters` (module order, A then B)."""
    return [p for layer in packed.values() for p in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def reset_slot(packed: dict[str, PackedLora], slot: int, init: dict[str, torch.Tensor]) -> None:
    """Put one slot back to the PEFT init (`init` from `adapters.snapshot` of the unpacked model)."""
    name = adapters.ADAPTER_NAME
    for path, layer in packed.items():
        layer.lora_A[slot].copy_(init[f"{path}.lora_A.{name}.weight"])
        layer.lora_B[slot].copy_(init[f"{path}.lora_B.{name}.weight"])


def slot_state_dict(packed: dict[str, PackedLora], slot: int) -> dict[str, torch.Tensor]:
    """One subject's adapter in peft's key format, detached fp32 CPU copies."""
    out = {}
    for path, layer in packed.items():
        out[f"{path}.lora_A.weight"] = layer.lora_A[slot].detach().to("cpu", torch.float32).clone()
        out[f"{path}.lora_B.weight"] = layer.lora_B[slot].detach().to("cpu", torch.float32).clone()
    return out


@torch.no_grad()
def load_slot(packed: dict[str, PackedLora], slot: int, state: dict[str, torch.Tensor]) -> None:
    """Put one subject's adapter (peft's key format, as `slot_state_dict` writes it) into a slot."""
    missing = [f"{path}.lora_{ab}.weight" for path in packed for ab in "AB" if f"{path}.lora_{ab}.weight" not in state]
    if missing:
        raise ValueError(f"checkpoint does not fit the packed adapter: {len(missing)} key(s) missing, e.g. {missing[0]}")
    for path, layer in packed.items():
        layer.lora_A[slot].copy_(state[f"{path}.lora_A.weight"])
        layer.lora_B[slot].copy_(state[f"{path}.lora_B.weight"])


def auto_pack(device: torch.device, resolution: int, batch_rows: int, model=None, cpu_default: int = 4,
              max_pack: int = 16) -> int:
    """`train.pack: auto`. On GPU: sized from the free memory and the footprint of the base
    (`model`, its ModelConfig) by training.pack_memory. On CPU: `cpu_default` (4), where packing
    pays mostly by amortizing per-op overhead."""
    if device.type != "cuda":
        return cpu_default
    from training.pack_memory import auto_pack_cuda

    return auto_pack_cuda(device, resolution, batch_rows, model, max_pack)
