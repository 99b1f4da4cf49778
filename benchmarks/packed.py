"""Packed multi-subject training (train.pack) vs sequential single-subject runs: subjects/hour.

    python benchmarks/packed.py cpu [--subjects 16] [--sequential 4] [--steps 10] [--packs 1 2 4 8 16]
    python benchmarks/packed.py gpu [--packs 1 2 4 8 16 32] [--steps 20]     # SD 1.5-shaped UNet, 512 px, bf16
    python benchmarks/packed.py gpu --device cpu --shape tiny --packs 1 2 --steps 1   # a smoke run of the gpu path
    python benchmarks/packed.py gpu --shape flux --packs 1 2 4 8 --gradient-checkpointing   # FLUX.1-shaped, 1024 px

cpu: the tiny random-weight model at 32 px, all through the real worker entry point. Sequential
means one process per subject (process start, model load, caching, training, export), as a
fleet without packing would run them; `--sequential N` runs N such processes and the rate is
N / their total time. Packed means one worker process with `--subjects` subjects and
train.pack=K (continuous batching). Same machine, same run, one after another.

gpu: in one process, an SD 1.5-shaped random-weight UNet (training.tiny SHAPES["sd15"]) in bf16
with packed LoRA rank 4 (comprehensive targets), batch 1 per subject at 512 px (64x64 latents)
(--shape flux: FLUX.1-dev's transformer, training.tiny FLUX_REAL, at 1024 px with a 512-token T5
sequence, through the flux family's predict),
AdamW per subject as in training.packed_loop. Reports samples/s, subjects/hour at `--subject-steps`
steps per subject (training time only), peak memory, and model FLOPs utilisation (FLOPs counted by
torch.utils.flop_counter for one forward+backward, over the GPU's dense bf16 peak, `--peak-tflops`,
989 for an H100 SXM). `--device cpu --shape tiny` runs the same code on the tiny model without a
GPU (no memory or MFU figures): the test suite does, so that a GPU session's time is not spent on
this script's bugs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _worker(job: Path) -> float:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "DREAMFLEET_"))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "training.worker", "--job", str(job)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - start


def run_cpu(args) -> list[dict]:
    import yaml

    from training.tiny import build_tiny_model, write_subject_images

    work = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    model = build_tiny_model(work / "model")
    subjects = []
    for i in range(args.subjects):
        write_subject_images(work / "img" / f"s{i}", i, count=3, size=48)
        subjects.append({"id": f"s{i}", "images": str(work / "img" / f"s{i}"), "instance_prompt": f"a photo of sks{i} thing"})

    def job(name: str, subs: list[dict], pack: int) -> Path:
        d = {"name": name, "model": {"source": str(model)}, "adapter": {"type": "lora", "rank": 4},
             "train": {"steps": args.steps, "resolution": 32, "log_every": args.steps, "optimizer": "adamw",
                       "learning_rate": 1e-4, "pack": pack, "samples": {"enabled": False}},
             "subjects": subs, "output": {"uri": str(work / "out")}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    rows = []
    total = sum(_worker(job(f"seq{i}", [subjects[i]], 1)) for i in range(args.sequential))
    seq_rate = 3600 * args.sequential / total
    rows.append({"mode": "sequential (process per subject)", "subjects": args.sequential, "wall_s": round(total, 1),
                 "subjects_per_hour": round(seq_rate), "vs_sequential": 1.0})
    print(json.dumps(rows[-1]), flush=True)
    for k in args.packs:
        wall = _worker(job(f"pack{k}", subjects, k))
        rate = 3600 * args.subjects / wall
        rows.append({"mode": f"packed K={k}", "subjects": args.subjects, "wall_s": round(wall, 1),
                     "subjects_per_hour": round(rate), "vs_sequential": round(rate / seq_rate, 2)})
        print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
    return rows


def _denoiser(args, device):
    """The packed step's model (adapters attached, trainable) and inputs(k) -> (x, forward(x) -> prediction):
    an SD 1.5-shaped UNet at 512 px (64x64 latents), or a FLUX.1-shaped transformer at 1024 px (128x128
    latents of 16 channels, a 512-token T5 sequence; guidance as train.guidance), both in bf16."""
    import torch

    from launcher.config import LoraSpec
    from training import adapters, families

    spec = LoraSpec(type="lora", rank=4, targets="comprehensive")
    if args.shape.startswith("flux"):
        from diffusers import FluxTransformer2DModel

        from training.tiny import FLUX_SHAPES

        family, sizes = families.get("flux"), FLUX_SHAPES["tiny" if args.shape == "flux-tiny" else "flux"]
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):  # built in place: FLUX.1's 12B parameters never pass through fp32 on the host
            model = FluxTransformer2DModel(**sizes["transformer"])
        torch.set_default_dtype(torch.float32)
        side = 16 if args.shape == "flux-tiny" else 128
        length = min(512, sizes["t5_max_length"])
        model.requires_grad_(False)
        adapters.attach(model, spec, family.targets("transformer"), "transformer")

        def inputs(k):
            x = torch.randn(k, 16, side, side, device=device)
            cond = {"encoder_hidden_states": torch.randn(k, length, sizes["t5"]["d_model"], device=device,
                                                         dtype=torch.bfloat16),
                    "pooled_projections": torch.randn(k, sizes["text"]["hidden_size"], device=device,
                                                      dtype=torch.bfloat16)}
            ts = torch.rand(k, device=device) * 1000
            return x, lambda x: family.predict(model, x, ts, cond)

        return model.to(device), inputs
    from diffusers import UNet2DConditionModel

    from training.tiny import SHAPES

    unet = UNet2DConditionModel(**SHAPES[args.shape]["unet"]).to(device, torch.bfloat16)
    side, context = unet.config.sample_size, unet.config.cross_attention_dim  # SD 1.5: 64x64 latents = 512 px
    unet.requires_grad_(False)
    adapters.attach(unet, spec, adapters.UNET_TARGETS, "unet")

    def inputs(k):
        x = torch.randn(k, 4, side, side, device=device)
        emb = torch.randn(k, 77, context, device=device, dtype=torch.bfloat16)
        ts = torch.randint(0, 1000, (k,), device=device)
        return x, lambda x: unet(x, ts, encoder_hidden_states=emb).sample

    return unet.to(device), inputs


def run_step(args) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training import packed

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    unet, inputs = _denoiser(args, device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    rows = []
    for k in args.packs:
        router, layers = packed.install(unet, k)
        params = packed.slot_parameters(layers)
        opts = [torch.optim.AdamW([torch.nn.Parameter(p.data[s]) for p in params], lr=1e-4, fused=True)
                for s in range(k)]
        router.index = torch.arange(k, device=device)
        x, forward = inputs(k)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred = forward(x)
            (pred.float() - x).pow(2).mean(dim=(1, 2, 3)).sum().backward()
            for s, opt in enumerate(opts):
                for view, p in zip(opt.param_groups[0]["params"], params):
                    view.grad = p.grad[s]
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
                opt.step()
            for p in params:
                p.grad = None

        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step()
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            dt = (time.perf_counter() - start) / args.steps
        except torch.OutOfMemoryError:
            rows.append({"K": k, "error": "out of memory"})
            packed.uninstall(unet, layers)
            break
        rows.append({"K": k, "samples_per_s": round(k / dt, 2), "step_s": round(dt, 4),
                     "subjects_per_hour": round(3600 * k / (dt * args.subject_steps)),
                     "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                     "tflop_per_step": round(flops / 1e12, 6),
                     "mfu": round(flops / dt / (args.peak_tflops * 1e12), 4) if cuda else None})
        packed.uninstall(unet, layers)
        opts = None  # this K's optimizer state freed before the next
        if cuda:
            torch.cuda.empty_cache()
    base = rows[0].get("subjects_per_hour")
    for r in rows:
        if base and "subjects_per_hour" in r:
            r["vs_K1"] = round(r["subjects_per_hour"] / base, 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("where", choices=["cpu", "gpu"])
    p.add_argument("--subjects", type=int, default=16)
    p.add_argument("--sequential", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--subject-steps", type=int, default=400)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda", help="gpu mode: where the step runs (cpu: a smoke run)")
    p.add_argument("--shape", choices=["sd15", "tiny", "flux", "flux-tiny"], default="sd15",
                   help="gpu mode: the denoiser's layer sizes (sd15/tiny: UNet at 512 px; flux/flux-tiny: Flux transformer)")
    p.add_argument("--warmup", type=int, default=3, help="gpu mode: untimed steps first")
    args = p.parse_args()
    import torch

    import diffusers
    import peft

    print(json.dumps({"machine": platform.platform(), "cpu": platform.processor(), "python": platform.python_version(),
                      "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
    rows = run_cpu(args) if args.where == "cpu" else run_step(args)
    if args.where == "gpu":
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
