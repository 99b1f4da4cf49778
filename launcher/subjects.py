"""Subjects: read them inline or from a JSONL/CSV manifest (launcher.manifest), list their
images, and check them.

`resolve_subjects(job)` returns the subject list; `check_subjects(subjects)` opens every image
and returns a problem list per subject id, so that all problems are reported at once.
"""

from __future__ import annotations

import logging
import re

from launcher import storage
from launcher.captions import CAPTION_SUFFIX
from launcher.config import JobConfig, Subject
from launcher.errors import ConfigError, InputError, StorageError
from launcher.manifest import load_manifest, where

log = logging.getLogger(__name__)

# the one list for folders and explicit lists alike (GIF: its first frame)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def resolve_subjects(job: JobConfig) -> list[Subject]:
    if isinstance(job.subjects, list):
        return list(job.subjects)
    subjects = load_manifest(job.subjects)
    if problem := job.class_prompts_missing(subjects):
        raise ConfigError(f"{where(job.subjects)}: {problem}")
    return subjects


def image_uris(subject: Subject, names: list[str] | None = None) -> list[str]:
    """The subject's image files: the listed ones, or the image files of its folder (`names`: its
    listing, where the caller has it)."""
    if isinstance(subject.images, list):
        return list(subject.images)
    folder = subject.images
    names = storage.list_names(folder) if names is None else names
    stems = {n.rsplit(".", 1)[0] for n in names if n.lower().endswith(IMAGE_SUFFIXES)}
    skipped = [n for n in names if not n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
               and not (n.lower().endswith(CAPTION_SUFFIX) and n[: -len(CAPTION_SUFFIX)] in stems)]  # captions
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        log.warning("subject %s: %d file(s) in %s skipped, not images (%s): %s", subject.id, len(skipped),
                    storage.redact(folder), ", ".join(IMAGE_SUFFIXES), shown)
    return [storage.join(folder, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def too_large(exc: Exception) -> str:
    """Why Pillow refused an image as a decompression bomb, in words (shared with training.data)."""
    m = _BOMB_PIXELS.search(str(exc))
    size = f" ({int(m[1]):,} pixels, more than the {int(m[2]):,} an image may have)" if m else ""
    return f"is too large{size}: resize it"


def check_image_bytes(data: bytes) -> str | None:
    """None if the bytes decode as an image, else why not."""
    from launcher.inputs_check import inspect_image

    return inspect_image(data)


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


def check_subject(subject: Subject, template: str = "{instance}") -> list[str]:
    """Every problem with one subject's images (empty list: it can train). A path that cannot be
    read is this subject's problem: the other subjects are still checked."""
    from launcher.inputs_check import check_subject as check

    return check(subject, template).problems


def check_subjects(subjects: list[Subject], template: str = "{instance}") -> dict[str, list[str]]:
    """{id: problems} of the subjects that cannot train, read concurrently (launcher.inputs_check)."""
    from launcher.inputs_check import check_inputs

    return {r.id: r.problems for r in check_inputs(subjects, template) if r.problems}


def require_valid(subjects: list[Subject]) -> None:
    bad = check_subjects(subjects)
    if bad:
        raise InputError("some subjects cannot be trained", [f"subject {sid}: {p}" for sid, ps in bad.items() for p in ps])
