"""The worker image, built and run with a real container engine (podman): a Debian base made
with debootstrap (no registry is reachable), the local CPU torch wheel brought in, then
`launcher --help`, `launcher version` and a 2-process training inside the container as the
non-root user with the output on the host; the Slurm backend's `podman` runtime on the real
two-node test cluster; and hadolint and checkov on the Dockerfile.

The image is built once per session, in the background from the session's start
(tests/image_build.py: under 5 minutes from an empty podman store on 2 cores; podman's layer
cache makes later sessions take seconds). Run:

    .venv/bin/python -m pytest tests/test_container.py -s    # -s prints build time and size
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import image_build
from conftest import REPO, job_dict, require_binary, run_cli, subject_entry, write_job
from image_build import IMAGE, LIMITS, PODMAN
from slurm_cluster import wait_for_job

# any test may be the first to ask for the image, and so pay for its build
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]
UID = 10001  # the image's non-root user
# Direct podman calls pass runc and the lowered ulimits (tests/image_build.py); the Slurm test gives
# podman the same settings through a containers.conf, as a cluster's nodes would have them.
# pidns: both test "nodes" are this one host, so the two torchrun agents' containers share the
# hostname (--network=host) and, each in its own PID namespace, the pid 1: the c10d rendezvous,
# which tells agents apart by hostname and pid, would then wait forever for a second node.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
pidns = "host"

[engine]
runtime = "runc"
"""


@pytest.fixture(scope="session")
def image():
    """The worker image built from docker/Dockerfile on a debootstrap base, once per session (in
    the background from the session's start: tests/image_build.py)."""
    require_binary("podman", "debootstrap", "runc")
    if os.geteuid() != 0:
        pytest.skip("the container test runs rootful podman")
    built, said = image_build.wait()
    assert built, said
    print(f"\n{said}")
    return IMAGE


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory, tiny_model, subjects_root) -> tuple[Path, Path]:
    """The tiny model and the subjects as shared storage serves them: readable by every uid.

    The session fixtures are not: pytest makes its temporary folders 0700, and
    `save_pretrained` writes the .safetensors files 0600. The container's uid 10001 could not
    read them (safetensors then reports a misleading "No such file or directory")."""
    root = tmp_path_factory.mktemp("shared")
    model = shutil.copytree(tiny_model, root / "model")
    subjects = shutil.copytree(subjects_root, root / "subjects")
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model, subjects


def run(image: str, *args: str, volumes: list[str] = (), entrypoint: str | None = None, timeout: float = 600):
    cmd = [*PODMAN, "run", "--rm", *LIMITS, "--network=none"]
    for v in volumes:
        cmd += ["-v", v]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=timeout)


def writable_out(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)  # the container's user (uid 10001) writes here
    return path


def assert_adapters_on_host(out: Path, subject_ids: list[str]) -> None:
    """Every subject done, its files written by the container's user, its LoRA loadable here."""
    for sid in subject_ids:
        subject = out / "t" / "subjects" / sid
        assert json.loads((subject / "status.json").read_text())["state"] == "done"
        weights = subject / "pytorch_lora_weights.safetensors"
        assert weights.stat().st_uid == UID
        tensors = load_file(weights)
        assert tensors and all("lora" in key for key in tensors), list(tensors)[:5]
        assert all(t.isfinite().all() for t in tensors.values())
        assert (subject / "adapter" / "unet" / "adapter_model.safetensors").exists()


def test_launcher_help_and_version_inside(image):
    helped = run(image, "--help", entrypoint="launcher")
    assert helped.returncode == 0 and "submit" in helped.stdout, helped.stderr
    version = run(image, "version", entrypoint="launcher")
    assert version.returncode == 0, version.stderr
    assert "dreamfleet     0.1.0" in version.stdout and "torch          2.13.0" in version.stdout
    whoami = run(image, "-c", "import os; print(os.getuid())", entrypoint="python")
    assert whoami.stdout.strip() == str(UID)
    inspect = subprocess.run(["podman", "image", "inspect", image, "--format", "{{json .Config}}"],
                             capture_output=True, text=True)
    config = json.loads(inspect.stdout)
    assert config["User"] == str(UID)
    assert config["Labels"]["org.opencontainers.image.revision"] == "test"
    assert config["Entrypoint"] == ["python", "-m", "training.worker"]


