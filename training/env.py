"""The environment contract between the launcher and the worker: the one place that reads what
the scheduler provides (torchrun, Slurm, Kubernetes) and the preemption signal.

Everything else receives a `WorkerEnv`. Shard index, in order of precedence:
`DREAMFLEET_SHARD_INDEX` (set by the launcher), `SLURM_ARRAY_TASK_ID`, `JOB_COMPLETION_INDEX`.
The shard count comes from `DREAMFLEET_NUM_SHARDS` (default 1).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Mapping

from launcher.errors import EXIT_PREEMPTED  # noqa: F401 - the worker's "requeue me", where the loops look for it

# SIGUSR1: Slurm's warning before the time limit; SIGTERM: Kubernetes, scancel, torchrun
# shutting down; SIGINT: Ctrl-C locally (a second Ctrl-C interrupts at once).
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class WorkerEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    shard_index: int = 0
    num_shards: int = 1
    job_id: str | None = None
    restart_count: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "WorkerEnv":
        env = os.environ if environ is None else environ

        def num(*names: str, default: int) -> int:
            for name in names:
                value = env.get(name)
                if value not in (None, ""):
                    try:
                        return int(value)
                    except ValueError:
                        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
            return default

        world = num("WORLD_SIZE", default=1)
        shard = num("DREAMFLEET_SHARD_INDEX", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", default=0)
        shards = num("DREAMFLEET_NUM_SHARDS", default=1)
        if not 0 <= shard < shards:
            raise ValueError(f"shard index {shard} is outside 0..{shards - 1} (DREAMFLEET_NUM_SHARDS={shards})")
        return cls(
            rank=num("RANK", default=0),
            local_rank=num("LOCAL_RANK", default=0),
            world_size=world,
            local_world_size=num("LOCAL_WORLD_SIZE", default=world),
            node_rank=num("GROUP_RANK", "NODE_RANK", default=0),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=num("MASTER_PORT", default=29500),
            shard_index=shard,
            num_shards=shards,
            job_id=env.get("SLURM_JOB_ID") or env.get("DREAMFLEET_JOB_ID") or None,
            restart_count=num("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", default=0),
        )


class Preemption:
    """Set when the scheduler asks the worker to stop (SIGUSR1 from Slurm before the time limit,
    SIGTERM from Kubernetes or scancel). The loop checks it between steps, checkpoints and exits."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.signal = signum
        self._event.set()

    def trigger(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

