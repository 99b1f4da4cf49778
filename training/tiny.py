"""Tiny, randomly initialised diffusion models and synthetic subjects, for trials and tests.

The weights are random: a model built here trains and samples through exactly the code path of
a real checkpoint of its family, in seconds on a CPU, but its images are noise. Nothing is
downloaded.

    python -m training.tiny model DIR            # SD 1.x layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    python -m training.tiny model DIR --family sdxl   # SDXL layout: + text_encoder_2/ tokenizer_2/
    python -m training.tiny model DIR --shape sd2     # SD 2.x-like UNet (linear projections, 3 blocks), v-prediction
    python -m training.tiny model DIR --family flux   # Flux.1 layout: transformer/ vae/ text_encoder/ (CLIP) text_encoder_2/ (T5)
    python -m training.tiny subjects DIR --count 3 --images 4
    python -m training.tiny sd15 DIR             # SD 1.5 layer sizes, random weights (GPU benchmarks)
    python -m training.tiny sdxl DIR             # SDXL layer sizes, random weights (GPU benchmarks)
    python -m training.tiny flux DIR             # FLUX.1-dev layer sizes (2-layer T5), bf16 random weights (GPU)
    python -m training.tiny clip DIR             # a CLIP evaluator (eval.clip)
    python -m training.tiny dino DIR             # a DINOv2 evaluator (eval.dino)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

TINY_RESOLUTION = 64


def _write_byte_level_tokenizer(directory: Path) -> None:
    """A CLIP tokenizer whose vocabulary is the 256 byte-level symbols (+ '</w>' forms)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


# Shapes: the tiny test model, and SD 1.5's own (for GPU speed and memory measurements).
SHAPES = {
    "tiny": {
        "unet": dict(sample_size=TINY_RESOLUTION // 2, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        "vae": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                    sample_size=TINY_RESOLUTION),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4),
    },
    # SD 2.x's UNet traits: linear projections in the transformers, a head count per block, three
    # blocks, a wider text encoder (v-prediction is set by the builder)
    "sd2": {
        "unet": dict(sample_size=TINY_RESOLUTION // 2, block_out_channels=(32, 64, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                     norm_num_groups=8),
        "vae": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                    sample_size=TINY_RESOLUTION),
        "text": dict(hidden_size=64, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4),
    },
    "sd15": {
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                    sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
}


def build_tiny_model(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon", shape: str = "tiny") -> Path:
    """Save a random-weight SD pipeline in the diffusers layout; returns the directory.
    shape="sd15" gives SD 1.5's layer sizes (860M-parameter UNet) for GPU measurements."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    directory = Path(directory)
    torch.manual_seed(seed)
    sizes = SHAPES[shape]
    unet = UNet2DConditionModel(**sizes["unet"])
    vae = AutoencoderKL(**sizes["vae"])
    tokenizer = _tokenizer(directory / "tokenizer")
    text_encoder = CLIPTextModel(_text_config(tokenizer, sizes["text"]))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


# SDXL: the UNet takes both encoders' hidden states (cross_attention_dim = their widths' sum) and,
# through its text_time embedding, the pooled projection plus six size ids
# (projection_class_embeddings_input_dim = 6 x addition_time_embed_dim + projection_dim)
SDXL_SHAPES = {
    "tiny": {
        "unet": dict(sample_size=TINY_RESOLUTION // 2, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
        "vae": SHAPES["tiny"]["vae"],
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4),
        "text_2": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                       projection_dim=32),
    },
    "sdxl": {
        "unet": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                     use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        "vae": dict(SHAPES["sd15"]["vae"], sample_size=1024, scaling_factor=0.13025),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       projection_dim=1280, hidden_act="gelu"),
    },
}


def _tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    _write_byte_level_tokenizer(directory)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def _text_config(tokenizer, sizes: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def build_tiny_sdxl(directory: str | Path, seed: int = 0, shape: str = "tiny") -> Path:
    """Save a random-weight SDXL pipeline in the diffusers layout; returns the directory.
    shape="sdxl" gives SDXL base's layer sizes (2.6B-parameter UNet) for GPU measurements."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    torch.manual_seed(seed)
    sizes = SDXL_SHAPES[shape]
    tokenizer, tokenizer_2 = _tokenizer(directory / "tokenizer"), _tokenizer(directory / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**sizes["vae"]),
        text_encoder=CLIPTextModel(_text_config(tokenizer, sizes["text"])),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, sizes["text_2"])),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=UNet2DConditionModel(**sizes["unet"]),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False)
    pipe.save_pretrained(directory)
    return directory


# Flux.1: a transformer over 2x2 patches of a 16-channel latent (in_channels = 16 x 4), conditioned
# on the T5 sequence (joint_attention_dim = T5's width) and CLIP's pooled output
# (pooled_projection_dim = CLIP's width); guidance-embedded like FLUX.1-dev. The VAE has Flux's
# shift and scaling factors and no quant convs; the scheduler shifts dynamically, as dev's does.
FLUX_TINY = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(2, 2, 4)),
    "vae": dict(SHAPES["tiny"]["vae"], latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                use_quant_conv=False, use_post_quant_conv=False),
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    "t5_max_length": 32,
}


# FLUX.1-dev's layer sizes (an 11.9B-parameter transformer: 19 double and 38 single blocks of width 3072,
# its 16-channel VAE, CLIP ViT-L), random weights, for GPU speed and memory measurements. The T5
# encoder has T5-XXL's width (4096, what the transformer reads) but 2 of its 24 layers: it runs once
# per prompt and is freed after caching, so its depth does not enter the training step, and a
# full one would be 19 GB of random weights to write.
FLUX_REAL = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, norm_num_groups=32,
                sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                use_post_quant_conv=False),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu"),
    "t5_max_length": 512,
}
FLUX_SHAPES = {"tiny": FLUX_TINY, "flux": FLUX_REAL}


