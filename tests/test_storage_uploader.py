"""Background checkpoint uploads against real S3, GCS and Azure endpoints (tests/s3.py,
tests/stores.py): the upload runs off
the training thread, at most one is in flight, `latest` moves only when it is done, and an
upload's failure is raised to the training thread with the URI named."""

from __future__ import annotations

import time

import pytest
import torch

from launcher.errors import StorageError
from training import checkpoint

pytestmark = [pytest.mark.integration]


def _local(tmp_path, step):
    return checkpoint.write_local(tmp_path / checkpoint.step_name(step), {"unet": {"w": torch.full((4,), float(step))}},
                                  {"step": step})


def test_upload_runs_in_background_and_latest_moves_after_it(tmp_path, store):
    proxy, subject = store["proxy"], f"{store['uri']}/out/s0"
    up = checkpoint.Uploader(timeout_s=120)
    up.submit(_local(tmp_path, 10), subject, 10, keep=2)
    up.wait()
    proxy.faults.stall_put_containing = "checkpoints/step-00000020/"
    started = time.perf_counter()
    up.submit(_local(tmp_path, 20), subject, 20, keep=2)
    assert time.perf_counter() - started < 5  # submit does not wait for the upload
    assert proxy.faults.stalled.wait(timeout=60)
    # mid-upload: the pointer still names the previous complete checkpoint
    assert checkpoint.find_latest(subject).endswith("step-00000010")
    proxy.faults.release.set()
    up.wait()
    assert checkpoint.find_latest(subject).endswith("step-00000020")
    assert not (tmp_path / "step-00000020").exists()  # the local copy goes once published
    up.submit(_local(tmp_path, 30), subject, 30, keep=2)
    up.wait()
    from launcher import storage

    assert storage.list_names(checkpoint.checkpoints_uri(subject)) == ["latest", "step-00000020", "step-00000030"]
    adapters, state = checkpoint.fetch(checkpoint.find_latest(subject))
    assert state["step"] == 30 and adapters["unet"]["w"].tolist() == [30.0] * 4


UNREACHABLE = {"s3": ("DREAMFLEET_S3_ENDPOINT", "http://127.0.0.1:9")}


# S3 only: gcsfs (6 tries, up to ~30 s) and the Azure SDK (3 retries from 15 s) retry under ours
# with no setting to lower, a minute or more to report (docs/storage.md)
@pytest.mark.parametrize("store", sorted(UNREACHABLE), indirect=True)
def test_upload_error_reaches_the_training_thread(tmp_path, store, monkeypatch):
    monkeypatch.setenv(*UNREACHABLE[store["scheme"]])  # nothing listens there
    monkeypatch.setattr("launcher.storage.RETRY_ATTEMPTS", 2)
    up = checkpoint.Uploader(timeout_s=120)
    up.submit(_local(tmp_path, 5), f"{store['uri']}/out/s0", 5, keep=1)
    with pytest.raises(StorageError, match=rf"{store['uri']}/out/s0/checkpoints.* after 2 attempt"):
        up.wait()
    up.wait()  # raised once, then clear
