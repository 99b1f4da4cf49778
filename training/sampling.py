"""Image generation with the loaded components: validation samples and prior class images.

The denoiser is fp32 while the VAE and text encoders may be in half precision (training.precision),
so generation runs under autocast to the half dtype: the pipeline would otherwise feed the text
encoders' bf16/fp16 embeddings to the fp32 denoiser, and its fp32 latents to the VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from training.components import Components
from training.precision import inference_autocast


def pipeline(c: Components):
    """The family's inference pipeline over the loaded (possibly adapted) components, with the
    family's sampler (a fresh one: sampling must not change the training scheduler's state),
    no safety checker or watermark."""
    pipe = c.family.pipeline(c)
    pipe.scheduler = c.family.sampler(c.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(c: Components, prompts: list[str], resolution: int, steps: int, guidance: float, seed: int):
    """PIL images, one per prompt, each with its own seed (seed + index) so batches are stable."""
    pipe = pipeline(c)
    images = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator("cpu").manual_seed(seed + i)
        with inference_autocast(*c.models().values(), c.vae):
            out = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                       guidance_scale=guidance, generator=gen, output_type="pil")
        images.append(out.images[0])
    return images


def write_samples(c: Components, prompts: list[str], instance_prompt: str, directory: Path, resolution: int,
                  steps: int, guidance: float, seed: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    filled = [p.replace("{instance}", instance_prompt) for p in prompts]
    paths = []
    for i, img in enumerate(generate(c, filled, resolution, steps, guidance, seed)):
        path = directory / f"{i:02d}.png"
        img.save(path)
        paths.append(path)
    (directory / "prompts.txt").write_text("\n".join(filled) + "\n")
    return paths
