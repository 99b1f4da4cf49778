"""The quality gate over a subject's scores, torch-free (the worker computes the scores,
training.scores; `launcher status` and `retry-failed` read them from the ledger).

Scores, as the DreamBooth paper defines them, each a mean cosine similarity in [-1, 1]:

    dino    subject fidelity: DINO ViT embeddings of every sample against every real photo
    clip_i  subject fidelity: CLIP image embeddings of every sample against every real photo
    clip_t  prompt fidelity: CLIP image embedding of each sample against its prompt's text embedding

A subject below any `eval.min_*` threshold is `done` but flagged for review.
"""

from __future__ import annotations

SCORES = ("dino", "clip_i", "clip_t")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def thresholds(eval_cfg) -> dict[str, float]:
    """{score: minimum} of the job's eval.min_* that are set."""
    return {name: value for name in SCORES if (value := getattr(eval_cfg, f"min_{name}")) is not None}


def gate(scores: dict | None, minimums: dict[str, float]) -> list[str]:
    """Why a subject with these scores is flagged (empty: it passes). A score that was not
    computed flags nothing: its threshold is only checked where its model is configured."""
    reasons = []
    for name in SCORES:  # in one order, whatever the order of `minimums`
        value, minimum = (scores or {}).get(name), minimums.get(name)
        if value is not None and minimum is not None and value < minimum:
            reasons.append(f"{LABELS[name]} {value:.3f} < eval.min_{name} {minimum:g}")
    return reasons


def regate(statuses: list, eval_cfg) -> None:
    """Apply the job's current thresholds to the recorded scores of done subjects, in place: a
    threshold changed after training flags (or clears) subjects without retraining them."""
    minimums = thresholds(eval_cfg)
    for s in statuses:
        if s.state == "done" and s.scores is not None:
            s.flag_reasons = gate(s.scores, minimums)
            s.flagged = bool(s.flag_reasons)


def format_scores(scores: dict | None) -> str:
    """'DINO 0.712 CLIP-I 0.801 CLIP-T 0.284' (those computed), or '-'."""
    parts = [f"{LABELS[n]} {scores[n]:.3f}" for n in SCORES if scores and scores.get(n) is not None]
    return " ".join(parts) or "-"
