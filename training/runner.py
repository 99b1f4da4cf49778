"""One worker's subjects, one after another on one loaded base model: check the ledger, train,
export, publish, and record the outcome. setup / train / save / cleanup, no callbacks.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from launcher import ledger, storage
from launcher.config import JobConfig, Subject, dump_job
from launcher.subjects import image_uris
from training import adapters, cpu_attention, evaluation, export, failures, lease, priors, prompts, trackers
from training.components import Components, cache_prompts_and_free, load_components
from training.env import Preemption, WorkerEnv
from training.lease import Outcome
from training.loop import prepare_subject, subject_seed, train_subject
from training.progress import Progress

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, job: JobConfig, env: WorkerEnv, preemption: Preemption, device: torch.device, owner: str):
        self.job, self.env, self.preemption, self.device, self.owner = job, env, preemption, device, owner
        self.job_uri = job.job_uri
        self.train_te = False  # whether a text encoder trains (known once the model's family is)
        self.progress = Progress(env.rank)
        self.c: Components | None = None
        self.init_state: dict[str, dict] = {}
        self.evaluators = None  # training.scores.Evaluators, when the job names eval.clip or eval.dino

    # ---------------------------------------------------------------- setup
    def setup(self, subjects: list[Subject]) -> dict[str, list[str]]:
        """Load the base, generate or reuse class images (before adapters exist), attach adapters."""
        job = self.job
        if self.env.is_main:
            from launcher import fingerprint

            fingerprint.check(job)  # a job file run by hand with changed settings stops here (exit 2)
            storage.write_text(storage.join(self.job_uri, "job.yaml"), dump_job(job))
        self.c = load_components(job.model, self.device, job.train)
        from launcher.errors import ConfigError
        from launcher.validate import family_problems

        if problems := family_problems(job, self.c.family.name):  # a remote model is checked once staged
            raise ConfigError(f"model {storage.redact(job.model.source)} is a {self.c.family.name} model", problems)
        self.specs = adapters.specs(job.adapter, self.c.family)
        self.train_te = len(self.specs) > 1
        cpu_attention.install(self.c.denoiser, "sdpa" if job.train.compile else job.train.attention)
        trackers.check_installed(job.train.trackers)
        if job.eval.enabled:  # loaded before any training: a wrong evaluator fails the run, not every subject
            from training.scores import load_evaluators

            self.evaluators = load_evaluators(job.eval, job.model, self.device)
        class_images: dict[str, list[str]] = {}
        if job.prior.enabled:
            store = job.prior.store or storage.join(self.job_uri, "priors")
            for prompt in sorted({s.class_prompt for s in subjects}):
                uris, _ = priors.ensure_class_images(self.c, prompt, priors.model_id(job.model), job.train.resolution,
                                                     job.prior, job.train.seed, store, self.owner,
                                                     job.output.stale_after_s)
                class_images[prompt] = uris
        if self.c.family.free_after_caching and not self.train_te and not job.train.samples.enabled:
            cache_prompts_and_free(self.c, prompts.job_prompts(subjects, job.train.prompt_template,
                                                               job.train.caption_dropout, job.prior.enabled))
        torch.manual_seed(job.train.seed)
        for part, spec in self.specs.items():  # the denoiser first: the seed's draws as before text encoders existed
            adapters.attach(self.c.part(part), spec, self.c.family.targets(part), part)
            self.init_state[part] = adapters.snapshot(self.c.part(part))
        if job.train.compile:
            self.c.denoiser.compile()  # in place: parameter names (and so adapter keys) stay the same
        return class_images

    # ---------------------------------------------------------------- per subject
    def run_subject(self, subject: Subject, class_images: list[str] | None) -> Outcome:
        job, c = self.job, self.c
        keeper, why = lease.begin(job, subject, self.owner)
        if keeper is None:
            log.info("subject %s: skipped (%s)", subject.id, why)
            return Outcome(subject.id, "skipped", why)  # the exit code reflects what this run attempted
        subject = keeper.subject  # with a retry's per-subject overrides (launcher retry-failed KEY=VALUE)
        log.info("subject %s: training (%s)", subject.id, why)
        steps = keeper.status.steps
        with keeper, tempfile.TemporaryDirectory(prefix=f"dreamfleet-{subject.id}-") as tmp:
            work = Path(tmp)
            tracker = trackers.NoTrackers()
            try:
                tracker = trackers.open_trackers(job, subject.id, work)
                for part, init in self.init_state.items():
                    adapters.restore(c.part(part), init)
                data = prepare_subject(c, job, subject, image_uris(subject), class_images, self.train_te)
                self.progress.start_subject(subject.id, steps)
                try:
                    def on_step(step: int, total: int, loss: float | None) -> None:
                        keeper.status.step = step  # picked up by the next heartbeat
                        self.progress.step(step, total, loss)

                    result = train_subject(c, job, subject, data, work, ledger.subject_uri(self.job_uri, subject.id),
                                           self.preemption, on_step=on_step, on_log=tracker.log_line)
                finally:
                    self.progress.end_subject()
                if result.preempted:
                    keeper.update(state="pending", step=result.step, error="preempted; resumes from its checkpoint")
                    return Outcome(subject.id, "preempted", f"checkpointed at step {result.step}")
                if not keeper.held():
                    return Outcome(subject.id, "skipped", "taken over by another worker; not published")
                scored = self.publish(subject, work, steps, tracker)
                keeper.update(state="done", step=result.step, final_loss=result.final_loss, finished_at=time.time(),
                              **scored)
                return Outcome(subject.id, "done", f"{result.step} steps", result.final_loss)
            except Exception as exc:  # any failure is this subject's alone, unless the process is unusable
                failures.log_failure(log, subject.id, exc)
                keeper.fail(exc)
                tracker.close(failed=True)
                if failures.is_fatal(exc):
                    raise
                return Outcome(subject.id, "failed", str(exc))
            finally:
                tracker.close()  # preempted or taken over: the run ends here too (a later attempt opens a new one)

    def publish(self, subject: Subject, work: Path, steps: int, tracker=None) -> dict:
        """Write every format, samples and their scores into a local folder, then publish it
        (manifest last). Returns the status fields of the scores (training.evaluation).
        `tracker`: the subject's open experiment trackers (training.trackers), which get the samples
        and scores and are closed here; without one (the packed and data-parallel loops) the
        job's trackers are opened here and given metrics.jsonl first."""
        job, c = self.job, self.c
        final = work / "final"
        final.mkdir()
        meta = export.describe(job.model.source, job.adapter, job.train.resolution, steps, subject.instance_prompt,
                               c.family.name)
        trained = export.TrainedAdapter(
            {part: export.Part(adapters.adapter_state_dict(c.part(part)),
                               adapters.peft_config(spec, c.family.targets(part)), spec)
             for part, spec in self.specs.items()}, c.family.name, meta)
        export.write_all(trained, final, job.output.formats, subject.id)
        if (work / "metrics.jsonl").exists():
            (final / "metrics.jsonl").write_bytes((work / "metrics.jsonl").read_bytes())
        if tracker is None:
            tracker = trackers.open_trackers(job, subject.id, work)
            trackers.replay(tracker, final / "metrics.jsonl")
        try:
            scored = evaluation.samples_and_scores(c, job, subject, final, steps, subject_seed(job.train.seed, subject.id),
                                                   self.evaluators)
            trackers.log_outputs(tracker, final, steps, scored["scores"])
        finally:
            tracker.close()
        tracker.publish_into(final)
        storage.publish_dir(final, ledger.subject_uri(self.job_uri, subject.id), extra={"subject": subject.id})
        return scored

    # ---------------------------------------------------------------- all
    def run(self, subjects: list[Subject]) -> list[Outcome]:
        class_images = self.setup(subjects)
        outcomes = []
        for subject in subjects:
            if self.preemption.requested:
                outcomes.append(Outcome(subject.id, "preempted", "not started"))
                continue
            outcomes.append(self.run_subject(subject, class_images.get(subject.class_prompt)))
        return outcomes
