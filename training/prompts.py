"""A subject's training prompts: one per image (train.prompt_template over the instance prompt
and the image's caption), encoded once per distinct prompt.

`PromptTable` holds the distinct prompts' token ids and, while the text encoders are frozen,
their cached conditioning, stacked on a first dimension; a latent cache row names its prompt by
index (training.data.LatentCache.prompt). With the default template every image has the instance
prompt, the table has one row, and training is exactly as it was before captions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from launcher import captions, storage
from launcher.errors import InputError
from launcher.subjects import image_uris

log = logging.getLogger(__name__)

IDS = "ids:"  # conditioning keys holding a prompt's token ids, encoded in the forward (training text encoders)
EMPTY = ""  # the prompt a dropped caption trains with (train.caption_dropout)
ENCODE_CHUNK = 16


@dataclass
class PromptTable:
    """Distinct prompts, their token ids per text encoder (P, L) and their conditioning (P, ...)
    cached while the text encoders are frozen (None when they train: encoded every step)."""

    texts: list[str]
    ids: dict[str, torch.Tensor]
    conditioning: dict[str, torch.Tensor] | None

    def index(self, text: str) -> int:
        return self.texts.index(text)

    def rows(self, which: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning (or the token ids under "ids:<part>") of the prompts `which` names, a row each."""
        own = {IDS + k: v for k, v in self.ids.items()} if self.conditioning is None else self.conditioning
        return {k: v[which.to(v.device)].to(device) for k, v in own.items()}


@torch.no_grad()
def encode(c, texts: list[str], train_text_encoder: bool) -> PromptTable:
    ids = c.family.tokenize(c.tokenizers, texts)
    if train_text_encoder:
        return PromptTable(texts, ids, None)
    if c.prompts:  # encoded before a text encoder was freed (training.components.cache_prompts_and_free)
        missing = [t for t in texts if t not in c.prompts]
        if missing:
            raise RuntimeError(f"prompt(s) not encoded before the text encoders were freed: {missing[:3]}")
        return PromptTable(texts, ids, {k: torch.cat([c.prompts[t][k] for t in texts]) for k in c.prompts[texts[0]]})
    chunks = [c.family.encode(c.text_encoders, {k: v[i:i + ENCODE_CHUNK] for k, v in ids.items()})
              for i in range(0, len(texts), ENCODE_CHUNK)]
    return PromptTable(texts, ids, {k: torch.cat([ch[k] for ch in chunks]).float() for k in chunks[0]})


def image_prompts(subject, uris: list[str], template: str) -> list[str]:
    """Each image's training prompt. A template with {caption} needs a caption for every image:
    the images without one are named in one error."""
    if not captions.uses_caption(template):
        return [captions.render(template, subject.instance_prompt, None)] * len(uris)
    found = captions.captions_for(subject, uris, _listed(subject))
    missing = [storage.redact(u) for u, text in found.items() if text is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"train.prompt_template {template!r} needs a caption for every image; {len(missing)} image(s) "
                         f"have none (a .txt file beside the image, or the subject's captions): {shown}")
    return [captions.render(template, subject.instance_prompt, found[u]) for u in uris]


def job_prompts(subjects, template: str, caption_dropout: float, class_prompts: bool) -> set[str]:
    """Every prompt a worker's subjects train on, for encoding them all before a text encoder is
    freed. A subject whose images or captions cannot be read here is left out: its own
    preparation reports that, and fails that subject alone, before it asks for a prompt."""
    texts = {EMPTY} if caption_dropout else set()
    for subject in subjects:
        if class_prompts:
            texts.add(subject.class_prompt)
        if not captions.uses_caption(template):
            texts.add(captions.render(template, subject.instance_prompt, None))
            continue
        try:
            texts.update(image_prompts(subject, image_uris(subject), template))
        except (InputError, OSError) as e:
            log.debug("subject %s: prompts not cached up front (%s)", subject.id, e)
    return texts


def _listed(subject) -> set[str] | None:
    """The names in the subject's image folder (a listed image list: None, sidecars are asked for)."""
    if isinstance(subject.images, list):
        return None
    return set(storage.list_names(subject.images))


def overlong(c, table: PromptTable, prompts: list[str], uris: list[str]) -> list[tuple[str, int]]:
    """(image, tokens dropped) for every image whose prompt is longer than a text encoder's window
    (the family's tokenization cuts it there)."""
    windows = {part: ids.shape[-1] for part, ids in table.ids.items()}
    dropped: dict[str, int] = {}
    for text in table.texts:
        counts = [len(c.tokenizers[part](text, truncation=False, verbose=False)["input_ids"]) - window
                  for part, window in windows.items() if part in c.tokenizers]
        dropped[text] = max([0, *counts])
    return [(storage.redact(u), dropped[p]) for u, p in zip(uris, prompts) if dropped.get(p, 0) > 0]


def report_overlong(subject_id: str, cut: list[tuple[str, int]]) -> None:
    """One warning per subject naming the images whose prompts are cut, and by how much."""
    if not cut:
        return
    shown = ", ".join(f"{name} ({n} token(s) dropped)" for name, n in cut[:5])
    more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
    log.warning("subject %s: %d image prompt(s) are longer than the text encoder's window and are cut: %s%s",
                subject_id, len(cut), shown, more)
