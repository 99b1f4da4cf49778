"""Backends: the only code that runs sbatch, squeue, kubectl or torchrun.

Each backend module offers `render(job, subjects, out_dir) -> list[Path]` (pure files, via
launcher.render) and `submit(job, subjects, out_dir, dry_run) -> str`, plus `status`, `logs`
and `cancel` where the scheduler has them.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from launcher.config import JobConfig, Subject, dump_job
from launcher.errors import ConfigError, UserError
from launcher.plan import PLAN_FILE, ShardPlan, shard_plan

log = logging.getLogger(__name__)

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


def gather_shard_plan(job: JobConfig, subjects: list[Subject]) -> ShardPlan:
    """The shard plan with what only the storage knows: each subject's image count (listed in
    parallel) and the placements of an earlier submit of this job (its plan.json in the output).
    What cannot be read is left out with a warning: the plan then balances by steps alone."""
    from launcher import storage
    from launcher.subjects import image_uris

    previous = None
    try:
        text = storage.read_text(storage.join(job.job_uri, PLAN_FILE))
        previous = ShardPlan.from_json(text)
    except FileNotFoundError:
        pass
    except (UserError, ValueError, KeyError) as exc:
        log.warning("cannot read the earlier shard plan (%s); placing every subject afresh", exc)

    def count(subject: Subject) -> int | None:
        try:
            return len(image_uris(subject))
        except (UserError, OSError):
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = dict(zip((s.id for s in subjects), pool.map(count, subjects)))
    unknown = [sid for sid, n in counts.items() if n is None]
    if unknown:
        log.warning("cannot list the images of %d subject(s) (%s); balancing them by steps",
                    len(unknown), ", ".join(unknown[:5]))
    return shard_plan(job, subjects, {k: v for k, v in counts.items() if v is not None}, previous)


def write_job_files(job: JobConfig, subjects: list[Subject], out_dir: Path,
                    plan: ShardPlan | None = None) -> tuple[Path, Path]:
    """The resolved job file and the shard plan beside it (the worker reads both)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan or shard_plan(job, subjects, {})  # without storage: balanced by steps
    job_file = (out_dir / "job.yaml").absolute()
    job_file.write_text(dump_job(job))
    plan_file = out_dir.absolute() / PLAN_FILE
    plan_file.write_text(plan.to_json())
    return job_file, plan_file
