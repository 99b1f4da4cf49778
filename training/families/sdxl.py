"""Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with projection).
The UNet is conditioned on the penultimate hidden states of both, concatenated, through
cross-attention, and on the pooled embedding of the second plus six size ids per image
(original height and width, crop top and left, target height and width) through its
`text_time` embedding. The size ids come from the crop that data loading really made.

SDXL's own VAE overflows in fp16: it stays fp32 where the frozen parts would be fp16, unless the
job names a separate VAE (`model.vae`, e.g. the fp16-fixed one). bf16 is safe.
"""

from __future__ import annotations

import torch

from training.families import ddpm, sd

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class StableDiffusionXL:
    name = "sdxl"
    denoiser = "unet"
    parts = {"unet": "diffusers:UNet2DConditionModel", "text_encoder": "transformers:CLIPTextModel",
             "text_encoder_2": "transformers:CLIPTextModelWithProjection"}
    tokenizers = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    tokenizer_classes = {"text_encoder": "transformers:CLIPTokenizer", "text_encoder_2": "transformers:CLIPTokenizer"}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
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
        # SDXL's UNet and both CLIP encoders use the module names of SD's (tests check each preset matches)
        return sd.UNET_TARGETS if part == self.denoiser else sd.TEXT_ENCODER_TARGETS

    def tokenize(self, tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {part: sd.tokenize(tokenizers[part], prompts) for part in TEXT_ENCODERS}

    def encode(self, text_encoders: dict, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = []
        for part in TEXT_ENCODERS:
            encoder = text_encoders[part]
            out = encoder(ids[part].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        # the second encoder's projected pooled embedding (CLIPTextModelWithProjection's text_embeds)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out[0]}

    def image_conditioning(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"time_ids": crops}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(noisy, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        added_cond_kwargs=added).sample

    def pipeline(self, c):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoders["text_encoder"], text_encoder_2=c.text_encoders["text_encoder_2"],
            tokenizer=c.tokenizers["text_encoder"], tokenizer_2=c.tokenizers["text_encoder_2"], unet=c.denoiser,
            scheduler=c.noise_scheduler, add_watermarker=False)

    def vae_dtype(self, frozen: torch.dtype, separate_vae: bool) -> torch.dtype:
        return torch.float32 if frozen == torch.float16 and not separate_vae else frozen


FAMILY = StableDiffusionXL()
