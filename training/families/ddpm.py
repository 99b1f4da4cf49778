"""The DDPM training objective that the UNet families (SD 1.x/2.x, SDXL) share: timesteps drawn
uniformly over the scheduler's training steps, latents noised by the scheduler, and the target
the model was trained to predict (`prediction_type`: epsilon, or v-prediction as in SD 2.x 768).
A flow-matching family has its own pair of functions instead."""

from __future__ import annotations

import torch


def draw_timesteps(scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=generator.device)


def noisy_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    if kind == "epsilon":
        return noisy, noise
    raise ValueError(f"the model's scheduler predicts {kind!r}; training supports epsilon and v_prediction")


def sampler(config):
    """DDIM over the model's scheduler config, for class images and samples (PNDM, SD's default,
    fails at very few steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)
