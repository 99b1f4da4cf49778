"""Which model family a diffusers-layout model belongs to, from its own files (no torch).

A family is what the worker's code for it (training/families/) needs the model to hold: its
component subfolders and the pipeline class it saves as. Detection reads `model_index.json`
(`_class_name`) and the denoiser's `config.json`, never the model's name; `model.family`
overrides it where the files cannot be read before a download (a Hub repo id). A layout that
no family matches is refused with what was found and the families supported, so that
`launcher validate` stops it before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    components: tuple[str, ...]  # subfolders the worker loads
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s of this family


LAYOUTS = {
    "sd": Layout("sd", "Stable Diffusion 1.x/2.x", ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                 ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")),
    "sdxl": Layout("sdxl", "Stable Diffusion XL",
                   ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
                   ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                    "StableDiffusionXLInpaintPipeline")),
    "flux": Layout("flux", "Flux.1",
                   ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
                   ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")),
}
# the target names whose modules have a place in Flux's kohya/ComfyUI file (BFL's naming,
# training/families/flux_kohya.py); LoRA only there
FLUX_KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                      "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "x_embedder", "context_embedder",
                      "linear_1", "linear_2", "norm_out.linear")
DENOISER_CLASSES = {"FluxTransformer2DModel": "flux"}  # transformer/config.json `_class_name` -> family
SUPPORTED = ", ".join(f"{layout.name} ({layout.title})" for layout in LAYOUTS.values())


class UnknownFamily(ValueError):
    """The model's files match no supported family; the message says what was found."""


def detect(present: set[str], model_index: dict | None, unet_config: dict | None,
           transformer_config: dict | None = None) -> str:
    """The family name of a model folder holding the subfolders `present`, given its
    model_index.json, unet/config.json and transformer/config.json (None where absent)."""
    pipeline = (model_index or {}).get("_class_name")
    for layout in LAYOUTS.values():
        if pipeline in layout.pipelines:
            return layout.name
    if (transformer_config or {}).get("_class_name") in DENOISER_CLASSES:
        return DENOISER_CLASSES[transformer_config["_class_name"]]
    if unet_config is not None:
        # no (known) pipeline class: the UNet tells SDXL (pooled text + size conditioning) from SD
        return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"
    found = f"a {pipeline}" if pipeline else "a model"
    denoiser = "transformer/" if "transformer" in present else "no unet/"
    if transformer_config and transformer_config.get("_class_name"):
        denoiser = f"a {transformer_config['_class_name']} in transformer/"
    raise UnknownFamily(f"{found} with {denoiser} ({', '.join(sorted(present)) or 'no subfolders'}) is not a "
                        f"supported family; supported: {SUPPORTED}")


def check(name: str, present: set[str], unet_config: dict | None) -> list[str]:
    """Problems with a model of family `name` (detected or named by model.family)."""
    layout = LAYOUTS[name]
    missing = [c for c in layout.components if c not in present]
    if missing:
        return [f"lacks the component subfolder(s) {', '.join(missing)} (a {layout.title} model in the diffusers "
                f"layout has {', '.join(layout.components)})"]
    text_time = (unet_config or {}).get("addition_embed_type") == "text_time"
    if name in ("sd", "sdxl") and unet_config is not None and text_time != (name == "sdxl"):
        what = "has" if text_time else "lacks"
        return [f"is named model.family {name} but its UNet {what} SDXL's text_time conditioning "
                f"(addition_embed_type {unet_config.get('addition_embed_type')!r})"]
    return []
