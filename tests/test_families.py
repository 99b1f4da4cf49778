"""The family layer: detection from the model's own files, refusals at validate, adapter presets
that fit each family's module names, SDXL's size conditioning from the real crop, its VAE's
dtype rule and a separate VAE source, and the SD 2.x-shaped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import job_dict, run_cli, subject_entry, write_job


def _validate(tmp_path, model: Path, subjects_root: Path, *overrides: str, **sections):
    job = write_job(tmp_path / "job.yaml", job_dict(model, [subject_entry(subjects_root, 0)], tmp_path / "out",
                                                    **sections))
    return run_cli("validate", str(job), *overrides)


def _user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_the_family_is_read_from_the_model_files(tiny_model, tiny_sdxl, tmp_path):
    from launcher.validate import model_family

    assert model_family(str(tiny_model)) == ("sd", [])
    assert model_family(str(tiny_sdxl)) == ("sdxl", [])
    # no model_index.json (a hand-assembled folder): the UNet's text_time conditioning tells SDXL
    copy = tmp_path / "no-index"
    shutil.copytree(tiny_sdxl, copy)
    (copy / "model_index.json").unlink()
    assert model_family(str(copy)) == ("sdxl", [])


def test_a_model_of_no_supported_family_is_refused_at_validate(tmp_path, tiny_sdxl, subjects_root):
    sd3 = tmp_path / "sd3"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "scheduler"):
        (sd3 / part).mkdir(parents=True)
        (sd3 / part / "config.json").write_text("{}")
    (sd3 / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    _user_error(_validate(tmp_path, sd3, subjects_root),
                "a StableDiffusion3Pipeline with a SD3Transformer2DModel in transformer/",
                "supported: sd (Stable Diffusion 1.x/2.x), sdxl (Stable Diffusion XL), flux (Flux.1)")


def test_family_mismatches_are_refused_at_validate(tmp_path, tiny_model, tiny_sdxl, subjects_root):
    _user_error(_validate(tmp_path, tiny_sdxl, subjects_root, "model.family=sd"),
                "is named model.family sd but its UNet has SDXL's text_time conditioning")
    _user_error(_validate(tmp_path, tiny_model, subjects_root, "model.family=sdxl"),
                "lacks the component subfolder(s) text_encoder_2, tokenizer_2")
    _user_error(_validate(tmp_path, tiny_model, subjects_root, adapter={"type": "lora", "text_encoder_2": {"rank": 4}}),
                "adapter.text_encoder_2: a Stable Diffusion 1.x/2.x model has one text encoder")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    _user_error(_validate(tmp_path, broken, subjects_root), "lacks the component subfolder(s) tokenizer_2")
    proc = _validate(tmp_path, tiny_sdxl, subjects_root, adapter={"type": "lora", "text_encoder_2": {"rank": 4}})
    assert proc.returncode == 0, proc.stderr


LEGACY = {"query", "value"}  # attention names of old diffusers checkpoints, kept in the SD preset


@pytest.mark.parametrize("preset", ["minimal", "comprehensive"])
def test_every_preset_fits_sdxl_module_names(tiny_sdxl, preset):
    """Each preset attaches to SDXL's UNet and both text encoders, and each of its names (but the
    legacy ones) adapts modules there: a preset that silently matched nothing would train less."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from launcher.config import LoraSpec
    from training import adapters, families

    family = families.get("sdxl")
    models = {"unet": UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
              "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")}
    for part, model in models.items():
        names = family.targets(part)[preset]
        adapters.attach(model, LoraSpec(rank=2, targets=preset), family.targets(part), part)
        adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
        for target in set(names) - LEGACY:
            assert any(n == target or n.endswith("." + target) for n in adapted), (part, target)
    attention = {n for n, _ in models["unet"].named_modules() if n.endswith((".attn1", ".attn2"))}
    assert attention and all(f"{a}.to_q" in {n for n, m in models["unet"].named_modules() if hasattr(m, "lora_A")}
                             for a in attention)


def test_sdxl_size_ids_come_from_the_real_crop():
    from PIL import Image

    from training.data import crop

    img = Image.new("RGB", (96, 48))  # landscape: resized to 64 x 32, cropped at 32 px
    gen = torch.Generator().manual_seed(0)
    tensor, where = crop(img, 32, center_crop=True, generator=gen)
    assert tensor.shape == (3, 32, 32)
    assert where.ids() == [48.0, 96.0, 0.0, 16.0, 32.0, 32.0]  # original h, w; crop top, left; target h, w
    assert where.mirrored().ids() == [48.0, 96.0, 0.0, 64 - 16 - 32, 32.0, 32.0]
    _, random_crop = crop(img, 32, center_crop=False, generator=gen)
    top, left = random_crop.top_left
    assert top == 0 and 0 <= left <= 32


def test_sdxl_vae_stays_fp32_where_the_frozen_parts_are_fp16_unless_a_separate_vae_is_named(tiny_sdxl, tiny_model):
    from launcher.config import ModelConfig
    from training.components import load_components

    c = load_components(ModelConfig(source=str(tiny_sdxl), dtype="fp16"), torch.device("cpu"))
    assert c.family.name == "sdxl" and c.vae.dtype == torch.float32
    assert {m.dtype for m in c.text_encoders.values()} == {torch.float16} and c.denoiser.dtype == torch.float32
    # model.vae: another VAE folder (here the tiny SD model's, same shape), loaded in the frozen dtype
    c = load_components(ModelConfig(source=str(tiny_sdxl), dtype="fp16", vae=str(tiny_model / "vae")),
                        torch.device("cpu"))
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    assert c.vae.dtype == torch.float16
    first = next(iter(theirs.state_dict()))
    torch.testing.assert_close(c.vae.state_dict()[first].float(), theirs.state_dict()[first].half().float())
    assert load_components(ModelConfig(source=str(tiny_sdxl), dtype="bf16"), torch.device("cpu")).vae.dtype == torch.bfloat16


def test_a_hub_model_needs_its_family_named(tmp_path, subjects_root):
    """A Hub repo id's files are read only when a worker downloads it: validate asks for model.family
    instead of letting the worker guess, and a named family passes."""
    hub = Path("some-org/some-model")
    _user_error(_validate(tmp_path, hub, subjects_root), "is a Hub repo id", "name its family with model.family")
    proc = _validate(tmp_path, hub, subjects_root, "model.family=sdxl")
    assert proc.returncode == 0, proc.stderr
    from launcher.config import ModelConfig
    from launcher.errors import InputError
    from training import families

    with pytest.raises(InputError, match="name its family"):
        families.for_model(ModelConfig(source=str(hub)), str(hub))
    assert families.for_model(ModelConfig(source=str(hub), family="sdxl"), str(hub)).name == "sdxl"
