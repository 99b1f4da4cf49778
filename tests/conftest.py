"""Shared fixtures: one tiny random-weight model per session, synthetic subjects, job files,
and the worker run as a real child process.

Under CI=true a test that would be skipped for a missing system dependency fails instead
(only the `gpu` marker may skip there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import image_build
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["slurm_cluster", "s3"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RESOLUTION = 32


# ------------------------------------------------------------------ the worker image, built in the background


def pytest_collection_finish(session):
    """Start the container tests' image build now, beside the tests before them (tests/image_build.py)."""
    if (os.geteuid() == 0 and all(shutil.which(b) for b in ("podman", "debootstrap", "runc"))
            and any("image" in getattr(item, "fixturenames", ()) for item in session.items)):
        image_build.start()


def pytest_sessionfinish(session):
    image_build.stop()


# ------------------------------------------------------------------ CI: skips are failures


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("gpu") is None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under CI=true, which requires every non-GPU test to run: {reason}"


def require_binary(*names: str) -> None:
    """Skip (or fail under CI) when a system program the test needs is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make system-deps installs it as root)")


# ------------------------------------------------------------------ tiny model and subjects


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight SD model in the diffusers layout, built once per session."""
    from training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def subjects_root(tmp_path_factory) -> Path:
    """Eight synthetic subjects (subject-0 .. subject-7), three images each."""
    from training.tiny import write_subject_images

    root = tmp_path_factory.mktemp("subjects")
    for i in range(8):
        write_subject_images(root / f"subject-{i}", i, count=3, size=48)
    return root


def subject_entry(root: Path, i: int, **extra) -> dict:
    return {"id": f"s{i}", "images": str(root / f"subject-{i}"), "instance_prompt": f"a photo of sks{i} thing",
            "class_prompt": "a photo of a thing", **extra}


FLEET_BAD = {"f03": "truncated", "f11": "empty", "f17": "not an image"}


def captioned_subjects(root: Path, size: int = 40) -> list[dict]:
    """Two subjects of two captioned images each: "good", and "bad" whose second caption file is
    not UTF-8 text (it fails by name; the other trains)."""
    from training.tiny import write_subject_images

    subjects = []
    for i, sid in enumerate(("good", "bad")):
        folder = write_subject_images(root / sid, i, count=2, size=size)
        (folder / "000.txt").write_text("on a sofa")
        (folder / "001.txt").write_text("in the snow")
        subjects.append({"id": sid, "images": str(folder), "instance_prompt": f"sks {sid}"})
    (root / "bad" / "001.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    return subjects


@pytest.fixture(scope="session")
def fleet_subjects(tmp_path_factory) -> list[dict]:
    """Twenty subjects of two classes (dogs and cats), three of them bad (FLEET_BAD)."""
    from training.tiny import write_subject_images

    root = tmp_path_factory.mktemp("fleet")
    entries = []
    for i in range(20):
        sid = f"f{i:02d}"
        folder = write_subject_images(root / sid, i, count=2 + i % 3, size=40)
        kind = ("dog", "cat")[i % 2]
        entries.append({"id": sid, "images": str(folder), "instance_prompt": f"a photo of sks{i} {kind}",
                        "class_prompt": f"a photo of a {kind}"})
    first = root / "f03" / "000.png"
    first.write_bytes(first.read_bytes()[:60])
    for p in (root / "f11").iterdir():
        p.unlink()
    for p in (root / "f17").iterdir():
        p.write_bytes(b"this is not a png")
    return entries


def job_dict(model: Path, subjects: list[dict], output_uri: Path | str, name: str = "t", **sections) -> dict:
    """A small, fast job: rank 4 LoRA, 4 steps at 32 px, fp32 AdamW, no samples."""
    job = {
        "name": name,
        "model": {"source": str(model)},
        "adapter": {"type": "lora", "rank": 4},
        "train": {"steps": 4, "resolution": RESOLUTION, "log_every": 1, "optimizer": "adamw",
                  "learning_rate": 1e-3, "samples": {"enabled": False}},
        "subjects": subjects,
        "output": {"uri": str(output_uri)},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(job.get(section), dict):
            job[section] = _merge(job[section], values)
        else:
            job[section] = values
    return job


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_job(path: Path, job: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def worker_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "DREAMFLEET_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_worker(job_path: Path, env: dict | None = None, timeout: float = 600, nproc: int = 1,
               extra_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real worker entry point (under torchrun when nproc > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "training.worker", "--job", str(job_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "training.worker", "--job", str(job_path)]
    cmd += extra_args or []
    return subprocess.run(cmd, env=worker_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `launcher` CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], env=worker_env(env), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO)


@pytest.fixture
def make_job(tmp_path, tiny_model, subjects_root):
    """make_job(n_subjects=1, **sections) -> path of a job file writing under tmp_path/out."""

    def factory(n_subjects: int = 1, name: str = "t", subjects: list[dict] | None = None, **sections) -> Path:
        subs = subjects if subjects is not None else [subject_entry(subjects_root, i) for i in range(n_subjects)]
        return write_job(tmp_path / f"{name}.yaml", job_dict(tiny_model, subs, tmp_path / "out", name=name, **sections))

    return factory


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random-weight SDXL model (two text encoders, text_time UNet), built once per session."""
    from training.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny random-weight Flux.1 model (transformer, CLIP and T5 encoders), built once per session."""
    from training.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


def preempt_at_step(monkeypatch, preemption, n: int) -> None:
    """Trigger `preemption` (as SIGUSR1 would) at the n-th optimizer step of the in-process loops;
    `monkeypatch.undo()` ends it."""
    from training import loop

    real_step, steps = loop.Stepper.step, []

    def counting(self):
        steps.append(1)
        if len(steps) == n:
            preemption.trigger()
        return real_step(self)

    monkeypatch.setattr(loop.Stepper, "step", counting)
