"""Flux.1 (dev, schnell): a DiT trained with flow matching.

The transformer sees the latent as a sequence of 2x2 patches (16 channels -> 64 per token) with
their (0, row, column) position ids, and the prompt as the T5 encoder's hidden states (with
all-zero text ids) plus CLIP's pooled output; a guidance-distilled transformer (dev:
`config.guidance_embeds`) also takes the guidance value, `train.guidance` in training, as in
diffusers' reference trainer. `predict` packs and unpacks, so the loops keep [B, C, H, W] latents.

Flow matching: a training time s in (0, 1] mixes latents and noise, noisy = (1 - s) x + s noise,
and the target is the velocity noise - x. s is drawn from the scheduler's own training table
(uniformly, or by a logit-normal density: `train.weighting_scheme`), which applies the
scheduler's static `shift` (a dynamically shifted scheduler, dev's, trains unshifted, as the
reference does). Timesteps are carried as s x 1000, the scale the pipeline feeds the
transformer (timestep / 1000). The loss weight of both schemes is 1, the loops' plain MSE.

The T5 encoder stays frozen (an adapter on text_encoder_2 is refused at validate); CLIP may
take an adapter.
"""

from __future__ import annotations

import torch

from training.families import flux_kohya, sd

TIMESTEP_SCALE = 1000.0  # FluxPipeline calls the transformer with timestep / 1000

TRANSFORMER_TARGETS = {
    # the image stream's attention of the double blocks and the single blocks' attention: what
    # diffusers' reference trainer adapts by default
    "minimal": ["to_q", "to_k", "to_v", "to_out.0"],
    # plus the text stream's attention, both streams' MLPs, and the single blocks' MLP input and
    # fused output projection (proj_out also names the final projection)
    "comprehensive": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                      "proj_out"],
}


def training_sigmas(config) -> torch.Tensor:
    """The flow-matching scheduler's training table of s, from 1 down to 1/N, as
    FlowMatchEulerDiscreteScheduler builds it before any set_timesteps (static shift applied)."""
    n = config.num_train_timesteps
    sigmas = torch.linspace(1, n, n, dtype=torch.float64).flip(0) / n
    if not config.use_dynamic_shifting:
        shift = config.shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.float()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: the transformer's tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, back to [B, C, H, W]."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, column) per 2x2 patch of an H x W latent (FluxPipeline._prepare_latent_image_ids)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class Flux:
    name = "flux"
    denoiser = "transformer"
    parts = {"transformer": "diffusers:FluxTransformer2DModel", "text_encoder": "transformers:CLIPTextModel",
             "text_encoder_2": "transformers:T5EncoderModel"}
    tokenizers = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    tokenizer_classes = {"text_encoder": "transformers:CLIPTokenizer", "text_encoder_2": "transformers:T5TokenizerFast"}
    scheduler = "diffusers:FlowMatchEulerDiscreteScheduler"
    # ComfyUI, Forge and diffusers' Flux converter read lora_unet_ keys in BFL's own module naming
    # (double_blocks_N_img_attn_qkv: q, k, v fused), not flattened diffusers paths: flux_kohya maps them
    kohya_prefix = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    kohya_names = {"transformer": (flux_kohya.to_bfl, flux_kohya.from_bfl)}
    quantized_blocks = ("transformer_blocks", "single_transformer_blocks")  # model.quantize: int8 | nf4
    free_after_caching = ("text_encoder_2",)  # T5 (4.7B parameters), once every prompt's conditioning is cached

    def __init__(self, guidance: float = 3.5, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        self.guidance = guidance
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def configure(self, train) -> "Flux":
        """This family with the job's settings (train.guidance, train.weighting_scheme, ...)."""
        return Flux(train.guidance, train.weighting_scheme, train.logit_mean, train.logit_std)

    def targets(self, part: str) -> dict[str, list[str]]:
        return TRANSFORMER_TARGETS if part == self.denoiser else sd.TEXT_ENCODER_TARGETS

    def tokenize(self, tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
        t5 = tokenizers["text_encoder_2"]
        length = min(512, t5.model_max_length)  # FluxPipeline's max_sequence_length is at most 512
        return {"text_encoder": sd.tokenize(tokenizers["text_encoder"], prompts),
                "text_encoder_2": t5(prompts, padding="max_length", max_length=length, truncation=True,
                                     return_tensors="pt").input_ids}

    def encode(self, text_encoders: dict, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clip, t5 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
        pooled = clip(ids["text_encoder"].to(clip.device), output_hidden_states=False).pooler_output
        sequence = t5(ids["text_encoder_2"].to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": sequence, "pooled_projections": pooled}

    def image_conditioning(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        b, _, h, w = noisy.shape
        text = conditioning["encoder_hidden_states"]
        guidance = None
        if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # DDP wraps the transformer as .module
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=pack(noisy), timestep=timesteps / TIMESTEP_SCALE, guidance=guidance,
                       pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                       img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def draw_timesteps(self, scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
        on = {"generator": generator, "device": generator.device}
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (n,), **on))
        else:
            u = torch.rand(n, **on)
        sigmas = training_sigmas(scheduler.config).to(generator.device)
        index = (u * len(sigmas)).long().clamp(max=len(sigmas) - 1)
        return sigmas[index] * TIMESTEP_SCALE

    def noisy_and_target(self, scheduler, latents, noise, timesteps):
        s = (timesteps / TIMESTEP_SCALE).to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        return (1 - s) * latents + s * noise, noise - latents

    def pipeline(self, c):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=c.noise_scheduler, vae=c.vae, text_encoder=c.text_encoders["text_encoder"],
                            tokenizer=c.tokenizers["text_encoder"], text_encoder_2=c.text_encoders["text_encoder_2"],
                            tokenizer_2=c.tokenizers["text_encoder_2"], transformer=c.denoiser)

    def sampler(self, config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def vae_dtype(self, frozen: torch.dtype, separate_vae: bool) -> torch.dtype:
        return frozen


FAMILY = Flux()
