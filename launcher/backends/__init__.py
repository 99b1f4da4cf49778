"""Backends: the only code that runs sbatch, squeue, kubectl or torchrun.

Each backend module offers `render(job, subjects, out_dir) -> list[Path]` (pure files, via
launcher.render) and `submit(job, subjects, out_dir, dry_run) -> str`, plus `status`, `logs`
and `cancel` where the scheduler has them.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from types import ModuleType

from launcher.errors import ConfigError, UserError

BACKENDS = ("local", "slurm", "kubernetes")


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"launcher.backends.{name}")


def run_tool(cmd: list[str], what: str, missing: str) -> str:
    """Run a scheduler client (sbatch, squeue, kubectl, ...); its stdout, or a UserError
    carrying its own message. `missing` says what to do when the program is not installed."""
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]} is not on PATH: {missing}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"{what} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout
