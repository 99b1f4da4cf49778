"""SDXL through the family layer, on the tiny SDXL model: every adapter kind with and without
adapters on both text encoders through the real worker; packed, DDP and ZeRO-2 runs equal to
their single-process twins; preemption and resume; and loaders no one here wrote (diffusers'
load_lora_weights on the diffusers and kohya files, PEFT's own loader, LyCORIS) reading what
the worker published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import family_runs
from conftest import job_dict, preempt_at_step, run_worker, subject_entry, write_job

pytestmark = pytest.mark.slow

ATOL = 1e-4  # as tests/test_formats.py: fp32 reordering between loaders
TE_PARTS = ("text_encoder", "text_encoder_2")
ADAPTERS = {
    "lora": {"type": "lora", "rank": 4, "targets": "comprehensive"},
    "loha": {"type": "loha", "rank": 4},
    "lokr": {"type": "lokr", "rank": 4},
}


def _with_te(adapter: dict) -> dict:
    return {**adapter, "text_encoder": {"type": adapter["type"], "rank": 2},
            "text_encoder_2": {"type": adapter["type"], "rank": 2}}


def _subject(out: Path, name: str, sid: str = "s0") -> Path:
    return out / name / "subjects" / sid


def _adapter(out: Path, name: str, sid: str = "s0", part: str = "unet") -> dict[str, torch.Tensor]:
    from training.export import read_peft_weights

    return read_peft_weights(_subject(out, name, sid) / "adapter" / part / "adapter_model.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _job(tmp: Path, model: Path, subjects_root: Path, name: str, n: int = 1, **sections) -> Path:
    subjects = [subject_entry(subjects_root, i) for i in range(n)]
    return write_job(tmp / f"{name}.yaml", job_dict(model, subjects, tmp / "out", name=name, **sections))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sdxl, subjects_root):
    """One subject per adapter kind, UNet alone and with adapters on both text encoders, through
    the real worker; the LoRA runs with prior preservation and samples (SDXL pipeline)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    done = {}
    for kind, adapter in ADAPTERS.items():
        for with_te in (False, True):
            name = f"{kind}-te" if with_te else kind
            extra = {}
            if kind == "lora":
                extra = {"prior": {"enabled": True, "num_class_images": 2, "sample_steps": 2},
                         "train": {"samples": {"enabled": True, "prompts": ["{instance}"], "num_inference_steps": 2}}}
            job = _job(tmp, tiny_sdxl, subjects_root, name, adapter=_with_te(adapter) if with_te else adapter, **extra)
            proc = run_worker(job)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[name] = (_subject(tmp / "out", name), proc.stderr)
    return done


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
@pytest.mark.parametrize("with_te", [False, True], ids=["unet", "unet+te1+te2"])
def test_each_adapter_trains_sdxl_and_writes_the_contract(runs, kind, with_te):
    folder, stderr = runs[f"{kind}-te" if with_te else kind]
    assert "loaded a sdxl model" in stderr
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 4
    parts = {p.name for p in (folder / "adapter").iterdir()}
    assert parts == ({"unet", *TE_PARTS} if with_te else {"unet"})
    with safe_open(str(folder / "s0.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["dreamfleet_family"] == "sdxl"
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == ({"lora_unet", "lora_te1", "lora_te2"} if with_te else {"lora_unet"})
    assert (folder / "pytorch_lora_weights.safetensors").exists() == (kind == "lora")
    lora_b = [v for k, v in _adapter(folder.parent.parent.parent, folder.parent.parent.name).items()
              if any(m in k for m in ("lora_B", "hada_w2_a", "lokr_w2"))]
    assert lora_b and all(torch.isfinite(v).all() for v in lora_b)


def test_sdxl_priors_and_samples_come_from_the_sdxl_pipeline(runs):
    folder, stderr = runs["lora"]
    assert "generating 2 class images" in stderr
    samples = sorted((folder / "samples").glob("*.png"))
    from PIL import Image

    assert len(samples) == 1 and Image.open(samples[0]).size == (32, 32)


def _peft_models(tiny_sdxl: Path, adapter_dir: Path):
    """The base parts with our PEFT folders loaded by PEFT's own loader."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    bases = {"unet": UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
             "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
             "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")}
    return {part: PeftModel.from_pretrained(model, str(adapter_dir / part)).eval() for part, model in bases.items()
            if (adapter_dir / part).is_dir()}


def _outputs(models: dict) -> dict[str, torch.Tensor]:
    """Each part's output on fixed inputs (SDXL UNet conditioning included)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (1, 77), generator=gen)
    unet = models["unet"]
    out = {"unet": unet(torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]),
                        encoder_hidden_states=torch.randn(1, 77, 64, generator=gen),
                        added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=gen),
                                           "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}).sample}
    for part in TE_PARTS:
        if part in models:
            out[part] = models[part](ids, output_hidden_states=True).hidden_states[-2]
    return out


@torch.no_grad()
@pytest.mark.parametrize("source", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_reads_our_sdxl_files(runs, tiny_sdxl, source):
    from diffusers import StableDiffusionXLPipeline

    folder, _ = runs["lora-te"]
    expected = _outputs(_peft_models(tiny_sdxl, folder / "adapter"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    base = _outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    path = folder / ("pytorch_lora_weights.safetensors" if source == "diffusers" else "s0.safetensors")
    pipe.load_lora_weights(str(path))
    got = _outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    for part in ("unet", *TE_PARTS):
        assert not torch.allclose(base[part], expected[part], atol=ATOL), f"{part}: the adapter changes nothing"
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=f"{source}: {part}")


@torch.no_grad()
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_reads_our_sdxl_loha_and_lokr_files(runs, tiny_sdxl, kind):
    from diffusers import UNet2DConditionModel
    from lycoris.modules import get_module, make_module
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder, _ = runs[f"{kind}-te"]
    expected = _outputs(_peft_models(tiny_sdxl, folder / "adapter"))
    weights = load_file(str(folder / "s0.safetensors"))
    models = {"unet": UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
              "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")}
    loaded = 0
    for part, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        model = models[part]
        # kohya keys name text-encoder modules under "text_model." (transformers 4 naming)
        if part != "unet" and not any(n.startswith("text_model") for n, _ in model.named_modules()):
            model = torch.nn.ModuleDict({"text_model": model})
        names = {k.split(".")[0] for k in weights if k.startswith(prefix + "_")}
        for name, module in list(model.named_modules()):
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in names:
                lyco = make_module(*get_module(weights, lora_name), lora_name, module)
                lyco.multiplier = 1.0
                lyco.apply_to()
                loaded += 1
    assert loaded == sum(1 for k in weights if k.endswith(".alpha"))
    got = _outputs(models)
    for part in ("unet", *TE_PARTS):
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=part)


def test_sdxl_pack_of_two_equals_two_single_runs(tmp_path, tiny_sdxl, subjects_root):
    lora = {"type": "lora", "rank": 4, "targets": "comprehensive"}
    for name, pack in (("alone", 1), ("packed", 2)):
        job = _job(tmp_path, tiny_sdxl, subjects_root, name, n=2, adapter=lora, train={"pack": pack, "eps": 1e-3})
        proc = run_worker(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packed slot 1" in proc.stderr
    for sid in ("s0", "s1"):
        assert _max_diff(_adapter(tmp_path / "out", "alone", sid), _adapter(tmp_path / "out", "packed", sid)) < ATOL, sid


def test_sdxl_ddp_with_both_text_encoders_equals_one_process(tmp_path, tiny_sdxl, subjects_root):
    family_runs.assert_ddp_equals_one_process(tmp_path, tiny_sdxl, subjects_root, _with_te({"type": "lora", "rank": 4}),
                                              ("unet", *TE_PARTS))


def test_sdxl_zero2_saves_the_full_adapter(tmp_path, tiny_sdxl, subjects_root):
    family_runs.assert_zero_saves_the_full_adapter(tmp_path, tiny_sdxl, subjects_root,
                                                    _with_te({"type": "lora", "rank": 4}), ("unet", *TE_PARTS))


def test_sdxl_preempted_run_resumes_to_the_straight_result(tmp_path, tiny_sdxl, subjects_root, monkeypatch):
    """Stopped at step 3 of 8 (checkpoint, as on SIGUSR1), then resumed by a fresh worker: equal
    to a straight run, for the UNet and both text encoders."""
    from launcher.config import load_job
    from training.env import Preemption, WorkerEnv
    from training.runner import Worker

    adapter = _with_te({"type": "lora", "rank": 4})
    train = {"steps": 8, "lr_scheduler": "cosine", "warmup_steps": 2}

    def run(name: str, preemption: Preemption):
        job = load_job(_job(tmp_path, tiny_sdxl, subjects_root, name, adapter=adapter, train=train))
        return Worker(job, WorkerEnv(), preemption, torch.device("cpu"), "test").run(list(job.subjects))

    assert [o.state for o in run("straight", Preemption())] == ["done"]
    stop = Preemption()
    preempt_at_step(monkeypatch, stop, 3)
    assert [o.state for o in run("resumed", stop)] == ["preempted"]
    monkeypatch.undo()
    assert not (_subject(tmp_path / "out", "resumed") / "MANIFEST.json").exists()
    assert [o.state for o in run("resumed", Preemption())] == ["done"]
    for part in ("unet", *TE_PARTS):
        a, b = _adapter(tmp_path / "out", "straight", part=part), _adapter(tmp_path / "out", "resumed", part=part)
        assert _max_diff(a, b) < 1e-5, part


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_convert_reads_the_sdxl_kohya_file_back_to_our_peft_adapter(runs, tiny_sdxl, tiny_model, tmp_path, kind):
    from training.convert import convert, read

    folder, _ = runs[f"{kind}-te"]
    back = read(convert(folder / "s0.safetensors", tmp_path / "peft", "peft", tiny_sdxl))
    ours = read(folder / "adapter")
    assert back.family == ours.family == "sdxl" and list(back.parts) == ["unet", *TE_PARTS]
    for part in ours.parts:
        # the kohya reader targets exact module paths; the weights are the same
        assert back.parts[part].state.keys() == ours.parts[part].state.keys(), part
        for key, value in ours.parts[part].state.items():
            torch.testing.assert_close(back.parts[part].state[key], value, atol=1e-6, rtol=1e-5)
    # SD's model cannot take an SDXL file: the message says what does not fit
    from launcher.errors import InputError

    with pytest.raises(InputError, match=r"parts a sd model lacks \(lora_te1_\*, lora_te2_\*\)"):
        read(folder / "s0.safetensors", tiny_model)


@torch.no_grad()
def test_merge_bakes_all_three_sdxl_parts(runs, tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from training.merge import merge

    folder, _ = runs["lora-te"]
    assert merge(tiny_sdxl, folder / "adapter", tmp_path / "merged") == ["unet", *TE_PARTS]
    merged = {"unet": UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(tmp_path / "merged", subfolder="text_encoder"),
              "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tmp_path / "merged", subfolder="text_encoder_2")}
    expected = _outputs(_peft_models(tiny_sdxl, folder / "adapter"))
    got = _outputs({k: m.eval() for k, m in merged.items()})
    for part in expected:
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=1e-3, msg=part)
