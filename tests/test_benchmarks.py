"""The benchmarks' code paths, the GPU ones run on the CPU at the tiny model's size.

No GPU is lent to most sessions, and one that is has little device time: a bug in a benchmark
script found there costs the measurement. These runs take the scripts' GPU code (the same
models, packing, optimizers and DeepSpeed engine) on the CPU, so that the scripts stay runnable.
They measure nothing here; the figures are for benchmarks/RESULTS.md from a GPU run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, require_binary, worker_env
from safetensors import safe_open


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("shape", ["tiny", "flux-tiny"])
def test_packed_step_benchmark_runs_and_counts_flops_per_pack(shape):
    proc = subprocess.run([sys.executable, "benchmarks/packed.py", "gpu", "--device", "cpu", "--shape", shape,
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


def test_bucketed_pack_benchmark_runs_its_three_cases_at_their_bucket_shapes():
    proc = subprocess.run([sys.executable, "benchmarks/buckets_pack.py", "--resolution", "32", "--step", "8",
                           "--steps", "1", "--reps", "1"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'p1': [(4, 16, 12)]" in proc.stdout and "'l1': [(4, 12, 20)]" in proc.stdout, proc.stdout
    for case in ("same-shape pack", "mixed-shape pack", "single runs"):
        assert case in proc.stdout and "subject-steps/s" in proc.stdout


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


def _vs_reference():
    spec = importlib.util.spec_from_file_location("vs_reference", REPO / "benchmarks" / "vs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepared(vr, tmp_path: Path, family: str, other: str):
    """vs_reference's arguments for a 2-subject packed run of `family` (after checking it refuses
    the `other` family's model), and the tiny model and images it prepares."""
    script = tmp_path / f"train_dreambooth_lora_{family}.py"  # the user's copy stands here; it is not run
    script.write_text("")
    with pytest.raises(SystemExit, match=f"--model {other} is not a {family} model; with --family {family} use one of "
                                         f"tiny, {family}"):
        vr.parse_args(["--reference-script", str(script), "--family", family, "--model", other])
    args = vr.parse_args(["--reference-script", str(script), "--python", sys.executable, "--family", family,
                          "--resolution", "32", "--subjects", "2", "--batch-set", "train.pack=2", "--out", str(tmp_path)])
    return (args, *vr.prepare(args, tmp_path))


def _published_keys(out: Path, subjects: int) -> list[list[str]]:
    """The adapter keys of each benchmark subject, each subject checked done."""
    found = []
    for i in range(subjects):
        subject = out / "bench" / "subjects" / f"bench-{i}"
        assert json.loads((subject / "status.json").read_text())["state"] == "done"
        with safe_open(str(subject / "pytorch_lora_weights.safetensors"), "pt") as f:
            found.append(list(f.keys()))
    return found


def test_vs_reference_sdxl_matches_the_reference_flags_and_runs_dreamfleets_packed_job(tmp_path, capsys):
    vr = _vs_reference()
    args, model, images = _prepared(vr, tmp_path, "sdxl", "sd15")
    script = args.reference_script
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (model / "text_encoder_2").is_dir() and len(list(images.parent.glob("images-*"))) == 2

    ref = vr.reference_command(args, model, images, 7, tmp_path / "ref")
    assert ref[:2] == [sys.executable, str(script)]
    for flag in (f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={images}", "--resolution=32",
                 "--train_batch_size=1", "--max_train_steps=7", "--rank=4", "--learning_rate=1e-4", "--seed=0",
                 "--mixed_precision=no", f"--adam_weight_decay={vr.WEIGHT_DECAY}", "--instance_prompt=a photo of sks thing"):
        assert flag in ref, (flag, ref)
    # the SDXL script has no --pre_compute_text_embeddings (it encodes a shared prompt once by itself);
    # given it, its argparse would exit: the SD script takes it
    assert "--pre_compute_text_embeddings" not in ref
    sd_args = vr.parse_args(["--reference-script", str(script), "--out", str(tmp_path)])
    assert "--pre_compute_text_embeddings" in vr.reference_command(sd_args, model, images, 7, tmp_path / "ref")

    out = tmp_path / "dreamfleet-x2"
    cmd = vr.ours_command(args, model, images, 2, out, subjects=2)
    job = yaml.safe_load((tmp_path / "dreamfleet-x2.yaml").read_text())
    assert job["train"]["attention"] == "sdpa" and job["train"]["pack"] == 2, job["train"]
    assert job["train"]["weight_decay"] == vr.WEIGHT_DECAY and job["adapter"]["targets"] == vr.TARGETS
    timing = vr.timed(cmd, tmp_path / "dreamfleet-x2.log", gpu=False)
    assert timing["wall_s"] > 0 and timing["rss_mib"] > 100, timing
    assert "loaded a sdxl model" in (tmp_path / "dreamfleet-x2.log").read_text()
    for keys in _published_keys(out, 2):
        # the same adapter as the reference's: UNet LoRA only, on the four attention projections
        assert keys and all(k.startswith("unet.") for k in keys), keys[:5]
        assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"to_k", "to_q", "to_v", "0"}, keys[:5]


def test_vs_reference_flux_matches_the_reference_flags_and_runs_dreamfleets_packed_job(tmp_path):
    vr = _vs_reference()
    args, model, images = _prepared(vr, tmp_path, "flux", "sdxl")
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    ref = vr.reference_command(args, model, images, 7, tmp_path / "ref")
    # the same targets, guidance, timestep density and T5 length as dreamfleet's job; latents cached
    for flag in ("--lora_layers=to_k,to_q,to_v,to_out.0", "--guidance_scale=3.5", "--weighting_scheme=none",
                 "--max_sequence_length=32", "--cache_latents", "--rank=4", "--max_train_steps=7", "--resolution=32"):
        assert flag in ref, (flag, ref)
    assert "--pre_compute_text_embeddings" not in ref  # an SD-script flag the Flux script lacks

    out = tmp_path / "dreamfleet-x2"
    cmd = vr.ours_command(args, model, images, 2, out, subjects=2)
    job = yaml.safe_load((tmp_path / "dreamfleet-x2.yaml").read_text())
    assert job["train"]["pack"] == 2 and job["adapter"]["targets"] == vr.TARGETS
    assert job["train"].get("guidance", 3.5) == 3.5 and job["train"].get("weighting_scheme", "none") == "none"
    timing = vr.timed(cmd, tmp_path / "dreamfleet-x2.log", gpu=False)
    assert timing["wall_s"] > 0, timing
    assert "loaded a flux model" in (tmp_path / "dreamfleet-x2.log").read_text()
    for keys in _published_keys(out, 2):
        assert keys and all(k.startswith("transformer.") for k in keys), keys[:5]
        assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"to_k", "to_q", "to_v", "0"}, keys[:5]
