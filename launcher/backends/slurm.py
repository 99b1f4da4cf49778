"""The Slurm backend: write job.sbatch + job.yaml, run sbatch, and ask squeue/sacct/scancel.

The render directory must be visible from the compute nodes (shared storage): the script
names the resolved job file by its absolute path there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

from launcher.backends import run_tool, write_job_files
from launcher.config import JobConfig, Subject
from launcher.errors import UserError
from launcher.plan import ShardPlan, make_plan, shard_plan as pure_shard_plan, shards_with_work
from launcher.render.slurm import render_sbatch

SCRIPT = "job.sbatch"


def render(job: JobConfig, subjects: list[Subject], out_dir: Path, shard_plan: ShardPlan | None = None,
           settled: Collection[str] = ()) -> list[Path]:
    """`settled`: subjects that need no more training; an array job leaves out the shards that
    hold nothing else."""
    shard_plan = shard_plan or pure_shard_plan(job, subjects, {})
    job_file, plan_file = write_job_files(job, subjects, out_dir, shard_plan)
    run_shards = shards_with_work(shard_plan, subjects, settled) if settled else None
    script = out_dir / SCRIPT
    script.write_text(render_sbatch(job, make_plan(job, len(subjects), run_shards), str(job_file)))
    return [job_file, plan_file, script]


def _run(cmd: list[str], what: str) -> str:
    return run_tool(cmd, what, "run this on a Slurm login node (or set SLURM_CONF for a test cluster)")


def submit(job: JobConfig, subjects: list[Subject], out_dir: Path, dry_run: bool = False,
           shard_plan: ShardPlan | None = None, settled: Collection[str] = ()) -> str:
    render(job, subjects, out_dir, shard_plan, settled)
    if dry_run:
        return (out_dir / SCRIPT).read_text()
    # slurmstepd opens --output before the script runs: the log directory must already exist
    Path(job.cluster.slurm.log_dir).mkdir(parents=True, exist_ok=True)
    out = _run(["sbatch", "--parsable", str(out_dir / SCRIPT)], "sbatch")
    return out.strip().split(";")[0]


def queue(job_id: str) -> str:
    """squeue's view of a job (and its array tasks), or sacct's once it has left the queue."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%i %T %M %R"], "squeue")
    if out.strip():
        return out
    try:
        return _run(["sacct", "-n", "-X", "-j", job_id, "-o", "JobID,State,Elapsed,ExitCode"], "sacct")
    except UserError:
        return f"{job_id}: not in the queue (accounting is off, so no history)\n"


def cancel(job_id: str) -> str:
    _run(["scancel", job_id], "scancel")
    return f"cancelled {job_id}"


def cancel_job(job: JobConfig) -> str:
    """Every queued job of this user named after the job (array tasks and requeues included)."""
    ids = sorted({line.split("_")[0] for line in _run(["squeue", "-h", "--me", "-n", job.name, "-o", "%i"], "squeue").split()})
    if not ids:
        return f"no Slurm job named {job.name} in the queue\n"
    _run(["scancel", *ids], "scancel")
    return f"cancelled {', '.join(ids)} ({job.name})\n"


def logs(job: JobConfig, job_id: str | None = None, lines: int = 50) -> str:
    log_dir = Path(job.cluster.slurm.log_dir)
    pattern = f"{job.name}-{job_id or ''}*"
    files = sorted(log_dir.glob(pattern + ".out")) + sorted(log_dir.glob(pattern + ".err"))
    if not files:
        raise UserError(f"no Slurm logs matching {log_dir / pattern}.out|.err")
    chunks = []
    for path in files:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        chunks.append(f"==> {path} <==\n" + "\n".join(tail))
    return "\n".join(chunks) + "\n"
