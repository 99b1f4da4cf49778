"""The fleet data check (`launcher validate`, docs/fleet.md): for every subject, the images it
will train on and what is wrong with them, read concurrently from any store.

Problems stop a subject from training: a missing or unreadable folder or image, an image that
does not decode, one smaller than the minimum side, and, when train.prompt_template uses
{caption}, an image without a caption or a caption file that is not text. Warnings do not: the
same image twice (by content hash: it would train twice as often), a caption without an image.

Subjects are checked `PARALLEL` at a time and each image read is one task of a shared pool of
the same size, so a subject with many images does not hold up the rest; a progress bar (or, off
a terminal, a line every tenth) goes to stderr. Torch-free: Pillow decodes.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from launcher import captions, storage
from launcher.config import Subject
from launcher.errors import InputError, StorageError
from launcher.subjects import IMAGE_SUFFIXES, image_uris

PARALLEL = 32  # subjects, and image reads, in flight at once
MIN_SIDE = 8  # pixels: below it no resolution can train an image


@dataclass
class SubjectReport:
    id: str
    images: list[str] = field(default_factory=list)  # what it trains on (credentials redacted)
    problems: list[str] = field(default_factory=list)  # each stops the subject
    warnings: list[str] = field(default_factory=list)  # worth a look; the subject still trains


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def too_large(exc: Exception) -> str:
    """Why Pillow refused an image as a decompression bomb, in words (shared with training.data)."""
    m = _BOMB_PIXELS.search(str(exc))
    size = f" ({int(m[1]):,} pixels, more than the {int(m[2]):,} an image may have)" if m else ""
    return f"is too large{size}: resize it"


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


def inspect_image(data: bytes, min_side: int = MIN_SIDE) -> str | None:
    """None if the bytes decode as an image with both sides at least `min_side`, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < min_side or img.height < min_side:
                floor = f", less than the minimum side of {min_side}" if min_side > MIN_SIDE else ""
                return f"is only {img.width}x{img.height} pixels{floor}"
    except UnidentifiedImageError:
        return "is not an image"
    except Image.DecompressionBombError as exc:  # not an OSError: it would end the whole check
        return too_large(exc)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot be decoded ({exc})"
    return None


