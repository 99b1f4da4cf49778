"""The GPU's precision path run on the CPU: naming `model.dtype: bf16` and
`train.mixed_precision: bf16` (training.precision honours an explicit value on every device)
loads the frozen VAE and text encoder in bf16 and autocasts the forward, while adapters and
optimizer state stay fp32, through the single, packed and data-parallel loops, priors, samples
and export. fp16 goes through a GradScaler that skips steps with inf gradients. `train.pack:
auto` is sized from given free-memory figures, and the paged 8-bit AdamW is checked on a GPU
where there is one."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open

from conftest import job_dict, run_worker, subject_entry, write_job
from launcher.config import job_from_dict
from launcher.errors import ConfigError
from launcher.subjects import image_uris, resolve_subjects
from training import adapters, pack_memory
from training.env import Preemption, WorkerEnv
from training.precision import resolve
from training.runner import Worker

ONE = {"id": "s0", "images": ["a.png"], "instance_prompt": "a photo of sks thing"}
GiB = 2**30
CPU = torch.device("cpu")


def _job(tiny_model, subjects, out, dtype: str = "bf16", **sections):
    d = job_dict(tiny_model, subjects, out, **sections)
    d["model"]["dtype"] = dtype
    return job_from_dict(d)


def _file_dtypes(path) -> set[str]:
    with safe_open(path, "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_auto_is_fp32_on_cpu_and_explicit_values_are_honoured():
    job = job_from_dict(job_dict("m", [ONE], "out"))
    p = resolve(job.train, job.model, CPU)
    assert (p.frozen, p.autocast_dtype, p.uses_scaler) == (torch.float32, None, False)
    bf16 = job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": "bf16"}))
    assert resolve(bf16.train, bf16.model, CPU).autocast_dtype == torch.bfloat16
    fp16 = job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": "fp16"}))
    p16 = resolve(fp16.train, fp16.model, CPU)
    assert p16.uses_scaler and p16.grad_scaler() is not None and p16.grad_scaler().is_enabled()


def test_bf16_worker_run_with_priors_samples_and_a_text_encoder_exports_fp32(tiny_model, subjects_root, tmp_path):
    """Every exported file (PEFT, diffusers, kohya; UNet and text encoder) holds fp32 adapter
    weights after a bf16 run, as docs/formats.md says."""
    job = _job(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out", name="p",
               adapter={"type": "lora", "rank": 4, "text_encoder": {"type": "lora", "rank": 4}},
               train={"mixed_precision": "bf16", "steps": 2, "samples": {"enabled": True, "num_inference_steps": 2}},
               prior={"enabled": True, "num_class_images": 2, "sample_steps": 2})
    worker = Worker(job, WorkerEnv(), Preemption(), CPU, "me")
    outcomes = worker.run(resolve_subjects(job))
    assert [o.state for o in outcomes] == ["done"], outcomes
    assert math.isfinite(outcomes[0].final_loss)
    assert worker.c.vae.dtype == torch.bfloat16 and worker.c.text_encoders["text_encoder"].dtype == torch.bfloat16
    for model in (worker.c.denoiser, worker.c.text_encoders["text_encoder"]):
        assert all(p.dtype == torch.float32 for p in adapters.adapter_parameters(model))
    subject = tmp_path / "out" / "p" / "subjects" / "s0"
    assert sorted(p.name for p in (subject / "samples").glob("*.png"))
    files = [subject / "adapter" / "unet" / "adapter_model.safetensors",
             subject / "adapter" / "text_encoder" / "adapter_model.safetensors",
             subject / "pytorch_lora_weights.safetensors", subject / "s0.safetensors"]
    # kohya's per-module alpha is a scalar; every other tensor is a factor
    assert {f.name: _file_dtypes(f) for f in files} == {f.name: {"F32"} for f in files}


# ------------------------------------------------------------------ packed


def _optimizer_state_dtypes(optimizer, params) -> dict[str, set]:
    """{state name: {(dtype, tensor has >= 4096 elements)}} over the optimizer's parameters."""
    out: dict[str, set] = {}
    for p in params:
        for name, value in optimizer.state[p].items():
            if torch.is_tensor(value) and value.numel() > 1:
                out.setdefault(name, set()).add((value.dtype, p.numel() >= 4096))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_packed_bf16_on_cpu_trains_with_fp32_adapters_and_documented_optimizer_state(tiny_model, subjects_root,
                                                                                       tmp_path, optimizer):
    """Two subjects in one pack under bf16 autocast over a bf16 VAE and text encoder. torch
    AdamW keeps fp32 moments; bitsandbytes AdamW8bit keeps uint8 moments (with fp32 absmax and
    quantization maps) for tensors of 4,096 elements or more and fp32 ones below that, by design."""
    from training.loop import prepare_subject
    from training.packed import PackedLora
    from training.packed_loop import PackedTrainer

    job = _job(tiny_model, [subject_entry(subjects_root, i) for i in range(2)], tmp_path / "out", name="pk",
               adapter={"type": "lora", "rank": 8, "targets": "comprehensive"},
               train={"mixed_precision": "bf16", "pack": 2, "steps": 2, "optimizer": optimizer})
    worker = Worker(job, WorkerEnv(), Preemption(), CPU, "me")
    subjects = resolve_subjects(job)
    worker.setup(subjects)
    c = worker.c
    trainer = PackedTrainer(c, job, 2, worker.init_state["unet"])
    seen: set[torch.dtype] = set()
    layer = next(m for m in c.denoiser.modules() if isinstance(m, PackedLora))
    layer.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    c.denoiser.train()
    for i, s in enumerate(subjects):
        trainer.open(i, s, prepare_subject(c, job, s, image_uris(s), None, False))
    before = [p.detach().clone() for p in trainer.params]
    trainer.step()
    trainer.step()
    assert seen == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert c.vae.dtype == torch.bfloat16 and c.text_encoders["text_encoder"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))  # it trained
    for s in trainer.slots:
        losses = [v[0].item() for v, _ in s.pending]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
        assert all(v.dtype == torch.float32 for v in s.views)
        state = _optimizer_state_dtypes(s.stepper.optimizer, s.views)
        if optimizer == "adamw":
            assert state == {"exp_avg": {(torch.float32, False), (torch.float32, True)},
                             "exp_avg_sq": {(torch.float32, False), (torch.float32, True)}}, state
        else:  # 8-bit for large tensors (some of rank-8 conv factors have >= 4096 elements), fp32 below
            assert state["state1"] == state["state2"] == {(torch.uint8, True), (torch.float32, False)}, state
            assert {d for d, _ in state["absmax1"] | state["qmap1"]} == {torch.float32}
    trainer.close()


