"""Per-image captions and the training prompt built from them (torch-free: the worker and the
data check both read captions through here).

An image's caption comes from the subject's `captions` map (keyed by the image's file name, or
its path/URI as listed), else from a sidecar text file beside it (`photo.jpg` -> `photo.txt`,
the convention of kohya sd-scripts and its peers). `train.prompt_template` turns the subject's
instance prompt and an image's caption into that image's training prompt; the default
"{instance}" is the instance prompt alone, and then no caption is read at all.
"""

from __future__ import annotations

import string

from launcher import storage
from launcher.errors import InputError

PLACEHOLDERS = ("instance", "caption")
CAPTION_SUFFIX = ".txt"


def template_problem(template: str) -> str | None:
    """Why a prompt template cannot be used (None: it can)."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"is not a valid template ({exc}); write literal braces as '{{{{' and '}}}}'"
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        return (f"has the unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; the placeholders are "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    if "instance" not in fields and "caption" not in fields:
        return "must use {instance}, {caption} or both"
    return None


def uses_caption(template: str) -> bool:
    return any(f == "caption" for _, f, _, _ in string.Formatter().parse(template))


def render(template: str, instance: str, caption: str | None) -> str:
    return template.format(instance=instance, caption=caption or "")


def sidecar(uri: str) -> str:
    """The caption file beside an image: its name with the suffix replaced by .txt."""
    head, sep, name = uri.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}{sep}{stem}{CAPTION_SUFFIX}"


def decode_caption(data: bytes, name: str) -> str:
    """A caption file's text on one line (UTF-8, with or without a byte-order mark; line breaks
    become spaces)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"caption file {name} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                         f"{exc.start}): save it as UTF-8") from None
    return " ".join(text.split())


def mapped(captions: dict[str, str], uri: str) -> str | None:
    """An image's caption in a subject's `captions` map: keyed by its path/URI or its file name."""
    if uri in captions:
        return captions[uri]
    return captions.get(uri.rstrip("/").rsplit("/", 1)[-1])


def captions_for(subject, uris: list[str], listed: set[str] | None = None) -> dict[str, str | None]:
    """{image uri: caption or None} for the subject's images. `listed`: the names in the images'
    folder when the caller listed it (a sidecar absent from it is not asked for)."""
    out: dict[str, str | None] = {}
    for uri in uris:
        caption = mapped(subject.captions, uri) if subject.captions else None
        if caption is None:
            path = sidecar(uri)
            if listed is None or path.rsplit("/", 1)[-1] in listed:
                try:
                    caption = decode_caption(storage.read_bytes(path), storage.redact(path))
                except FileNotFoundError:
                    caption = None
        out[uri] = caption.strip() if caption and caption.strip() else None
    return out


def orphans(subject, uris: list[str], listed: set[str] | None) -> list[str]:
    """Captions that name no image the subject trains on: caption files in its folder without an
    image of the same stem, and keys of its `captions` map that match none of its images."""
    found = []
    if listed is not None:
        stems = {u.rsplit("/", 1)[-1].rsplit(".", 1)[0] for u in uris}
        found += [f"caption file {name} has no image beside it" for name in sorted(listed)
                  if name.lower().endswith(CAPTION_SUFFIX) and name[: -len(CAPTION_SUFFIX)] not in stems]
    if subject.captions:
        names = {u.rsplit("/", 1)[-1] for u in uris} | set(uris)
        found += [f"captions: {key!r} names no image of the subject" for key in sorted(subject.captions) if key not in names]
    return found
