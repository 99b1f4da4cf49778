"""Subjects manifests: a JSONL or CSV file (gzipped or not) of subject rows, read into Subjects.

`load_manifest(uri)` reports every bad line at once, each with its row number, in the Subject's
own keys; a manifest that is not text, not valid gzip, empty or with no subjects is refused by name.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from typing import Any

from pydantic import ValidationError

from launcher import storage
from launcher.config import Subject, _format_errors
from launcher.errors import ConfigError, StorageError

ROW_KEYS = "id, images, instance_prompt"  # the keys every manifest row needs
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def where(uri: str) -> str:
    return f"subjects manifest {storage.redact(uri)}"


def _read_manifest(uri: str) -> bytes:
    """The manifest's bytes; a missing file, a directory or no name at all is the user's mistake."""
    if not uri.strip():
        raise ConfigError(f"subjects manifest {uri!r} is empty: name a JSONL or CSV file, or list the subjects inline")
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"{where(uri)} does not exist") from None
    except StorageError as exc:
        if isinstance(exc.__cause__, IsADirectoryError):
            raise ConfigError(f"{where(uri)} is a directory: name a JSONL or CSV file") from None
        raise


def _manifest_text(uri: str, data: bytes) -> str:
    """The manifest's text: gunzipped when compressed (`.gz`), UTF-8 with or without a byte-order
    mark (spreadsheets write one at the start of a CSV export)."""
    if uri.lower().endswith(".gz") or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConfigError(f"{where(uri)} is not valid gzip: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        hint = "it is UTF-16: save it as UTF-8" if utf16 else "is it a text file?"
        raise ConfigError(f"{where(uri)} is not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start} ({hint})") from None


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
            if isinstance(row.get("captions"), str):
                row["captions"], problem = _csv_captions(row["captions"])
                if problem:
                    problems.append(f"row {n}: captions: {problem}")
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


def _csv_captions(cell: str) -> tuple[Any, str | None]:
    """A CSV `captions` cell: a JSON object of image file name -> caption; (value, problem)."""
    try:
        value = json.loads(cell)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None, f"{_short(cell)} is not a JSON object of image name -> caption"
    if not isinstance(value, dict):
        return None, f"must be a JSON object of image name -> caption, got {JSON_TYPES.get(type(value), '?')}"
    return value, None


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
                      f"learning_rate, captions), got {JSON_TYPES.get(type(row), type(row).__name__)}"]
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
        raise ConfigError(f"{where(uri)} is empty")
    rows, problems = _parse_manifest(uri, text)
    subjects, seen = [], set()
    from launcher.secrets import MANIFEST_ROW, find_credentials

    for label, row in rows:
        subject, row_problems = _row_problems(row)
        problems += [f"{label}: {p}" for p in row_problems]
        problems += [f"{label}: {p.lstrip('.')}" for p in find_credentials(row, MANIFEST_ROW)]
        if subject is None:
            continue
        if subject.id in seen:
            problems.append(f"{label}: duplicate subject id {subject.id!r}")
        seen.add(subject.id)
        subjects.append(subject)
    if problems:
        raise ConfigError(f"{where(uri)} is invalid", problems)
    if not subjects:
        raise ConfigError(f"{where(uri)} lists no subjects")
    return subjects
