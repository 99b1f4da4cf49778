"""`launcher demo`: the quickstart on this machine, with nothing to download.

Builds a tiny random-weight Stable Diffusion model and a few synthetic subjects under
`.dreamfleet/demo/` when they are missing (in a child process: the launcher imports no torch),
then trains `examples/quickstart.yaml` with the local backend and prints where the adapters are.
`launcher demo model.family=sdxl` does the same on a tiny SDXL model (job `quickstart-sdxl`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer

DEMO_DIR = Path(".dreamfleet/demo")
MODEL_DIR = DEMO_DIR / "tiny-sd"
SDXL_DIR = DEMO_DIR / "tiny-sdxl"
SUBJECTS_DIR = DEMO_DIR / "subjects"
NUM_SUBJECTS = 3


def default_job() -> Path:
    """examples/quickstart.yaml of the checkout this package runs from, else of the cwd."""
    beside_package = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
    return beside_package if beside_package.exists() else Path("examples/quickstart.yaml")


def ensure_assets(family: str = "sd") -> None:
    model = SDXL_DIR if family == "sdxl" else MODEL_DIR
    if not (model / "model_index.json").exists():
        typer.echo(f"building a tiny random-weight {family} model in {model} (no download)")
        _tiny("model", str(model), "--family", family)
    if not all((SUBJECTS_DIR / f"subject-{i}").is_dir() for i in range(NUM_SUBJECTS)):
        typer.echo(f"writing {NUM_SUBJECTS} synthetic subjects in {SUBJECTS_DIR}")
        _tiny("subjects", str(SUBJECTS_DIR), "--count", str(NUM_SUBJECTS), "--images", "4")


def _tiny(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "training.tiny", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building demo assets failed:\n{proc.stderr[-3000:]}")


def run_demo(job_file: Path | None, overrides: list[str]) -> int:
    from launcher.backends import local
    from launcher.config import load_job
    from launcher.subjects import resolve_subjects

    family = "sdxl" if "model.family=sdxl" in overrides else "sd"
    ensure_assets(family)
    if family == "sdxl" and job_file is None:
        # the quickstart on the tiny SDXL model, as its own job (a changed model is a new job)
        overrides = [f"model.source={SDXL_DIR}", "name=quickstart-sdxl", *overrides]
    job_file = job_file or default_job()
    job = load_job(job_file, overrides)
    subjects = resolve_subjects(job)
    from launcher.cli import _all_settled, _finish_local, _settled

    settled = _settled(job, subjects)
    if _all_settled(job, subjects, settled):  # a second `make demo`: show what the first one trained
        _finish_local(job.job_uri)
        return 0
    started = time.perf_counter()
    result = local.submit(job, subjects, Path(".dreamfleet") / job.name / "local", settled=settled)
    elapsed = time.perf_counter() - started
    _finish_local(job.job_uri)
    code = int(result.split()[-1])
    trained = [s for s in subjects if s.id not in settled]
    steps = sum(s.steps or job.train.steps for s in trained)
    typer.echo(f"{len(trained)} subject(s), {steps} steps in {elapsed:.0f}s; adapters under {job.job_uri}/subjects/")
    return code
