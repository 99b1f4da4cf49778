"""PEFT adapters (LoRA, LoHa, LoKr) on the denoiser and, optionally, the text encoders.

The one place where the job's adapter spec maps onto peft's config classes. Adapters are
injected under the name "default" and kept in fp32 whatever the base dtype.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from launcher.config import AdapterSpec, LohaSpec, LokrSpec, LoraSpec
from training.families import sd

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"
UNET_TARGETS, TEXT_ENCODER_TARGETS = sd.UNET_TARGETS, sd.TEXT_ENCODER_TARGETS  # SD's presets (families own them)

def specs(adapter, family) -> dict[str, AdapterSpec]:
    """The adapters a job trains, by part: the denoiser's (the job's `adapter`) and each text
    encoder's the family has and the job gives one (`adapter.text_encoder`, `.text_encoder_2`)."""
    named = {family.denoiser: adapter, "text_encoder": adapter.text_encoder,
             "text_encoder_2": getattr(adapter, "text_encoder_2", None)}
    return {part: spec for part, spec in named.items()
            if spec is not None and (part == family.denoiser or part in family.tokenizers)}


def target_modules(spec: AdapterSpec, presets: dict[str, list[str]]) -> list[str]:
    return list(presets[spec.targets]) if isinstance(spec.targets, str) else list(spec.targets)


def peft_config(spec: AdapterSpec, presets: dict[str, list[str]]):
    """The peft config object for an adapter spec."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = target_modules(spec, presets)
    if isinstance(spec, LoraSpec):
        return LoraConfig(r=spec.rank, lora_alpha=spec.effective_alpha, lora_dropout=spec.dropout, bias=spec.bias,
                          target_modules=targets, init_lora_weights="gaussian")
    common = dict(r=spec.rank, alpha=spec.effective_alpha, rank_dropout=spec.rank_dropout,
                  module_dropout=spec.module_dropout, use_effective_conv2d=spec.use_effective_conv2d,
                  target_modules=targets)
    if isinstance(spec, LohaSpec):
        return LoHaConfig(**common)
    if isinstance(spec, LokrSpec):
        return LoKrConfig(decompose_both=spec.decompose_both, decompose_factor=spec.decompose_factor, **common)
    raise TypeError(f"unknown adapter spec {type(spec).__name__}")


def attach(model: torch.nn.Module, spec: AdapterSpec, presets: dict[str, list[str]], what: str) -> torch.nn.Module:
    """Inject a fresh adapter into a frozen model; only adapter weights require grad (fp32)."""
    from peft import inject_adapter_in_model

    config = peft_config(spec, presets)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ValueError(f"cannot attach a {spec.type} adapter to the {what}: {exc} "
                         f"(targets: {', '.join(config.target_modules)})") from None
    for name, param in model.named_parameters():
        is_adapter = _is_adapter_param(name)
        param.requires_grad_(is_adapter)
        if is_adapter and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: %s adapter rank %d on %d module kinds; trainable %s of %s parameters (%.3f%%)", what, spec.type,
             spec.rank, len(config.target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


_ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")


def _is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in _ADAPTER_MARKERS) and f".{ADAPTER_NAME}" in name


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_adapter_param(n)]


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's key format (no adapter name), detached fp32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_adapter_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:5]}")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the current adapter weights, to reset them for the next subject."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_adapter_param(n)}


def restore(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snap.items():
            params[name].copy_(value)


@contextmanager
def switched_off(*models: torch.nn.Module):
    """The models run as the base model inside: every adapter layer (LoRA, LoHa, LoKr) disabled,
    and enabled again on exit (eval.base_model's samples)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
