"""Remote storage against a real S3 endpoint (moto's server on 127.0.0.1, through a loopback
proxy that counts requests and injects faults): train from s3:// to s3://, stage once per node,
survive transient faults and a kill during a checkpoint upload, and never write a credential.
Training from the bucket and the kill mid-upload also run on gs:// and az:// (tests/stores.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, job_dict, run_worker, worker_env, write_job
from stores import fs_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PLANTED = "planted-secret-value-7d1e"


def s3fs_for(s3):
    return fs_for({**s3, "scheme": "s3"})


def _upload_inputs(store, tiny_model, subjects_root):
    """The tiny model and two subjects' images uploaded to the store's bucket."""
    fs = fs_for(store)
    b = store["bucket"]
    fs.put(str(tiny_model) + "/", f"{b}/models/tiny/", recursive=True)
    for i in range(2):
        fs.put(str(subjects_root / f"subject-{i}") + "/", f"{b}/photos/s{i}/", recursive=True)
    store["proxy"].requests.clear()
    u = store.get("uri", f"s3://{b}")
    subjects = [{"id": f"s{i}", "images": f"{u}/photos/s{i}", "instance_prompt": f"a photo of sks{i} thing"}
                for i in range(2)]
    return {**store, "fs": fs, "model": f"{u}/models/tiny", "subjects": subjects, "out": f"{u}/out"}


@pytest.fixture
def remote(s3, tiny_model, subjects_root):
    """The inputs on S3."""
    return _upload_inputs({**s3, "scheme": "s3"}, tiny_model, subjects_root)


@pytest.fixture
def any_remote(store, tiny_model, subjects_root):
    """The inputs on each of S3, GCS and Azure."""
    return _upload_inputs(store, tiny_model, subjects_root)


def s3_job(tmp_path, remote, name="t", cache="cache", **sections) -> Path:
    job = job_dict(remote["model"], remote["subjects"], remote["out"], name=name, **sections)
    job["model"]["cache_dir"] = str(tmp_path / cache)
    return write_job(tmp_path / f"{name}.yaml", job)


def test_train_from_bucket_to_bucket_and_load_in_diffusers(tmp_path, any_remote, tiny_model):
    from diffusers import StableDiffusionPipeline

    remote = any_remote
    planted = {"s3": "AWS_SECRET_ACCESS_KEY", "gs": "DREAMFLEET_UNUSED_SECRET", "az": "DREAMFLEET_UNUSED_SECRET"}
    env = {**remote["env"], planted[remote["scheme"]]: PLANTED}
    proc = run_worker(s3_job(tmp_path, remote, train={"checkpoint_every": 2}), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs, b = remote["fs"], remote["bucket"]
    for sid in ("s0", "s1"):
        status = json.loads(fs.cat(f"{b}/out/t/subjects/{sid}/status.json"))
        assert status["state"] == "done"
        assert fs.exists(f"{b}/out/t/subjects/{sid}/MANIFEST.json")
    local = tmp_path / "download"
    fs.get(f"{b}/out/t/", str(local) + "/", recursive=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(local / "subjects" / "s0")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    # the credential value is nowhere: not in any object written, not in the logs
    written = b"".join(p.read_bytes() for p in local.rglob("*") if p.is_file())
    assert PLANTED.encode() not in written and PLANTED not in proc.stderr + proc.stdout
    for name in ("AWS_ACCESS_KEY_ID", "AZURE_STORAGE_CONNECTION_STRING"):  # nor the store's own credential
        if name in remote["env"]:
            assert remote["env"][name].encode() not in written and remote["env"][name] not in proc.stderr
    if remote["scheme"] == "az":
        key = remote["env"]["AZURE_STORAGE_CONNECTION_STRING"].split("AccountKey=")[1].split(";")[0]
        assert key.encode() not in written and key not in proc.stderr + proc.stdout


def test_staging_downloads_each_file_once_per_node(tmp_path, remote):
    proxy = remote["proxy"]
    files = [p for p in remote["fs"].find(f"{remote['bucket']}/models/tiny")]
    jobs = [s3_job(tmp_path, remote, name=f"job{i}", train={"steps": 2}) for i in range(2)]
    cmd = lambda j: [sys.executable, "-m", "training.worker", "--job", str(j)]
    procs = [subprocess.Popen(cmd(j), env=worker_env(remote["env"]), cwd=REPO, stderr=subprocess.PIPE, text=True)
             for j in jobs]  # two workers of one node, sharing one cache directory, at once
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    model_gets = proxy.count("GET", "/models/tiny/")
    assert model_gets == len(files), f"{model_gets} GETs for {len(files)} files"
    assert sum("downloaded 0 file(s)" in e for e in errs) == 1
    proxy.requests.clear()
    third = run_worker(s3_job(tmp_path, remote, name="job3", train={"steps": 2}), env=remote["env"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert proxy.count("GET", "/models/tiny/") == 0 and "downloaded 0 file(s)" in third.stderr


@pytest.mark.parametrize("fault", ["fail_503", "reset"])
def test_transient_faults_are_retried(tmp_path, remote, fault):
    setattr(remote["proxy"].faults, fault, 8)
    proc = run_worker(s3_job(tmp_path, remote, train={"steps": 2}), env=remote["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert getattr(remote["proxy"].faults, fault) == 0  # every injected fault was hit
    status = json.loads(remote["fs"].cat(f"{remote['bucket']}/out/t/subjects/s0/status.json"))
    assert status["state"] == "done"


def test_unreachable_bucket_is_a_clear_error(tmp_path, remote):
    env = {**remote["env"], "DREAMFLEET_S3_ENDPOINT": "http://127.0.0.1:9", "DREAMFLEET_STORAGE_ATTEMPTS": "2",
           "AWS_SECRET_ACCESS_KEY": PLANTED}
    proc = run_worker(s3_job(tmp_path, remote, train={"steps": 2}), env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot list {remote['bucket']}" in proc.stderr or "cannot list s3://" in proc.stderr, proc.stderr[-3000:]
    assert "after 2 attempt(s)" in proc.stderr  # the model is checked first now, before anything is written
    assert "Could not connect" in proc.stderr and "Traceback" not in proc.stderr
    assert PLANTED not in proc.stderr


def test_kill_during_checkpoint_upload_resumes_from_the_last_complete_one(tmp_path, any_remote, tiny_model):
    remote = any_remote
    train = {"steps": 30, "checkpoint_every": 10, "log_every": 10}
    subjects = remote["subjects"][:1]
    straight = write_job(tmp_path / "straight.yaml", job_dict(tiny_model, [dict(subjects[0], images=str(tmp_path / "imgs"))],
                                                              tmp_path / "straight", train=train))
    remote["fs"].get(f"{remote['bucket']}/photos/s0/", str(tmp_path / "imgs") + "/", recursive=True)
    assert run_worker(straight).returncode == 0

    job = job_dict(remote["model"], subjects, remote["out"], train=train)
    job["model"]["cache_dir"] = str(tmp_path / "cache")
    job["output"].update(heartbeat_s=1, stale_after_s=2)  # a killed worker's claim goes stale quickly
    job_path = write_job(tmp_path / "job.yaml", job)
    proxy = remote["proxy"]
    proxy.faults.stall_put_containing = "checkpoints/step-00000020/"
    worker = subprocess.Popen([sys.executable, "-m", "training.worker", "--job", str(job_path)],
                              env=worker_env(remote["env"]), cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not proxy.faults.stalled.wait(timeout=1) and worker.poll() is None and time.monotonic() < deadline:
        pass
    if not proxy.faults.stalled.is_set():
        worker.kill()
        pytest.fail(f"the worker never reached the second checkpoint: {worker.communicate()[1][-3000:]}")
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=60)
    fs, root = remote["fs"], f"{remote['bucket']}/out/t/subjects/s0/checkpoints"
    assert fs.cat(f"{root}/latest").decode().strip() == "step-00000010"
    assert not fs.exists(f"{root}/step-00000020/MANIFEST.json")
    proxy.reset()

    time.sleep(3)
    again = run_worker(job_path, env=remote["env"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from step-00000010" in again.stderr
    assert not fs.exists(f"{root}/step-00000020") or fs.exists(f"{root}/step-00000020/MANIFEST.json")
    local = tmp_path / "resumed.safetensors"
    fs.get(f"{remote['bucket']}/out/t/subjects/s0/adapter/unet/adapter_model.safetensors", str(local))
    a = load_file(tmp_path / "straight" / "t" / "subjects" / "s0" / "adapter" / "unet" / "adapter_model.safetensors")
    b = load_file(local)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_status_report_and_retry_read_and_write_the_ledger_in_the_bucket(tmp_path, store):
    """`launcher status`, `report` and `retry-failed` given a job's output URI on each store."""
    from launcher import ledger
    from launcher.ledger import SubjectStatus

    from conftest import run_cli

    job_uri = f"{store['uri']}/out/fleet"
    for i, state in enumerate(["done", "done", "failed"]):
        ledger.write_status(job_uri, SubjectStatus(id=f"c-{i}", state=state, steps=10, step=10 if state == "done" else 3,
                                                   attempts=3 if state == "failed" else 1,
                                                   error="bad image" if state == "failed" else None,
                                                   started_at=1000.0 + i, finished_at=2000.0 + i if state == "done" else None))
    status = run_cli("status", job_uri, env=store["env"])
    assert status.returncode == 0, status.stderr[-3000:]
    assert "3 subjects: pending 0, running 0, done 2, failed 1" in status.stdout and "bad image" in status.stdout
    report = run_cli("report", job_uri, "--out", str(tmp_path / "report.html"), env=store["env"])
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    assert all(f"id='subject-c-{i}'" in page for i in range(3)) and "bad image" in page
    retry = run_cli("retry-failed", job_uri, env=store["env"])
    assert retry.returncode == 0 and "reset 1 failed subject(s): c-2" in retry.stdout, retry.stderr[-3000:]
    after = {s.id: s for s in ledger.list_statuses(job_uri)}
    assert after["c-2"].state != "failed" and after["c-0"].state == "done"