def _t5_tokenizer(max_length: int):
    """A T5 tokenizer made on the fly: a Unigram model (what T5's sentencepiece model is) over
    letters, digits and a little punctuation, with T5's special tokens, as T5TokenizerFast."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + ".,!?'-_"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)


def build_tiny_flux(directory: str | Path, seed: int = 0, shape: str = "tiny") -> Path:
    """Save a random-weight Flux.1 pipeline in the diffusers layout (tiny: one double- and one
    single-stream block; shape="flux": FLUX.1-dev's layer sizes, in bf16, for GPU measurements);
    returns the directory."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    directory = Path(directory)
    torch.manual_seed(seed)
    sizes = FLUX_SHAPES[shape]
    if shape != "tiny":  # built in bf16: 24 GB of transformer weights instead of 48
        torch.set_default_dtype(torch.bfloat16)
    tokenizer = _tokenizer(directory / "tokenizer")
    tokenizer_2 = _t5_tokenizer(sizes["t5_max_length"])
    t5 = T5Config(vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id,
                  eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, **sizes["t5"])
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=AutoencoderKL(**sizes["vae"]), text_encoder=CLIPTextModel(_text_config(tokenizer, sizes["text"])),
        tokenizer=tokenizer, text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**sizes["transformer"]))
    torch.set_default_dtype(torch.float32)
    pipe.save_pretrained(directory)
    return directory


# Evaluator models (training.scores): a CLIP and a DINOv2 ViT over 32 px images in 8 px patches
EVAL_TINY = {
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    "vision": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8),
    "projection_dim": 16,
}


def build_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a random-weight CLIPModel with its tokenizer and image processor (the layout
    eval.clip names); returns the directory."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # the vocabulary files; save_pretrained writes the tokenizer's own
        tokenizer = _tokenizer(Path(tmp))
    text = _text_config(tokenizer, EVAL_TINY["text"]).to_dict()
    config = CLIPConfig(text_config=text, vision_config=EVAL_TINY["vision"], projection_dim=EVAL_TINY["projection_dim"])
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    side = EVAL_TINY["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(directory)
    return directory


def build_tiny_dino(directory: str | Path, seed: int = 0) -> Path:
    """Save a random-weight DINOv2 ViT with its image processor (the layout eval.dino names)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = Path(directory)
    torch.manual_seed(seed)
    v = EVAL_TINY["vision"]
    config = Dinov2Config(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                          num_attention_heads=v["num_attention_heads"], mlp_ratio=1, image_size=v["image_size"],
                          patch_size=v["patch_size"])
    Dinov2Model(config).save_pretrained(directory)
    side = v["image_size"]
    BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory


PALETTE = [(220, 60, 60), (60, 160, 80), (60, 90, 220), (230, 180, 40), (160, 70, 200), (40, 190, 200)]


def write_subject_images(directory: str | Path, index: int, count: int = 4, size: int = TINY_RESOLUTION) -> Path:
    """Synthetic photos of one 'subject': a coloured shape at random places on a plain ground."""
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(index)
    colour = PALETTE[index % len(PALETTE)]
    for i in range(count):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(180, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        r = rng.randrange(size // 6, size // 3)
        cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if index % 2 == 0 else draw.rectangle)(box, fill=colour)
        img.save(directory / f"{i:03d}.png")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="build a tiny random-weight SD model")
    m.add_argument("directory")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="default: epsilon; v_prediction for --shape sd2")
    m.add_argument("--family", default="sd", choices=["sd", "sdxl", "flux"])
    m.add_argument("--shape", default="tiny", choices=["tiny", "sd2"], help="the SD UNet's shape (--family sd)")
    big = sub.add_parser("sd15", help="build an SD 1.5-shaped random-weight model (for GPU benchmarks)")
    big.add_argument("directory")
    xl = sub.add_parser("sdxl", help="build an SDXL-shaped random-weight model (for GPU benchmarks)")
    xl.add_argument("directory")
    fx = sub.add_parser("flux", help="build a FLUX.1-shaped random-weight model (for GPU benchmarks; 24 GB)")
    fx.add_argument("directory")
    for name, what in (("clip", "CLIP"), ("dino", "DINOv2")):
        sub.add_parser(name, help=f"build a tiny random-weight {what} evaluator (eval.{name})").add_argument("directory")
    s = sub.add_parser("subjects", help="write synthetic subject image folders")
    s.add_argument("directory")
    s.add_argument("--count", type=int, default=3)
    s.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    if args.what == "model" and args.family == "flux":
        print(build_tiny_flux(args.directory, seed=args.seed))
    elif args.what == "model" and args.family == "sdxl":
        print(build_tiny_sdxl(args.directory, seed=args.seed))
    elif args.what == "model":
        kind = args.prediction_type or ("v_prediction" if args.shape == "sd2" else "epsilon")
        print(build_tiny_model(args.directory, seed=args.seed, prediction_type=kind, shape=args.shape))
    elif args.what == "sd15":
        print(build_tiny_model(args.directory, shape="sd15"))
    elif args.what == "sdxl":
        print(build_tiny_sdxl(args.directory, shape="sdxl"))
    elif args.what == "flux":
        print(build_tiny_flux(args.directory, shape="flux"))
    elif args.what == "clip":
        print(build_tiny_clip(args.directory))
    elif args.what == "dino":
        print(build_tiny_dino(args.directory))
    else:
        for i in range(args.count):
            print(write_subject_images(Path(args.directory) / f"subject-{i}", i, args.images))


if __name__ == "__main__":
    main()
