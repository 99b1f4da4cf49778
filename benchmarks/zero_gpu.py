"""GPU benchmark for issue 3: step time and peak memory of an SD 1.5-shaped UNet (random
weights, 512 px, LoRA rank 4) trained with bf16 + bitsandbytes AdamW8bit under DeepSpeed ZeRO-2,
against plain torch AdamW without ZeRO. Needs a CUDA GPU, deepspeed and bitsandbytes; it was
written in a session without a GPU and has not been run on one yet.

Run (one GPU; DeepSpeed still needs a process group):
    torchrun --standalone --nproc-per-node=1 benchmarks/zero_gpu.py --steps 20 --warmup 5
Prints one JSON line per configuration; copy the figures into benchmarks/RESULTS.md.

`--device cpu --shape tiny` runs the same code on the tiny model without a GPU (fp32, gloo,
non-paged AdamW8bit, no memory figures): the test suite does, so that a GPU session's time is not
spent on this script's bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cuda(args) -> bool:
    return args.device == "cuda"


def build_unet(args) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from training.tiny import SHAPES

    unet = UNet2DConditionModel(**SHAPES[args.shape]["unet"])
    unet.requires_grad_(False)
    unet.to(args.device, dtype=torch.bfloat16 if cuda(args) else torch.float32)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapter weights in fp32, the base frozen in bf16
    return unet


def batch(args, unet):
    side, context = unet.config.sample_size, unet.config.cross_attention_dim  # SD 1.5: 64x64 latents = 512 px
    latents = torch.randn(args.batch_size, 4, side, side, device=args.device)
    text = torch.randn(args.batch_size, 77, context, device=args.device)
    t = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    return latents, t, text


def measure(args, step) -> dict:
    for _ in range(args.warmup):
        step()
    if cuda(args):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda(args):
        torch.cuda.synchronize()
    return {"step_s": (time.perf_counter() - start) / args.steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda(args) else None}


def plain_adamw(args) -> dict:
    unet = build_unet(args)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, text = batch(args, unet)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda(args)):
            loss = unet(x, t, text).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    precision = "bf16 autocast" if cuda(args) else "fp32"
    return {"config": f"{precision} + torch AdamW, no ZeRO", **measure(args, step)}


def zero2_adamw8bit(args) -> dict:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    import bitsandbytes as bnb
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState

    bf16 = cuda(args)  # on CPU: fp32 and gloo, as the worker runs there
    PartialState(backend="nccl" if bf16 else "gloo", timeout=timedelta(seconds=600))
    ds = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2, "overlap_comm": bf16, "contiguous_gradients": True},
          "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    unet = build_unet(args)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = (bnb.optim.PagedAdamW8bit if bf16 else bnb.optim.AdamW8bit)(params, lr=1e-4)  # paged: CUDA memory only
    model, opt = acc.prepare(unet, opt)
    x, t, text = batch(args, unet)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step():
        loss = model(x.to(dtype), t, text.to(dtype)).sample.float().pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()

    return {"config": "bf16 + PagedAdamW8bit + ZeRO-2 (DeepSpeed via accelerate)" if bf16
            else "fp32 + AdamW8bit + ZeRO-2 (DeepSpeed via accelerate)", **measure(args, step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--only", choices=["plain", "zero2"], default=None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--shape", choices=["sd15", "tiny"], default="sd15", help="the UNet's layer sizes")
    args = parser.parse_args()
    if cuda(args) and not torch.cuda.is_available():
        raise SystemExit("benchmarks/zero_gpu.py needs a CUDA GPU (--device cpu --shape tiny: a smoke run)")
    torch.manual_seed(0)
    runs = {"plain": plain_adamw, "zero2": zero2_adamw8bit}
    for name, run in runs.items():
        if args.only in (None, name):
            result = run(args)
            if cuda(args):
                torch.cuda.empty_cache()
            print(json.dumps({**result, "gpu": torch.cuda.get_device_name() if cuda(args) else None,
                              "shape": args.shape, "batch_size": args.batch_size, "lora_rank": args.rank}), flush=True)


if __name__ == "__main__":
    main()
