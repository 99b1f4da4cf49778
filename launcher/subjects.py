"""Subjects: read them inline or from a JSONL/CSV manifest (launcher.manifest), and list their
images.

`resolve_subjects(job)` returns the subject list, `image_uris(subject)` a subject's image files;
checking them is launcher.inputs_check's.
"""

from __future__ import annotations

import logging

from launcher import storage
from launcher.captions import CAPTION_SUFFIX
from launcher.config import JobConfig, Subject
from launcher.errors import ConfigError
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
