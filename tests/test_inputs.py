"""Bad inputs get a clear message naming what is wrong, never a traceback; odd but valid images
train; a subject that fails is never marked done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import job_dict, run_cli, run_worker, subject_entry, write_job


def _expect_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def broken(tmp_path, tiny_model, subjects_root):
    """A copy of the model and one subject folder that tests can break."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    folder = tmp_path / "imgs"
    shutil.copytree(subjects_root / "subject-0", folder)
    return model, folder


def _job(tmp_path, model, folder, **extra) -> Path:
    subjects = [{"id": "dog", "images": str(folder), "instance_prompt": "a photo of sks dog"}]
    return write_job(tmp_path / "job.yaml", job_dict(model, subjects, tmp_path / "out", **extra))


def test_validate_accepts_a_good_job(tmp_path, broken):
    proc = run_cli("validate", str(_job(tmp_path, *broken)), "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "ok (1 subject(s), adapter lora rank 4" in proc.stdout


def test_missing_component_subfolder(tmp_path, broken):
    model, folder = broken
    shutil.rmtree(model / "vae")
    _expect_user_error(run_cli("validate", str(_job(tmp_path, model, folder))), "lacks the component subfolder(s) vae")


def test_empty_subject_folder(tmp_path, broken):
    model, folder = broken
    for p in folder.iterdir():
        p.unlink()
    _expect_user_error(run_cli("validate", str(_job(tmp_path, model, folder))), "subject dog", "holds no images")


def test_non_image_and_truncated_png_are_both_reported(tmp_path, broken):
    model, folder = broken
    (folder / "notes.png").write_text("this is not a picture")
    data = (folder / "000.png").read_bytes()
    (folder / "000.png").write_bytes(data[: len(data) // 2])
    proc = run_cli("validate", str(_job(tmp_path, model, folder)))
    _expect_user_error(proc, "notes.png is not an image", "000.png cannot be decoded")


def test_duplicate_ids_and_config_errors_are_messages(tmp_path, broken):
    model, folder = broken
    subject = {"id": "dog", "images": str(folder), "instance_prompt": "p"}
    job = write_job(tmp_path / "job.yaml", job_dict(model, [subject, subject], tmp_path / "out"))
    _expect_user_error(run_cli("validate", str(job)), "duplicate subject ids: dog")
    _expect_user_error(run_cli("validate", str(job), "train.steps=0"), "train.steps")
    _expect_user_error(run_cli("validate", str(tmp_path / "missing.yaml")), "does not exist")
    _expect_user_error(run_cli("submit", str(job), "--backend", "local"), "duplicate subject ids")
    _expect_user_error(run_cli("submit", str(job), "--backend", "nomad"), "'nomad' is not a backend")  # checked first


def test_missing_model_and_folder(tmp_path):
    job = write_job(tmp_path / "job.yaml", job_dict(tmp_path / "nomodel", [{"id": "a", "images": str(tmp_path / "nope"),
                                                                             "instance_prompt": "p"}], tmp_path / "out"))
    _expect_user_error(run_cli("validate", str(job)), "model.source", "does not exist", "image folder")


def test_rgba_grayscale_and_exif_rotated_images_train(tmp_path, tiny_model):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGBA", (40, 56), (200, 10, 10, 128)).save(folder / "rgba.png")
    Image.new("L", (50, 50), 90).save(folder / "gray.png")
    Image.new("P", (48, 48), 3).save(folder / "palette.png")
    rotated = Image.new("RGB", (64, 40), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rotated.save(folder / "rotated.jpg", exif=exif)
    from training.data import decode_image, to_tensor

    assert decode_image((folder / "rotated.jpg").read_bytes(), "rotated.jpg").size == (40, 64)
    assert to_tensor(decode_image((folder / "rgba.png").read_bytes(), "x"), 32, True).shape == (3, 32, 32)
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, [{"id": "odd", "images": str(folder),
                                                                  "instance_prompt": "a photo of sks thing"}], tmp_path / "out"))
    assert run_cli("validate", str(job)).returncode == 0
    proc = run_worker(job)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads((tmp_path / "out" / "t" / "subjects" / "odd" / "status.json").read_text())
    assert status["state"] == "done"


def test_high_depth_images_keep_their_tones_and_a_folder_reports_what_it_skips(tmp_path, caplog):
    import numpy as np

    from launcher.config import Subject
    from launcher.subjects import image_uris
    from training.data import decode_image

    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(folder / "gray16.png")  # mid-gray, 16-bit
    Image.fromarray(np.full((32, 32), 0.25, dtype=np.float32), mode="F").save(folder / "float.tif")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "anim.gif")
    (folder / "notes.txt").write_text("not an image")
    for name, expected in (("gray16.png", 127.5), ("float.tif", 63.75)):
        mean = float(np.asarray(decode_image((folder / name).read_bytes(), name)).mean())
        assert abs(mean - expected) < 1, (name, mean)  # was 254.5: the 16-bit values clipped to white
    with caplog.at_level("WARNING"):
        uris = image_uris(Subject(id="deep", images=str(folder), instance_prompt="p"))
    assert sorted(u.rsplit("/", 1)[-1] for u in uris) == ["anim.gif", "float.tif", "gray16.png"]
    assert "1 file(s) in" in caplog.text and "notes.txt" in caplog.text


def test_a_failing_subject_is_recorded_and_never_marked_done(tmp_path, tiny_model, subjects_root):
    """The worker does not trust validation: a corrupt image found at training time fails that
    subject (with the reason) and the others still train."""
    bad = tmp_path / "bad"
    shutil.copytree(subjects_root / "subject-1", bad)
    data = (bad / "000.png").read_bytes()
    (bad / "000.png").write_bytes(data[:60])
    subjects = [subject_entry(subjects_root, 0), {"id": "bad", "images": str(bad), "instance_prompt": "p"}]
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, subjects, tmp_path / "out"))
    proc = run_worker(job)
    assert proc.returncode == 1, proc.stderr[-2000:]
    root = tmp_path / "out" / "t" / "subjects"
    status = json.loads((root / "bad" / "status.json").read_text())
    assert status["state"] == "failed" and "000.png cannot be decoded" in status["error"]
    assert not (root / "bad" / "MANIFEST.json").exists() and not (root / "bad" / "adapter").exists()
    assert json.loads((root / "s0" / "status.json").read_text())["state"] == "done"
    # a second run retries the failed subject and leaves the done one alone
    again = run_worker(job)
    assert "subject s0: skipped (already done)" in again.stderr
    assert json.loads((root / "bad" / "status.json").read_text())["attempts"] == 2
    # once every subject is settled (done, or out of attempts), a worker exits before loading the model
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, subjects, tmp_path / "out", output={"max_attempts": 2}))
    last = run_worker(job, extra_args=["--summary", str(tmp_path / "summary.json")])
    assert last.returncode == 0, last.stderr[-2000:]
    assert "subject bad: skipped (failed 2 times (max_attempts=2))" in last.stderr
    assert "loaded unet" not in last.stderr
    assert json.loads((tmp_path / "summary.json").read_text()) == [
        {"subject": "bad", "state": "skipped", "detail": "failed 2 times (max_attempts=2)", "final_loss": None},
        {"subject": "s0", "state": "skipped", "detail": "already done", "final_loss": None}]


def test_no_images_names_where_it_looked(tmp_path):
    from launcher.config import TrainConfig
    from launcher.errors import InputError
    from training.data import load_images

    with pytest.raises(InputError, match=f"no images to train on in {tmp_path / 'empty'} \\(image files end in .png"):
        load_images([], TrainConfig(), source=str(tmp_path / "empty"))
