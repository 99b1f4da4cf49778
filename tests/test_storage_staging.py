"""Node-local staging against real S3, GCS and Azure endpoints (tests/s3.py, tests/stores.py),
in-process: what is current is reused without a GET, a changed object is downloaded again, a
damaged cached file is replaced, and transient faults during staging are retried."""

from __future__ import annotations

import pytest

from stores import fs_for, object_reads
from training import staging

pytestmark = [pytest.mark.integration]


@pytest.fixture
def model(store):
    fs = fs_for(store)
    for key, body in {"unet/config.json": b'{"a": 1}', "unet/w.bin": b"x" * 5000, "vae/w.bin": b"y" * 300}.items():
        fs.pipe_file(f"{store['bucket']}/m/{key}", body)
    store["proxy"].requests.clear()
    return {**store, "uri": f"{store['uri']}/m", "fs": fs}


def test_reuse_changed_object_and_damaged_file(tmp_path, model):
    proxy = model["proxy"]
    dest = staging.stage_model(model["uri"], str(tmp_path))
    assert (dest / "unet" / "w.bin").read_bytes() == b"x" * 5000
    assert object_reads(model, "m/") == 3
    proxy.requests.clear()
    assert staging.stage_model(model["uri"], str(tmp_path)) == dest
    assert object_reads(model, "m/") == 0  # listed, nothing downloaded

    model["fs"].pipe_file(f"{model['bucket']}/m/vae/w.bin", b"z" * 300)  # same size, new ETag / generation
    (dest / "unet" / "config.json").write_text("{}")  # damaged on disk: the size no longer matches
    proxy.requests.clear()
    staging.stage_model(model["uri"], str(tmp_path))
    assert object_reads(model, "m/vae/w.bin") == 1 and object_reads(model, "m/unet/config.json") == 1
    assert object_reads(model, "m/unet/w.bin") == 0
    assert (dest / "vae" / "w.bin").read_bytes() == b"z" * 300


@pytest.mark.parametrize("fault", ["fail_503", "reset"])
def test_staging_retries_transient_faults(tmp_path, model, fault):
    # one on Azure: its SDK's own retry under ours waits 15 s and more before each attempt
    setattr(model["proxy"].faults, fault, 1 if model["scheme"] == "az" else 3)
    dest = staging.stage_model(model["uri"], str(tmp_path))
    assert getattr(model["proxy"].faults, fault) == 0
    assert (dest / "vae" / "w.bin").stat().st_size == 300


def test_cache_dir_from_environment(tmp_path, s3, monkeypatch):
    fs_for({**s3, "scheme": "s3"}).pipe_file(f"{s3['bucket']}/m/unet/config.json", b"{}")
    monkeypatch.setenv("DREAMFLEET_CACHE_DIR", str(tmp_path / "env-cache"))
    assert staging.stage_model(f"s3://{s3['bucket']}/m").parent == tmp_path / "env-cache"
