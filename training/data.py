"""Instance and class images: decode, orient, resize, crop, and encode once to cached latents.

Images come from any URI. RGBA is composited on white, grayscale and palette images are
converted to RGB, and EXIF orientation is applied, so phone photos train the right way up.
Latents are cached as the VAE's distribution (mean, std) and sampled each step, so the VAE
never runs in the training step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from launcher import storage
from launcher.config import TrainConfig
from launcher.errors import InputError
from launcher.inputs_check import too_large


def _to_8_bit(img):
    """High-depth grayscale (16-bit PNG as I;16, 32-bit I, float F) scaled into 0..255: PIL's
    own convert("RGB") clips them, so a 16-bit photo would train as an almost white image."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    import numpy as np
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if img.mode.startswith("I;16") or 255 < peak <= 65535:
        values = values / 257.0
    elif img.mode == "F" and peak <= 1.0:
        values = values * 255.0
    elif peak > 65535:
        values = values * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def decode_image(data: bytes, name: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image") from None
    except Image.DecompressionBombError as exc:  # not an OSError: it would end the worker, not fail the subject
        raise InputError(f"{name} {too_large(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name} cannot be decoded ({exc})") from None
    img = ImageOps.exif_transpose(img)
    img = _to_8_bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(ground, rgba)
    return img.convert("RGB")


@dataclass(frozen=True)
class Crop:
    """Where an image's training crop came from: SDXL conditions on it (its size ids)."""

    original: tuple[int, int]  # (height, width) of the decoded image
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target: tuple[int, int]  # (height, width) of the crop: train.resolution square, or the image's bucket
    resized_width: int

    def mirrored(self) -> "Crop":
        """The same crop of the image mirrored left to right (random_flip's second copy)."""
        top, left = self.top_left
        return Crop(self.original, (top, self.resized_width - left - self.target[1]), self.target, self.resized_width)

    def ids(self) -> list[float]:
        """(original h, w, crop top, left, target h, w): SDXL's add_time_ids."""
        return [*map(float, self.original), *map(float, self.top_left), *map(float, self.target)]


def to_tensor(img, resolution: int, center_crop: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], shortest side resized, square-cropped."""
    return crop(img, resolution, center_crop, generator)[0]


def crop(img, target: int | tuple[int, int], center_crop: bool, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, Crop]:
    """The training crop of an image as a tensor in [-1, 1], and where it came from. `target`: the
    square's side, or (width, height) of a bucket; the image is scaled, without distortion, to
    cover it and then cropped to it."""
    from PIL import Image

    width, height = (target, target) if isinstance(target, int) else target
    w, h = img.size
    original = (h, w)
    scale = max(width / w, height / h)
    img = img.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if center_crop:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left = int(torch.randint(0, w - width + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - height + 1, (1,), generator=generator))
    img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), Crop(original, (top, left), (height, width), w)


Target = Callable[[int, int], "int | tuple[int, int]"]  # (image width, height) -> crop target


def load_images(uris: list[str], cfg: TrainConfig, generator: torch.Generator | None = None,
                source: str = "", target: Target | None = None) -> list[tuple[torch.Tensor, Crop]]:
    """Each image's training crop and where it came from, in order; `target` picks an image's
    crop (default: the train.resolution square). `source` (a folder or a list, as the job names
    it) is what an empty result names."""
    if not uris:
        from launcher.subjects import IMAGE_SUFFIXES

        where = f" in {storage.redact(source)}" if source else ""
        raise InputError(f"no images to train on{where} (image files end in {', '.join(IMAGE_SUFFIXES)})")
    out = []
    for u in uris:
        img = decode_image(storage.read_bytes(u), storage.redact(u))
        out.append(crop(img, target(*img.size) if target else cfg.resolution, cfg.center_crop, generator))
    return out


@dataclass
class LatentCache:
    """Per-image latent distribution; `sample()` draws latents scaled for the denoiser. `crops`
    holds each image's Crop.ids() (a row per cached image, mirrored copies included)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    crops: torch.Tensor
    shift_factor: float = 0.0  # the VAE's latent mean (Flux's VAE has one; SD's and SDXL's none)
    prompt: torch.Tensor | None = None  # per row: its prompt's index in the subject's prompt table

    @property
    def shape(self) -> tuple[int, ...]:
        """The latents' (channels, height, width): one bucket's, every row alike."""
        return tuple(self.mean.shape[1:])

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        index = index.to(self.mean.device)
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        latents = mean + std * noise
        if self.shift_factor:  # (z - shift) * scale, as the pipeline's decode inverts; SD/SDXL unchanged
            latents = latents - self.shift_factor
        return latents * self.scaling_factor


@torch.no_grad()
def encode_latents(vae, images: list[tuple[torch.Tensor, Crop]], device: torch.device, random_flip: bool,
                   batch: int = 8, prompt: list[int] | None = None) -> LatentCache:
    """Encode images of one shape once (and their mirror images when random_flip is on); `prompt`:
    each image's index in the prompt table (default: all the first)."""
    pixels, crops = torch.stack([t for t, _ in images]), [c for _, c in images]
    prompt = prompt if prompt is not None else [0] * len(crops)
    if random_flip:
        pixels = torch.cat([pixels, torch.flip(pixels, dims=[3])])
        crops = crops + [c.mirrored() for c in crops]
        prompt = prompt + prompt
    means, stds = [], []
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    ids = torch.tensor([c.ids() for c in crops], dtype=torch.float32, device=device)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), ids, shift,
                       torch.tensor(prompt, dtype=torch.long, device=device))
