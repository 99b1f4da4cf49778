"""GPU benchmark for issue 3: step time and peak memory of an SD 1.5-shaped UNet (random
weights, 512 px, LoRA rank 4) trained with bf16 + bitsandbytes AdamW8bit under DeepSpeed ZeRO-2,
against plain torch AdamW without ZeRO. Needs a CUDA GPU, deepspeed and bitsandbytes; it was
written in a session without a GPU and has not been run yet.

Run (one GPU; DeepSpeed still needs a process group):
    torchrun --standalone --nproc-per-node=1 benchmarks/zero_gpu.py --steps 20 --warmup 5
Prints one JSON line per configuration; copy the figures into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def build_unet(rank: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel(**SD15_UNET)
    unet.requires_grad_(False)
    unet.to("cuda", dtype=torch.bfloat16)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapter weights in fp32, the base frozen in bf16
    return unet


def batch(batch_size: int):
    latents = torch.randn(batch_size, 4, 64, 64, device="cuda")  # 512 px / 8
    text = torch.randn(batch_size, 77, 768, device="cuda")
    t = torch.randint(0, 1000, (batch_size,), device="cuda")
    return latents, t, text


def measure(step, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"step_s": (time.perf_counter() - start) / steps, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def plain_adamw(args) -> dict:
    unet = build_unet(args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, text = batch(args.batch_size)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = unet(x, t, text).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"config": "bf16 autocast + torch AdamW, no ZeRO", **measure(step, args.steps, args.warmup)}


def zero2_adamw8bit(args) -> dict:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    import bitsandbytes as bnb
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState

    PartialState(backend="nccl", timeout=timedelta(seconds=600))
    ds = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
          "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    acc = Accelerator(mixed_precision="bf16", deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    unet = build_unet(args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    model, opt = acc.prepare(unet, opt)
    x, t, text = batch(args.batch_size)

    def step():
        loss = model(x.bfloat16(), t, text.bfloat16()).sample.float().pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()

    return {"config": "bf16 + PagedAdamW8bit + ZeRO-2 (DeepSpeed via accelerate)", **measure(step, args.steps, args.warmup)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--only", choices=["plain", "zero2"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/zero_gpu.py needs a CUDA GPU")
    torch.manual_seed(0)
    runs = {"plain": plain_adamw, "zero2": zero2_adamw8bit}
    for name, run in runs.items():
        if args.only in (None, name):
            result = run(args)
            torch.cuda.empty_cache()
            print(json.dumps({**result, "gpu": torch.cuda.get_device_name(), "batch_size": args.batch_size,
                              "resolution": 512, "lora_rank": args.rank}), flush=True)


if __name__ == "__main__":
    main()
