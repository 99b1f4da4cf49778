"""Per-image captions (docs/fleet.md): from sidecar .txt files or the manifest's captions, through
train.prompt_template, to the text encoder; one embedding per distinct prompt; a prompt longer
than the encoder's window reported once per subject; caption dropout."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.config import job_from_dict
from launcher.errors import ConfigError, InputError
from launcher.subjects import image_uris, resolve_subjects

CAPTIONS = {"000.png": "on a red sofa", "001.png": "in the snow", "002.png": "wearing a hat"}


@pytest.fixture(scope="module")
def components(tiny_model):
    from training.components import load_components
    from launcher.config import ModelConfig

    return load_components(ModelConfig(source=str(tiny_model)), torch.device("cpu"))


def _job(tiny_model, tmp_path, subjects, **train):
    from conftest import job_dict

    return job_from_dict(job_dict(tiny_model, subjects, tmp_path / "out", train={"batch_size": 6, **train}))


def _encoded(c, prompt: str) -> torch.Tensor:
    """The prompt's embedding computed afresh (what the text encoder makes of it)."""
    with torch.no_grad():
        return c.family.encode(c.text_encoders, c.family.tokenize(c.tokenizers, [prompt]))["encoder_hidden_states"][0]


def _assert_rows_use_their_images_prompts(c, job, data, uris, expected: dict[str, str]):
    """Draw a batch as the loop does and check every row's conditioning is its own image's prompt."""
    from training.loop import draw_batch

    gen = torch.Generator().manual_seed(7)
    probe = torch.Generator().manual_seed(7)
    index = torch.randint(len(data.instance[0]), (job.train.batch_size,), generator=probe)  # draw_batch's first draw
    batch = draw_batch(c, job, data, gen)
    names = [u.rsplit("/", 1)[-1] for u in uris]
    for row, i in enumerate(index.tolist()):
        prompt = expected[names[i % len(names)]]
        assert torch.allclose(batch.conditioning["encoder_hidden_states"][row], _encoded(c, prompt), atol=1e-5), (row, prompt)
    assert len({names[i] for i in index.tolist()}) > 1  # the batch mixes images, so the rows' prompts differ


def test_sidecar_captions_reach_the_text_encoder_one_embedding_per_distinct_prompt(tiny_model, tmp_path, components):
    from training.loop import prepare_subject
    from training.tiny import write_subject_images

    folder = write_subject_images(tmp_path / "dog", 0, count=3, size=40)
    for name, caption in CAPTIONS.items():
        (folder / name.replace(".png", ".txt")).write_text(caption + "\n")
    job = _job(tiny_model, tmp_path, [{"id": "dog", "images": str(folder), "instance_prompt": "sks dog"}],
               prompt_template="{instance}, {caption}")
    [subject] = resolve_subjects(job)
    uris = image_uris(subject)
    data = prepare_subject(components, job, subject, uris, None, False)
    expected = {name: f"sks dog, {caption}" for name, caption in CAPTIONS.items()}
    assert sorted(data.instance_prompt.texts) == sorted(expected.values())
    assert data.instance_prompt.conditioning["encoder_hidden_states"].shape[0] == 3  # cached once per prompt
    _assert_rows_use_their_images_prompts(components, job, data, uris, expected)


def test_manifest_captions_reach_the_text_encoder_and_win_over_sidecars(tiny_model, tmp_path, components):
    from training.loop import prepare_subject
    from training.tiny import write_subject_images

    folder = write_subject_images(tmp_path / "cat", 1, count=3, size=40)
    (folder / "000.txt").write_text("a sidecar the manifest overrides")
    manifest = tmp_path / "subjects.jsonl"
    manifest.write_text(json.dumps({"id": "cat", "images": str(folder), "instance_prompt": "sks cat",
                                    "captions": CAPTIONS}) + "\n")
    from conftest import job_dict

    job = job_from_dict(job_dict(tiny_model, str(manifest), tmp_path / "out",
                                 train={"batch_size": 6, "prompt_template": "{caption} ({instance})"}))
    [subject] = resolve_subjects(job)
    uris = image_uris(subject)
    data = prepare_subject(components, job, subject, uris, None, False)
    expected = {name: f"{caption} (sks cat)" for name, caption in CAPTIONS.items()}
    assert sorted(data.instance_prompt.texts) == sorted(expected.values())
    _assert_rows_use_their_images_prompts(components, job, data, uris, expected)


