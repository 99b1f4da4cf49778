"""Bake a PEFT adapter (LoRA, LoHa, LoKr) into the UNet and text encoder weights.

    python -m training.merge MODEL_DIR ADAPTER_DIR OUT_DIR

MODEL_DIR is a diffusers pipeline directory; ADAPTER_DIR is a run's `adapter/` folder (unet/ and
optionally text_encoder/ in PEFT format). OUT_DIR receives a full diffusers pipeline whose UNet and
text encoder carry the merged weights; every other component is copied unchanged.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

PARTS = {"unet": "diffusers:UNet2DConditionModel", "text_encoder": "transformers:CLIPTextModel"}


def _load(model_dir: Path, part: str):
    if part == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")


def merged_model(model_dir: Path, adapter_dir: Path, part: str) -> torch.nn.Module:
    """The part with the adapter in adapter_dir/part merged into its weights (no adapter layers left)."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    model = _load(model_dir, part)
    config = PeftConfig.from_pretrained(str(adapter_dir / part))
    inject_adapter_in_model(config, model, adapter_name="default")
    set_peft_model_state_dict(model, load_file(str(adapter_dir / part / "adapter_model.safetensors")),
                              adapter_name="default")
    # merge in place, then put each base layer back where its wrapper was
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True, adapter_names=["default"])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def merge(model_dir: Path, adapter_dir: Path, out_dir: Path) -> list[str]:
    """Write the merged pipeline to out_dir; returns the parts that were merged."""
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    parts = [p for p in PARTS if (adapter_dir / p / "adapter_config.json").exists()]
    if not parts:
        raise ValueError(f"{adapter_dir} holds no PEFT adapter (expected unet/adapter_config.json)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*parts))
    for part in parts:
        merged_model(model_dir, adapter_dir, part).save_pretrained(str(out_dir / part))
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    parts = merge(args.model_dir, args.adapter_dir, args.out_dir)
    print(f"merged {', '.join(parts)} into {args.out_dir}")


if __name__ == "__main__":
    main()
