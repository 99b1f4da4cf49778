"""Scores of a subject's samples, as the DreamBooth paper defines them (launcher.quality names
them and gates on them):

    DINO    mean cosine similarity of the DINO ViT [CLS] embeddings of every (sample, real photo) pair
    CLIP-I  the same with CLIP image embeddings
    CLIP-T  mean cosine similarity of each sample's CLIP image embedding and its prompt's CLIP text
            embedding; the text is the sample prompt with the instance prompt replaced by the
            subject's class prompt (identifier removed) under eval.clip_t_text "class" (the
            default), the prompt as rendered (identifier kept) under "sample"

The evaluator models (eval.clip: a transformers CLIPModel with its tokenizer and image
processor; eval.dino: a DINO ViT or DINOv2 model with its image processor) are named in the job
and staged into the node cache like the base model; each worker loads them once.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from launcher import storage
from launcher.config import EvalConfig, ModelConfig, Subject
from training.components import resolve_model_path

log = logging.getLogger(__name__)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over every pair (row of a, row of b): DINO and CLIP-I."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a @ b.T).mean())


def mean_matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity of row i of a with row i of b: CLIP-T (sample i, prompt i)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a.shape[0]} images against {b.shape[0]} texts")
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor in some transformers versions, a model output in others."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


@dataclass
class Evaluators:
    """The loaded evaluator models (either may be None: that score is not computed)."""

    clip: tuple | None  # (CLIPModel, tokenizer, image processor)
    dino: tuple | None  # (model, image processor)
    device: torch.device

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        model, _, processor = self.clip
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        model, tokenizer, _ = self.clip
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        model, processor = self.dino
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return model(pixel_values=pixels).last_hidden_state[:, 0]  # the [CLS] token, as the paper's DINO score

    def score(self, samples: list[Image.Image], photos: list[Image.Image], texts: list[str]) -> dict[str, float]:
        """{dino, clip_i, clip_t} of these samples against the real photos and their prompts."""
        out: dict[str, float] = {}
        if self.dino is not None:
            out["dino"] = mean_pairwise_cosine(self.dino_images(samples), self.dino_images(photos))
        if self.clip is not None:
            sample_emb = self.clip_images(samples)
            out["clip_i"] = mean_pairwise_cosine(sample_emb, self.clip_images(photos))
            out["clip_t"] = mean_matched_cosine(sample_emb, self.clip_texts(texts))
        return {k: round(v, 6) for k, v in out.items()}


def load_evaluators(cfg: EvalConfig, model_cfg: ModelConfig, device: torch.device) -> Evaluators | None:
    """The job's evaluator models, staged like the base model (into model.cache_dir), in eval mode."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    if not cfg.enabled:
        return None
    common = {"revision": cfg.revision} if cfg.revision else {}
    clip = dino = None
    if cfg.clip:
        path = resolve_model_path(model_cfg, cfg.clip)
        model = CLIPModel.from_pretrained(path, **common).to(device).eval().requires_grad_(False)
        clip = (model, AutoTokenizer.from_pretrained(path, **common), AutoImageProcessor.from_pretrained(path, **common))
        log.info("CLIP evaluator from %s", storage.redact(cfg.clip))
    if cfg.dino:
        path = resolve_model_path(model_cfg, cfg.dino)
        model = AutoModel.from_pretrained(path, **common).to(device).eval().requires_grad_(False)
        dino = (model, AutoImageProcessor.from_pretrained(path, **common))
        log.info("DINO evaluator from %s", storage.redact(cfg.dino))
    return Evaluators(clip, dino, device)


def read_image(uri: str) -> Image.Image:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        return img.convert("RGB")


def clip_t_texts(cfg: EvalConfig, subject: Subject, prompts: list[str]) -> list[str]:
    """The texts CLIP-T compares the samples with (the module docstring): one per sample prompt."""
    if cfg.clip_t_text == "class" and subject.class_prompt:
        return [p.replace("{instance}", subject.class_prompt) for p in prompts]
    return [p.replace("{instance}", subject.instance_prompt) for p in prompts]


def score_paths(ev: Evaluators, samples: list[Path], photos: list[Image.Image], texts: list[str]) -> dict[str, float]:
    images = []
    for path in samples:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return ev.score(images, photos, texts)
