"""The environment contract: one reader of what torchrun, Slurm and Kubernetes provide."""

from __future__ import annotations

import os
import signal

import pytest

from training.env import Preemption, WorkerEnv


def test_defaults_are_a_single_process():
    env = WorkerEnv.from_environ({})
    assert (env.rank, env.world_size, env.shard_index, env.num_shards) == (0, 1, 0, 1)
    assert env.is_main and not env.distributed


def test_torchrun_variables():
    env = WorkerEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                  "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29411"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (3, 1, 4, 2, 1)
    assert (env.master_addr, env.master_port) == ("n1", 29411)
    assert env.distributed and not env.is_main and not env.is_local_main


@pytest.mark.parametrize("variables, shard", [
    ({"SLURM_ARRAY_TASK_ID": "2"}, 2),
    ({"JOB_COMPLETION_INDEX": "3"}, 3),
    ({"DREAMFLEET_SHARD_INDEX": "1", "SLURM_ARRAY_TASK_ID": "2"}, 1),  # the launcher's own variable wins
])
def test_shard_index_from_each_scheduler(variables, shard):
    env = WorkerEnv.from_environ({"DREAMFLEET_NUM_SHARDS": "4", **variables})
    assert env.shard_index == shard and env.num_shards == 4


def test_slurm_job_id_and_restart_count():
    env = WorkerEnv.from_environ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"})
    assert env.job_id == "77" and env.restart_count == 2


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"DREAMFLEET_NUM_SHARDS": "2", "JOB_COMPLETION_INDEX": "2"}, "shard index 2 is outside 0..1"),
])
def test_bad_values_are_named(variables, message):
    with pytest.raises(ValueError, match=message):
        WorkerEnv.from_environ(variables)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_preemption_signals_set_the_flag(sig):
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        flag = Preemption().install()
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert flag.requested and flag.signal == sig
        if sig == signal.SIGINT:  # a second Ctrl-C does not wait for a checkpoint
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
