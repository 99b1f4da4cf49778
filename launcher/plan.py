"""Config -> plan: how many shards, which subjects each shard and rank trains, and the
environment each worker gets.

The shard plan balances work: a subject's work is estimated in UNet steps (its steps, doubled
with prior preservation, plus one per image to encode), and subjects are dealt largest first to
the least-loaded shard. The plan is a file (`plan.json`) rendered beside the job file and kept
in the job's output: a later submit of the same job keeps every subject it already placed where
it was (so adding subjects to a manifest never moves the others) and places only the new ones.
A subject the plan does not know (a manifest grown after rendering) falls back to a stable hash
of its id, which every worker computes alike. Within a shard, subject-parallel ranks get
disjoint, work-balanced sets the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Collection

from launcher.config import JobConfig, Subject

PLAN_FILE = "plan.json"


def shard_of(subject_id: str, num_shards: int) -> int:
    return int(hashlib.sha256(subject_id.encode()).hexdigest()[:12], 16) % num_shards


def subject_work(job: JobConfig, subject: Subject, num_images: int) -> int:
    """Estimated cost of one subject in UNet steps."""
    steps = subject.steps or job.train.steps
    return steps * (2 if job.prior.enabled else 1) + num_images


def deal(work: dict[str, float], bins: int, placed: dict[str, int] | None = None) -> dict[str, int]:
    """Largest first onto the least-loaded bin (ties: lowest id, lowest bin); `placed` stay put."""
    load = [0.0] * bins
    out: dict[str, int] = {}
    for sid, b in (placed or {}).items():
        if sid in work and 0 <= b < bins:
            out[sid] = b
            load[b] += work[sid]
    for sid in sorted((s for s in work if s not in out), key=lambda s: (-work[s], s)):
        b = min(range(bins), key=lambda i: (load[i], i))
        out[sid] = b
        load[b] += work[sid]
    return out


@dataclass(frozen=True)
class ShardPlan:
    num_shards: int
    shards: dict[str, int]
    work: dict[str, int]

    def shard(self, subject_id: str) -> int:
        found = self.shards.get(subject_id)
        return found if found is not None else shard_of(subject_id, self.num_shards)

    def load(self) -> list[int]:
        totals = [0] * self.num_shards
        for sid, b in self.shards.items():
            totals[b] += self.work.get(sid, 0)
        return totals

    def to_json(self) -> str:
        return json.dumps({"version": 1, "num_shards": self.num_shards, "work_unit": "UNet steps",
                           "shard_work": self.load(),
                           "subjects": {sid: {"shard": self.shards[sid], "work": self.work[sid]} for sid in sorted(self.shards)}},
                          indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ShardPlan":
        data = json.loads(text)
        subjects = data.get("subjects", {})
        return cls(int(data["num_shards"]), {k: int(v["shard"]) for k, v in subjects.items()},
                   {k: int(v.get("work", 0)) for k, v in subjects.items()})


def shard_plan(job: JobConfig, subjects: list[Subject], image_counts: dict[str, int],
               previous: ShardPlan | None = None) -> ShardPlan:
    """Place the subjects on shards; those `previous` placed stay (when the shard count is unchanged)."""
    shards = num_shards(job, len(subjects))
    work = {s.id: subject_work(job, s, image_counts.get(s.id, 0)) for s in subjects}
    placed = previous.shards if previous is not None and previous.num_shards == shards else None
    return ShardPlan(shards, deal(work, shards, placed), work)


def subjects_for_shard(subjects: list[Subject], shard_index: int, num_shards: int,
                       plan: ShardPlan | None = None) -> list[Subject]:
    if plan is not None and plan.num_shards == num_shards:
        return [s for s in subjects if plan.shard(s.id) == shard_index]
    return [s for s in subjects if shard_of(s.id, num_shards) == shard_index]


def subjects_for_rank(job: JobConfig, subjects: list[Subject], rank: int, world_size: int,
                      work: dict[str, int] | None = None) -> list[Subject]:
    """Subject-parallel: each rank takes a disjoint, work-balanced set of the shard's subjects.
    Data-parallel strategies: every rank works on every subject of the shard together. A
    subject the plan's `work` lacks is weighed like a planned one, its images not counted."""
    ordered = sorted(subjects, key=lambda s: s.id)
    if job.distributed.strategy != "subject":
        return ordered
    weights = {s.id: (work or {}).get(s.id) or subject_work(job, s, 0) for s in ordered}
    ranks = deal(weights, world_size)
    return [s for s in ordered if ranks[s.id] == rank]


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
    run_shards: tuple[int, ...] | None = None  # the shards with work left (None: all of them)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def is_array(self) -> bool:
        return self.num_shards > 1


def make_plan(job: JobConfig, num_subjects: int, run_shards: tuple[int, ...] | None = None) -> Plan:
    d = job.distributed
    shards = num_shards(job, num_subjects)
    env = dict(sorted(job.cluster.env.items()))
    env["DREAMFLEET_NUM_SHARDS"] = str(shards)
    return Plan(job.name, d.nnodes, d.nproc_per_node, shards, d.strategy, env, run_shards)


def shards_with_work(plan: ShardPlan, subjects: list[Subject], settled: Collection[str]) -> tuple[int, ...]:
    """The shards that hold at least one subject not settled (see ledger.settled)."""
    return tuple(sorted({plan.shard(s.id) for s in subjects if s.id not in settled}))


def index_ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8", as Slurm's --array takes them."""
    parts, start = [], None
    for i, n in enumerate(indices):
        start = n if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ",".join(parts)
