"""Bake a PEFT adapter (LoRA, LoHa, LoKr) into the denoiser and text encoder weights (SD, SDXL, Flux).

    python -m training.merge MODEL_DIR ADAPTER_DIR OUT_DIR

MODEL_DIR is a diffusers pipeline directory; ADAPTER_DIR is a run's `adapter/` folder (unet/, or
transformer/ for Flux, and optionally text_encoder/ and, for SDXL, text_encoder_2/ in PEFT format). OUT_DIR receives a full
diffusers pipeline whose adapted parts carry the merged weights; every other component is copied
unchanged.

A user mistake (missing or corrupt model or adapter, an adapter that does not fit the model, a
non-empty OUT_DIR) is one `error:` line on stderr and exit code 2, as the launcher's own commands do.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from launcher.errors import InputError, UserError
from training import families
from training.tools import check_model, fail, load_part, one_line, quiet_libraries, read_adapter_part

ADAPTER_NAME = "default"


def adapter_parts(adapter_dir: Path) -> list[str]:
    """The parts the adapter folder holds (the denoiser first); an adapter without a unet/ or transformer/
    is not one of ours."""
    if not adapter_dir.is_dir():
        raise InputError(f"adapter {adapter_dir} does not exist or is not a folder")
    parts = [p for p in families.PARTS if (adapter_dir / p / "adapter_config.json").exists()]
    if not {"unet", "transformer"} & set(parts):
        raise InputError(f"adapter {adapter_dir} holds no PEFT adapter (expected unet/ or transformer/"
                         "adapter_config.json)")
    return parts


def _attach(model: torch.nn.Module, config, state, where: str) -> None:
    """Inject the adapter and load its weights, failing when they do not fit the model: peft itself
    only warns about weights it could not place, and a merge of half an adapter looks complete."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        loaded = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # no such targets / size mismatch
        raise InputError(f"{where} does not fit this model: {one_line(exc)}") from None
    # the model's own weights are "missing" from an adapter state dict; the adapter's must not be
    missing = [k for k in loaded.missing_keys if f".{ADAPTER_NAME}." in k or k.endswith(f".{ADAPTER_NAME}")]
    for problem, keys in (("weights for no module of the model", loaded.unexpected_keys),
                          ("no weights for adapted modules", missing)):
        if keys:
            raise InputError(f"{where} does not fit this model: {len(keys)} {problem}, e.g. {keys[0]}")


def merged_model(model_dir: Path, adapter_dir: Path, part: str) -> torch.nn.Module:
    """The part with the adapter in adapter_dir/part merged into its weights (no adapter layers left)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    config, state = read_adapter_part(adapter_dir / part)
    model = load_part(model_dir, part)
    _attach(model, config, state, f"adapter {adapter_dir / part}")
    # merge in place, then put each base layer back where its wrapper was
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            try:
                module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            except ValueError as exc:  # safe_merge: the adapter's weights give NaNs
                raise InputError(f"adapter {adapter_dir / part} cannot be merged: {one_line(exc)}") from None
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty")


def _staging(out_dir: Path) -> Path:
    """An empty hidden folder beside out_dir (same filesystem, so the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as exc:
        raise InputError(f"cannot write {out_dir}: {one_line(exc)}") from None


def merge(model_dir: Path, adapter_dir: Path, out_dir: Path) -> list[str]:
    """Write the merged pipeline to out_dir; returns the parts that were merged.

    Everything is written into a folder beside out_dir that is renamed into place only when
    complete: a failure halfway (a corrupt adapter, a model it does not fit, Ctrl-C) must not leave
    an out_dir that looks like a pipeline, with the base model's weights where the merged ones belong.
    The parts are merged before the rest is copied, so an adapter that does not fit fails fast.
    """
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    parts = adapter_parts(adapter_dir)
    check_model(model_dir, parts)
    if not (model_dir / "model_index.json").is_file():
        raise InputError(f"model {model_dir} is not a diffusers pipeline folder (no model_index.json)")
    _check_out(out_dir)
    staging = _staging(out_dir)
    try:
        for part in parts:
            merged_model(model_dir, adapter_dir, part).save_pretrained(str(staging / part))
        shutil.copytree(model_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*parts))
        staging.replace(out_dir)  # an empty out_dir is replaced; a non-empty one was refused above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        parts = merge(args.model_dir, args.adapter_dir, args.out_dir)
    except UserError as exc:
        fail(exc)
    print(f"merged {', '.join(parts)} into {args.out_dir}")


if __name__ == "__main__":
    main()
