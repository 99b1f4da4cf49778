"""The local backend: torchrun on this machine, in the foreground.

`render` writes the resolved job file and the exact command; `submit` runs it and returns the
worker's exit status as text. Nothing here imports torch: torchrun runs as a child process.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Collection

from launcher.backends import write_job_files
from launcher.config import JobConfig, Subject
from launcher.plan import ShardPlan, make_plan, shard_plan as pure_shard_plan, shards_with_work
from launcher.render import AGENT_MODULE

COMMAND_FILE = "command.sh"


def worker_command(job: JobConfig, job_file: Path, python: str | None = None) -> list[str]:
    d = job.distributed
    return [python or sys.executable, "-m", AGENT_MODULE, "--standalone",
            f"--nnodes={d.nnodes}", f"--nproc-per-node={d.nproc_per_node}",
            "-m", "training.worker", "--job", str(job_file)]


def worker_env(job: JobConfig, subjects: list[Subject]) -> dict[str, str]:
    plan = make_plan(job, len(subjects))
    env = dict(plan.env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.distributed.nproc_per_node)))
    return env


def render(job: JobConfig, subjects: list[Subject], out_dir: Path, shard_plan: ShardPlan | None = None) -> list[Path]:
    job_file, plan_file = write_job_files(job, subjects, out_dir, shard_plan)
    env = worker_env(job, subjects)
    lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(shlex.join(worker_command(job, job_file, python="python")))
    script = out_dir / COMMAND_FILE
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return [job_file, plan_file, script]


def submit(job: JobConfig, subjects: list[Subject], out_dir: Path, dry_run: bool = False,
           shard_plan: ShardPlan | None = None, settled: Collection[str] = ()) -> str:
    """Run the shards one after another; those holding only `settled` subjects are not started."""
    shard_plan = shard_plan or pure_shard_plan(job, subjects, {})
    render(job, subjects, out_dir, shard_plan)
    cmd = worker_command(job, (out_dir / "job.yaml").absolute())
    if dry_run:
        return (out_dir / COMMAND_FILE).read_text()
    env = dict(os.environ, **worker_env(job, subjects))
    num_shards = int(env["DREAMFLEET_NUM_SHARDS"])
    codes = []
    run_shards = shards_with_work(shard_plan, subjects, settled) if settled else range(num_shards)
    for shard in run_shards:
        env["DREAMFLEET_SHARD_INDEX"] = str(shard)
        code, stopped = run_forwarding_signals(cmd, env)
        codes.append(code)
        if stopped:  # asked to stop: the later shards are not started
            break
    worst = max(codes, default=0)
    return f"exit {worst}"


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run the agent in a session of its own and pass it every SIGTERM/SIGINT/SIGHUP this process
    gets (the agent asks its workers to checkpoint), then wait for it: (its exit code, whether a
    signal came). In its own session, a terminal's Ctrl-C reaches the agent once, through here,
    not twice; and a launcher killed by a scheduler or a user no longer leaves it running."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got: list[int] = []

    def forward(signum, _frame) -> None:
        got.append(signum)
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = proc.wait()  # a signal handled meanwhile does not interrupt the wait (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (128 - code if code < 0 else code), bool(got)