def _read(uri: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, why the file cannot be read as one subject's problem)."""
    try:
        return storage.read_bytes(uri), None
    except FileNotFoundError:
        return None, "does not exist"
    except StorageError as exc:
        if (why := _unreadable(exc)) is None:
            raise  # every subject would fail alike (an unreachable bucket): that ends the check
        return None, why


def _image(uri: str, min_side: int) -> tuple[str | None, str | None]:
    """(problem, sha256) of one image."""
    data, why = _read(uri)
    if data is None:
        return why, None
    return inspect_image(data, min_side), hashlib.sha256(data).hexdigest()


def _caption(uri: str) -> tuple[str | None, str | None]:
    """(caption, problem) of one caption file."""
    data, why = _read(uri)
    if data is None:
        return None, None if why == "does not exist" else f"caption file {storage.redact(uri)} {why}"
    try:
        return captions.decode_caption(data, storage.redact(uri)) or None, None
    except InputError as exc:
        return None, str(exc)


def check_subject(subject: Subject, template: str = "{instance}", min_side: int = MIN_SIDE,
                  pool: Executor | None = None) -> SubjectReport:
    """Every problem and warning of one subject's images. `pool` runs the image reads (default: here)."""
    report = SubjectReport(subject.id)
    images = storage.redact(str(subject.images))
    listed = None
    try:
        names = None
        if isinstance(subject.images, str):
            # a remote folder is listed first (one request; only an empty listing asks whether it
            # exists); a local one is looked at first (a broken link lists as empty)
            names = storage.list_names(subject.images) if not storage.is_local(subject.images) else None
            if not names and (problem := _folder_problem(subject.images)):
                report.problems.append(problem)
                return report
            names = storage.list_names(subject.images) if names is None else names
            listed = set(names)
        uris = image_uris(subject, names)
        if not uris and isinstance(subject.images, str) and _is_file(subject.images):
            report.problems.append(f"images {images} is a file, not a folder: name image files in a list "
                                   f"(images: [{images}])")
            return report
    except StorageError as exc:
        if (why := _unreadable(exc)) is None:
            raise
        report.problems.append(f"image folder {images} {why}")
        return report
    if not uris:
        report.problems.append(f"image folder {images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return report
    submit = pool.submit if pool is not None else _here
    checked = [submit(_image, uri, min_side) for uri in uris]
    need_captions = captions.uses_caption(template)
    mapped = subject.captions or {}
    sidecars = {}
    if need_captions:
        for uri in uris:
            path = captions.sidecar(uri)
            known = captions.mapped(mapped, uri) is not None
            if not known and (listed is None or path.rsplit("/", 1)[-1] in listed):
                sidecars[uri] = submit(_caption, path)
    seen: dict[str, str] = {}
    for uri, future in zip(uris, checked):
        problem, digest = future.result()
        name = storage.redact(uri)
        if problem:
            report.problems.append(f"{name} {problem}")
            continue
        report.images.append(name)
        if digest in seen:
            report.warnings.append(f"{name} is the same image as {seen[digest]} (sha256 {digest[:12]}): it trains twice "
                                   "as often")
        else:
            seen[digest] = name
        if need_captions:
            if uri in sidecars:
                caption, why = sidecars[uri].result()
            else:
                caption, why = captions.mapped(mapped, uri), None
            if why:
                report.problems.append(why)
            elif not (caption and caption.strip()):
                report.problems.append(f"{name} has no caption, and train.prompt_template {template!r} needs one "
                                       f"(write {storage.redact(captions.sidecar(uri)).rsplit('/', 1)[-1]} beside it, "
                                       "or add it to the subject's captions)")
    report.warnings += captions.orphans(subject, uris, listed)
    return report


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _here(fn, *args):
    return _Done(fn(*args))


def check_inputs(subjects: list[Subject], template: str = "{instance}", min_side: int = MIN_SIDE,
                 parallel: int = PARALLEL, progress: bool = False) -> list[SubjectReport]:
    """Every subject's report, in the subjects' order; `parallel` subjects and image reads at once."""
    bar = _Progress(len(subjects)) if progress else None
    with ThreadPoolExecutor(parallel, thread_name_prefix="read") as reads, \
            ThreadPoolExecutor(parallel, thread_name_prefix="subject") as pool:
        futures = [pool.submit(check_subject, s, template, min_side, reads) for s in subjects]
        if bar:
            for f in futures:
                f.add_done_callback(lambda _: bar.advance())
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar:
                bar.close()


class _Progress:
    """Subjects checked, on stderr: a live bar on a terminal, else a line at every tenth."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.live = Progress(console=Console(stderr=True), transient=True)
            self.task = self.live.add_task("checking subjects", total=total)
            self.live.start()

    def advance(self) -> None:
        self.done += 1
        if self.live is not None:
            self.live.advance(self.task)
        elif self.total >= 10 and self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            print(f"checked {self.done}/{self.total} subject(s) ({time.perf_counter() - self.started:.1f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def check_subjects(subjects: list[Subject], template: str = "{instance}") -> dict[str, list[str]]:
    """{id: problems} of the subjects that cannot train."""
    return {r.id: r.problems for r in check_inputs(subjects, template) if r.problems}


def summary(reports: list[SubjectReport], seconds: float) -> str:
    """One line: subjects, images, how many with problems and warnings, and the time taken."""
    bad = sum(bool(r.problems) for r in reports)
    images = sum(len(r.images) for r in reports)
    problems = sum(len(r.problems) for r in reports)
    warnings = sum(len(r.warnings) for r in reports)
    return (f"checked {len(reports)} subject(s), {images} usable image(s) in {seconds:.1f} s: "
            f"{len(reports) - bad} ok, {bad} with problems ({problems} problem(s)), {warnings} warning(s)")


def as_json(reports: list[SubjectReport], seconds: float) -> dict:
    return {"summary": summary(reports, seconds), "seconds": round(seconds, 3),
            "subjects": [asdict(r) for r in reports]}
