"""Subjects manifests and images that users get wrong: each mistake is a message naming the file,
the row and the key, never a traceback, and every problem is reported at once."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import job_dict, run_cli, write_job
from launcher.config import Subject
from launcher.errors import ConfigError, InputError
from launcher.manifest import load_manifest
from launcher.inputs_check import check_subject, check_subjects, inspect_image
from launcher.subjects import resolve_subjects


@pytest.fixture
def img(tmp_path) -> Path:
    path = tmp_path / "imgs" / "a.png"
    path.parent.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def _row(img: Path, sid: str = "a", **extra) -> dict:
    return {"id": sid, "images": [str(img)], "instance_prompt": "a photo of sks dog", **extra}


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_manifest(str(path))
    return [err.value.message, *err.value.problems]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (no pixel data: opening reads the header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ 1, 2: encodings and compression


@pytest.mark.parametrize("data, needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "is not UTF-8 text: byte 0x89 at offset 0"),
    ('{"id": "a"}\n'.encode("utf-16"), "it is UTF-16: save it as UTF-8"),
])
def test_a_manifest_that_is_not_utf8_is_a_message(tmp_path, data, needle):
    path = tmp_path / "subjects.jsonl"
    path.write_bytes(data)
    [message] = _problems(path)
    assert str(path) in message and needle in message


@pytest.mark.parametrize("name, text", [
    ("subjects.jsonl.gz", None),
    ("subjects.csv.gz", "id,images,instance_prompt\na,{img},a photo of sks dog\n"),
    ("subjects.jsonl", None),  # gzip bytes under a plain name are recognised too
])
def test_a_gzipped_manifest_is_read(tmp_path, img, name, text):
    data = text.format(img=img).encode() if text else _jsonl(_row(img))
    (tmp_path / name).write_bytes(gzip.compress(data))
    [subject] = load_manifest(str(tmp_path / name))
    assert subject.id == "a" and str(img) in str(subject.images)


def test_a_truncated_gzip_manifest_is_a_message(tmp_path, img):
    path = tmp_path / "subjects.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(_row(img)))[:20])
    [message] = _problems(path)
    assert "is not valid gzip" in message


@pytest.mark.parametrize("name, text", [
    ("subjects.csv", "id,images,instance_prompt\na,{img},a photo of sks dog\n"),
    ("subjects.jsonl", '{{"id": "a", "images": "{img}", "instance_prompt": "a photo of sks dog"}}\n'),
])
def test_a_byte_order_mark_is_skipped(tmp_path, img, name, text):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.format(img=img).encode())
    [subject] = load_manifest(str(tmp_path / name))
    assert subject.id == "a"


# ------------------------------------------------------------------ 3, 4, 5: malformed rows


def test_a_csv_images_cell_that_is_not_json(tmp_path, img):
    path = tmp_path / "subjects.csv"
    path.write_text(f'id,images,instance_prompt\na,"[bad json",p\nb,"[""{img}""]",p\n')
    problems = _problems(path)
    assert problems[1:] == ["row 1: images: '[bad json' is not a JSON list: Expecting value (column 2)"]


def test_deeply_nested_json_is_reported_with_the_other_rows(tmp_path, img):
    path = tmp_path / "subjects.jsonl"
    path.write_bytes(_jsonl(_row(img)) + b"[" * 100_000 + b"\n{not json\n" + _jsonl({"id": "c"}))
    problems = _problems(path)
    assert "line 2 is not a subject: its JSON is nested too deeply" in problems
    assert any(p.startswith("line 3 is not JSON") for p in problems)
    assert "row 4: images: required" in problems and "row 4: instance_prompt: required" in problems


def test_a_csv_value_over_the_field_limit(tmp_path):
    path = tmp_path / "subjects.csv"
    path.write_text("id,images,instance_prompt\na," + "x" * 140_000 + ",p\n")
    [_, problem] = _problems(path)
    assert problem.startswith("row 1 is not valid CSV: a value is longer than 131072 characters")


def test_a_csv_row_with_more_fields_than_the_header(tmp_path, img):
    path = tmp_path / "subjects.csv"
    path.write_text(f"id,images,instance_prompt\na,{img},a photo, of sks dog\nb,{img},p\n")
    [_, problem] = _problems(path)
    assert problem == "row 1: has 4 fields, the header has 3 (quote a value that holds a comma)"


def test_a_manifest_row_lists_the_subject_keys(tmp_path, img):
    path = tmp_path / "subjects.jsonl"
    path.write_bytes(_jsonl(_row(img, colour="red")))
    [_, problem] = _problems(path)
    assert problem.startswith("row 1: colour: unknown key; valid keys here: captions, class_prompt, id, images,")
    assert "adapter" not in problem


# ------------------------------------------------------------------ 7: rows of the wrong type


def test_rows_that_are_not_objects(tmp_path, img):
    path = tmp_path / "subjects.jsonl"
    path.write_text('[1, 2]\nnull\n42\n"a"\n')
    problems = _problems(path)[1:]
    assert [p.rsplit("got ", 1)[1] for p in problems] == ["a list", "null", "a number", "a string"]
    assert all(p.startswith(f"row {n}: must be an object with the keys id, images, instance_prompt")
               for n, p in enumerate(problems, start=1))


def test_images_of_the_wrong_type_are_readable(tmp_path, img):
    path = tmp_path / "subjects.jsonl"
    path.write_bytes(_jsonl({**_row(img), "images": [1, str(img), None]}, {**_row(img, "b"), "images": 5}))
    assert _problems(path)[1:] == [
        "row 1: images: every item must be an image path or URI (a string); item 0 is a number, item 2 is null",
        "row 2: images: must be a folder (a string) or a list of image paths, got a number",
    ]


# ------------------------------------------------------------------ 9: no manifest file


def test_an_empty_or_directory_manifest(tmp_path):
    with pytest.raises(ConfigError, match="subjects manifest '' is empty"):
        load_manifest("")
    with pytest.raises(ConfigError, match=f"subjects manifest {tmp_path} is a directory"):
        load_manifest(str(tmp_path))
    (tmp_path / "s.jsonl").write_text("\n  \n")
    with pytest.raises(ConfigError, match="s.jsonl is empty"):
        load_manifest(str(tmp_path / "s.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_manifest(str(tmp_path / "missing.jsonl"))


def test_resolve_subjects_reads_a_bom_csv(tmp_path, img):
    from launcher.config import job_from_dict

    (tmp_path / "s.csv").write_bytes(f"\ufeffid,images,instance_prompt\na,{img},p\n".encode())
    job = job_from_dict(job_dict(tmp_path / "model", str(tmp_path / "s.csv"), tmp_path / "out"))
    assert [s.id for s in resolve_subjects(job)] == ["a"]


# ------------------------------------------------------------------ 6: oversized images


def test_an_oversized_image_is_too_large_not_a_crash(tmp_path, img):
    bomb = _png_header(20_000, 20_000)
    assert inspect_image(bomb).startswith("is too large (400,000,000 pixels, more than the ")
    (img.parent / "huge.png").write_bytes(bomb)
    [problem] = check_subject(Subject(id="a", images=str(img.parent), instance_prompt="p")).problems
    assert problem.startswith(f"{img.parent / 'huge.png'} is too large (400,000,000 pixels")


def test_the_worker_fails_the_subject_on_an_oversized_image():
    from training.data import decode_image

    with pytest.raises(InputError, match=r"huge.png is too large \(400,000,000 pixels"):
        decode_image(_png_header(20_000, 20_000), "huge.png")


# ------------------------------------------------------------------ 8: paths that are not what they seem


def test_images_naming_one_file(img):
    [problem] = check_subject(Subject(id="a", images=str(img), instance_prompt="p")).problems
    assert problem == f"images {img} is a file, not a folder: name image files in a list (images: [{img}])"


def test_unreadable_paths_are_the_subjects_problems(tmp_path, img):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    (img.parent / "inner.png").mkdir()  # a folder named like an image, inside the folder
    (img.parent / "cycle.jpg").symlink_to(img.parent / "cycle.jpg")
    broken = tmp_path / "broken"
    broken.symlink_to(broken)
    subjects = [Subject(id="listed", images=[str(loop), str(img.parent), str(img)], instance_prompt="p"),
                Subject(id="folder", images=str(img.parent), instance_prompt="p"),
                Subject(id="link", images=str(broken), instance_prompt="p"),
                Subject(id="fine", images=[str(img)], instance_prompt="p")]
    assert check_subjects(subjects) == {
        "listed": [f"{loop} cannot be read (Too many levels of symbolic links)",
                   f"{img.parent} is a folder, not an image file"],
        "folder": [f"{img.parent / 'cycle.jpg'} cannot be read (Too many levels of symbolic links)",
                   f"{img.parent / 'inner.png'} is a folder, not an image file"],
        "link": [f"image folder {broken} is a broken symbolic link (a loop, or its target is missing)"],
    }


# ------------------------------------------------------------------ end to end


@pytest.fixture
def model(tmp_path) -> Path:
    """A model folder with the component subfolders: enough for `validate`, which only lists them."""
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "model" / name).mkdir(parents=True)
    return tmp_path / "model"


def _validate(tmp_path, model, subjects) -> tuple[int, str]:
    job = write_job(tmp_path / "job.yaml", job_dict(model, subjects, tmp_path / "out"))
    proc = run_cli("validate", str(job), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def test_validate_reports_every_bad_manifest_row(tmp_path, model, img):
    path = tmp_path / "subjects.csv"
    path.write_bytes(b"\xef\xbb\xbfid,images,instance_prompt\n"
                     + f'a,"[bad",p\nb,{img},p,extra\nc,{img},p\n'.encode())
    code, err = _validate(tmp_path, model, str(path))
    assert code == 2, err
    assert f"subjects manifest {path} is invalid" in err
    assert "row 1: images: '[bad' is not a JSON list" in err and "row 2: has 4 fields" in err
    assert "id: required" not in err


def test_validate_reports_an_oversized_image_and_a_binary_manifest(tmp_path, model, img):
    (img.parent / "huge.png").write_bytes(_png_header(20_000, 20_000))
    path = tmp_path / "subjects.jsonl"
    path.write_bytes(_jsonl(_row(img), {**_row(img, "b"), "images": str(img.parent)}))
    code, err = _validate(tmp_path, model, str(path))
    assert code == 2, err
    assert f"subject b: {img.parent / 'huge.png'} is too large (400,000,000 pixels" in err
    assert "subject a:" not in err
    path.write_bytes(img.read_bytes())
    code, err = _validate(tmp_path, model, str(path))
    assert code == 2 and f"subjects manifest {path} is not UTF-8 text: byte 0x89 at offset 0" in err, err


def test_a_credential_in_a_manifest_row_is_refused_by_row_and_key_without_its_value(tmp_path, img):
    """As in the job file (launcher.secrets): a signed URL, a token in a URI's user part."""
    path = tmp_path / "subjects.jsonl"
    signed = "https://photos.example.com/rex.png?X-Amz-Signature=0123456789abcdef0123456789abcdef"
    path.write_bytes(_jsonl(_row(img, "ok"), _row(img, "signed", images=[signed]),
                            _row(img, "token", images="s3://ghp_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@bucket/rex/")))
    problems = _problems(path)[1:]
    assert len(problems) == 2, problems
    assert problems[0].startswith("row 2: images.0: holds a credential") and "by reference" in problems[0]
    assert problems[1].startswith("row 3: images: holds a credential")
    assert not any("0123456789abcdef" in p or "ghp_" in p for p in problems)
