"""A failure in one subject is that subject's alone: any exception (not only the expected
kinds) fails the subject with its type, message and place in status.json, the full traceback
goes to the log, and the worker trains the shard's next subject. Only a fatal error (the
process unusable) ends the worker."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import job_dict, subject_entry
from launcher.config import job_from_dict
from training import failures, runner
from training.env import Preemption, WorkerEnv
from training.runner import Worker

pytestmark = pytest.mark.slow


def test_failures_are_contained_unless_the_process_is_unusable():
    assert not failures.is_fatal(TypeError("unsupported operand"))
    assert not failures.is_fatal(RuntimeError("shapes cannot be multiplied"))
    assert failures.is_fatal(MemoryError())
    assert failures.is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert failures.is_fatal(KeyboardInterrupt())
    try:
        {}["missing"]
    except KeyError as exc:
        line = failures.one_line(exc)
    assert line.startswith("KeyError: 'missing' (at ") and "test_failures.py:" in line


def test_an_unexpected_exception_fails_its_subject_and_the_next_one_trains(tmp_path, tiny_model, subjects_root,
                                                                          monkeypatch, caplog):
    job = job_from_dict(job_dict(tiny_model, [subject_entry(subjects_root, i) for i in range(2)], tmp_path / "out"))
    real = runner.train_subject

    def train_subject(c, job, subject, *args, **kwargs):
        if subject.id == "s0":  # what a library bug deep in the step looks like
            return None + 1
        return real(c, job, subject, *args, **kwargs)

    monkeypatch.setattr(runner, "train_subject", train_subject)
    worker = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), owner="test:1")
    with caplog.at_level(logging.ERROR):
        outcomes = worker.run(list(job.subjects))
    assert [(o.subject, o.state) for o in outcomes] == [("s0", "failed"), ("s1", "done")]
    s0 = json.loads((tmp_path / "out" / "t" / "subjects" / "s0" / "status.json").read_text())
    assert s0["state"] == "failed" and s0["error"].startswith("TypeError: unsupported operand"), s0
    assert "test_failures.py:" in s0["error"] and "\n" not in s0["error"]
    assert "Traceback (most recent call last)" in caplog.text  # the whole story is in the log
