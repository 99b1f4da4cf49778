"""Subjects: read them inline or from a JSONL/CSV manifest, list their images, and check them.

`resolve_subjects(job)` returns the subject list; `check_subjects(subjects)` opens every image
and returns a problem list per subject id, so that all problems are reported at once.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from typing import Any

from pydantic import ValidationError

from launcher import storage
from launcher.config import JobConfig, Subject, _format_errors
from launcher.errors import ConfigError, InputError, StorageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ROW_KEYS = "id, images, instance_prompt"  # the keys every manifest row needs
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _where(uri: str) -> str:
    return f"subjects manifest {storage.redact(uri)}"


def _read_manifest(uri: str) -> bytes:
    """The manifest's bytes; a missing file, a directory or no name at all is the user's mistake."""
    if not uri.strip():
        raise ConfigError(f"subjects manifest {uri!r} is empty: name a JSONL or CSV file, or list the subjects inline")
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"{_where(uri)} does not exist") from None
    except StorageError as exc:
        if isinstance(exc.__cause__, IsADirectoryError):
            raise ConfigError(f"{_where(uri)} is a directory: name a JSONL or CSV file") from None
        raise


def _manifest_text(uri: str, data: bytes) -> str:
    """The manifest's text: gunzipped when compressed (`.gz`), UTF-8 with or without a byte-order
    mark (spreadsheets write one at the start of a CSV export)."""
    if uri.lower().endswith(".gz") or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConfigError(f"{_where(uri)} is not valid gzip: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        hint = "it is UTF-16: save it as UTF-8" if utf16 else "is it a text file?"
        raise ConfigError(f"{_where(uri)} is not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start} ({hint})") from None


def _is_csv(uri: str) -> bool:
    return uri.lower().removesuffix(".gz").endswith(".csv")


def _parse_manifest(uri: str, text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(label, row) pairs and the problems met reading them: every bad line is reported, not only the first."""
    return _csv_rows(text) if _is_csv(uri) else _jsonl_rows(text)


