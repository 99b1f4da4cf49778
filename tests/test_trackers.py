"""Experiment trackers (train.trackers), read back with each library's own reader: TensorBoard's
EventAccumulator, MLflow's MlflowClient on a local file store, and W&B's offline run file
through W&B's own record schema (wandb.proto; W&B ships no Python reader for an offline run). One
run per subject, tagged with the job and subject ids: loss, learning rate, steps/s, samples and
scores. The credentials the workers are given (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN) appear in
no file the run writes, nor in its log."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import run_cli, run_worker

WANDB_KEY = "0123456789abcdef0123456789abcdef0a1b2c3d"  # the shape of a W&B key, planted
MLFLOW_TOKEN = "planted-mlflow-token-5f2e"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("evaluators") / "clip")


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's log format (a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type full/first/middle/last), each
    record a wandb.proto Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_trackers_get_one_run_per_subject_with_loss_lr_rate_samples_and_scores_and_no_credential(
        make_job, tmp_path, tiny_clip, monkeypatch):
    pytest.importorskip("tensorboard", reason="the [trackers] extra (in [test]) installs it")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlruns = tmp_path / "mlruns"
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": WANDB_KEY, "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": mlruns.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN}
    job = make_job(name="tracked", train={"steps": 3, "trackers": ["tensorboard", "wandb", "mlflow"],
                                          "samples": {"enabled": True, "num_inference_steps": 1,
                                                      "prompts": ["{instance} in a garden", "{instance} at night"]}},
                   eval={"clip": str(tiny_clip)})
    proc = run_worker(job, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subject = tmp_path / "out" / "tracked" / "subjects" / "s0"
    status = json.loads((subject / "status.json").read_text())
    lines = [json.loads(line) for line in (subject / "metrics.jsonl").read_text().splitlines()]
    losses = {li["step"]: li["loss"] for li in lines if "loss" in li}
    assert sorted(losses) == [1, 2, 3]

    # TensorBoard: the event files published in the subject's output
    events = EventAccumulator(str(subject / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/grad_norm", "eval/clip_i", "eval/clip_t"} <= set(tags["scalars"])
    assert {e.step: pytest.approx(e.value, abs=1e-5) for e in events.Scalars("train/loss")} == losses
    assert all(e.value > 0 for e in events.Scalars("train/steps_per_s"))
    assert events.Scalars("eval/clip_i")[0].value == pytest.approx(status["scores"]["clip_i"], abs=1e-5)
    assert {"samples/00", "samples/01"} <= set(tags["images"])
    assert "job tracked, subject s0" in str(events.Tensors("run/text_summary")[0].tensor_proto)

    # W&B, offline: the run kept in the subject's output for `wandb sync`
    [run_file] = list((subject / "wandb").glob("offline-run-*/run-*.wandb"))
    history, run, summary = {}, None, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): u.value_json for u in record.summary.update})
    assert run.display_name == "s0" and run.run_group == "tracked" and run.project == "tracked"
    assert list(run.tags) == ["tracked", "s0"]
    assert {s: pytest.approx(h["train/loss"], abs=1e-5) for s, h in history.items() if "train/loss" in h} == losses
    assert all("train/lr" in history[s] and "train/steps_per_s" in history[s] for s in (1, 2, 3))
    assert history[3]["samples/count"] == 2 and history[3]["samples/_type"] == "images/separated"  # as W&B images
    assert json.loads(summary["eval/clip_t"]) == pytest.approx(status["scores"]["clip_t"], abs=1e-5)

    # MLflow: one run in the job's experiment, on the local file store (kept by MLflow 3 on request)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name("tracked")
    [mrun] = client.search_runs([experiment.experiment_id])
    assert mrun.info.run_name == "s0" and mrun.info.status == "FINISHED"
    assert mrun.data.tags["dreamfleet.job"] == "tracked" and mrun.data.tags["dreamfleet.subject"] == "s0"
    loss = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "train.loss")}
    assert loss == {s: pytest.approx(v, abs=1e-5) for s, v in losses.items()}
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train.lr")] == [1, 2, 3]
    assert mrun.data.metrics["eval.clip_i"] == pytest.approx(status["scores"]["clip_i"], abs=1e-5)
    assert sorted(a.path for a in client.list_artifacts(mrun.info.run_id, "samples")) == ["samples/00.png",
                                                                                          "samples/01.png"]

    # no credential in any file the run wrote, nor in its log
    for root in (tmp_path / "out", mlruns):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert WANDB_KEY.encode() not in data and MLFLOW_TOKEN.encode() not in data, path
    assert WANDB_KEY not in proc.stdout + proc.stderr and MLFLOW_TOKEN not in proc.stdout + proc.stderr


def test_a_tracker_credential_in_the_job_is_refused_and_not_echoed(make_job, tmp_path):
    job = make_job(train={"trackers": ["wandb"]}, cluster={"env": {"WANDB_API_KEY": WANDB_KEY}})
    proc = run_cli("render", str(job), "--backend", "slurm", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "cluster.env.WANDB_API_KEY: holds a credential" in " ".join(proc.stderr.split())
    assert WANDB_KEY not in proc.stdout + proc.stderr and not (tmp_path / "r").exists()
    bad = run_cli("validate", str(make_job(train={"trackers": ["tensorbaord"]})), "--no-inputs")
    assert bad.returncode == 2 and "train.trackers.0" in bad.stderr and "tensorboard" in bad.stderr, bad.stderr