def test_pack_refuses_fp16_where_auto_means_fp16(monkeypatch):
    """A pack runs one unscaled backward for subjects with their own optimizers, so it cannot
    scale the loss: on a GPU without bf16 (faked: no GPU here), `auto` is fp16 and the pack is
    refused with the fix, instead of per-slot GradScalers unscaling gradients that were never
    scaled (dividing them by 65,536)."""
    from training.packed_loop import resolve_pack

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    gpu = torch.device("cuda", 0)
    job = job_from_dict(job_dict("m", [ONE], "out", train={"pack": 2}))
    with pytest.raises(ConfigError, match="train.pack=2 needs bf16 or fp32.*set train.mixed_precision no"):
        resolve_pack(job, gpu)
    fp32 = job_from_dict(job_dict("m", [ONE], "out", train={"pack": 2, "mixed_precision": "no"}))
    assert resolve_pack(fp32, gpu) == 2


# ------------------------------------------------------------------ pack: auto


@pytest.mark.parametrize("free_gib, resolution, rows, expected", [
    (80, 512, 1, 16),  # capped: (64 - 3.6) / 2.5 = 24
    (40, 512, 2, 5),  # (32 - 3.6) / 5 = 5.7
    (24, 512, 2, 3),  # (19.2 - 3.6) / 5 = 3.1
    (16, 512, 1, 3),  # (12.8 - 3.6) / 2.5 = 3.7 (the base not subtracted would give 5)
    (40, 768, 2, 2),  # (32 - 3.6) / 11.25 = 2.5
    (8, 512, 1, 1),  # (6.4 - 3.6) / 2.5 = 1.1
    (4, 512, 1, 1),  # the base alone fills it: never below 1
    (80, 256, 1, 16),
])
def test_pack_auto_sizing_for_sd15_from_free_memory(free_gib, resolution, rows, expected):
    sd15 = pack_memory.SD15
    assert 3.5 * GiB < sd15.bytes < 3.7 * GiB
    assert pack_memory.pack_for_memory(free_gib * GiB, resolution, rows, sd15.bytes, sd15.unet_params) == expected


