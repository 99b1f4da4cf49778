"""A resubmit with settings that change the result is refused with the differences listed,
unless --force-new (every subject trains again under the new settings, the old run's job file
kept); settings that change only how it trains go on as before."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_changed_settings_on_resubmit_are_refused_or_started_over(make_job, tmp_path):
    job = make_job(n_subjects=1)
    rendered = str(tmp_path / "r")
    first = run_cli("submit", str(job), "--backend", "local", "--out", rendered)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out" / "t"
    job_yaml = (out / "job.yaml").read_text()

    for override, listed in (("train.steps=10", "train.steps: 4 -> 10"), ("adapter.rank=8", "adapter.rank: 4 -> 8")):
        proc = run_cli("submit", str(job), override, "--backend", "local", "--out", rendered)
        assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
        assert listed in proc.stderr and "--force-new" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert (out / "job.yaml").read_text() == job_yaml  # what ran is still what the output says

    # how it trains is not what it trains: nothing to do, as before
    same = run_cli("submit", str(job), "train.log_every=2", "train.pack=2", "--backend", "local", "--out", rendered)
    assert same.returncode == 0 and "nothing to train" in same.stdout, same.stdout + same.stderr[-2000:]

    again = run_cli("submit", str(job), "adapter.rank=8", "--force-new", "--backend", "local", "--out", rendered)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "started over: 1 setting(s) changed" in again.stderr
    status = json.loads((out / "subjects" / "s0" / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 1, status
    assert any("superseded" in h for h in status["history"])
    config = json.loads((out / "subjects" / "s0" / "adapter" / "unet" / "adapter_config.json").read_text())
    assert config["r"] == 8
    (archived,) = (out / "superseded").iterdir()
    assert (archived / "job.yaml").read_text() == job_yaml
    assert "rank: 8" in (out / "job.yaml").read_text()


def test_a_record_from_before_a_setting_existed_is_not_a_change():
    """model.family, model.vae and adapter.text_encoder_2 came with the family layer: a fingerprint
    recorded before them was trained with their defaults, and a non-default value is a change."""
    from launcher import fingerprint

    now = {"model.source": "/m", "model.family": "auto", "model.vae": None, "adapter.text_encoder_2": None,
           "model.quantize": "none"}
    old = {"model.source": "/m"}
    assert fingerprint.differences(old, now) == []
    assert fingerprint.differences(old, {**now, "model.vae": "/vae"}) == ['model.vae: null -> "/vae"']
    assert fingerprint.differences(old, {**now, "model.quantize": "nf4"}) == ['model.quantize: "none" -> "nf4"']
