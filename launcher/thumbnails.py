"""Small JPEG thumbnails as data URIs, for the fleet report (launcher.report).

The worker writes a subject's thumbnails once, when it publishes (samples/thumbnails.json:
photos, samples and, with eval.base_model, the base model's samples), so that the report of a
5,000-subject fleet reads one small file per subject instead of every image.

    {"photos": ["data:image/jpeg;base64,...", ...], "samples": [...], "base": [...]}
"""

from __future__ import annotations

import base64
import io

from PIL import Image

FILE = "thumbnails.json"  # in a subject's samples/ folder
SIDE = 64  # pixels: small enough for 5,000 subjects in one page, large enough to recognise a subject
MAX_IMAGES = 4  # of each kind


def data_uri(image: Image.Image, side: int = SIDE, quality: int = 70) -> str:
    """A square-cropped JPEG of `side` pixels, as a data: URI."""
    img = image.convert("RGB")
    w, h = img.size
    edge = min(w, h)
    img = img.crop(((w - edge) // 2, (h - edge) // 2, (w - edge) // 2 + edge, (h - edge) // 2 + edge))
    img = img.resize((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def from_bytes(data: bytes, side: int = SIDE) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return data_uri(img, side)


def make(photos: list[Image.Image], samples: list[Image.Image], base: list[Image.Image] | None = None) -> dict:
    """The thumbnails.json record of one subject."""
    record = {"photos": [data_uri(i) for i in photos[:MAX_IMAGES]], "samples": [data_uri(i) for i in samples[:MAX_IMAGES]]}
    if base:
        record["base"] = [data_uri(i) for i in base[:MAX_IMAGES]]
    return record