def test_two_process_training_inside_as_non_root(image, tmp_path, shared_inputs):
    model, subjects_dir = shared_inputs
    out = writable_out(tmp_path / "out")
    subjects = [dict(subject_entry(subjects_dir, i), images=f"/data/subjects/subject-{i}") for i in range(2)]
    job = job_dict(Path("/data/model"), subjects, "/out", distributed={"nproc_per_node": 2})
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "job.yaml").write_text(json.dumps(job))
    proc = run(image, "-m", "training.agent", "--standalone", "--nproc-per-node=2",
               "-m", "training.worker", "--job", "/job/job.yaml", entrypoint="python",
               volumes=[f"{model}:/data/model:ro", f"{subjects_dir}:/data/subjects:ro",
                        f"{tmp_path / 'job'}:/job:ro", f"{out}:/out"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 1/2" in proc.stderr + proc.stdout
    assert_adapters_on_host(out, ["s0", "s1"])


def _container_running(name: str) -> bool:
    listed = subprocess.run(["podman", "ps", "-q", "--filter", f"name=^{name}$"], capture_output=True, text=True)
    return bool(listed.stdout.strip())


def test_a_container_waiting_in_the_rendezvous_stops_on_sigterm(image):
    """The agent is the container's pid 1 (no init) and waits for a second node that never
    comes, as a cancelled multi-node job's first node does. SIGTERM to the engine's client (what
    Slurm sends a cancelled step; podman passes it on) stops the container: with
    `training.agent` at once, while plain torchrun, as pid 1 without a handler yet, ignores it."""
    import signal

    for module, stops in (("training.agent", True), ("torch.distributed.run", False)):
        name = f"dreamfleet-sigterm-{module.replace('.', '-')}"
        cmd = [*PODMAN, "run", "--rm", *LIMITS, "--network=none", "--name", name, "--entrypoint", "python", image,
               "-m", module, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               "--rdzv-endpoint=127.0.0.1:29400", "--rdzv-id=never", "-m", "training.worker", "--job", "/none.yaml"]
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 120
            while not _container_running(name) and time.time() < deadline and client.poll() is None:
                time.sleep(0.5)
            assert _container_running(name), f"{module}: the container did not start"
            time.sleep(5)  # the agent has imported torch and waits in the rendezvous
            client.send_signal(signal.SIGTERM)
            deadline = time.time() + (30 if stops else 10)
            while _container_running(name) and time.time() < deadline:
                time.sleep(0.5)
            assert _container_running(name) is not stops, module
        finally:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
            output = client.communicate(timeout=60)[0]
        if stops:
            assert "SIGTERM before the workers started; exiting" in output, output[-2000:]


@pytest.fixture
def no_leftover_containers(image):
    """Remove what a failed job leaves running: podman's conmon runs outside the job step's
    process tree, so a step killed before its container stopped can leave it running."""
    yield
    left = subprocess.run(["podman", "ps", "-q", "--filter", f"ancestor={image}"], capture_output=True, text=True)
    if left.stdout.split():
        subprocess.run(["podman", "rm", "-f", "-t", "0", *left.stdout.split()], capture_output=True, timeout=120)


def test_slurm_podman_runtime_trains_across_two_nodes(image, slurm_cluster, tmp_path, shared_inputs,
                                                      no_leftover_containers):
    """`launcher submit --backend slurm` with `runtime: podman`: each node's srun task starts the
    image, whose torchrun agents meet in a c10d rendezvous over the host network."""
    model, subjects_dir = shared_inputs
    out = writable_out(tmp_path / "out")
    subjects = [subject_entry(subjects_dir, i) for i in range(2)]
    # shared storage: every path the job names is mounted at the same path inside the container
    slurm = {"runtime": "podman", "log_dir": str(tmp_path / "logs"), "time": "00:10:00",
             "mounts": [f"{model}:{model}:ro", f"{subjects_dir}:{subjects_dir}:ro", f"{out}:{out}"]}
    job = write_job(tmp_path / "job.yaml", job_dict(model, subjects, out, distributed={"nnodes": 2, "nproc_per_node": 1},
                                                    cluster={"backend": "slurm", "image": image, "slurm": slurm}))
    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**slurm_cluster, "CONTAINERS_CONF": str(conf)}  # sbatch and srun pass it on to podman
    started = time.time()
    proc = run_cli("submit", str(job), "--backend", "slurm", "--out", str(tmp_path / "rendered"), env=env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), proc.stdout
    script = (tmp_path / "rendered" / "job.sbatch").read_text()
    assert "podman run --rm --network=host --ipc=host" in script and f"--entrypoint python {image}" in script
    wait_for_job(job_id, slurm_cluster, 300)
    text = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*")))
    assert "rank 0/2" in text and "rank 1/2" in text, text[-4000:]
    assert_adapters_on_host(out, ["s0", "s1"])
    print(f"\nSlurm + podman, sbatch to adapters: {time.time() - started:.1f}s")


def test_dockerfile_lints_clean():
    tools = REPO / ".venv-tools" / "bin"
    if not (tools / "hadolint").exists():
        pytest.skip("hadolint and checkov are installed by `make tools` into .venv-tools")
    lint = subprocess.run([str(tools / "hadolint"), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    scan = subprocess.run([str(tools / "checkov"), "-f", str(REPO / "docker" / "Dockerfile"), "--framework", "dockerfile",
                           "--quiet", "--compact", "-o", "json", "--config-file", str(REPO / ".checkov.yaml")],
                          capture_output=True, text=True, timeout=600)
    report = json.loads(scan.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c["check_id"] for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, failed
