"""What the offline adapter tools (training.convert, training.merge) share: a quiet stderr, user
mistakes as one `error:` line with exit code 2 (as the launcher's own commands), and reading an
adapter part or a model part with errors that name the file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from launcher.errors import InputError


def quiet_libraries() -> None:
    """Leave stderr to the result or the error (the worker's log, the tools' one line).

    bitsandbytes (4-bit CPU kernels) and transformers (image processors without torchvision) warn at
    import about parts these tools never use, and from_pretrained draws progress bars; all of it
    landed before the one line the user needs. Runs before peft/diffusers are first imported.
    """
    for unused in ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"):
        logging.getLogger(unused).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def fail(exc: BaseException) -> NoReturn:
    """Report a user mistake the way the launcher does (one `error:` line, exit 2), not as a traceback."""
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's exception text fit for an error line: its messages span lines and can be long."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model(model_dir: Path, parts) -> None:
    """Fail on a model folder that lacks the parts; from_pretrained would take the path for a Hub
    model id instead, go to the network and fail with a paragraph that never names the folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model {model_dir} does not exist or is not a folder")
    for part in parts:
        if not (model_dir / part / "config.json").is_file():
            raise InputError(f"model {model_dir} has no {part}/config.json (not a diffusers pipeline folder?)")


def read_adapter_part(directory: Path):
    """(peft config, weights in our in-memory key form) of one part's PEFT folder (unet/ or
    text_encoder/); a corrupt or missing file is the user's to fix, so it is named rather than
    raised from deep in peft."""
    from peft import PeftConfig
    from safetensors import SafetensorError

    from training.export import PEFT_WEIGHTS, read_peft_weights

    config_file, weights_file = directory / "adapter_config.json", directory / PEFT_WEIGHTS
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{config_file} is not a valid PEFT adapter config: {one_line(exc)}") from None
    if getattr(config, "peft_type", None) is None:
        raise InputError(f"{config_file} is not a valid PEFT adapter config: it names no peft_type")
    try:
        state = read_peft_weights(weights_file)  # either key form: old outputs exist
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{weights_file} cannot be read: {one_line(exc)}") from None
    return config, state


def model_family(model_dir: Path):
    """The family (training.families) of a local model folder, from its files."""
    from training import families

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model {model_dir} does not exist or is not a folder")
    return families.for_model(None, model_dir)


def load_part(model_dir: Path, part: str):
    """The base model's part, as its family names it; a missing or corrupt folder, or a part the
    family does not have, is named in the error."""
    from training import families

    family = model_family(model_dir)
    if part not in family.parts:
        raise InputError(f"model {model_dir} is a {family.name} model without a {part}; the adapter has one "
                         "(is it the model the adapter was trained on?)")
    check_model(model_dir, [part])
    try:
        return families.class_of(family.parts[part]).from_pretrained(model_dir, subfolder=part)
    except (OSError, ValueError) as exc:  # both wrap a corrupt config.json or weights file
        raise InputError(f"model {Path(model_dir) / part} cannot be loaded: {one_line(exc)}") from None
