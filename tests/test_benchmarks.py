"""The benchmarks' code paths, the GPU ones run on the CPU at the tiny model's size.

No GPU is lent to most sessions, and one that is has little device time: a bug in a benchmark
script found there costs the measurement. These runs take the scripts' GPU code (the same
models, packing, optimizers and DeepSpeed engine) on the CPU, so that the scripts stay runnable.
They measure nothing here; the figures are for benchmarks/RESULTS.md from a GPU run."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_binary, worker_env


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_packed_step_benchmark_runs_and_counts_flops_per_pack():
    proc = subprocess.run([sys.executable, "benchmarks/packed.py", "gpu", "--device", "cpu", "--shape", "tiny",
                           "--packs", "1", "2", "--steps", "1", "--warmup", "1"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = _json_lines(proc.stdout)
    assert header["gpu"] is None and header["torch"]
    assert [r["K"] for r in rows] == [1, 2], rows
    assert all(r["samples_per_s"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None for r in rows), rows
    # two subjects packed are one batch of two: twice the model FLOPs of one
    assert 1.8 < rows[1]["tflop_per_step"] / rows[0]["tflop_per_step"] < 2.2, rows
    assert rows[1]["vs_K1"] > 0


def test_zero2_benchmark_runs_both_configurations():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "benchmarks/zero_gpu.py", "--device", "cpu", "--shape", "tiny", "--steps", "1", "--warmup", "1"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _json_lines(proc.stdout)
    assert [r["config"] for r in rows] == ["fp32 + torch AdamW, no ZeRO",
                                           "fp32 + AdamW8bit + ZeRO-2 (DeepSpeed via accelerate)"], rows
    assert all(r["step_s"] > 0 and r["shape"] == "tiny" for r in rows), rows


def test_cpu_attention_benchmark_times_the_kernel_against_sdpa():
    require_binary("cc")  # the kernel is built with it
    proc = subprocess.run([sys.executable, "benchmarks/cpu_attention.py", "--quick", "--reps", "1", "--threads", "1"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = _json_lines(proc.stdout)
    assert header["threads"] == 1 and header["torch"]
    assert [(r["batch"], r["heads"], r["head_dim"]) for r in rows] == [(1, 8, 4)], rows
    assert rows[0]["kernel_ms"] > 0 and rows[0]["sdpa_ms"] > 0
    assert "| 1, 8, 4, 64, 64 | smoke |" in proc.stdout
