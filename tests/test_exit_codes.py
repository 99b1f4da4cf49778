"""The exit codes that reach the scheduler, and signals on the way down.

The worker exits 75 after checkpointing on request and 2 on a user error; the sbatch script
requeues on 75 and the Kubernetes podFailurePolicy ignores 75 and fails the index on 2. Those
rules only work if the code passes through torchrun (training.agent) and, locally, through
`launcher submit`. Here: the agent's mapping, a Kubernetes pod run as the kubelet would run its
container (command, args, env, the ConfigMap's job file) with the policy evaluated on its exit,
and a local submit stopped with SIGTERM. The Slurm side is in test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_dict, subject_entry, worker_env, write_job

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ the agent's mapping


def test_agent_exit_code_prefers_preemption_then_user_error_then_the_first_failure():
    from training.agent import exit_code

    assert exit_code({}) == 0
    assert exit_code({1: 1, 0: 75}) == 75  # one rank checkpointed on request, the other was stopped
    assert exit_code({0: -15, 1: 2}) == 2
    assert exit_code({1: 3, 0: 1}) == 3  # the first to fail
    assert exit_code({0: -9}) == 137


def _agent(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.agent", "--standalone", *args],
                            env=worker_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.parametrize("code", [2, 75, 3])
def test_agent_ends_with_the_workers_code_in_one_line(tmp_path, code):
    script = tmp_path / "w.py"
    script.write_text(f"import os, sys\nsys.exit({code} if os.environ['RANK'] == '1' else 0)\n")
    proc = _agent(["--nproc-per-node=2", str(script)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "ChildFailedError" not in out and "Traceback" not in out, out
    assert f"worker rank 1 exited {code}" in out


# ------------------------------------------------------------------ Kubernetes: the pod as the kubelet runs it


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references in args, as the kubelet expands them."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def _policy_action(policy: dict, container: str, exit_code: int) -> str:
    """The Job controller's decision for a failed pod: the first matching rule's action, else
    the failure counts against backoffLimit."""
    for rule in policy["rules"]:
        on = rule.get("onExitCodes")
        if on and on.get("containerName", container) == container:
            hit = exit_code in on["values"]
            if hit == (on["operator"] == "In"):
                return rule["action"]
    return "Count"


class Pod:
    """One rendered Indexed Job pod, run as a local process: the container's command and args,
    its env, and the job file where the ConfigMap would be mounted."""

    def __init__(self, job: dict, tmp_path: Path):
        from launcher.backends.kubernetes import render_files
        from launcher.config import JobConfig

        config = JobConfig.model_validate(job)
        docs = [yaml.safe_load(text) for name, text in sorted(render_files(config, config.subjects).items())
                if name != "kustomization.yaml"]
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        self.job = next(d for d in docs if d["kind"] == "Job")
        pod = self.job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "job")
        self.job_dir = tmp_path / "etc-dreamfleet"
        self.job_dir.mkdir()
        for name, text in configmap["data"].items():
            (self.job_dir / name).write_text(text)
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        env["JOB_COMPLETION_INDEX"] = "0"  # the Job controller's annotation, through the downward API
        self.env = worker_env(env)
        assert c["command"] == ["python"]
        self.argv = [sys.executable] + [_expand(a, env).replace(mount, str(self.job_dir)) for a in c["args"]]
        self.policy = self.job["spec"]["podFailurePolicy"]

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def action(self, code: int) -> str:
        return _policy_action(self.policy, "worker", code)


def _k8s_job(tiny_model, subjects_root, out: Path, **sections) -> dict:
    job = job_dict(tiny_model, [subject_entry(subjects_root, 0)], out, **sections)
    job["cluster"] = {"backend": "kubernetes", "image": "localhost/dreamfleet:test"}
    return job


def wait_for_step(status_path: Path, min_step: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before step {min_step}:\n{proc.stdout.read()[-3000:]}")
        if status_path.exists() and json.loads(status_path.read_text()).get("step", 0) >= min_step:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"never reached step {min_step}")


def test_pod_user_error_exits_2_and_fails_the_index(tmp_path, tiny_model, subjects_root):
    job = _k8s_job(tiny_model, subjects_root, tmp_path / "out")
    job["model"]["source"] = str(tmp_path / "no-such-model")
    pod = Pod(job, tmp_path)
    proc = pod.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert pod.action(proc.returncode) == "FailJob"
    assert "ChildFailedError" not in out and "no-such-model" in out, out[-3000:]


def test_pod_sigterm_checkpoints_exits_75_and_is_ignored_by_the_policy(tmp_path, tiny_model, subjects_root):
    job = _k8s_job(tiny_model, subjects_root, tmp_path / "out", train={"steps": 5000, "log_every": 50},
                   output={"heartbeat_s": 1})
    pod = Pod(job, tmp_path)
    proc = pod.start()
    status_path = tmp_path / "out" / "t" / "subjects" / "s0" / "status.json"
    wait_for_step(status_path, 3, proc)
    proc.send_signal(signal.SIGTERM)  # the kubelet signals the container's pid 1: the agent
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert pod.action(proc.returncode) == "Ignore"
    status = json.loads(status_path.read_text())
    assert status["state"] == "pending" and status["step"] < 5000, status
    assert (tmp_path / "out" / "t" / "subjects" / "s0" / "checkpoints" / "latest").exists()


# ------------------------------------------------------------------ local: SIGTERM to `launcher submit`


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(pid) != os.getpid():
                found.append(f"{pid}: {cmdline}")
    return found


def test_sigterm_to_local_submit_checkpoints_and_leaves_no_process(tmp_path, tiny_model, subjects_root):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, [subject_entry(subjects_root, 0)], tmp_path / "out",
                                                    train={"steps": 5000, "log_every": 50}, output={"heartbeat_s": 1}))
    rendered = tmp_path / "rendered"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "submit", str(job), "--backend", "local",
                             "--out", str(rendered)], env=worker_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    status_path = tmp_path / "out" / "t" / "subjects" / "s0" / "status.json"
    wait_for_step(status_path, 3, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher alone, as a scheduler or `kill` would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert _processes_mentioning(str(rendered / "job.yaml")) == []
    status = json.loads(status_path.read_text())
    assert status["state"] == "pending", status


# ------------------------------------------------------------------ messages, not tracebacks


def test_a_bad_image_under_no_inputs_is_one_line_and_an_unreachable_bucket_exits_2(tmp_path, tiny_model,
                                                                                  subjects_root):
    import shutil
    import socket

    from conftest import run_cli

    images = tmp_path / "imgs"
    shutil.copytree(subjects_root / "subject-0", images)
    (images / "bad.png").write_bytes(b"this is not a png")
    subject = {"id": "s0", "images": str(images), "instance_prompt": "a photo of sks thing"}
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, [subject], tmp_path / "out"))
    proc = run_cli("submit", str(job), "--backend", "local", "--no-inputs", "--out", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"subject s0 failed: {images / 'bad.png'} is not an image") == 1, proc.stderr[-3000:]

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = write_job(tmp_path / "s3.yaml", job_dict(tiny_model, [subject_entry(subjects_root, 0)], "s3://nowhere/out"))
    env = {"DREAMFLEET_S3_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "DREAMFLEET_STORAGE_BACKOFF_S": "0.05"}
    proc = run_cli("submit", str(job), "--backend", "local", "--out", str(tmp_path / "r3"), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Could not connect to the endpoint" in proc.stderr, proc.stderr[-3000:]