def test_a_long_caption_is_reported_once_per_subject_with_the_tokens_dropped(tiny_model, tmp_path, components, caplog):
    from training.loop import prepare_subject
    from training.tiny import write_subject_images

    folder = write_subject_images(tmp_path / "long", 2, count=2, size=40)
    long_caption = "a very long description " * 8
    (folder / "000.txt").write_text(long_caption)
    (folder / "001.txt").write_text("short")
    job = _job(tiny_model, tmp_path, [{"id": "long", "images": str(folder), "instance_prompt": "sks toy"}],
               prompt_template="{instance}, {caption}")
    [subject] = resolve_subjects(job)
    tokenizer = components.tokenizers["text_encoder"]
    full = len(tokenizer("sks toy, " + " ".join(long_caption.split()))["input_ids"])
    assert full > tokenizer.model_max_length
    with caplog.at_level("WARNING", logger="training.prompts"):
        prepare_subject(components, job, subject, image_uris(subject), None, False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "training.prompts"]
    assert len(warnings) == 1, warnings
    assert "subject long: 1 image prompt(s)" in warnings[0]
    assert f"000.png ({full - tokenizer.model_max_length} token(s) dropped)" in warnings[0]
    assert "001.png" not in warnings[0]


def test_an_image_without_a_caption_is_named_when_the_template_needs_one(tiny_model, tmp_path, components):
    from training.loop import prepare_subject
    from training.tiny import write_subject_images

    folder = write_subject_images(tmp_path / "half", 3, count=2, size=40)
    (folder / "000.txt").write_text("captioned")
    job = _job(tiny_model, tmp_path, [{"id": "half", "images": str(folder), "instance_prompt": "sks toy"}],
               prompt_template="{instance}, {caption}")
    [subject] = resolve_subjects(job)
    with pytest.raises(InputError, match=r"needs a caption for every image; 1 image\(s\) have none .*001\.png"):
        prepare_subject(components, job, subject, image_uris(subject), None, False)


def test_caption_dropout_trains_some_rows_with_the_empty_prompt(tiny_model, tmp_path, components):
    from training.loop import draw_batch, prepare_subject
    from training.tiny import write_subject_images

    folder = write_subject_images(tmp_path / "drop", 4, count=2, size=40)
    job = _job(tiny_model, tmp_path, [{"id": "drop", "images": str(folder), "instance_prompt": "sks toy"}],
               caption_dropout=0.5, batch_size=16)
    [subject] = resolve_subjects(job)
    data = prepare_subject(components, job, subject, image_uris(subject), None, False)
    assert data.instance_prompt.texts == ["sks toy", ""]
    rows = draw_batch(components, job, data, torch.Generator().manual_seed(0)).conditioning["encoder_hidden_states"]
    empty, own = _encoded(components, ""), _encoded(components, "sks toy")
    dropped = [torch.allclose(r, empty, atol=1e-5) for r in rows]
    kept = [torch.allclose(r, own, atol=1e-5) for r in rows]
    assert all(d != k for d, k in zip(dropped, kept)) and 0 < sum(dropped) < len(rows)


@pytest.mark.parametrize("template, needle", [
    ("{instance} {subject}", "unknown placeholder(s) {subject}"),
    ("a photo", "must use {instance}, {caption} or both"),
    ("{instance", "is not a valid template"),
])
def test_a_bad_prompt_template_names_the_key(tiny_model, tmp_path, template, needle):
    from conftest import job_dict

    with pytest.raises(ConfigError) as err:
        job_from_dict(job_dict(tiny_model, [{"id": "a", "images": "x", "instance_prompt": "p"}], tmp_path,
                               train={"prompt_template": template}))
    assert any(p.startswith("train.prompt_template:") and needle in p for p in err.value.problems), err.value.problems


def test_a_csv_manifest_takes_captions_as_a_json_object_cell(tmp_path):
    from launcher.manifest import load_manifest

    path = tmp_path / "subjects.csv"
    path.write_text('id,images,instance_prompt,captions\na,/data/a,sks dog,"{""000.png"": ""on a sofa""}"\n'
                    'b,/data/b,sks cat,not json\n')
    with pytest.raises(ConfigError) as err:
        load_manifest(str(path))
    assert err.value.problems == ["row 2: captions: 'not json' is not a JSON object of image name -> caption"]
    path.write_text('id,images,instance_prompt,captions\na,/data/a,sks dog,"{""000.png"": ""on a sofa""}"\n')
    [subject] = load_manifest(str(path))
    assert subject.captions == {"000.png": "on a sofa"}


def test_a_bad_caption_file_fails_its_subject_by_name_and_the_others_train(tiny_model, tmp_path):
    from conftest import captioned_subjects, job_dict, run_worker, write_job

    subjects = captioned_subjects(tmp_path)
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, subjects, tmp_path / "out",
                                                    train={"prompt_template": "{instance}, {caption}"}))
    proc = run_worker(job)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    root = tmp_path / "out" / "t" / "subjects"
    status = json.loads((root / "bad" / "status.json").read_text())
    assert status["state"] == "failed"
    assert f"caption file {tmp_path / 'bad' / '001.txt'} is not UTF-8 text (byte 0xff at offset 0)" in status["error"]
    assert json.loads((root / "good" / "status.json").read_text())["state"] == "done"
