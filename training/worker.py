"""The worker entry point that runs in the container, one process per rank:

    python -m training.worker --job job.yaml

It reads the resolved job file and the environment contract (training.env), picks this rank's
subjects from the plan, trains them, and exits 0 (all done or skipped), 1 (some failed),
2 (a user error before training) or 75 (preempted after checkpointing: requeue me).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from launcher.errors import EXIT_USER_ERROR, UserError


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=os.environ.get("DREAMFLEET_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "botocore", "s3fs", "aiobotocore", "urllib3", "PIL", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from training.tools import quiet_libraries

    quiet_libraries()  # warnings about parts never used, and from_pretrained's progress bars


def _load_plan(path: str | None, job_file: str):
    from pathlib import Path

    from launcher.config import read_file_text
    from launcher.errors import ConfigError
    from launcher.plan import PLAN_FILE, ShardPlan

    beside = PLAN_FILE + ".gz" if job_file.endswith(".gz") else PLAN_FILE  # gzipped beside a gzipped job file
    plan_file = Path(path) if path else Path(job_file).with_name(beside)
    if not plan_file.exists():
        if path:
            raise ConfigError(f"shard plan {plan_file} does not exist")
        return None
    try:
        return ShardPlan.from_json(read_file_text(plan_file))
    except (ValueError, KeyError, TypeError, OSError, EOFError) as exc:
        raise ConfigError(f"shard plan {plan_file} is not valid: {exc}") from None


def _ids(subjects) -> str:
    shown = ", ".join(s.id for s in subjects[:20])
    return (shown + f", ... ({len(subjects) - 20} more)" if len(subjects) > 20 else shown) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.worker", description="dreamfleet training worker")
    parser.add_argument("--job", required=True, help="resolved job file (YAML)")
    parser.add_argument("--plan", help="shard plan (JSON); default: plan.json beside the job file, if there is one")
    parser.add_argument("--summary", help="write a JSON summary of the outcomes to this path (rank 0)")
    args = parser.parse_args(argv)

    from training.env import EXIT_PREEMPTED, Preemption, WorkerEnv

    try:
        env = WorkerEnv.from_environ()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    _setup_logging(env.rank)
    log = logging.getLogger("dreamfleet.worker")
    preemption = Preemption().install()
    try:
        from launcher.config import load_job
        from launcher.plan import subjects_for_rank, subjects_for_shard
        from launcher.subjects import resolve_subjects

        job = load_job(args.job)
        from launcher.errors import ConfigError
        from launcher.validate import check_model, unsupported

        # the launcher says so first; a hand-made job file, or a pod whose model went missing, meets it here
        if problems := unsupported(job) + check_model(job, remote=False):
            raise ConfigError(f"{args.job} cannot run", problems)
        plan = _load_plan(args.plan, args.job)
        if plan is not None and env.rank == 0 and env.shard_index == 0:
            from launcher import storage
            from launcher.plan import PLAN_FILE

            storage.write_text(storage.join(job.job_uri, PLAN_FILE), plan.to_json())  # the next submit keeps it
        subjects = subjects_for_shard(resolve_subjects(job), env.shard_index, env.num_shards, plan)
        mine = subjects_for_rank(job, subjects, env.rank, env.world_size, plan.work if plan else None)
        log.info("shard %d/%d, rank %d/%d: %d subject(s): %s", env.shard_index, env.num_shards, env.rank,
                 env.world_size, len(mine), _ids(mine))
        from training.lease import summarize, without_settled

        outcomes = []
        # data-parallel ranks decide together, subject by subject (two ranks reading the ledger
        # a moment apart could disagree, and one would wait in a collective the other never joins)
        if job.distributed.strategy == "subject" or env.world_size == 1:
            mine, outcomes = without_settled(job, mine)
            for o in outcomes:
                log.info("subject %s: skipped (%s)", o.subject, o.detail)
            if outcomes:
                log.info("%d subject(s) need no training; %d to train: %s", len(outcomes), len(mine), _ids(mine))
        if mine:
            from training.distributed import run_strategy

            outcomes += run_strategy(job, env, preemption, mine)
    except UserError as exc:
        log.error("%s", exc)
        return EXIT_USER_ERROR
    for o in outcomes:
        log.info("subject %s: %s %s", o.subject, o.state, o.detail)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summarize(outcomes), f, indent=2)
    if any(o.state == "preempted" for o in outcomes):
        return EXIT_PREEMPTED
    return 1 if any(o.state == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
