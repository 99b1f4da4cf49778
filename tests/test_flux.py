"""Flux.1 through the family layer, on the tiny Flux model: detection and refusals; the packing,
position ids and flow-matching objective checked against diffusers' own code; every adapter kind
(and a CLIP adapter) through the real worker, with priors and samples from the Flux pipeline;
loaders no one here wrote (PEFT's, and FluxPipeline.load_lora_weights) reading what the worker
published and reproducing our model's output; a pack of two equal to two single runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import family_runs
from conftest import captioned_subjects, job_dict, preempt_at_step, run_cli, run_worker, subject_entry, write_job

pytestmark = pytest.mark.slow

ATOL = 1e-4
ADAPTERS = {
    "lora": {"type": "lora", "rank": 4, "targets": "comprehensive"},
    "loha": {"type": "loha", "rank": 4, "targets": "comprehensive"},
    "lokr": {"type": "lokr", "rank": 4, "targets": "comprehensive"},
}


def _job(tmp: Path, model: Path, subjects_root: Path, name: str, n: int = 1, **sections) -> Path:
    subjects = [subject_entry(subjects_root, i) for i in range(n)]
    return write_job(tmp / f"{name}.yaml", job_dict(model, subjects, tmp / "out", name=name, **sections))


def _with_model(job: Path, **settings) -> Path:
    """The job file with these model.* settings added."""
    data = yaml.safe_load(job.read_text())
    data["model"].update(settings)
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    return job


def _subject(out: Path, name: str, sid: str = "s0") -> Path:
    return out / name / "subjects" / sid


def _adapter(out: Path, name: str, sid: str = "s0", part: str = "transformer") -> dict[str, torch.Tensor]:
    from training.export import read_peft_weights

    return read_peft_weights(_subject(out, name, sid) / "adapter" / part / "adapter_model.safetensors")


# ------------------------------------------------------------------ detection, refusals, objective


def test_flux_is_detected_from_its_files(tiny_flux, tmp_path):
    from launcher.validate import model_family

    assert model_family(str(tiny_flux)) == ("flux", [])
    # no model_index.json: the transformer's class tells
    copy = tmp_path / "no-index"
    shutil.copytree(tiny_flux, copy)
    (copy / "model_index.json").unlink()
    assert model_family(str(copy)) == ("flux", [])
    shutil.rmtree(copy / "text_encoder_2")
    family, problems = model_family(str(copy))
    assert family == "flux" and "lacks the component subfolder(s) text_encoder_2" in problems[0]


def _validate(tmp_path, model, subjects_root, **sections):
    job = write_job(tmp_path / "job.yaml", job_dict(model, [subject_entry(subjects_root, 0)], tmp_path / "out",
                                                    **sections))
    return run_cli("validate", str(job))


def test_flux_refuses_a_t5_adapter_and_what_its_kohya_file_cannot_hold(tiny_flux, tmp_path, subjects_root):
    proc = _validate(tmp_path, tiny_flux, subjects_root,
                     adapter={"type": "lora", "text_encoder_2": {"rank": 4}, "targets": ["to_q", "attn.norm_q"]},
                     output={"formats": ["peft", "kohya"]})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "adapter.text_encoder_2: Flux's T5 encoder stays frozen" in proc.stderr
    assert "output.formats: adapter.targets attn.norm_q have no place in Flux's kohya/ComfyUI file" in proc.stderr
    loha = _validate(tmp_path, tiny_flux, subjects_root, adapter={"type": "loha"}, output={"formats": ["kohya"]})
    assert loha.returncode == 2 and "Flux's kohya/ComfyUI file holds LoRA only (adapter.type is loha" in loha.stderr
    ok = _validate(tmp_path, tiny_flux, subjects_root, adapter={"type": "lora", "text_encoder": {"rank": 4}},
                   output={"formats": ["kohya"]})
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_packing_and_ids_are_the_flux_pipelines():
    from diffusers import FluxPipeline

    from training.families import flux

    x = torch.randn(2, 16, 6, 8)
    tokens = flux.pack(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(flux.unpack(tokens, 6, 8), x)
    assert torch.equal(flux.image_ids(6, 8, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("dynamic", [False, True])
def test_training_times_come_from_the_schedulers_table(dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from launcher.config import TrainConfig
    from training.families import flux

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    table = flux.training_sigmas(scheduler.config)
    torch.testing.assert_close(table, scheduler.sigmas.float())  # the fresh scheduler's own table
    torch.testing.assert_close(table * 1000, scheduler.timesteps.float())
    uniform = flux.FAMILY.configure(TrainConfig())
    t = uniform.draw_timesteps(scheduler, 4096, torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and torch.isin(t, table * 1000).all()
    logit = flux.FAMILY.configure(TrainConfig(weighting_scheme="logit_normal", logit_std=0.5))
    s = logit.draw_timesteps(scheduler, 4096, torch.Generator().manual_seed(0)) / 1000
    # logit-normal with a small std concentrates around the middle of the (shifted) table
    middle = table[len(table) // 2].item()
    assert ((s - middle).abs() < 0.25).float().mean() > ((t / 1000 - middle).abs() < 0.25).float().mean()
    latents, noise = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    times = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    noisy, target = uniform.noisy_and_target(scheduler, latents, noise, times)
    torch.testing.assert_close(noisy[2], 0.5 * latents[2] + 0.5 * noise[2])
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(target, noise - latents)


def test_flux_presets_adapt_the_transformers_modules(tiny_flux):
    from diffusers import FluxTransformer2DModel

    from training.families import flux

    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    names = [n for n, _ in model.named_modules()]
    for preset, targets in flux.TRANSFORMER_TARGETS.items():
        for target in targets:
            assert any(n == target or n.endswith("." + target) for n in names), f"{preset}: {target}"
    singles = [n for n in names if n.startswith("single_transformer_blocks.0.")]
    assert "single_transformer_blocks.0.proj_mlp" in singles and "single_transformer_blocks.0.attn.to_q" in singles


def test_latents_are_shifted_then_scaled():
    from training.data import LatentCache

    mean, std = torch.randn(2, 16, 4, 4), torch.zeros(2, 16, 4, 4)
    crops = torch.zeros(2, 6)
    index = torch.tensor([0, 1])
    flux_cache = LatentCache(mean, std, 0.3611, crops, 0.1159)
    torch.testing.assert_close(flux_cache.sample(index, torch.Generator()), (mean - 0.1159) * 0.3611)
    sd_cache = LatentCache(mean, std, 0.18215, crops)
    assert torch.equal(sd_cache.sample(index, torch.Generator()), mean * 0.18215)


# ------------------------------------------------------------------ through the real worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_flux, subjects_root):
    """One subject per adapter kind on the transformer, and LoRA with a CLIP adapter (with prior
    preservation and samples from the Flux pipeline), through the real worker."""
    tmp = tmp_path_factory.mktemp("flux")
    done = {}
    plan = {**ADAPTERS, "lora-te": {**ADAPTERS["lora"], "text_encoder": {"type": "lora", "rank": 2}}}
    for name, adapter in plan.items():
        extra = {}
        if name == "lora-te":
            extra = {"prior": {"enabled": True, "num_class_images": 2, "sample_steps": 2},
                     "train": {"samples": {"enabled": True, "prompts": ["{instance}"], "num_inference_steps": 2},
                               "weighting_scheme": "logit_normal"}}
        proc = run_worker(_job(tmp, tiny_flux, subjects_root, name, adapter=adapter, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        done[name] = (_subject(tmp / "out", name), proc.stderr)
    return done


@pytest.mark.parametrize("name", ["lora", "loha", "lokr", "lora-te"])
def test_each_adapter_trains_flux_and_writes_the_contract(runs, name):
    folder, stderr = runs[name]
    assert "loaded a flux model" in stderr
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 4
    parts = {p.name for p in (folder / "adapter").iterdir()}
    assert parts == ({"transformer", "text_encoder"} if name == "lora-te" else {"transformer"})
    assert (folder / "pytorch_lora_weights.safetensors").exists() == name.startswith("lora")
    # the kohya/ComfyUI file in BFL's naming is LoRA only; the default formats skip it for LoHa/LoKr
    assert (folder / "s0.safetensors").exists() == name.startswith("lora")
    if not name.startswith("lora"):
        assert "no kohya/ComfyUI file for this flux adapter" in stderr and "holds LoRA only" in stderr
    from training.export import read_peft_weights

    trained = read_peft_weights(folder / "adapter" / "transformer" / "adapter_model.safetensors")
    moved = [v for k, v in trained.items() if any(m in k for m in ("lora_B", "hada_w2_a", "lokr_w2"))]
    assert moved and all(torch.isfinite(v).all() for v in moved) and any(v.abs().max() > 0 for v in moved)
    # the single blocks' MLP and the text stream's attention were adapted
    assert any("single_transformer_blocks.0.proj_mlp" in k for k in trained)
    assert any("attn.add_q_proj" in k for k in trained)


def test_flux_priors_and_samples_come_from_the_flux_pipeline(runs):
    from PIL import Image

    folder, stderr = runs["lora-te"]
    assert "generating 2 class images" in stderr
    samples = sorted((folder / "samples").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (32, 32)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 64, generator=gen), "timestep": torch.tensor([0.6]),
            "guidance": torch.tensor([3.5]), "pooled_projections": torch.randn(1, 32, generator=gen),
            "encoder_hidden_states": torch.randn(1, 32, 32, generator=gen), "txt_ids": torch.zeros(32, 3),
            "img_ids": torch.rand(16, 3, generator=gen) * 4}


@torch.no_grad()
def _outputs(transformer, text_encoder) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 200, (1, 77), generator=torch.Generator().manual_seed(1))
    return {"transformer": transformer(**_inputs(), return_dict=False)[0],
            "text_encoder": text_encoder(ids).pooler_output}


@torch.no_grad()
@pytest.mark.parametrize("name", ["lora-te", "loha"])
def test_peft_and_diffusers_loaders_reproduce_our_flux_adapter(runs, tiny_flux, name):
    """PeftModel.from_pretrained on our folders equals our own adapted parts; for LoRA,
    FluxPipeline.load_lora_weights on our diffusers file equals both."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    from launcher.config import load_job
    from training import adapters, families

    folder, _ = runs[name]
    job = load_job(folder.parent.parent / "job.yaml")
    family = families.get("flux")
    ours = {"transformer": FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"),
            "text_encoder": CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder")}
    for part, spec in adapters.specs(job.adapter, family).items():
        adapters.attach(ours[part], spec, family.targets(part), part)
        adapters.load_adapter_state_dict(ours[part], _adapter(folder.parent.parent.parent, job.name, part=part))
    expected = _outputs(ours["transformer"].eval(), ours["text_encoder"].eval())

    peft = {part: PeftModel.from_pretrained(model, str(folder / "adapter" / part)).eval() if (
        folder / "adapter" / part).is_dir() else model for part, model in (
        ("transformer", FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")),
        ("text_encoder", CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder")))}
    got = _outputs(peft["transformer"], peft["text_encoder"])
    for part in expected:
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=f"peft: {part}")
    if not name.startswith("lora"):
        return
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    base = _outputs(pipe.transformer, pipe.text_encoder)
    pipe.load_lora_weights(str(folder / "pytorch_lora_weights.safetensors"))
    loaded = _outputs(pipe.transformer, pipe.text_encoder)
    for part in expected:
        assert not torch.allclose(base[part], expected[part], atol=ATOL), f"{part}: the adapter changes nothing"
        torch.testing.assert_close(loaded[part], expected[part], atol=ATOL, rtol=1e-3, msg=f"diffusers: {part}")


def test_flux_pack_of_two_equals_two_single_runs(tmp_path, tiny_flux, subjects_root):
    lora = {"type": "lora", "rank": 4, "targets": "comprehensive"}
    for name, pack in (("alone", 1), ("packed", 2)):
        job = _job(tmp_path, tiny_flux, subjects_root, name, n=2, adapter=lora, train={"pack": pack, "eps": 1e-3})
        proc = run_worker(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packed slot 1" in proc.stderr
    for sid in ("s0", "s1"):
        a, b = _adapter(tmp_path / "out", "alone", sid), _adapter(tmp_path / "out", "packed", sid)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < ATOL, sid


def test_flux_ddp_with_a_clip_adapter_equals_one_process(tmp_path, tiny_flux, subjects_root):
    spec = {**ADAPTERS["lora"], "text_encoder": {"type": "lora", "rank": 2}}
    family_runs.assert_ddp_equals_one_process(tmp_path, tiny_flux, subjects_root, spec, ("transformer", "text_encoder"))


@pytest.mark.parametrize("stage", [2, 3])
def test_flux_zero_saves_the_full_adapter(tmp_path, tiny_flux, subjects_root, stage):
    spec = {**ADAPTERS["lora"], "text_encoder": {"type": "lora", "rank": 2}}
    family_runs.assert_zero_saves_the_full_adapter(tmp_path, tiny_flux, subjects_root, spec,
                                                   ("transformer", "text_encoder"), stage)


def test_flux_preempted_run_resumes_to_the_straight_result(tmp_path, tiny_flux, subjects_root, monkeypatch):
    """Stopped at step 3 of 6 (a checkpoint, as on SIGUSR1), then resumed by a fresh worker:
    equal to a straight run, for the transformer and the CLIP adapter."""
    from launcher.config import load_job
    from training.env import Preemption, WorkerEnv
    from training.runner import Worker

    adapter = {**ADAPTERS["lora"], "text_encoder": {"type": "lora", "rank": 2}}
    train = {"steps": 6, "lr_scheduler": "cosine", "warmup_steps": 2, "weighting_scheme": "logit_normal"}

    def run(name: str, preemption: Preemption):
        job = load_job(_job(tmp_path, tiny_flux, subjects_root, name, adapter=adapter, train=train))
        return Worker(job, WorkerEnv(), preemption, torch.device("cpu"), "test").run(list(job.subjects))

    assert [o.state for o in run("straight", Preemption())] == ["done"]
    stop = Preemption()
    preempt_at_step(monkeypatch, stop, 3)
    assert [o.state for o in run("resumed", stop)] == ["preempted"]
    monkeypatch.undo()
    assert [o.state for o in run("resumed", Preemption())] == ["done"]
    for part in ("transformer", "text_encoder"):
        a, b = _adapter(tmp_path / "out", "straight", part=part), _adapter(tmp_path / "out", "resumed", part=part)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, part


@torch.no_grad()
def test_the_jobs_guidance_reaches_a_guidance_distilled_transformer(tiny_flux):
    from diffusers import FluxTransformer2DModel

    from launcher.config import ModelConfig, TrainConfig
    from training import families

    family = families.for_model(ModelConfig(source=str(tiny_flux)), tiny_flux, TrainConfig(guidance=1.0))
    assert family.name == "flux" and family.guidance == 1.0
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").eval()
    gen = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([600.0])
    cond = {"encoder_hidden_states": torch.randn(1, 32, 32, generator=gen),
            "pooled_projections": torch.randn(1, 32, generator=gen)}
    low = family.predict(model, noisy, t, cond)
    high = family.configure(TrainConfig(guidance=5.0)).predict(model, noisy, t, cond)
    assert low.shape == noisy.shape and not torch.allclose(low, high)
    # what the pipeline computes for the same packed input (timestep / 1000, guidance, ids)
    from training.families.flux import image_ids, pack, unpack

    direct = model(hidden_states=pack(noisy), timestep=t / 1000, guidance=torch.tensor([1.0]),
                   txt_ids=torch.zeros(32, 3), img_ids=image_ids(8, 8, "cpu", torch.float32), return_dict=False,
                   **cond)[0]
    torch.testing.assert_close(unpack(direct, 8, 8), low)


# ------------------------------------------------------------------ memory: a quantized transformer (QLoRA)


def test_a_quantized_flux_transformer_trains_a_lora_on_top(tmp_path, tiny_flux, subjects_root):
    """bitsandbytes 0.50 runs its 8-bit and NF4 layers on the CPU: the blocks' linear layers are
    held quantized (a fraction of the bytes), the LoRA trains in fp32 on top and is exported."""
    from launcher.config import ModelConfig
    from training import components, quantize

    proc = run_worker(_with_model(_job(tmp_path, tiny_flux, subjects_root, "int8", adapter=ADAPTERS["lora"]),
                                  quantize="int8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "linear layers of transformer_blocks, single_transformer_blocks in int8" in proc.stderr
    trained = _adapter(tmp_path / "out", "int8")
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    full = components.load_components(ModelConfig(source=str(tiny_flux)), torch.device("cpu"))
    for mode, kind in (("int8", torch.int8), ("nf4", torch.uint8)):
        held = components.load_components(ModelConfig(source=str(tiny_flux), quantize=mode), torch.device("cpu"))
        blocks = [held.denoiser.transformer_blocks[0].attn.to_q, held.denoiser.single_transformer_blocks[0].proj_mlp]
        assert all(b.weight.dtype == kind for b in blocks), mode
        assert held.denoiser.x_embedder.weight.dtype == torch.float32  # outside the blocks: not quantized
        assert quantize.weight_bytes(held.denoiser) < 0.7 * quantize.weight_bytes(full.denoiser), mode


def test_nf4_qlora_under_ddp_equals_one_process(tmp_path, tiny_flux, subjects_root):
    log = family_runs.assert_ddp_equals_one_process(tmp_path, tiny_flux, subjects_root, ADAPTERS["lora"],
                                                    ("transformer",), model_settings={"quantize": "nf4"})
    assert "in nf4 (bitsandbytes)" in log


def test_quantize_is_refused_where_it_cannot_run(tmp_path, tiny_flux, tiny_model, subjects_root):
    job = _job(tmp_path, tiny_flux, subjects_root, "q", adapter={"type": "loha"}, train={"pack": 2},
               distributed={"strategy": "deepspeed", "nproc_per_node": 2})
    proc = run_cli("validate", str(_with_model(job, quantize="nf4")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for problem in ("adapter.type: model.quantize=nf4 trains LoRA", "train.pack: model.quantize=nf4",
                    "distributed.strategy: model.quantize=nf4 cannot run under DeepSpeed"):
        assert problem in proc.stderr, proc.stderr
    sd = run_cli("validate", str(_with_model(_job(tmp_path, tiny_model, subjects_root, "sd"), quantize="int8")))
    assert sd.returncode == 2 and "model.quantize=int8: quantizing the frozen denoiser is offered for Flux's" in sd.stderr


def test_t5_is_freed_once_every_prompt_is_cached(tmp_path, tiny_flux, subjects_root, monkeypatch, caplog):
    """A subject with prior preservation, frozen encoders and no samples: its instance and class
    prompts are encoded first, then T5 is dropped (no reference left) and both subjects train from the
    cache, to the same adapters as a run that keeps T5 (a CLIP adapter keeps it: it encodes each step)."""
    import gc
    import logging
    import weakref

    from launcher.config import load_job
    from training import runner
    from training.env import Preemption, WorkerEnv

    t5s = []
    real_load = runner.load_components

    def load(*args, **kwargs):
        c = real_load(*args, **kwargs)
        t5s.append(weakref.ref(c.text_encoders["text_encoder_2"]))
        return c

    monkeypatch.setattr(runner, "load_components", load)
    prior = {"enabled": True, "num_class_images": 2, "sample_steps": 1}

    def run(name, **sections):
        job = load_job(_job(tmp_path, tiny_flux, subjects_root, name, prior=prior, **sections))
        worker = runner.Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "test")
        return worker, [o.state for o in worker.run(list(job.subjects))]

    with caplog.at_level(logging.INFO, logger="training.components"):
        freed, states = run("freed")
    assert states == ["done"]
    assert "text_encoder_2" not in freed.c.text_encoders and len(freed.c.prompts) == 2  # instance and class prompt
    assert "freed text_encoder_2 after caching 2 prompt(s)" in caplog.text
    gc.collect()
    assert t5s[0]() is None, "the T5 encoder is still referenced"
    kept, states = run("kept", train={"samples": {"enabled": True, "prompts": ["{instance}"], "num_inference_steps": 1}})
    assert states == ["done"] and "text_encoder_2" in kept.c.text_encoders and not kept.c.prompts
    a, b = _adapter(tmp_path / "out", "freed"), _adapter(tmp_path / "out", "kept")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_t5_is_freed_after_every_captioned_prompt_is_cached(tmp_path, tiny_flux, caplog):
    """With captions and caption dropout, every image's prompt and the empty one are encoded before
    T5 goes; a subject whose captions cannot be read fails by name and the other trains."""
    import logging

    from launcher.config import load_job
    from training import runner
    from training.env import Preemption, WorkerEnv

    subjects = captioned_subjects(tmp_path, size=48)
    job = load_job(write_job(tmp_path / "job.yaml", job_dict(
        tiny_flux, subjects, tmp_path / "out", name="captions",
        train={"prompt_template": "{instance}, {caption}", "caption_dropout": 0.5})))
    worker = runner.Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "test")
    with caplog.at_level(logging.INFO, logger="training.components"):
        states = {o.subject: o.state for o in worker.run(list(job.subjects))}
    assert states == {"good": "done", "bad": "failed"}
    assert "text_encoder_2" not in worker.c.text_encoders
    assert set(worker.c.prompts) == {"sks good, on a sofa", "sks good, in the snow", ""}
    assert "freed text_encoder_2 after caching 3 prompt(s)" in caplog.text
    status = json.loads((_subject(tmp_path / "out", "captions", "bad") / "status.json").read_text())
    assert "is not UTF-8 text" in status["error"]


# ------------------------------------------------------------------ the kohya/ComfyUI file, convert, merge

# every module kind the BFL naming has a place for: the comprehensive preset, modulations, embedders
EVERY_MAPPED = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
                "context_embedder", "linear_1", "linear_2"]
# diffusers' converter splits a single block's linear1 at FLUX.1's widths (3072 x 3, 12288), so the
# single blocks are read at that width (one block, no double block); the double blocks at the tiny one
CONVERTER_SHAPES = {
    "double-blocks": dict(num_layers=2, num_single_layers=0),
    "single-block-at-flux1-width": dict(num_layers=0, num_single_layers=1, attention_head_dim=128,
                                        num_attention_heads=24, axes_dims_rope=(16, 56, 56)),
}


def _lora_part(model, spec, presets, part):
    """Attach a LoRA with random non-zero up matrices (as after training); the export Part of it."""
    from training import adapters, export

    adapters.attach(model, spec, presets, part)
    gen = torch.Generator().manual_seed(len(part))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return export.Part(adapters.adapter_state_dict(model), adapters.peft_config(spec, presets), spec)


@torch.no_grad()
@pytest.mark.parametrize("shape", CONVERTER_SHAPES)
def test_diffusers_flux_converter_reads_our_kohya_file(tiny_flux, tmp_path, shape):
    """diffusers' kohya Flux converter (what FluxPipeline.load_lora_weights runs on such a file)
    reads our single file (BFL's naming, fused q/k/v and linear1, the final layer's swapped
    modulation) into adapters that reproduce our transformer and CLIP encoder."""
    import copy

    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors import safe_open

    from launcher.config import LoraSpec
    from training import export, families
    from training.kohya import write_kohya
    from training.tiny import FLUX_TINY

    family = families.get("flux")
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**{**FLUX_TINY["transformer"], **CONVERTER_SHAPES[shape]}).eval()
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=copy.deepcopy(base))
    ours = {"transformer": base, "text_encoder": copy.deepcopy(pipe.text_encoder)}
    parts = {"transformer": _lora_part(ours["transformer"], LoraSpec(rank=4, alpha=8, targets=EVERY_MAPPED),
                                       family.targets("transformer"), "transformer"),
             "text_encoder": _lora_part(ours["text_encoder"], LoraSpec(rank=2), family.targets("text_encoder"),
                                        "text_encoder")}
    path = write_kohya(export.TrainedAdapter(parts, "flux"), tmp_path / "s0.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = {k.partition(".")[0] for k in f.keys()}
    fused = "lora_unet_double_blocks_1_img_attn_qkv" if shape == "double-blocks" else "lora_unet_single_blocks_0_linear1"
    assert fused in keys and "lora_unet_final_layer_adaLN_modulation_1" in keys and "lora_unet_guidance_in_in_layer" in keys
    assert not any("transformer_blocks" in k for k in keys) and any(k.startswith("lora_te1_text_model_") for k in keys)

    expected = _outputs(ours["transformer"], ours["text_encoder"].eval())
    before = _outputs(pipe.transformer, pipe.text_encoder)
    converted = FluxPipeline.lora_state_dict(str(path))  # diffusers' kohya Flux converter
    # diffusers 0.42's converter names the final layer and the embedders without the "transformer."
    # prefix that load_lora_weights routes by (it would drop them): they are put under it here, and
    # nothing else may lack it
    bare = {k for k in converted if not k.startswith(("transformer.", "text_encoder."))}
    assert {k.split(".")[0] for k in bare} <= {"proj_out", "norm_out", "x_embedder", "context_embedder",
                                               "time_text_embed"}, sorted(bare)[:4]
    pipe.load_lora_weights({(f"transformer.{k}" if k in bare else k): v for k, v in converted.items()})
    got = _outputs(pipe.transformer, pipe.text_encoder)
    for part in expected:
        assert not torch.allclose(before[part], expected[part], atol=ATOL), f"{part}: the adapter changes nothing"
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=part)


def test_convert_reads_the_flux_kohya_file_back_to_our_peft_adapter(runs, tiny_flux, tiny_model, tmp_path):
    """`launcher convert` of the worker's kohya file (BFL's naming) back to PEFT, and to diffusers' file."""
    from training.convert import read

    folder, _ = runs["lora-te"]
    proc = run_cli("convert", str(folder / "s0.safetensors"), str(tmp_path / "peft"), "--to", "peft",
                   "--model", str(tiny_flux))
    assert proc.returncode == 0, proc.stderr
    back, ours = read(tmp_path / "peft"), read(folder / "adapter")
    assert back.family == ours.family == "flux" and list(back.parts) == ["transformer", "text_encoder"]
    for part in ours.parts:
        assert back.parts[part].state.keys() == ours.parts[part].state.keys(), part
        for key, value in ours.parts[part].state.items():
            torch.testing.assert_close(back.parts[part].state[key], value, atol=1e-6, rtol=1e-5)
    again = run_cli("convert", str(tmp_path / "peft"), str(tmp_path / "diffusers"), "--to", "diffusers")
    assert again.returncode == 0, again.stderr
    assert read(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").family == "flux"
    wrong = run_cli("convert", str(folder / "s0.safetensors"), str(tmp_path / "x"), "--to", "peft",
                    "--model", str(tiny_model))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "parts a sd model lacks (lora_te1_*)" in wrong.stderr or "no module of the model part" in wrong.stderr


@torch.no_grad()
def test_merge_bakes_the_flux_transformer_and_clip(runs, tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    folder, _ = runs["lora-te"]
    proc = run_cli("merge", str(tiny_flux), str(folder / "adapter"), str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert "merged transformer, text_encoder" in proc.stdout
    merged = tmp_path / "merged"
    assert (merged / "text_encoder_2" / "config.json").exists() and (merged / "model_index.json").exists()
    got = _outputs(FluxTransformer2DModel.from_pretrained(merged, subfolder="transformer").eval(),
                   CLIPTextModel.from_pretrained(merged, subfolder="text_encoder").eval())
    expected = _outputs(
        PeftModel.from_pretrained(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"),
                                  str(folder / "adapter" / "transformer")).eval(),
        PeftModel.from_pretrained(CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder"),
                                  str(folder / "adapter" / "text_encoder")).eval())
    for part in expected:
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=part)


def test_the_flux_shaped_benchmark_model_has_flux1_dev_sizes():
    """`python -m training.tiny flux DIR` (GPU measurements): built here on the meta device only."""
    from diffusers import FluxTransformer2DModel

    from training.tiny import FLUX_REAL

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_REAL["transformer"])
    params = sum(p.numel() for p in model.parameters())
    assert 11.8e9 < params < 12.0e9, params  # FLUX.1-dev's transformer: 11.9B
    assert model.single_transformer_blocks[0].proj_mlp.out_features == 12288 and len(model.transformer_blocks) == 19
    assert FLUX_REAL["t5"]["d_model"] == FLUX_REAL["transformer"]["joint_attention_dim"] == 4096
