"""Prior-preservation class images: generated once per distinct set, stored, and reused.

A set is keyed by (class prompt, model, resolution, count, seed, sampler steps, guidance) and
lives under `<store>/<key>/` with a manifest written last; every subject of that class, and
later jobs, reuse it. Generation runs before adapters are attached (the frozen base model) and
before any collective, so no rank waits inside one while another generates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from launcher import storage
from launcher.config import PriorConfig
from training.components import Components
from training.sampling import generate

log = logging.getLogger(__name__)


def prior_key(class_prompt: str, model: str, resolution: int, prior: PriorConfig, seed: int) -> str:
    ident = {"prompt": class_prompt, "model": model, "resolution": resolution, "count": prior.num_class_images,
             "seed": seed, "steps": prior.sample_steps, "guidance": prior.guidance_scale}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{digest}"


def prior_uri(store: str, key: str) -> str:
    return storage.join(store, key)


def ensure_class_images(c: Components, class_prompt: str, model: str, resolution: int, prior: PriorConfig,
                        seed: int, store: str) -> tuple[list[str], bool]:
    """URIs of the class images, generating and publishing the set if it is not complete yet.
    Returns (uris, generated_now)."""
    key = prior_key(class_prompt, model, resolution, prior, seed)
    uri = prior_uri(store, key)
    manifest = storage.read_json(storage.join(uri, storage.MANIFEST))
    generated = False
    if manifest is None:
        log.info("generating %d class images for %r (%s)", prior.num_class_images, class_prompt, key)
        with tempfile.TemporaryDirectory(prefix="dreamfleet-prior-") as tmp:
            tmp_path = Path(tmp)
            images = generate(c, [class_prompt] * prior.num_class_images, resolution, prior.sample_steps,
                              prior.guidance_scale, seed)
            for i, img in enumerate(images):
                img.save(tmp_path / f"{i:05d}.png")
            (tmp_path / "prompt.txt").write_text(class_prompt + "\n")
            manifest = storage.publish_dir(tmp_path, uri, extra={"class_prompt": class_prompt, "key": key})
        generated = True
    else:
        log.info("reusing %d class images for %r (%s)", len(manifest["files"]) - 1, class_prompt, key)
    names = sorted(n for n in manifest["files"] if n.endswith(".png"))
    return [storage.join(uri, n) for n in names], generated