def test_pack_auto_sizing_scales_with_the_unet_and_counts_only_the_base_still_to_load():
    sdxl_unet = 2_567_463_684
    sdxl_bytes = sdxl_unet * 4 + (123_060_480 + 694_659_841 + 83_653_863) * 2  # ~11.3 GiB
    assert pack_memory.pack_for_memory(80 * GiB, 1024, 1, sdxl_bytes, sdxl_unet) == 1  # (64 - 11.3) / 29.9
    assert pack_memory.pack_for_memory(141 * GiB, 1024, 1, sdxl_bytes, sdxl_unet) == 3  # an H200
    # already loaded (nothing left to load): the free memory is all for activations
    assert pack_memory.pack_for_memory(16 * GiB, 512, 1, 0) == 5
    assert pack_memory.pack_for_memory(80 * GiB, 512, 1, 0, max_pack=4) == 4


def test_model_footprint_is_what_the_loaded_base_takes(tiny_model):
    from training.components import load_components

    job = _job(tiny_model, [ONE], "out")
    c = load_components(job.model, CPU)
    loaded = sum(p.numel() * p.element_size() for m in (c.denoiser, c.vae, c.text_encoders["text_encoder"]) for p in m.parameters())
    found = pack_memory.model_footprint(tiny_model, torch.bfloat16)
    assert found.unet_params == sum(p.numel() for p in c.denoiser.parameters())
    assert found.bytes == loaded
    assert pack_memory.model_footprint(tiny_model, torch.bfloat16, variant="fp16") is None  # no such files
    assert pack_memory.footprint_of(job.model.model_copy(update={"source": "s3://b/m"}), CPU) == pack_memory.SD15


def test_pack_auto_reads_free_memory_before_the_base_is_loaded(tiny_model, monkeypatch, caplog):
    """resolve_pack runs before Worker.setup loads the base (training.distributed), so the
    footprint read from the model's files is subtracted from the free memory. The CUDA memory
    queries are the one boundary faked here (no GPU): given figures in, a pack size out."""
    from training.packed_loop import resolve_pack

    job = _job(tiny_model, [ONE], "out", dtype="auto", train={"pack": "auto", "resolution": 512})
    footprint = pack_memory.model_footprint(tiny_model, torch.bfloat16)
    per_subject = pack_memory.ACTIVATIONS_PER_512PX_SAMPLE * footprint.unet_params / pack_memory.SD15_UNET_PARAMS
    free = int((3 * per_subject + footprint.bytes) / pack_memory.HEADROOM) + 1024  # 3 subjects after the base
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert resolve_pack(job, torch.device("cpu")) == 4  # a CPU: the fixed default
    with caplog.at_level(logging.INFO, logger="training.pack_memory"):
        assert resolve_pack(job, torch.device("cuda", 0)) == 3
    assert "train.pack auto: 3 subject(s) per pack" in caplog.text
    # once the base is loaded (allocated), it is not subtracted twice
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: footprint.bytes)
    assert resolve_pack(job, torch.device("cuda", 0)) == min(16, int(pack_memory.HEADROOM * free // per_subject)) > 3


# ------------------------------------------------------------------ data-parallel


def test_ddp_precision_follows_the_single_process_rule(caplog):
    from training.dataparallel import _accelerate_precision

    def job(mixed, strategy="ddp"):
        return job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": mixed},
                                      distributed={"strategy": strategy, "nproc_per_node": 2}))

    assert _accelerate_precision(job("auto"), CPU) == "no"  # auto: fp32 on a CPU
    assert _accelerate_precision(job("no"), CPU) == "no"
    assert _accelerate_precision(job("bf16"), CPU) == "bf16"  # was "no": every CPU run was fp32
    with caplog.at_level(logging.WARNING, logger="training.dataparallel"):
        assert _accelerate_precision(job("fp16"), CPU) == "no"  # accelerate scales fp16 on GPUs only
    assert "accelerate runs fp16 on a GPU only; this CPU run is fp32" in caplog.text
    assert _accelerate_precision(job("bf16", "deepspeed"), CPU) == "no"  # as launcher.deepspeed's config says


