"""Convert adapters between the PEFT folder, diffusers' LoRA file and the kohya/LyCORIS file.

    python -m training.convert IN OUT --to peft|diffusers|kohya [--model MODEL_DIR]

IN is a PEFT adapter folder (unet/ and optionally text_encoder/), a diffusers LoRA file, or a
kohya/A1111/ComfyUI/LyCORIS single file (LoRA, LoHa, LoKr). Reading a kohya file needs the base
model (--model) because its keys flatten module paths ('.' -> '_'). OUT is a folder for --to peft
and diffusers, a .safetensors file for --to kohya.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from launcher.config import LohaSpec, LokrSpec, LoraSpec
from training import export, kohya

TARGETS = ("peft", "diffusers", "kohya")


def spec_from_peft(config):
    """The job-file adapter spec that maps onto this peft config."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else [config.target_modules]
    if isinstance(config, LoraConfig):
        return LoraSpec(rank=config.r, alpha=config.lora_alpha, targets=targets)
    common = dict(rank=config.r, alpha=config.alpha, targets=targets, use_effective_conv2d=config.use_effective_conv2d)
    if isinstance(config, LoHaConfig):
        return LohaSpec(**common)
    if isinstance(config, LoKrConfig):
        return LokrSpec(decompose_both=config.decompose_both, decompose_factor=config.decompose_factor, **common)
    raise ValueError(f"unsupported peft config {type(config).__name__}")


def read_peft(directory: Path) -> export.TrainedAdapter:
    from peft import PeftConfig

    parts = {}
    for part in ("unet", "text_encoder"):
        if (directory / part / "adapter_config.json").exists():
            config = PeftConfig.from_pretrained(str(directory / part))
            state = load_file(str(directory / part / "adapter_model.safetensors"))
            parts[part] = (state, config, spec_from_peft(config))
    if "unet" not in parts:
        raise ValueError(f"{directory}: no PEFT adapter (expected unet/adapter_config.json)")
    return _adapter(parts, _metadata(directory / "unet" / "adapter_model.safetensors"))


def read_diffusers(path: Path) -> export.TrainedAdapter:
    from peft import LoraConfig

    tensors = load_file(str(path))
    meta = _metadata(path)
    if "lora_adapter_metadata" not in meta:
        raise ValueError(f"{path}: a diffusers LoRA without peft metadata; convert it with diffusers "
                         "(pipe.load_lora_weights) or pass the kohya file instead")
    configs = json.loads(meta["lora_adapter_metadata"])
    parts = {}
    for part in ("unet", "text_encoder"):
        state = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if state:
            cfg = {k[len(part) + 1:]: v for k, v in configs.items() if k.startswith(part + ".")}
            config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
            parts[part] = (state, config, spec_from_peft(config))
    return _adapter(parts, meta)


def read_kohya(path: Path, model_dir: Path) -> export.TrainedAdapter:
    from training.adapters import peft_config
    from training.merge import _load

    tensors = load_file(str(path))
    parts = {}
    for part in ("unet", "text_encoder"):
        own = {k: v for k, v in tensors.items() if k.startswith(kohya.PREFIX[part])}
        if not own:
            continue
        names = [n for n, _ in _load(model_dir, part).named_modules()]
        spec = _spec_from_kohya(own, names, part)
        state = kohya.from_kohya(own, part, names, spec.effective_alpha, spec.rank)
        # exact module paths as targets, so peft adapts precisely the modules in the file
        spec = spec.model_copy(update={"targets": sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else
                                                          k.rsplit(".", 1)[0] for k in state})})
        parts[part] = (state, peft_config(spec, {}), spec)
    if "unet" not in parts:
        raise ValueError(f"{path}: no lora_unet_* keys")
    return _adapter(parts, _metadata(path))


def _spec_from_kohya(tensors, names, part):
    factors = {k.partition(".")[2] for k in tensors}
    ranks = [kohya._module_rank({f: v}) for k, v in tensors.items() for f in [k.partition(".")[2]]
             if f in ("lora_down.weight", "hada_w1_b", "lokr_w1_a", "lokr_w2_a")]
    rank = max(ranks) if ranks else 1
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    alpha = alphas[0] if alphas else float(rank)
    if "lora_down.weight" in factors:
        return LoraSpec(rank=rank, alpha=alpha, targets=["placeholder"])
    tucker = bool(factors & {"hada_t1", "lokr_t2"})
    if "hada_w1_a" in factors:
        return LohaSpec(rank=rank, alpha=alpha, targets=["placeholder"], use_effective_conv2d=tucker)
    if factors & {"lokr_w1", "lokr_w1_a"}:
        return LokrSpec(rank=rank, alpha=alpha, targets=["placeholder"], use_effective_conv2d=tucker,
                        decompose_both="lokr_w1_a" in factors)
    raise ValueError(f"unrecognised {part} adapter keys: {sorted(factors)[:5]}")


def _adapter(parts, metadata) -> export.TrainedAdapter:
    state, config, spec = parts["unet"]
    adapter = export.TrainedAdapter(unet=state, unet_config=config, unet_spec=spec, metadata=metadata)
    if "text_encoder" in parts:
        adapter.text_encoder, adapter.text_encoder_config, adapter.text_encoder_spec = parts["text_encoder"]
    return adapter


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return {k: v for k, v in meta.items() if k not in ("format", "lora_adapter_metadata") and not k.startswith("ss_")}


def read(path: Path, model_dir: Path | None = None) -> export.TrainedAdapter:
    path = Path(path)
    if path.is_dir():
        if (path / "adapter").is_dir():
            path = path / "adapter"
        return read_peft(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in keys):
        if model_dir is None:
            raise ValueError(f"{path} is a kohya/LyCORIS file: pass --model MODEL_DIR to map its keys")
        return read_kohya(path, Path(model_dir))
    return read_diffusers(path)


def convert(src: Path, dst: Path, to: str, model_dir: Path | None = None) -> Path:
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    adapter = read(src, model_dir)
    dst = Path(dst)
    if to == "kohya":
        dst.parent.mkdir(parents=True, exist_ok=True)
        return kohya.write_kohya(adapter, dst)
    dst.mkdir(parents=True, exist_ok=True)
    if to == "peft":
        export.write_peft(adapter, dst)
        return dst
    path = export.write_diffusers(adapter, dst)
    if path is None:
        raise ValueError("diffusers' LoRA format holds LoRA only; convert LoHa/LoKr to peft or kohya")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--to", required=True, choices=TARGETS)
    parser.add_argument("--model", type=Path, default=None, help="base model dir (needed to read kohya files)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.to, args.model))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
