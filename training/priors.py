"""Prior-preservation class images: generated once per distinct set, stored, and reused.

A set is keyed by (class prompt, model, resolution, count, seed, sampler steps, guidance) and
lives under `<store>/<key>/` with a manifest written last; every subject of that class, and
later jobs, reuse it. Generation runs before adapters are attached (the frozen base model) and
before any collective, so no rank waits inside one while another generates.

Workers that need the same missing set race for a lock, a claim in `<store>/<key>.claims/`
(launcher.ledger's protocol): one generates, refreshing its claim as a heartbeat, and the
others wait for the manifest. A lock whose heartbeat is older than `stale_after_s` (a dead
generator) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

from launcher import ledger, storage
from launcher.config import ModelConfig, PriorConfig
from training.components import Components
from training.lease import Heartbeat
from training.sampling import generate

log = logging.getLogger(__name__)


def model_id(model: ModelConfig) -> str:
    """What identifies the generating model in a set's key: its source, and a separate VAE (which
    changes every image) when the job names one."""
    return model.source if model.vae is None else f"{model.source} (vae {model.vae})"


def prior_key(class_prompt: str, model: str, resolution: int, prior: PriorConfig, seed: int) -> str:
    ident = {"prompt": class_prompt, "model": model, "resolution": resolution, "count": prior.num_class_images,
             "seed": seed, "steps": prior.sample_steps, "guidance": prior.guidance_scale}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{digest}"


def prior_uri(store: str, key: str) -> str:
    return storage.join(store, key)


def ensure_class_images(c: Components, class_prompt: str, model: str, resolution: int, prior: PriorConfig,
                        seed: int, store: str, owner: str = "", stale_after_s: float = 600,
                        poll_s: float = 2.0) -> tuple[list[str], bool]:
    """URIs of the class images, generating and publishing the set if no worker has yet.
    Returns (uris, generated_here)."""
    key = prior_key(class_prompt, model, resolution, prior, seed)
    uri = prior_uri(store, key)
    claims = storage.join(store, f"{key}.claims")
    owner = owner or ledger.worker_name()
    generated, waited = False, False
    while (manifest := storage.read_json(storage.join(uri, storage.MANIFEST))) is None:
        latest = ledger.latest_claim(claims)
        if latest is None or time.time() - latest.at > stale_after_s:
            claim = ledger.try_claim(claims, (latest.seq if latest else 0) + 1, owner)
            if claim is not None:
                if latest is not None:
                    log.warning("taking over class-image generation for %r from %s (no heartbeat for %.0fs)",
                                class_prompt, latest.owner, time.time() - latest.at)
                _generate(c, class_prompt, resolution, prior, seed, uri, key, claims, claim, stale_after_s)
                generated = True
                continue
        if not waited:
            log.info("waiting for %s to generate the class images for %r (%s)",
                     latest.owner if latest else "another worker", class_prompt, key)
            waited = True
        time.sleep(poll_s)
    if not generated:
        log.info("reusing %d class images for %r (%s)", len(manifest["files"]) - 1, class_prompt, key)
    names = sorted(n for n in manifest["files"] if n.endswith(".png"))
    return [storage.join(uri, n) for n in names], generated


def _generate(c: Components, class_prompt: str, resolution: int, prior: PriorConfig, seed: int, uri: str, key: str,
              claims: str, claim: ledger.Claim, stale_after_s: float) -> None:
    log.info("generating %d class images for %r (%s)", prior.num_class_images, class_prompt, key)
    heartbeat = Heartbeat(lambda: ledger.refresh_claim(claims, claim), max(1.0, stale_after_s / 4),
                          f"class-image lock heartbeat of {key}")
    with heartbeat:
        with tempfile.TemporaryDirectory(prefix="dreamfleet-prior-") as tmp:
            tmp_path = Path(tmp)
            images = generate(c, [class_prompt] * prior.num_class_images, resolution, prior.sample_steps,
                              prior.guidance_scale, seed)
            for i, img in enumerate(images):
                img.save(tmp_path / f"{i:05d}.png")
            (tmp_path / "prompt.txt").write_text(class_prompt + "\n")
            storage.publish_dir(tmp_path, uri, extra={"class_prompt": class_prompt, "key": key,
                                                      "generated_by": claim.owner})