def _metrics(out, name):
    path = out / name / "subjects" / "s0" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_ddp_bf16_on_cpu_autocasts_like_one_process(tiny_model, subjects_root, tmp_path):
    """Two gloo processes of batch 1 under bf16 compute the same first-step loss as one process
    of batch 2 under bf16 (the same global batch, the same bf16 forward), which differs from the
    fp32 loss by far more than rounding; the adapter stays fp32 in the exported files."""
    out = tmp_path / "out"
    train = {"steps": 2, "eps": 1.0, "learning_rate": 0.5}
    runs = (("one", "bf16", 1), ("one32", "no", 1), ("ddp", "bf16", 2))
    for name, mixed, nproc in runs:
        d = job_dict(tiny_model, [subject_entry(subjects_root, 0)], out, name=name,
                     train={**train, "mixed_precision": mixed, "batch_size": 2 // nproc},
                     distributed={"strategy": "ddp" if nproc == 2 else "subject", "nproc_per_node": nproc})
        d["model"]["dtype"] = "bf16"
        proc = run_worker(write_job(tmp_path / f"{name}.yaml", d), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
    first = {name: _metrics(out, name)[0]["loss"] for name, _, _ in runs}
    assert abs(first["ddp"] - first["one"]) < 2e-5, first
    assert abs(first["one32"] - first["one"]) > 5e-5, first  # so the comparison tells bf16 from fp32
    assert all(math.isfinite(line["loss"]) for line in _metrics(out, "ddp"))
    subject = out / "ddp" / "subjects" / "s0"
    for f in (subject / "adapter" / "unet" / "adapter_model.safetensors", subject / "pytorch_lora_weights.safetensors",
              subject / "s0.safetensors"):
        assert _file_dtypes(f) == {"F32"}, f


# ------------------------------------------------------------------ fp16 and its GradScaler


def test_single_subject_fp16_on_cpu_trains_through_a_grad_scaler(tiny_model, subjects_root, tmp_path):
    """fp16 autocast runs on a CPU (torch's CPU autocast and GradScaler support it), so the
    single-subject loop scales the loss there as on a GPU: the checkpoint carries the scaler."""
    job = _job(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out", dtype="fp16", name="h",
               train={"mixed_precision": "fp16", "steps": 3, "checkpoint_every": 2})
    worker = Worker(job, WorkerEnv(), Preemption(), CPU, "me")
    outcomes = worker.run(resolve_subjects(job))
    assert [o.state for o in outcomes] == ["done"], outcomes
    assert worker.c.vae.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in adapters.adapter_parameters(worker.c.denoiser))
    subject = tmp_path / "out" / "h" / "subjects" / "s0"
    lines = [json.loads(x) for x in (subject / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in lines)
    state = torch.load(subject / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert state["stepper"]["scaler"]["scale"] == 2.0**16  # two finite steps: the initial scale
    assert _file_dtypes(subject / "adapter" / "unet" / "adapter_model.safetensors") == {"F32"}


def test_fp16_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    from training.loop import Stepper

    job = job_from_dict(job_dict("m", [ONE], "out", train={"mixed_precision": "fp16", "max_grad_norm": 1.0}))
    weight = torch.nn.Parameter(torch.ones(8, 8))
    stepper = Stepper([{"params": [weight], "lr": 0.1}], job, CPU, total_steps=10)
    assert isinstance(stepper.scaler, torch.amp.GradScaler) and stepper.scaler.is_enabled()
    with stepper.autocast():
        loss = (weight @ torch.ones(8, 8)).float().mean() * float("inf")
    stepper.backward(loss)
    stepper.step()
    assert torch.equal(weight.detach(), torch.ones(8, 8))  # skipped: the weights did not move
    assert stepper.scaler.get_scale() == 2.0**15
    state = stepper.optimizer.state[weight]  # fused AdamW sets its state up, then skips on found_inf
    assert float(state.get("step", 0)) == 0 and not state.get("exp_avg", torch.zeros(1)).any()
    with stepper.autocast():
        loss = (weight @ torch.ones(8, 8)).float().mean()
    stepper.backward(loss)
    stepper.step()
    assert not torch.equal(weight.detach(), torch.ones(8, 8))  # a finite step goes through
    assert float(stepper.optimizer.state[weight]["step"]) == 1
    assert stepper.scaler.get_scale() == 2.0**15


# ------------------------------------------------------------------ GPU only


# the `gpu` marker keeps these a skip under CI=true (tests/conftest.py), where no GPU exists
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_paged_adamw8bit_on_cuda_keeps_8bit_paged_state_and_fp32_params():
    """bitsandbytes pages the 8-bit state of tensors of 100,000 elements or more into unified
    memory; smaller ones of 4,096 or more are 8-bit on the device, and below that fp32."""
    from training.optim import build_optimizer

    job = job_from_dict(job_dict("m", [ONE], "out", train={"optimizer": "paged_adamw8bit"}))
    gpu = torch.device("cuda")
    big, mid, small = (torch.nn.Parameter(torch.randn(*shape, device=gpu)) for shape in ((512, 256), (64, 64), (16, 16)))
    optimizer = build_optimizer([{"params": [big, mid, small], "lr": 1e-3}], job.train, gpu)
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    before = big.detach().clone()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum((p @ p.T).float().square().mean() for p in (big, mid, small))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert math.isfinite(loss.item()) and not torch.equal(before, big.detach())
    assert all(p.dtype == torch.float32 for p in (big, mid, small))
    s_big, s_mid, s_small = (optimizer.state[p] for p in (big, mid, small))
    assert s_big["state1"].dtype == s_big["state2"].dtype == torch.uint8 and getattr(s_big["state1"], "is_paged", False)
    assert s_mid["state1"].dtype == torch.uint8 and not getattr(s_mid["state1"], "is_paged", False)
    assert s_small["state1"].dtype == torch.float32


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_precision_worker_run_with_paged_adamw8bit(tiny_model, subjects_root, tmp_path):
    """On a GPU, `auto` is half precision for the frozen parts and the forward; adapters stay fp32."""
    job = _job(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out", dtype="auto", name="g",
               train={"optimizer": "paged_adamw8bit", "steps": 2})
    gpu = torch.device("cuda", torch.cuda.current_device())
    worker = Worker(job, WorkerEnv(), Preemption(), gpu, "me")
    outcomes = worker.run(resolve_subjects(job))
    assert [o.state for o in outcomes] == ["done"] and math.isfinite(outcomes[0].final_loss), outcomes
    assert worker.c.vae.dtype in (torch.bfloat16, torch.float16)
    assert all(p.dtype == torch.float32 for p in adapters.adapter_parameters(worker.c.denoiser))
    assert _file_dtypes(tmp_path / "out" / "g" / "subjects" / "s0" / "s0.safetensors") == {"F32"}
