"""The DeepSpeed config generated from a job, with the job's raw `distributed.deepspeed_config`
merged over it (the user's keys win). Torch-free: `launcher` can show it before any launch."""

from __future__ import annotations

import copy
from typing import Any

from launcher.config import JobConfig


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(job: JobConfig, on_gpu: bool) -> dict[str, Any]:
    d, t = job.distributed, job.train
    precision = t.mixed_precision if on_gpu else "no"
    if precision == "auto":
        precision = "bf16"
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # bitsandbytes AdamW8bit as the client optimizer
        # under offload the worker hands DeepSpeed its own CPU Adam (AdamW mode, the job's betas
        # and eps); forcing would make accelerate swap in another instance (Adam mode, the job's
        # LR schedule attached to the discarded one)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, d.deepspeed_config or {})
