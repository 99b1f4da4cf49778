"""Render a job as a Slurm batch script: pure text from the config and the plan.

One srun task per node starts one torchrun agent; the agents meet in a c10d rendezvous on the
allocation's first node at a port derived from the job id. The batch shell traps the
checkpoint signal (`--signal=B:USR1@grace`), tells the workers to checkpoint (SIGTERM to the
step; they exit 75 after checkpointing), and requeues the job up to `max_requeues` times. SIGTERM
to the batch shell means stop (scancel, a preemption that cancels, the time limit): the workers,
which Slurm signals too, checkpoint and exit, and the job is not requeued.
Subject shards become an array job; the array index reaches the worker as SLURM_ARRAY_TASK_ID.

Everything a user wrote is shell-quoted; no credential is ever written into the script.
"""

from __future__ import annotations

import shlex

from launcher.config import JobConfig, SlurmConfig
from launcher.plan import Plan, index_ranges
from launcher.render import AGENT_MODULE

q = shlex.quote


def sbatch_options(job: JobConfig, plan: Plan) -> list[str]:
    s: SlurmConfig = job.cluster.slurm
    log = s.log_dir.rstrip("/")
    pattern = "%x-%A_%a" if plan.is_array else "%x-%j"
    opts = [f"--job-name={job.name}", f"--nodes={plan.nnodes}", "--ntasks-per-node=1", f"--time={s.time}",
            f"--output={log}/{pattern}.out", f"--error={log}/{pattern}.err", "--open-mode=append",
            "--requeue", f"--signal=B:USR1@{s.signal_grace_s}"]
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("cpus-per-task", s.cpus_per_task), ("mem", s.mem), ("constraint", s.constraint),
                        ("gres", s.gres)):
        if value is not None:
            opts.append(f"--{flag}={value}")
    if s.gpus_per_node and not s.gres:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.exclusive:
        opts.append("--exclusive")
    if plan.is_array:
        throttle = f"%{s.array_throttle}" if s.array_throttle else ""
        shards = index_ranges(plan.run_shards) if plan.run_shards is not None else f"0-{plan.num_shards - 1}"
        opts.append(f"--array={shards}{throttle}")
    opts += list(s.extra)
    return opts


def torchrun_command(job: JobConfig, plan: Plan, job_file: str) -> list[str]:
    """The per-node command; $MASTER_ADDR/$MASTER_PORT/$SLURM_JOB_ID expand on the node."""
    return ["python", "-m", AGENT_MODULE, f"--nnodes={plan.nnodes}",
            f"--nproc-per-node={plan.nproc_per_node}", "--rdzv-backend=c10d",
            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
            "-m", "training.worker", "--job", q(job_file)]


def _container_prefix(job: JobConfig, env_names: list[str], job_file: str) -> list[str]:
    s = job.cluster.slurm
    image = q(job.cluster.image)
    job_dir = job_file.rsplit("/", 1)[0] or "/"
    mounts = list(s.mounts) + [f"{job_dir}:{job_dir}:ro"]  # the resolved job file, at the same path
    if s.runtime == "pyxis":
        return [f"--container-image={image}", "--no-container-mount-home",
                f"--container-mounts={q(','.join(mounts))}"]  # srun options, not a wrapper command
    if s.runtime == "apptainer":
        binds = [f"--bind {q(m)}" for m in mounts]
        return ["apptainer", "exec", "--nv", *binds, image]
    if s.runtime in ("podman", "docker"):
        engine = s.runtime
        gpus = ["--device", "nvidia.com/gpu=all"] if engine == "podman" else ["--gpus", "all"]
        gpus = gpus if s.gpus_per_node or s.gres else []
        volumes = [f"-v {q(m)}" for m in mounts]
        passenv = [f"-e {name}" for name in env_names]
        return [engine, "run", "--rm", "--network=host", "--ipc=host", *gpus, *volumes, *passenv,
                "--entrypoint", "python", image]
    return []


# Environment the workers need from the batch shell (names only: values are read on the node).
PASSED_ENV = ["MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
              "DREAMFLEET_NUM_SHARDS", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG"]


def render_sbatch(job: JobConfig, plan: Plan, job_file: str) -> str:
    """The batch script. `job_file` is the resolved job file's path as seen on the nodes."""
    s = job.cluster.slurm
    env_names = PASSED_ENV + sorted(k for k in plan.env if k not in PASSED_ENV)
    lines = ["#!/bin/bash", f"# dreamfleet job {job.name}: rendered by `launcher render --backend slurm`; do not edit,",
             "# re-render from the job file instead."]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(job, plan)]
    lines += ["", "set -euo pipefail", ""]
    lines += [f"export {k}={q(v)}" for k, v in sorted(plan.env.items())]
    lines += [
        f"export DREAMFLEET_JOB_FILE={q(job_file)}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, (s.cpus_per_task or plan.nproc_per_node) // plan.nproc_per_node)}}}",
        "",
        "# rendezvous on the first node of the allocation, at a port derived from the job id",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'MASTER_ADDR=$(scontrol show node "$first_node" -o | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')',
        'export MASTER_ADDR=${MASTER_ADDR:-$first_node}',
        "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        "",
    ]
    if s.runtime == "none" and s.venv:
        lines += [f"source {q(s.venv.rstrip('/') + '/bin/activate')}", ""]
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={plan.nnodes}", "--ntasks-per-node=1", "--export=ALL"]
    prefix = _container_prefix(job, env_names, job_file)
    worker = torchrun_command(job, plan, job_file)
    if s.runtime == "pyxis":
        command = srun + prefix + worker
    elif s.runtime in ("podman", "docker"):
        command = srun + prefix + worker[1:]  # the image's python is the entrypoint
    else:
        command = srun + prefix + worker
    lines += [
        "# USR1 (ahead of the time limit, or by hand): checkpoint and requeue.",
        "# TERM (scancel, a cancelling preemption): Slurm signals the workers too; they checkpoint and stop.",
        "preempted='' stopping=''",
        "on_preempt() {",
        '  echo "dreamfleet: preemption or time limit: asking workers to checkpoint" >&2',
        "  preempted=1",
        '  scancel --signal=TERM "${SLURM_JOB_ID}.0" 2>/dev/null || kill -TERM "$step_pid" 2>/dev/null || true',
        "}",
        "on_stop() {",
        '  echo "dreamfleet: SIGTERM (job cancelled): workers checkpoint and stop; not requeueing" >&2',
        "  stopping=1",
        "}",
        "trap on_preempt USR1",
        "trap on_stop TERM",
        "",
        " ".join(command) + " &",
        "step_pid=$!",
        "set +e",
        'wait "$step_pid"; rc=$?',
        'while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; rc=$?; done',
        "set -e",
        "",
        "# exit 75: a worker checkpointed on request; requeue unless the cap is reached",
        'if [ -z "$stopping" ] && { [ -n "$preempted" ] || [ "$rc" -eq 75 ]; }; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {s.max_requeues} ]; then',
        '    echo "dreamfleet: requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "  fi",
        f'  echo "dreamfleet: not requeueing: {s.max_requeues} requeue(s) already" >&2',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"
