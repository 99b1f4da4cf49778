"""Convert adapters between the PEFT folder, diffusers' LoRA file and the kohya/LyCORIS file.

    python -m training.convert IN OUT --to peft|diffusers|kohya [--model MODEL_DIR]

IN is a PEFT adapter folder (unet/ or, for Flux, transformer/, and optionally text_encoder/, text_encoder_2/), a diffusers LoRA file, or a
kohya/A1111/ComfyUI/LyCORIS single file (LoRA, LoHa, LoKr). Reading a kohya file needs the base
model (--model) because its keys flatten module paths ('.' -> '_'). OUT is a folder for --to peft
and diffusers, a .safetensors file for --to kohya.

A user mistake (a missing or unreadable IN, a file that is no adapter, an OUT of the wrong kind) is
one `error:` line on stderr and exit code 2, as the launcher's own commands do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from launcher.config import LohaSpec, LokrSpec, LoraSpec
from launcher.errors import InputError, UserError
from training import export, families, kohya
from training.tools import fail, load_part, model_family, one_line, quiet_libraries, read_adapter_part

TARGETS = ("peft", "diffusers", "kohya")
DENOISERS = {"unet", "transformer"}  # an adapter holds one of these (SD, SDXL: unet; Flux: transformer)


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
    raise InputError(f"unsupported peft adapter type {config.peft_type} ({type(config).__name__}); "
                     "convert handles LoRA, LoHa and LoKr")


def read_peft(directory: Path) -> export.TrainedAdapter:
    """A PEFT folder in either key form (PeftModel.save_pretrained's, or the bare one of older runs)."""
    parts = {}
    for part in families.PARTS:
        if (directory / part / "adapter_config.json").exists():
            config, state = read_adapter_part(directory / part)
            parts[part] = export.Part(state, config, spec_from_peft(config))
    if not set(parts) & DENOISERS:
        raise InputError(f"{directory}: no PEFT adapter (expected unet/ or transformer/adapter_config.json)")
    denoiser = next(p for p in parts if p in DENOISERS)
    return _adapter(parts, _metadata(directory / denoiser / export.PEFT_WEIGHTS))


def read_diffusers(path: Path) -> export.TrainedAdapter:
    from peft import LoraConfig

    tensors = _tensors(path)
    meta = _header_metadata(path)
    if "lora_adapter_metadata" not in meta:
        raise InputError(f"{path}: a diffusers LoRA without peft metadata; convert it with diffusers "
                         "(pipe.load_lora_weights) or pass the kohya file instead")
    configs = json.loads(meta["lora_adapter_metadata"])
    parts = {}
    for part in families.PARTS:
        state = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if state:
            cfg = {k[len(part) + 1:]: v for k, v in configs.items() if k.startswith(part + ".")}
            config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
            parts[part] = export.Part(state, config, spec_from_peft(config))
    if not set(parts) & DENOISERS:
        raise InputError(f"{path}: no unet.* or transformer.* keys")
    return _adapter(parts, _metadata(path))


def read_kohya(path: Path, model_dir: Path) -> export.TrainedAdapter:
    from training.adapters import peft_config

    tensors = kohya.drop_anchors(_tensors(path), _header_metadata(path))
    family = model_family(model_dir)
    foreign = sorted({k.split(".")[0].split("_", 2)[1] for k in tensors
                      if not k.startswith(tuple(family.kohya_prefix.values()))})
    if foreign:
        raise InputError(f"{path} has keys for parts a {family.name} model lacks (lora_{'_*, lora_'.join(foreign)}_*); "
                         "is --model the model it was trained on?")
    parts = {}
    for part, prefix in family.kohya_prefix.items():
        own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        if not own:
            continue
        if part in family.kohya_names:  # the family's own naming (Flux: BFL's) -> flattened module paths
            own = family.kohya_names[part][1](own, prefix)
        names = [n for n, _ in load_part(model_dir, part).named_modules()]
        spec = _spec_from_kohya(own, names, part)
        state = kohya.from_kohya(own, prefix, names, spec.effective_alpha, spec.rank)
        # exact module paths as targets, so peft adapts precisely the modules in the file
        spec = spec.model_copy(update={"targets": sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else
                                                          k.rsplit(".", 1)[0] for k in state})})
        parts[part] = export.Part(state, peft_config(spec, {}), spec)
    if not set(parts) & DENOISERS:
        raise InputError(f"{path}: no lora_unet_* keys")
    return _adapter(parts, {**_metadata(path), export.FAMILY_METADATA: family.name})


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


