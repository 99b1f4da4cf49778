"""What the per-family test files (test_sdxl.py, test_flux.py) check the same way on their own tiny
model: that a DDP run of 2 processes equals one process, and that a ZeRO-2 run saves the full
adapter. Each runs the real worker twice and compares the published adapters part by part."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import job_dict, run_worker, subject_entry, write_job


def job(tmp: Path, model: Path, subjects_root: Path, name: str, n: int = 1, model_settings: dict | None = None,
        **sections) -> Path:
    """A job file of n subjects; model_settings: model.* entries beside the source (model.quantize)."""
    subjects = [subject_entry(subjects_root, i) for i in range(n)]
    data = job_dict(model, subjects, tmp / "out", name=name, **sections)
    data["model"].update(model_settings or {})
    return write_job(tmp / f"{name}.yaml", data)


def adapter(out: Path, name: str, part: str, sid: str = "s0") -> dict[str, torch.Tensor]:
    from training.export import read_peft_weights

    return read_peft_weights(out / name / "subjects" / sid / "adapter" / part / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_ddp_equals_one_process(tmp: Path, model: Path, subjects_root: Path, spec: dict, parts,
                                  model_settings: dict | None = None) -> str:
    """As tests/test_distributed.py: eps=1.0 so the update is proportional to the averaged gradient;
    a batch of 2 in one process against 1 per process in 2. Returns the DDP run's log."""
    train = {"steps": 3, "eps": 1.0, "learning_rate": 0.5}
    one = run_worker(job(tmp, model, subjects_root, "one", model_settings=model_settings, adapter=spec,
                         train={**train, "batch_size": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_worker(job(tmp, model, subjects_root, "ddp", model_settings=model_settings, adapter=spec,
                         train={**train, "batch_size": 1}, distributed={"strategy": "ddp", "nproc_per_node": 2}),
                     nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    for part in parts:
        assert max_diff(adapter(tmp / "out", "one", part), adapter(tmp / "out", "ddp", part)) < 1e-5, part
    return ddp.stderr


def assert_zero_saves_the_full_adapter(tmp: Path, model: Path, subjects_root: Path, spec: dict, parts,
                                       stage: int = 2) -> None:
    """A 2-process DeepSpeed ZeRO run (stage 3 partitions the frozen base too) publishes each
    part's whole adapter: the keys and shapes of a single run's, finite and trained."""
    one = run_worker(job(tmp, model, subjects_root, "one", adapter=spec, train={"steps": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    zero = run_worker(job(tmp, model, subjects_root, "zero", adapter=spec, train={"steps": 2},
                          distributed={"strategy": "deepspeed", "zero_stage": stage, "nproc_per_node": 2}), nproc=2)
    assert zero.returncode == 0, zero.stderr[-4000:]
    assert f"DeepSpeed ZeRO-{stage} engine" in zero.stderr
    for part in parts:
        ours, single = adapter(tmp / "out", "zero", part), adapter(tmp / "out", "one", part)
        assert ours.keys() == single.keys() and all(v.shape == single[k].shape for k, v in ours.items())
        assert all(torch.isfinite(v).all() for v in ours.values())
        assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k), part
