"""Config -> plan: how many shards, which subjects each shard and rank trains, and the
environment each worker gets. Pure functions; the renderers and the worker both use them.

A subject's shard depends only on its id (a stable hash), so adding subjects to a manifest
never moves the ones already assigned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from launcher.config import JobConfig, Subject


def shard_of(subject_id: str, num_shards: int) -> int:
    return int(hashlib.sha256(subject_id.encode()).hexdigest()[:12], 16) % num_shards


def subjects_for_shard(subjects: list[Subject], shard_index: int, num_shards: int) -> list[Subject]:
    return [s for s in subjects if shard_of(s.id, num_shards) == shard_index]


def subjects_for_rank(subjects: list[Subject], rank: int, world_size: int, strategy: str) -> list[Subject]:
    """Subject-parallel: each rank takes a disjoint slice of the shard (balanced by steps x
    images would need the images listed; ids are dealt round-robin in sorted order).
    Data-parallel strategies: every rank works on every subject of the shard together."""
    ordered = sorted(subjects, key=lambda s: s.id)
    if strategy != "subject":
        return ordered
    return ordered[rank::world_size]


def num_shards(job: JobConfig, num_subjects: int) -> int:
    if job.cluster.shards is not None:
        return max(1, min(job.cluster.shards, num_subjects))
    return 1


@dataclass(frozen=True)
class Plan:
    job_name: str
    nnodes: int
    nproc_per_node: int
    num_shards: int
    strategy: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def is_array(self) -> bool:
        return self.num_shards > 1


def make_plan(job: JobConfig, num_subjects: int) -> Plan:
    d = job.distributed
    shards = num_shards(job, num_subjects)
    env = dict(sorted(job.cluster.env.items()))
    env["DREAMFLEET_NUM_SHARDS"] = str(shards)
    return Plan(job.name, d.nnodes, d.nproc_per_node, shards, d.strategy, env)
