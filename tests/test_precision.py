"""The GPU's precision path run on the CPU: naming `model.dtype: bf16` and
`train.mixed_precision: bf16` (training.precision honours an explicit value on every device)
loads the frozen VAE and text encoder in bf16 and autocasts the forward, while adapters and
optimizer state stay fp32. Class images and samples run through the pipeline over an fp32
UNet and a bf16 VAE/text encoder, which failed with a dtype mismatch before."""

from __future__ import annotations

import math

import torch

from conftest import job_dict, subject_entry
from launcher.config import job_from_dict
from launcher.subjects import resolve_subjects
from training import adapters
from training.env import Preemption, WorkerEnv
from training.precision import resolve
from training.runner import Worker

ONE = {"id": "s0", "images": ["a.png"], "instance_prompt": "a photo of sks thing"}


def test_auto_is_fp32_on_cpu_and_explicit_values_are_honoured():
    job = job_from_dict(job_dict("m", [ONE], "out"))
    cpu = torch.device("cpu")
    p = resolve(job.train, job.model, cpu)
    assert (p.frozen, p.autocast_dtype, p.uses_scaler) == (torch.float32, None, False)
    bf16 = job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": "bf16"}))
    assert resolve(bf16.train, bf16.model, cpu).autocast_dtype == torch.bfloat16
    fp16 = job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": "fp16"}))
    p16 = resolve(fp16.train, fp16.model, cpu)
    assert p16.uses_scaler and p16.grad_scaler() is not None and p16.grad_scaler().is_enabled()


def test_bf16_worker_run_with_priors_and_samples_on_cpu(tiny_model, subjects_root, tmp_path):
    d = job_dict(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out", name="p",
                 train={"mixed_precision": "bf16", "steps": 2, "samples": {"enabled": True, "num_inference_steps": 2}},
                 prior={"enabled": True, "num_class_images": 2, "sample_steps": 2})
    d["model"]["dtype"] = "bf16"
    job = job_from_dict(d)
    worker = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "me")
    outcomes = worker.run(resolve_subjects(job))
    assert [o.state for o in outcomes] == ["done"], outcomes
    assert math.isfinite(outcomes[0].final_loss)
    assert worker.c.vae.dtype == torch.bfloat16 and worker.c.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapters.adapter_parameters(worker.c.unet))
    subject = tmp_path / "out" / "p" / "subjects" / "s0"
    assert sorted(p.name for p in (subject / "samples").glob("*.png"))
