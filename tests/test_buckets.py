"""Aspect-ratio buckets (train.buckets): the bucket of a shape, portrait and landscape images
trained at their bucket's latent shape, SDXL's size ids from the real crop, a square set trained
exactly as without buckets, and a pack of bucketed subjects equal to single runs."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import job_dict, run_worker, subject_entry, write_job
from training.buckets import bucket_for, candidates

BUCKETED = {"buckets": True, "bucket_step": 8}  # the tiny model's 32 px: 8 px steps (64 at real sizes)


@pytest.mark.parametrize("size, resolution, step, bucket", [
    ((300, 400), 32, 8, (24, 32)),  # 3:4 exactly
    ((1920, 1080), 32, 8, (40, 24)),  # 16:9 -> 5:3, the nearest of 8 px multiples within 32x32 pixels
    ((500, 500), 32, 8, (32, 32)),
    ((3000, 4000), 1024, 64, (768, 1024)),  # SDXL-sized: 3:4 exactly
    ((1920, 1080), 1024, 64, (1024, 576)),  # 16:9 exactly (1344x768, larger, is 7:4)
])
def test_the_bucket_is_the_nearest_aspect_within_the_area(size, resolution, step, bucket):
    assert bucket_for(*size, resolution, step) == bucket
    assert all(w % step == 0 and h % step == 0 and w * h <= resolution ** 2 for w, h in candidates(resolution, step))


def test_a_bucketed_crop_keeps_the_whole_image_shape_and_gives_sdxl_its_real_size_ids():
    from training.data import crop

    img = Image.new("RGB", (64, 36))  # 16:9 -> bucket 40x24: scaled to 43x24 (cover), 1 px cropped each side
    tensor, where = crop(img, (40, 24), center_crop=True)
    assert tensor.shape == (3, 24, 40)
    assert where.ids() == [36.0, 64.0, 0.0, 1.0, 24.0, 40.0]  # original h, w; crop top, left; target h, w
    assert where.mirrored().ids() == [36.0, 64.0, 0.0, 43 - 1 - 40, 24.0, 40.0]


def _mixed_subject(folder, seed):
    """A subject of a 3:4, a 16:9 and a square photo."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for name, size in (("portrait.png", (30, 40)), ("wide.png", (64, 36)), ("square.png", (40, 40))):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (4, 4, size[0] // 2, size[1] // 2))
        img.save(folder / name)
    return folder


def test_portrait_and_landscape_images_train_at_their_bucket_shapes(tiny_model, tmp_path):
    from launcher.config import job_from_dict
    from launcher.subjects import image_uris, resolve_subjects
    from training.components import load_components
    from training.loop import diffusion_loss, draw_batch, prepare_subject, training_model

    folder = _mixed_subject(tmp_path / "mixed", 0)
    job = job_from_dict(job_dict(tiny_model, [{"id": "m", "images": str(folder), "instance_prompt": "sks toy",
                                               "class_prompt": "a toy"}], tmp_path / "out",
                                 train={**BUCKETED, "batch_size": 2, "random_flip": True}))
    c = load_components(job.model, torch.device("cpu"))
    [subject] = resolve_subjects(job)
    # the class set: two squares and a 3:4 portrait
    classes = [str(tmp_path / f"class{i}.png") for i in range(3)]
    for p, size in zip(classes, [(32, 32), (32, 32), (30, 40)]):
        Image.new("RGB", size, (9, 9, 9)).save(p)
    data = prepare_subject(c, job, subject, image_uris(subject), classes, False)
    # the VAE halves each side: portrait 24x32 px -> 12x16 latents, 16:9 -> 40x24 px -> 20x12, square 32x32 -> 16x16
    assert sorted(cache.shape for cache in data.instance) == [(4, 12, 20), (4, 16, 12), (4, 16, 16)]
    assert all(len(cache) == 2 for cache in data.instance)  # each image and its mirror image
    assert [p.shape for p in data.prior] == [i.shape for i in data.instance]  # class latents at each bucket's shape
    # a bucket the class set has trains with its own class images; the 16:9 one (none) with all three cropped
    prior_rows = {p.shape: len(p) for p in data.prior}
    assert prior_rows == {(4, 16, 12): 2, (4, 16, 16): 4, (4, 12, 20): 6}, prior_rows
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        batch = draw_batch(c, job, data, gen)
        assert batch.latents.shape[0] == 4 and len({tuple(x.shape) for x in batch.latents}) == 1  # one bucket a step
        seen.add(tuple(batch.latents.shape[1:]))
    assert seen == {(4, 12, 20), (4, 16, 12), (4, 16, 16)}
    loss = diffusion_loss(c, job, data, gen, training_model(c, job), lambda: torch.autocast("cpu", enabled=False))
    assert torch.isfinite(loss)


