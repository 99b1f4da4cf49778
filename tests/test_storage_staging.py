"""Node-local staging against the real S3 endpoint (tests/s3.py), in-process: what is current is
reused without a GET, a changed object is downloaded again, a damaged cached file is replaced,
and transient faults during staging are retried."""

from __future__ import annotations

import pytest

from training import staging

pytestmark = [pytest.mark.integration]


@pytest.fixture
def model(s3):
    import boto3

    client = boto3.client("s3", endpoint_url=s3["proxy"].url, region_name="us-east-1")
    for key, body in {"unet/config.json": b'{"a": 1}', "unet/w.bin": b"x" * 5000, "vae/w.bin": b"y" * 300}.items():
        client.put_object(Bucket=s3["bucket"], Key=f"m/{key}", Body=body)
    s3["proxy"].requests.clear()
    return {"uri": f"s3://{s3['bucket']}/m", "client": client, **s3}


def test_reuse_changed_object_and_damaged_file(tmp_path, model):
    proxy = model["proxy"]
    dest = staging.stage_model(model["uri"], str(tmp_path))
    assert (dest / "unet" / "w.bin").read_bytes() == b"x" * 5000
    assert proxy.count("GET", "/m/") == 3
    proxy.requests.clear()
    assert staging.stage_model(model["uri"], str(tmp_path)) == dest
    assert proxy.count("GET", "/m/") == 0  # listed, nothing downloaded

    model["client"].put_object(Bucket=model["bucket"], Key="m/vae/w.bin", Body=b"z" * 300)  # same size, new ETag
    (dest / "unet" / "config.json").write_text("{}")  # damaged on disk: the size no longer matches
    proxy.requests.clear()
    staging.stage_model(model["uri"], str(tmp_path))
    assert proxy.count("GET", "/m/vae/w.bin") == 1 and proxy.count("GET", "/m/unet/config.json") == 1
    assert proxy.count("GET", "/m/unet/w.bin") == 0
    assert (dest / "vae" / "w.bin").read_bytes() == b"z" * 300


@pytest.mark.parametrize("fault", ["fail_503", "reset"])
def test_staging_retries_transient_faults(tmp_path, model, fault):
    setattr(model["proxy"].faults, fault, 3)
    dest = staging.stage_model(model["uri"], str(tmp_path))
    assert getattr(model["proxy"].faults, fault) == 0
    assert (dest / "vae" / "w.bin").stat().st_size == 300


def test_cache_dir_from_environment(tmp_path, model, monkeypatch):
    monkeypatch.setenv("DREAMFLEET_CACHE_DIR", str(tmp_path / "env-cache"))
    assert staging.stage_model(model["uri"]).parent == tmp_path / "env-cache"
