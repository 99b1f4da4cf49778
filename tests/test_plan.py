"""The shard plan: balanced by work, stable when subjects are added, disjoint across shards and
ranks, written beside the job file, and read by the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import job_dict
from launcher.backends import gather_shard_plan, write_job_files
from launcher.config import Subject, job_from_dict
from launcher.plan import ShardPlan, index_ranges, shard_plan, shards_with_work, subjects_for_rank, subjects_for_shard
from training.tiny import write_subject_images


def subjects(n: int, start: int = 0, steps=lambda i: None) -> list[Subject]:
    return [Subject(id=f"s{i:03d}", images=f"/nowhere/{i}", instance_prompt="sks", steps=steps(i))
            for i in range(start, start + n)]


def fleet_job(n_shards: int, output: str = "/tmp/unused"):
    data = job_dict(Path("/m"), [{"id": "x", "images": "/nowhere", "instance_prompt": "sks"}], output,
                    cluster={"shards": n_shards})
    return job_from_dict(data)


def test_shards_are_balanced_by_work_not_by_count():
    job = fleet_job(4)
    subs = subjects(40, steps=lambda i: 400 if i % 10 == 0 else 100)  # four heavy subjects
    plan = shard_plan(job, subs, {s.id: 5 for s in subs})
    loads = plan.load()
    assert sum(loads) == sum(plan.work.values()) and max(loads) - min(loads) <= 105
    heavy = {plan.shard(s.id) for s in subs if s.steps == 400}
    assert heavy == {0, 1, 2, 3}  # one heavy subject per shard
    per_shard = [subjects_for_shard(subs, i, 4, plan) for i in range(4)]
    assert sorted(s.id for shard in per_shard for s in shard) == sorted(s.id for s in subs)


def test_adding_subjects_does_not_move_the_placed_ones():
    job = fleet_job(3)
    first = shard_plan(job, subjects(20), {})
    grown = shard_plan(job, subjects(25), {}, previous=ShardPlan.from_json(first.to_json()))
    assert all(grown.shards[sid] == first.shards[sid] for sid in first.shards)
    assert max(grown.load()) - min(grown.load()) <= max(grown.work.values())
    reshaped = shard_plan(fleet_job(5), subjects(25), {}, previous=first)  # a new shard count places afresh
    assert reshaped.num_shards == 5 and set(reshaped.shards.values()) == {0, 1, 2, 3, 4}


def test_unknown_subjects_fall_back_to_the_stable_hash():
    plan = shard_plan(fleet_job(3), subjects(6), {})
    late = subjects(1, start=99)[0]
    assert 0 <= plan.shard(late.id) < 3
    owners = [i for i in range(3) if late in subjects_for_shard([late], i, 3, plan)]
    assert len(owners) == 1


def rank_job(strategy: str, steps: int = 100):
    data = job_dict(Path("/m"), [{"id": "x", "images": "/nowhere", "instance_prompt": "sks"}], "/tmp/unused",
                    train={"steps": steps}, distributed={"strategy": strategy, "nproc_per_node": 3})
    return job_from_dict(data)


def test_ranks_get_disjoint_work_balanced_sets():
    subs = subjects(9, steps=lambda i: 300 if i == 0 else 100)
    work = {s.id: s.steps for s in subs}
    ranks = [subjects_for_rank(rank_job("subject"), subs, r, 3, work) for r in range(3)]
    assert sorted(s.id for r in ranks for s in r) == [s.id for s in subs]
    assert sorted(sum(work[s.id] for s in r) for r in ranks) == [300, 400, 400]  # the best split of 1100
    assert subjects_for_rank(rank_job("ddp"), subs, 1, 3, work) == sorted(subs, key=lambda s: s.id)


def test_a_subject_missing_from_the_plan_is_weighed_by_the_jobs_steps():
    """Four planned subjects of 100 steps and one the plan lacks, of the job's 400: the late one
    is a rank's whole load, as it would be had it been planned."""
    subs = subjects(5)
    work = {s.id: 100 for s in subs[:4]}
    ranks = [subjects_for_rank(rank_job("subject", steps=400), subs, r, 3, work) for r in range(3)]
    assert [s.id for s in subs[4:]] in [[s.id for s in r] for r in ranks]
    assert sorted(len(r) for r in ranks) == [1, 2, 2]


def test_submit_weighs_images_keeps_the_earlier_plan_and_writes_it_beside_the_job(tmp_path):
    root = tmp_path / "photos"
    for i, count in enumerate([6, 1, 1, 1]):
        write_subject_images(root / f"p{i}", i, count=count, size=16)
    entries = [{"id": f"p{i}", "images": str(root / f"p{i}"), "instance_prompt": "sks"} for i in range(4)]
    job = job_from_dict(job_dict(Path("/m"), entries, tmp_path / "out", cluster={"shards": 2}))
    plan = gather_shard_plan(job, list(job.subjects))
    assert plan.work["p0"] == 4 + 6 and plan.work["p1"] == 4 + 1
    assert plan.load() == [10, 15] or plan.load() == [15, 10]
    job_file, plan_file = write_job_files(job, list(job.subjects), tmp_path / "r", plan)
    assert plan_file == job_file.with_name("plan.json")
    assert json.loads(plan_file.read_text())["subjects"]["p0"] == {"shard": plan.shard("p0"), "work": 10}
    # the worker publishes the plan to the output; the next submit keeps those placements
    moved = {sid: 1 - b for sid, b in plan.shards.items()}
    (tmp_path / "out" / "t").mkdir(parents=True)
    (tmp_path / "out" / "t" / "plan.json").write_text(ShardPlan(2, moved, plan.work).to_json())
    assert gather_shard_plan(job, list(job.subjects)).shards == moved


@pytest.mark.parametrize("indices, text", [
    ((0,), "0"), ((0, 1, 2, 3), "0-3"), ((1, 3), "1,3"), ((0, 1, 2, 5, 7, 8), "0-2,5,7-8"), ((4, 9, 10, 11), "4,9-11"),
])
def test_index_ranges_as_slurm_array_takes_them(indices, text):
    assert index_ranges(indices) == text


def test_shards_with_work_leave_out_shards_of_settled_subjects_only():
    plan = ShardPlan(4, {"a": 0, "b": 0, "c": 1, "d": 2, "e": 3}, {})
    subjects = [Subject(id=sid, images="/x", instance_prompt="p") for sid in "abcdef"]  # f: unplanned, hashed
    assert shards_with_work(plan, subjects, {"a", "b", "c", "d", "e", "f"}) == ()
    assert shards_with_work(plan, subjects[:5], {"a", "d"}) == (0, 1, 3)
    assert shards_with_work(plan, subjects[:5], {"a", "b", "d"}) == (1, 3)
