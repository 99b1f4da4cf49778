"""Versions of dreamfleet and its training stack, for `launcher version` and bug reports."""

from __future__ import annotations

import platform
from importlib import metadata

from launcher import __version__

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "fsspec")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    out = {"dreamfleet": __version__, "python": platform.python_version()}
    out.update({name: _version(name) for name in PACKAGES})
    try:
        import torch

        out["cuda"] = torch.version.cuda or "none (CPU build)"
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        out["cuda"] = "unknown (torch not importable)"
    return out
