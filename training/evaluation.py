"""A subject's samples after training: rendered, scored (training.scores), gated
(launcher.quality) and thumbnailed for the report (launcher.thumbnails), into the folder that
is then published.

    samples/00.png ...            the adapter's samples (train.samples.prompts)
    samples/base/00.png ...       the same prompts and seeds without the adapter (eval.base_model)
    samples/thumbnails.json       small thumbnails of the photos and samples, for the report
    metrics.jsonl                 + one {"step": N, "scores": {...}} line when scored

Returns the status fields (scores, flagged, flag_reasons) the worker records with `done`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from launcher import quality, thumbnails
from launcher.config import JobConfig, Subject
from launcher.subjects import image_uris
from training import adapters
from training.components import Components
from training.scores import Evaluators, clip_t_texts, read_image
from training.sampling import write_samples

log = logging.getLogger(__name__)
NOT_SCORED = {"scores": None, "flagged": False, "flag_reasons": []}


def _open(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


def samples_and_scores(c: Components, job: JobConfig, subject: Subject, final: Path, steps: int, seed: int,
                       evaluators: Evaluators | None) -> dict:
    """Render the samples into final/samples, score and gate them; the status fields."""
    s = job.train.samples
    if not (s.enabled and s.prompts):
        return dict(NOT_SCORED)
    render = dict(resolution=job.train.resolution, steps=s.num_inference_steps, guidance=s.guidance_scale, seed=seed)
    samples = _open(write_samples(c, s.prompts, subject.instance_prompt, final / "samples", **render))
    base = []
    if evaluators is not None and job.eval.base_model:
        with adapters.switched_off(*c.models().values()):
            base = _open(write_samples(c, s.prompts, subject.instance_prompt, final / "samples" / "base", **render))
    photos = [read_image(uri) for uri in image_uris(subject)]
    (final / "samples" / thumbnails.FILE).write_text(json.dumps(thumbnails.make(photos, samples, base)))
    if evaluators is None:
        return dict(NOT_SCORED)
    texts = clip_t_texts(job.eval, subject, s.prompts)
    scores: dict = evaluators.score(samples, photos, texts)
    if base:
        scores["base"] = evaluators.score(base, photos, texts)
    scores.update(clip_t_text=job.eval.clip_t_text, photos=len(photos), samples=len(samples))
    with open(final / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": steps, "scores": scores}) + "\n")
    reasons = quality.gate(scores, quality.thresholds(job.eval))
    log.info("subject %s: %s%s", subject.id, quality.format_scores(scores),
             f"; flagged for review: {'; '.join(reasons)}" if reasons else "")
    return {"scores": scores, "flagged": bool(reasons), "flag_reasons": reasons}
