"""Aspect-ratio buckets (train.buckets): each image trains at the bucket nearest its shape
instead of a square crop, so portrait and landscape photos keep their heads and feet.

A bucket is (width, height), both multiples of train.bucket_step, with an area of at most
train.resolution squared; an image goes to the bucket whose aspect ratio is nearest its own
(on a log scale, so 2:1 and 1:2 are equally far from square), the larger bucket on a tie. The
image is then scaled without distortion to cover the bucket and center- or random-cropped to
it (training.data.crop), so only the overhang of the nearest shape is lost.

Latents are cached per bucket and each step draws its batch from one bucket, chosen with a
probability proportional to its images (training.loop.draw_batch).
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=16)
def candidates(resolution: int, step: int) -> tuple[tuple[int, int], ...]:
    """Every (width, height) of multiples of `step` whose area is at most resolution squared."""
    area = resolution * resolution
    return tuple((w, h) for w in range(step, area // step + 1, step)
                 for h in range(step, area // w + 1, step) if w * h <= area)


def bucket_for(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """The bucket (width, height) of an image of width x height pixels."""
    aspect = math.log(width / height)
    return min(candidates(resolution, step), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def target(train):
    """The crop target of an image (training.data.load_images): its bucket, or None for the
    train.resolution square (buckets off)."""
    if not train.buckets:
        return None
    return lambda w, h: bucket_for(w, h, train.resolution, train.bucket_step)


def group(shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Indices of equal shapes, the groups in the order of their shapes (deterministic)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    return [by_shape[s] for s in sorted(by_shape)]


def draw(sizes: list[int], generator: torch.Generator) -> int:
    """A bucket's index, with a probability proportional to its rows; the only draw that reads a
    number back from the device (its shape decides the step's tensors). One bucket draws nothing,
    so a run without buckets consumes the generator exactly as before."""
    if len(sizes) == 1:
        return 0
    row = torch.randint(sum(sizes), (1,), generator=generator, device=generator.device)
    bounds = torch.tensor(sizes, device=generator.device).cumsum(0)
    return int((row >= bounds).sum())
