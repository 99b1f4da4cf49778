"""What `launcher validate` and the generated DeepSpeed config say about the data-parallel
strategies, torch-free and fast (the training runs are in test_distributed.py)."""

from __future__ import annotations

import pytest

from conftest import job_dict
from launcher.config import job_from_dict
from launcher.deepspeed import deepspeed_config
from launcher.validate import check_job

SUBJECT = {"id": "s0", "images": "/nonexistent", "instance_prompt": "a photo of sks thing"}


def job(**sections):
    return job_from_dict(job_dict("/nonexistent/model", [SUBJECT], "/nonexistent/out", **sections))


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_text_encoder_adapter_is_accepted_under_data_parallel_strategies(strategy):
    errors, _ = check_job(job(adapter={"type": "lora", "rank": 4, "text_encoder": {"type": "lora", "rank": 2}},
                              distributed={"strategy": strategy, "nproc_per_node": 2}), check_inputs=False)
    assert errors == []


def test_offload_names_the_optimizer_that_replaces_an_8bit_one():
    errors, notes = check_job(job(train={"optimizer": "adamw8bit"},
                                  distributed={"strategy": "deepspeed", "offload_optimizer": True}), check_inputs=False)
    assert errors == []
    assert any(n.startswith("train.optimizer=adamw8bit cannot run with ZeRO-Offload") and "DeepSpeed's own CPU Adam" in n
               for n in notes), notes
    assert any(n.startswith("distributed.offload_optimizer: DeepSpeed compiles its CPU Adam") for n in notes), notes


def test_offload_needs_the_deepspeed_strategy():
    errors, _ = check_job(job(distributed={"strategy": "ddp", "offload_optimizer": True}), check_inputs=False)
    assert errors == [("distributed.offload_optimizer: offloading is done by DeepSpeed and needs distributed.strategy "
                       "deepspeed, got ddp")]


def test_offload_config_keeps_the_workers_cpu_adam():
    """accelerate swaps a client optimizer for a new DeepSpeedCPUAdam (Adam mode, the LR schedule
    left on the old one) unless zero_force_ds_cpu_optimizer is false."""
    config = deepspeed_config(job(distributed={"strategy": "deepspeed", "offload_optimizer": True}), on_gpu=False)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert config["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_gradient_accumulation_is_refused_under_data_parallel(strategy, tmp_path):
    errors, notes = check_job(job(train={"gradient_accumulation": 2, "gradient_checkpointing": True},
                                  distributed={"strategy": strategy, "nproc_per_node": 2}), check_inputs=False)
    assert len(errors) == 1 and "train.gradient_accumulation=2 is not supported" in errors[0]
    assert not any("gradient_checkpointing" in n for n in notes)  # applied under DDP and ZeRO (test_distributed.py)
    if strategy == "ddp":  # a hand-made job file that skipped the launcher meets the same refusal in the worker
        from conftest import run_worker, write_job

        path = write_job(tmp_path / "job.yaml", job_dict("/nonexistent/model", [SUBJECT], tmp_path / "out",
                                                          train={"gradient_accumulation": 2},
                                                          distributed={"strategy": "ddp"}))
        proc = run_worker(path, timeout=120)
        assert proc.returncode == 2 and "gradient_accumulation=2 is not supported" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_pack_under_a_data_parallel_strategy_is_refused_not_ignored(strategy):
    errors, _ = check_job(job(train={"pack": 4}, distributed={"strategy": strategy, "nproc_per_node": 2}),
                          check_inputs=False)
    assert errors == [f"train.pack=4 needs distributed.strategy subject (each rank packs its own subjects), got "
                      f"{strategy}: a data-parallel run trains one subject at a time"]


def test_compile_with_a_pack_is_refused():
    errors, _ = check_job(job(train={"compile": True, "pack": 4}), check_inputs=False)
    assert len(errors) == 1 and "train.compile cannot be combined with train.pack" in errors[0]
    assert check_job(job(train={"compile": True}), check_inputs=False)[0] == []