ATOL, EPS = 1e-4, 1e-3  # as tests/test_packed.py: AdamW eps large enough that rounding stays rounding
LORA = {"type": "lora", "rank": 4, "targets": "comprehensive", "alpha": 8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, subjects_root):
    """A square subject trained without buckets, then with buckets beside two mixed-shape
    subjects, one at a time and packed two at a time."""
    tmp = tmp_path_factory.mktemp("buckets")
    mixed = [{"id": f"m{i}", "images": str(_mixed_subject(tmp / f"m{i}", i)), "instance_prompt": f"sks{i} toy"}
             for i in range(2)]
    square = subject_entry(subjects_root, 0)
    out = tmp / "out"
    train = {"learning_rate": 1e-3, "eps": EPS, "steps": 3, "random_flip": True, "center_crop": False}
    for name, subjects, extra in (("plain", [square], {}), ("alone", [square, *mixed], {**BUCKETED, "pack": 1}),
                                  ("packed", mixed, {**BUCKETED, "pack": 2})):
        job = write_job(tmp / f"{name}.yaml", job_dict(tiny_model, subjects, out, name=name, adapter=LORA,
                                                     train={**train, **extra}))
        proc = run_worker(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _adapter(out, name, sid):
    return load_file(out / name / "subjects" / sid / "adapter" / "unet" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_square_set_with_buckets_gives_the_adapter_of_the_square_path(runs):
    plain, bucketed = _adapter(runs, "plain", "s0"), _adapter(runs, "alone", "s0")
    assert plain.keys() == bucketed.keys()
    assert all(torch.equal(plain[k], bucketed[k]) for k in plain)  # bit-equal
    assert any(bucketed[k].abs().max() > 0 for k in bucketed if "lora_B" in k)


@pytest.mark.slow
def test_a_pack_of_bucketed_subjects_equals_single_runs(runs):
    for sid in ("m0", "m1"):
        alone, packed = _adapter(runs, "alone", sid), _adapter(runs, "packed", sid)
        worst = max((alone[k] - packed[k]).abs().max().item() for k in alone)
        assert worst < ATOL, f"{sid}: max abs difference {worst}"
        assert any(packed[k].abs().max() > 0 for k in packed if "lora_B" in k)


@pytest.mark.slow
def test_ddp_and_zero2_with_buckets_and_captions_equal_one_process(tiny_model, tmp_path):
    """Both ranks draw the same bucket each step (from the subject's generator), so 2 DDP ranks,
    or 2 ZeRO-2 ranks, of batch 1 train the adapter of one process of batch 2 (eps=1.0 as in
    tests/test_distributed.py)."""
    folder = _mixed_subject(tmp_path / "m", 5)
    for name, caption in (("portrait", "standing"), ("wide", "lying down"), ("square", "sitting")):
        (folder / f"{name}.txt").write_text(caption)
    subjects = [{"id": "m", "images": str(folder), "instance_prompt": "sks toy"}]
    train = {**BUCKETED, "steps": 4, "eps": 1.0, "learning_rate": 0.5, "prompt_template": "{instance}, {caption}"}
    out = tmp_path / "out"
    one = run_worker(write_job(tmp_path / "one.yaml", job_dict(tiny_model, subjects, out, name="one",
                                                              train={**train, "batch_size": 2})))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_worker(write_job(tmp_path / "ddp.yaml", job_dict(tiny_model, subjects, out, name="ddp",
                                                              train={**train, "batch_size": 1},
                                                              distributed={"strategy": "ddp", "nproc_per_node": 2})),
                     nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    zero = run_worker(write_job(tmp_path / "zero.yaml", job_dict(tiny_model, subjects, out, name="zero",
                                                                train={**train, "batch_size": 1},
                                                                distributed={"strategy": "deepspeed", "zero_stage": 2,
                                                                             "nproc_per_node": 2})),
                      nproc=2)
    assert zero.returncode == 0, zero.stderr[-4000:]
    a = _adapter(out, "one", "m")
    for name in ("ddp", "zero"):
        b = _adapter(out, name, "m")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
        assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)


def test_sdxl_trains_buckets_with_the_size_ids_of_their_real_crops(tiny_sdxl, tmp_path):
    from launcher.config import job_from_dict
    from launcher.subjects import image_uris, resolve_subjects
    from training.components import load_components
    from training.loop import diffusion_loss, draw_batch, prepare_subject, training_model

    folder = _mixed_subject(tmp_path / "x", 3)
    job = job_from_dict(job_dict(tiny_sdxl, [{"id": "x", "images": str(folder), "instance_prompt": "sks toy"}],
                                 tmp_path / "out", train={**BUCKETED, "batch_size": 2}))
    c = load_components(job.model, torch.device("cpu"))
    [subject] = resolve_subjects(job)
    data = prepare_subject(c, job, subject, image_uris(subject), None, False)
    # (original h, w, crop top, left, target h, w) of each image: 30x40 -> 24x32 (scaled 0.8, no overhang),
    # 64x36 -> 40x24 (scaled to 43x24, 1 px off the left), 40x40 -> 32x32
    ids = sorted(tuple(cache.crops[0].tolist()) for cache in data.instance)
    assert ids == [(36.0, 64.0, 0.0, 1.0, 24.0, 40.0), (40.0, 30.0, 0.0, 0.0, 32.0, 24.0), (40.0, 40.0, 0.0, 0.0, 32.0, 32.0)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        batch = draw_batch(c, job, data, gen)
        h, w = batch.latents.shape[2:]
        assert batch.conditioning["time_ids"][:, 4:].tolist() == [[2.0 * h, 2.0 * w]] * 2  # the VAE halves each side
    assert torch.isfinite(diffusion_loss(c, job, data, gen, training_model(c, job), lambda: torch.autocast("cpu", enabled=False)))


def test_a_bucket_step_that_does_not_divide_the_resolution_names_the_keys(tmp_path):
    from launcher.config import job_from_dict
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        job_from_dict(job_dict("/m", [{"id": "a", "images": "/x", "instance_prompt": "p"}], tmp_path,
                               train={"buckets": True, "bucket_step": 48, "resolution": 512}))
    assert any("train.bucket_step 48 must divide train.resolution 512" in p for p in err.value.problems), err.value.problems
