"""Stable Diffusion 1.x/2.x: one CLIP text encoder whose last hidden states condition the UNet
through cross-attention; epsilon or v-prediction (SD 2.x 768) from the scheduler's config."""

from __future__ import annotations

import torch

from training.families import ddpm

UNET_TARGETS = {
    "minimal": ["to_q", "to_v", "query", "value"],
    "comprehensive": ["to_q", "to_k", "to_v", "proj", "proj_in", "proj_out", "conv", "conv1", "conv2",
                      "conv_shortcut", "to_out.0", "time_emb_proj", "ff.net.2"],
}
TEXT_ENCODER_TARGETS = {
    "minimal": ["q_proj", "v_proj"],
    "comprehensive": ["fc1", "fc2", "q_proj", "k_proj", "v_proj", "out_proj"],
}


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class StableDiffusion:
    name = "sd"
    denoiser = "unet"
    parts = {"unet": "diffusers:UNet2DConditionModel", "text_encoder": "transformers:CLIPTextModel"}
    tokenizers = {"text_encoder": "tokenizer"}
    tokenizer_classes = {"text_encoder": "transformers:CLIPTokenizer"}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_names: dict = {}  # flattened module paths, as kohya.to_kohya writes them
    quantized_blocks: tuple[str, ...] = ()  # model.quantize is refused at validate
    free_after_caching: tuple[str, ...] = ()  # the text encoders stay loaded
    scheduler = "diffusers:DDPMScheduler"
    draw_timesteps = staticmethod(ddpm.draw_timesteps)
    noisy_and_target = staticmethod(ddpm.noisy_and_target)
    sampler = staticmethod(ddpm.sampler)

    def configure(self, train):
        return self  # reads no job setting

    def targets(self, part: str) -> dict[str, list[str]]:
        return UNET_TARGETS if part == self.denoiser else TEXT_ENCODER_TARGETS

    def tokenize(self, tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"text_encoder": tokenize(tokenizers["text_encoder"], prompts)}

    def encode(self, text_encoders: dict, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = text_encoders["text_encoder"]
        return {"encoder_hidden_states": encoder(ids["text_encoder"].to(encoder.device))[0]}

    def image_conditioning(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        return denoiser(noisy, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample

    def pipeline(self, c):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            unet=c.denoiser, vae=c.vae, text_encoder=c.text_encoders["text_encoder"],
            tokenizer=c.tokenizers["text_encoder"], scheduler=c.noise_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def vae_dtype(self, frozen: torch.dtype, separate_vae: bool) -> torch.dtype:
        return frozen


FAMILY = StableDiffusion()
