"""Backends: the only code that runs sbatch, squeue, kubectl or torchrun.

Each backend module offers `render(job, subjects, out_dir) -> list[Path]` (pure files, via
launcher.render) and `submit(job, subjects, out_dir, dry_run) -> str`, plus `status`, `logs`
and `cancel` where the scheduler has them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from launcher.errors import ConfigError

BACKENDS = ("local", "slurm", "kubernetes")


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"launcher.backends.{name}")