def _adapter(parts: dict[str, export.Part], metadata: dict[str, str]) -> export.TrainedAdapter:
    return export.TrainedAdapter(parts, families.of_adapter(parts, metadata), metadata)


def _keys(path: Path) -> list[str]:
    """The tensor names in a single-file adapter; what is not a safetensors file is named as such
    (safetensors' own error only says the header is too small or too large)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{path} is not a safetensors file ({one_line(exc)}); convert reads a PEFT adapter folder, "
                         "a diffusers LoRA file or a kohya/LyCORIS file") from None


def _tensors(path: Path) -> dict:
    """All tensors of the file; its header was read already, so a failure here is a truncated file."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{path} cannot be read (truncated?): {one_line(exc)}") from None


def _header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _metadata(path: Path) -> dict[str, str]:
    """The header's descriptive entries, without those the writers regenerate (peft configs, kohya's ss_*,
    the kohya writer's no-op modules)."""
    meta = _header_metadata(path)
    regenerated = ("format", "lora_adapter_metadata", kohya.ANCHORS_METADATA)
    return {k: v for k, v in meta.items() if k not in regenerated and not k.startswith("ss_")}


def read(path: Path, model_dir: Path | None = None) -> export.TrainedAdapter:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        if (path / "adapter").is_dir():
            path = path / "adapter"
        return read_peft(path)
    keys = _keys(path)
    kohya_keys = ("lora_unet_", kohya.TEXT_ENCODER_PREFIX)
    if not any(k.startswith((*kohya_keys, *(f"{part}." for part in families.PARTS))) for k in keys):
        raise InputError(f"{path} holds no adapter weights (no lora_unet_*, lora_te*_*, unet.*, text_encoder.* or "
                         "text_encoder_2.* keys)")
    if any(k.startswith(kohya_keys) for k in keys):
        if model_dir is None:
            raise InputError(f"{path} is a kohya/LyCORIS file: pass --model MODEL_DIR to map its keys")
        return read_kohya(path, Path(model_dir))
    return read_diffusers(path)


def convert(src: Path, dst: Path, to: str, model_dir: Path | None = None) -> Path:
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    adapter = read(src, model_dir)
    dst = Path(dst)
    _check_dst(adapter, dst, to)
    try:
        if to == "kohya":
            return _write_kohya(adapter, dst)
        dst.mkdir(parents=True, exist_ok=True)
        if to == "peft":
            export.write_peft(adapter, dst)
            return dst
        return export.write_diffusers(adapter, dst)
    except OSError as exc:  # no permission, no space: the user's to fix, not a bug
        raise InputError(f"cannot write {dst}: {one_line(exc)}") from None


def _check_dst(adapter: export.TrainedAdapter, dst: Path, to: str) -> None:
    """Refuse what cannot be written before anything is, so a refusal leaves no empty output behind."""
    if to == "kohya" and dst.is_dir():
        raise InputError(f"{dst} is a folder; --to kohya writes one .safetensors file")
    if to != "kohya" and dst.exists() and not dst.is_dir():
        raise InputError(f"{dst} exists and is not a folder; --to {to} writes a folder")
    specs = [part.spec for part in adapter.parts.values()]
    if to == "diffusers" and not all(isinstance(s, LoraSpec) for s in specs):  # export.write_diffusers' rule
        raise InputError("diffusers' LoRA format holds LoRA only; convert LoHa/LoKr to peft or kohya")


def _write_kohya(adapter: export.TrainedAdapter, dst: Path) -> Path:
    """Written beside dst and renamed into place, so a failure never leaves a truncated file under dst's name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    try:
        kohya.write_kohya(adapter, partial)
        partial.replace(dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--to", required=True, choices=TARGETS)
    parser.add_argument("--model", type=Path, default=None, help="base model dir (needed to read kohya files)")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        print(convert(args.src, args.dst, args.to, args.model))
    except (UserError, ValueError) as exc:  # ValueError: kohya's and the specs' refusals of what the file holds
        fail(exc)


if __name__ == "__main__":
    main()
