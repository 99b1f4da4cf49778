"""Experiment trackers (train.trackers): TensorBoard, Weights & Biases, MLflow. One run per
subject, named after it and tagged with the job and subject ids, receiving what metrics.jsonl
gets (loss, learning rate, gradient norm, steps/s), then the samples and the scores.

    tensorboard  event files in the subject's output: <output>/<job>/subjects/<id>/tensorboard/
                 (`tensorboard --logdir <output>/<job>/subjects` shows every subject)
    wandb        project train.tracker_project (default: the job name), group the job; the mode,
                 the key and the host come from the workers' environment (WANDB_MODE,
                 WANDB_API_KEY, WANDB_BASE_URL, WANDB_DIR); an offline run without WANDB_DIR is
                 kept in the subject's output under wandb/, for `wandb sync`
    mlflow       experiment train.tracker_project (default: the job name) at MLFLOW_TRACKING_URI
                 (the environment; credentials too: MLFLOW_TRACKING_TOKEN and the like)

The libraries are the `trackers` extra and are imported only when a job names them. No
credential passes through the job: each library reads its own from the environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Trackers:
    """The subject's open runs. `log_line` takes a metrics.jsonl line as the loops write it."""

    def __init__(self, names: list[str], job_name: str, project: str | None, subject_id: str, work: Path):
        self.names, self.job_name, self.subject_id, self.work = list(names), job_name, subject_id, work
        self.project = project or job_name
        self._tb = self._wandb = self._mlflow = None
        self._last: tuple[int, float] | None = None  # (step, elapsed_s) of the previous line, for steps/s
        try:
            for name in self.names:
                getattr(self, f"_open_{name}")()
        except BaseException:
            self.close(failed=True)
            raise

    # ------------------------------------------------------------------ opening
    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.work / "tensorboard"))
        self._tb.add_text("run", f"job {self.job_name}, subject {self.subject_id}")

    def _open_wandb(self) -> None:
        import wandb

        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.work)}
        self._wandb = wandb.init(project=self.project, name=self.subject_id, group=self.job_name,
                                 tags=[self.job_name, self.subject_id], reinit="create_new",
                                 config={"job": self.job_name, "subject": self.subject_id}, **where)

    def _open_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()  # MLFLOW_TRACKING_URI, or ./mlruns
        experiment = client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.project)
        run = client.create_run(experiment_id, run_name=self.subject_id,
                                tags={"dreamfleet.job": self.job_name, "dreamfleet.subject": self.subject_id})
        self._mlflow = (client, run.info.run_id)

    # ------------------------------------------------------------------ logging
    def log_line(self, line: dict) -> None:
        """One metrics.jsonl line: {"step", "loss", "lr", "grad_norm", "elapsed_s", ...}."""
        step = int(line["step"])
        values = {k: float(line[k]) for k in ("loss", "lr", "grad_norm", "last_loss") if line.get(k) is not None}
        if "elapsed_s" in line:
            if self._last is not None and line["elapsed_s"] > self._last[1]:
                values["steps_per_s"] = (step - self._last[0]) / (line["elapsed_s"] - self._last[1])
            elif self._last is None and line["elapsed_s"] > 0:
                values["steps_per_s"] = step / line["elapsed_s"]
            self._last = (step, float(line["elapsed_s"]))
        self.log(step, {f"train/{k}": v for k, v in values.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k.replace("/", "."), v, now, step) for k, v in values.items()])

    def samples(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        """The sample images, each with its prompt."""
        if not paths:
            return
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            for i, path in enumerate(paths):
                with Image.open(path) as img:
                    self._tb.add_image(f"samples/{i:02d}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({"samples": [wandb.Image(str(p), caption=c) for p, c in zip(paths, prompts)]}, step=step)
        if self._mlflow is not None:
            client, run_id = self._mlflow
            for path in paths:
                client.log_artifact(run_id, str(path), "samples")

    def scores(self, step: int, scores: dict) -> None:
        """The subject's scores (launcher.quality), and the base model's under base/."""
        values = {f"eval/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k in SCORE_KEYS}
        values.update({f"eval/base_{k}": float(v) for k, v in (scores.get("base") or {}).items()})
        if values:
            self.log(step, values)
            if self._wandb is not None:
                self._wandb.summary.update(values)

    # ------------------------------------------------------------------ closing
    def close(self, failed: bool = False) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
            self._mlflow = None

    def publish_into(self, final: Path) -> None:
        """What the trackers keep locally and the subject's output should hold: the TensorBoard
        event files, and an offline W&B run (for `wandb sync`) unless WANDB_DIR keeps it."""
        if (self.work / "tensorboard").is_dir():
            shutil.copytree(self.work / "tensorboard", final / "tensorboard", dirs_exist_ok=True)
        offline = sorted((self.work / "wandb").glob("offline-run-*")) if (self.work / "wandb").is_dir() else []
        for run in offline:
            shutil.copytree(run, final / "wandb" / run.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("debug*.log"))


SCORE_KEYS = ("dino", "clip_i", "clip_t")


class NoTrackers:
    """The job names no tracker: every call does nothing."""

    def log_line(self, line: dict) -> None:
        pass

    def samples(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        pass

    def scores(self, step: int, scores: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def publish_into(self, final: Path) -> None:
        pass


def check_installed(names: list[str]) -> None:
    """Refuse, before any training, a tracker whose library is not installed."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]  # each tracker's module has its name
    if missing:
        from launcher.errors import ConfigError

        raise ConfigError(f"train.trackers names {', '.join(missing)}, not installed here: "
                          "pip install 'dreamfleet[trackers]' (in the worker image too)")


def open_trackers(job, subject_id: str, work: Path) -> Trackers | NoTrackers:
    """The job's trackers for one subject (closed by the caller, `close()`)."""
    if not job.train.trackers:
        return NoTrackers()
    return Trackers(job.train.trackers, job.name, job.train.tracker_project, subject_id, work)


def replay(tracker: Trackers | NoTrackers, metrics: Path) -> None:
    """Give the trackers a finished run's metrics.jsonl (the loops that do not log as they go)."""
    import json

    if metrics.exists():
        for text in metrics.read_text().splitlines():
            line = json.loads(text) if text.strip() else {}
            if "loss" in line:
                tracker.log_line(line)


def log_outputs(tracker: Trackers | NoTrackers, final: Path, step: int, scores: dict | None) -> None:
    """The published samples (with their prompts) and scores."""
    folder = final / "samples"
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    prompts = (folder / "prompts.txt").read_text().splitlines() if (folder / "prompts.txt").exists() else []
    tracker.samples(step, paths, prompts + [""] * (len(paths) - len(prompts)))
    if scores:
        tracker.scores(step, scores)
