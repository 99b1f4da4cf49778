"""Optimizers and LR schedules: torch AdamW (fused/foreach) or bitsandbytes 8-bit AdamW."""

from __future__ import annotations

import logging

import torch

from launcher.config import TrainConfig

log = logging.getLogger(__name__)


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # one fused kernel for all parameters, on GPU and on CPU (half the step time of foreach on CPU)
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused, foreach=None if fused else True, **kwargs)
    import bitsandbytes as bnb

    if cfg.optimizer == "paged_adamw8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.learning_rate, **kwargs)
    return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps)
