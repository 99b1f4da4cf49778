"""Subjects: read them inline or from a JSONL/CSV manifest, list their images, and check them.

`resolve_subjects(job)` returns the subject list; `check_subjects(subjects)` opens every image
and returns a problem list per subject id, so that all problems are reported at once.
"""

from __future__ import annotations

import csv
import io
import json

from pydantic import ValidationError

from launcher import storage
from launcher.config import JobConfig, Subject, _format_errors
from launcher.errors import ConfigError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _parse_manifest(uri: str, text: str) -> list[dict]:
    if uri.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        for row in rows:
            for key in list(row):
                if row[key] in ("", None):
                    del row[key]
            if isinstance(row.get("images"), str) and row["images"].lstrip().startswith("["):
                row["images"] = json.loads(row["images"])
            elif isinstance(row.get("images"), str) and ";" in row["images"]:
                row["images"] = [p.strip() for p in row["images"].split(";") if p.strip()]
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"subjects manifest {storage.redact(uri)} line {n} is not JSON: {exc.msg}") from None
    return rows


def load_manifest(uri: str) -> list[Subject]:
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ConfigError(f"subjects manifest {storage.redact(uri)} does not exist") from None
    problems, subjects, seen = [], [], set()
    for n, row in enumerate(_parse_manifest(uri, text), start=1):
        try:
            subject = Subject.model_validate(row)
        except ValidationError as exc:
            problems += [f"row {n}: {p}" for p in _format_errors(exc)]
            continue
        if subject.id in seen:
            problems.append(f"row {n}: duplicate subject id {subject.id!r}")
        seen.add(subject.id)
        subjects.append(subject)
    if problems:
        raise ConfigError(f"subjects manifest {storage.redact(uri)} is invalid", problems)
    if not subjects:
        raise ConfigError(f"subjects manifest {storage.redact(uri)} lists no subjects")
    return subjects


def resolve_subjects(job: JobConfig) -> list[Subject]:
    if isinstance(job.subjects, list):
        return list(job.subjects)
    subjects = load_manifest(job.subjects)
    if problem := job.class_prompts_missing(subjects):
        raise ConfigError(f"subjects manifest {storage.redact(job.subjects)}: {problem}")
    return subjects


def image_uris(subject: Subject) -> list[str]:
    """The subject's image files: the listed ones, or the image files of its folder."""
    if isinstance(subject.images, list):
        return list(subject.images)
    folder = subject.images
    return [storage.join(folder, name) for name in storage.list_names(folder) if name.lower().endswith(IMAGE_SUFFIXES)]


def check_image_bytes(data: bytes) -> str | None:
    """None if the bytes decode as an image, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < 8 or img.height < 8:
                return f"is only {img.width}x{img.height} pixels"
    except UnidentifiedImageError:
        return "is not an image"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot be decoded ({exc})"
    return None


def check_subject(subject: Subject) -> list[str]:
    """Every problem with one subject's images (empty list: it can train)."""
    problems = []
    if isinstance(subject.images, str) and not storage.exists(subject.images):
        return [f"image folder {storage.redact(subject.images)} does not exist"]
    uris = image_uris(subject)
    if not uris:
        return [f"image folder {storage.redact(subject.images)} holds no images ({', '.join(IMAGE_SUFFIXES)})"]
    for uri in uris:
        try:
            why = check_image_bytes(storage.read_bytes(uri))
        except FileNotFoundError:
            why = "does not exist"
        if why:
            problems.append(f"{storage.redact(uri)} {why}")
    return problems


def check_subjects(subjects: list[Subject]) -> dict[str, list[str]]:
    return {s.id: problems for s in subjects if (problems := check_subject(s))}


def require_valid(subjects: list[Subject]) -> None:
    bad = check_subjects(subjects)
    if bad:
        raise InputError("some subjects cannot be trained", [f"subject {sid}: {p}" for sid, ps in bad.items() for p in ps])