def _jsonl_rows(text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """One JSON value a line; blank lines and '#' comments are skipped. Split on '\\n' only:
    str.splitlines would also split a prompt holding U+2028 or U+0085."""
    rows, problems, n = [], [], 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        n += 1
        try:
            rows.append((f"row {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"line {line_no} is not JSON: {exc.msg} (column {exc.colno})")
        except RecursionError:
            problems.append(f"line {line_no} is not a subject: its JSON is nested too deeply")
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            problems.append(f"line {line_no} is not JSON: {exc}")
    return rows, problems


def _csv_rows(text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """A header row of keys, then one subject a row; an empty cell is an absent key. A malformed
    record ends the reading (the csv module cannot resynchronise) after the rows before it."""
    reader = csv.DictReader(io.StringIO(text))
    rows, problems, where = [], [], "the header row"
    try:
        header, where = reader.fieldnames or [], "row 1"
        if twice := sorted({k for k in header if header.count(k) > 1}):
            problems.append(f"the header names {', '.join(map(repr, twice))} more than once")
        for n, record in enumerate(reader, start=1):
            where = f"row {n + 1}"  # the record after this one, should it be malformed
            if None in record:
                problems.append(f"row {n}: has {len(header) + len(record[None])} fields, the header has {len(header)} "
                                "(quote a value that holds a comma)")
                continue
            row = {k: v for k, v in record.items() if v not in ("", None)}
            if isinstance(row.get("images"), str):
                row["images"], problem = _csv_images(row["images"])
                if problem:
                    problems.append(f"row {n}: images: {problem}")
                    continue
            rows.append((f"row {n}", row))
    except csv.Error as exc:
        limit = csv.field_size_limit()
        why = f"a value is longer than {limit} characters (name a folder, or use a JSONL manifest)" if "field limit" in str(exc) else exc
        problems.append(f"{where} is not valid CSV: {why}")
    return rows, problems


def _csv_images(cell: str) -> tuple[Any, str | None]:
    """A CSV `images` cell: a JSON list, a ';'-separated list, or one folder; (value, problem)."""
    if cell.lstrip().startswith("["):
        try:
            return json.loads(cell), None
        except json.JSONDecodeError as exc:
            return None, f"{_short(cell)} is not a JSON list: {exc.msg} (column {exc.colno})"
        except (RecursionError, ValueError):
            return None, f"{_short(cell)} is not a JSON list of paths"
    if ";" in cell:
        return [p.strip() for p in cell.split(";") if p.strip()], None
    return cell, None


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _images_problem(images: Any) -> str | None:
    """A readable line for `images` of the wrong type (pydantic reports each branch of the union)."""
    if isinstance(images, list):
        bad = [f"item {i} is {JSON_TYPES.get(type(v), type(v).__name__)}" for i, v in enumerate(images) if not isinstance(v, str)]
        return f"images: every item must be an image path or URI (a string); {', '.join(bad[:5])}" if bad else None
    if images is not None and not isinstance(images, str):
        return f"images: must be a folder (a string) or a list of image paths, got {JSON_TYPES.get(type(images), '?')}"
    return None


def _row_problems(row: Any) -> tuple[Subject | None, list[str]]:
    """The row as a Subject, or what is wrong with it (with the Subject's keys, not the job's)."""
    if not isinstance(row, dict):
        return None, [f"must be an object with the keys {ROW_KEYS} (and optionally class_prompt, steps, "
                      f"learning_rate), got {JSON_TYPES.get(type(row), type(row).__name__)}"]
    try:
        return Subject.model_validate(row), []
    except ValidationError as exc:
        problems = _format_errors(exc, root=Subject)
    if images := _images_problem(row.get("images")):
        problems = [p for p in problems if not p.startswith(("images:", "images."))] + [images]
    return None, problems


def load_manifest(uri: str) -> list[Subject]:
    text = _manifest_text(uri, _read_manifest(uri))
    if not text.strip():
        raise ConfigError(f"{_where(uri)} is empty")
    rows, problems = _parse_manifest(uri, text)
    subjects, seen = [], set()
    for label, row in rows:
        subject, row_problems = _row_problems(row)
        problems += [f"{label}: {p}" for p in row_problems]
        if subject is None:
            continue
        if subject.id in seen:
            problems.append(f"{label}: duplicate subject id {subject.id!r}")
        seen.add(subject.id)
        subjects.append(subject)
    if problems:
        raise ConfigError(f"{_where(uri)} is invalid", problems)
    if not subjects:
        raise ConfigError(f"{_where(uri)} lists no subjects")
    return subjects


def resolve_subjects(job: JobConfig) -> list[Subject]:
    if isinstance(job.subjects, list):
        return list(job.subjects)
    subjects = load_manifest(job.subjects)
    if problem := job.class_prompts_missing(subjects):
        raise ConfigError(f"{_where(job.subjects)}: {problem}")
    return subjects


def image_uris(subject: Subject) -> list[str]:
    """The subject's image files: the listed ones, or the image files of its folder."""
    if isinstance(subject.images, list):
        return list(subject.images)
    folder = subject.images
    return [storage.join(folder, name) for name in storage.list_names(folder) if name.lower().endswith(IMAGE_SUFFIXES)]


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def too_large(exc: Exception) -> str:
    """Why Pillow refused an image as a decompression bomb, in words (shared with training.data)."""
    m = _BOMB_PIXELS.search(str(exc))
    size = f" ({int(m[1]):,} pixels, more than the {int(m[2]):,} an image may have)" if m else ""
    return f"is too large{size}: resize it"


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
    except Image.DecompressionBombError as exc:  # not an OSError: it would end the whole check
        return too_large(exc)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot be decoded ({exc})"
    return None


def _unreadable(exc: StorageError) -> str | None:
    """Why a path cannot be read, as one subject's problem (a directory, a symlink loop, no
    permission); None where every subject would fail alike (an unreachable bucket after retries,
    a missing filesystem package): that still ends the check."""
    cause = exc.__cause__
    if not isinstance(cause, OSError) or storage.is_transient(cause):
        return None
    if isinstance(cause, IsADirectoryError):
        return "is a folder, not an image file"
    return f"cannot be read ({cause.strerror or cause})"


def _folder_problem(images: str) -> str | None:
    """Why `images` names no folder at all: a missing path or a broken symbolic link."""
    path = storage.local_path(images) if storage.is_local(images) else None
    if path is not None and path.is_symlink() and not path.exists():
        return f"image folder {images} is a broken symbolic link (a loop, or its target is missing)"
    if not storage.exists(images):
        return f"image folder {storage.redact(images)} does not exist"
    return None


def _is_file(uri: str) -> bool:
    """Whether uri is one file, not a folder: a listing cannot tell (a file lists as itself), so
    this is asked only when a folder seems to hold no images."""
    if storage.is_local(uri):
        return storage.local_path(uri).is_file()
    fs, path = storage._fs(uri)
    return storage.call(uri, "check", lambda: fs.isfile(path))


def check_subject(subject: Subject) -> list[str]:
    """Every problem with one subject's images (empty list: it can train). A path that cannot be
    read is this subject's problem: the other subjects are still checked."""
    images = storage.redact(str(subject.images))
    try:
        if isinstance(subject.images, str) and (problem := _folder_problem(subject.images)):
            return [problem]
        uris = image_uris(subject)
        if not uris and isinstance(subject.images, str) and _is_file(subject.images):
            return [f"images {images} is a file, not a folder: name image files in a list (images: [{images}])"]
    except StorageError as exc:
        if (why := _unreadable(exc)) is None:
            raise
        return [f"image folder {images} {why}"]
    if not uris:
        return [f"image folder {images} holds no images ({', '.join(IMAGE_SUFFIXES)})"]
    problems = []
    for uri in uris:
        try:
            why = check_image_bytes(storage.read_bytes(uri))
        except FileNotFoundError:
            why = "does not exist"
        except StorageError as exc:
            if (why := _unreadable(exc)) is None:
                raise
        if why:
            problems.append(f"{storage.redact(uri)} {why}")
    return problems


def check_subjects(subjects: list[Subject]) -> dict[str, list[str]]:
    return {s.id: problems for s in subjects if (problems := check_subject(s))}


def require_valid(subjects: list[Subject]) -> None:
    bad = check_subjects(subjects)
    if bad:
        raise InputError("some subjects cannot be trained", [f"subject {sid}: {p}" for sid, ps in bad.items() for p in ps])
