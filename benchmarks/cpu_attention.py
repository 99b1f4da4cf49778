"""The CPU small-head attention kernel (training/cpu_attention.py) against PyTorch's SDPA.

    python benchmarks/cpu_attention.py [--reps 15] [--threads N]

One forward and backward of softmax attention per shape, the kernel and SDPA alternating, the
median of `--reps` timed calls each; a JSON line per shape, then a table for
benchmarks/RESULTS.md. The shapes are the tiny UNet's at 64 px (8 heads, head size 4 or 8;
self-attention over 1,024 and 256 latent tokens, cross-attention over 77 text tokens), a packed
batch of 4, and every head size the kernel takes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from training import cpu_attention

# (batch, heads, head size, queries, keys, what)
SHAPES = [
    (1, 8, 4, 1024, 1024, "tiny UNet self-attention, 64 px"),
    (4, 8, 4, 1024, 1024, "the same, 4 subjects packed"),
    (1, 8, 8, 256, 256, "tiny UNet mid block"),
    (1, 8, 4, 1024, 77, "tiny UNet cross-attention"),
] + [(1, 8, d, 512, 512, f"head size {d}") for d in range(1, cpu_attention.MAX_HEAD_DIM + 1)]


def timed(fn, reps: int) -> float:
    fn()  # warm-up: allocation, the kernel's first call
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(batch: int, heads: int, head_dim: int, queries: int, keys: int, reps: int) -> dict:
    torch.manual_seed(0)
    width = heads * head_dim
    q, k, v = (torch.randn(batch, n, width, requires_grad=True) for n in (queries, keys, keys))
    grad = torch.randn(batch, queries, width)

    def step(use_kernel: bool):
        def run():
            q.grad = k.grad = v.grad = None
            cpu_attention.attention(q, k, v, heads, head_dim ** -0.5, use_kernel).backward(grad)
        return run

    kernel, sdpa = [], []
    for _ in range(3):  # alternate, so that the machine's drift lands on both
        kernel.append(timed(step(True), reps))
        sdpa.append(timed(step(False), reps))
    ms_kernel, ms_sdpa = statistics.median(kernel), statistics.median(sdpa)
    return {"batch": batch, "heads": heads, "head_dim": head_dim, "queries": queries, "keys": keys,
            "kernel_ms": round(ms_kernel, 3), "sdpa_ms": round(ms_sdpa, 3), "speedup": round(ms_sdpa / ms_kernel, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the first shape only, at 64 queries and keys (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_attention.library() is None:
        raise SystemExit(f"the kernel is not available: {cpu_attention._state['why']}")
    shapes = [(1, 8, 4, 64, 64, "smoke")] if args.quick else SHAPES
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "python": platform.python_version()}))
    rows = []
    for *shape, what in shapes:
        row = measure(*shape, reps=args.reps) | {"what": what}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| shape (batch, heads, head size, queries, keys) | what | kernel ms | SDPA ms | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']}, {r['heads']}, {r['head_dim']}, {r['queries']}, {r['keys']} | {r['what']} "
              f"| {r['kernel_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
