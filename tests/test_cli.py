"""The CLI as a user runs it: fast help without torch, local submit, dry run, status, the demo,
and every shipped example validates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, worker_env


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from launcher.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'training')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_shipped_example_validates(example):
    proc = run_cli("validate", str(REPO / "examples" / example), "--no-inputs")
    assert proc.returncode == 0, proc.stderr


def test_local_submit_dry_run_prints_the_command(make_job, tmp_path):
    job = make_job()
    proc = run_cli("submit", str(job), "--backend", "local", "--dry-run", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "training.agent --standalone --nnodes=1 --nproc-per-node=1 -m training.worker" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing trained


def test_resubmit_starts_only_the_shards_with_work_left(make_job, tmp_path):
    """A Slurm array leaves out the shards whose subjects are all done or out of attempts; when
    nothing is left the submit says so and submits nothing."""
    from launcher import ledger
    from launcher.ledger import SubjectStatus

    slurm = {"runtime": "none", "venv": sys.prefix, "log_dir": str(tmp_path / "logs")}
    job = make_job(n_subjects=6, cluster={"backend": "slurm", "shards": 4, "slurm": slurm}, output={"max_attempts": 2})
    first = run_cli("submit", str(job), "--dry-run", "--out", str(tmp_path / "r"))
    assert first.returncode == 0, first.stderr
    assert "#SBATCH --array=0-3" in first.stdout
    shards = {sid: s["shard"] for sid, s in json.loads((tmp_path / "r" / "plan.json").read_text())["subjects"].items()}
    job_uri = str(tmp_path / "out" / "t")
    for sid, shard in shards.items():  # shards 0 and 2 finished (one subject there failed for good)
        if shard in (0, 2):
            state = "failed" if sid == min(s for s, b in shards.items() if b == 2) else "done"
            ledger.write_status(job_uri, SubjectStatus(id=sid, state=state, attempts=2 if state == "failed" else 1))
    again = run_cli("submit", str(job), "--dry-run", "--out", str(tmp_path / "r"))
    assert again.returncode == 0, again.stderr
    assert "#SBATCH --array=1,3" in again.stdout
    settled = sum(b in (0, 2) for b in shards.values())
    assert f"note: {settled} of 6 subject(s) need no training ({settled - 1} done, 1 failed" in again.stderr
    for sid in shards:
        ledger.write_status(job_uri, SubjectStatus(id=sid, state="done", attempts=1))
    last = run_cli("submit", str(job), "--out", str(tmp_path / "r2"))  # a real submit: sbatch is never reached
    assert last.returncode == 0, last.stderr
    assert "nothing to train: all 6 subject(s) are settled" in last.stdout and "(6 done)" in last.stdout
    assert not (tmp_path / "r2").exists()


def test_status_of_a_job_not_started_and_of_a_mistyped_output(make_job, tmp_path):
    job = make_job(n_subjects=2)
    proc = run_cli("status", str(job))  # submitted, no worker started yet: every subject is pending
    assert proc.returncode == 0, proc.stderr
    assert "2 subjects: pending 2, running 0, done 0, failed 0" in proc.stdout
    assert [s["state"] for s in json.loads(run_cli("status", str(job), "--json").stdout)["subjects"]] == ["pending"] * 2
    typo = tmp_path / "out" / "tt"
    for command in ("status", "report", "retry-failed"):
        proc = run_cli(command, str(typo))
        assert proc.returncode == 2 and f"error: no job output at {typo}:" in proc.stderr, proc.stderr
    assert not typo.exists()  # the report was not written into a new folder
    proc = run_cli("status", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "job file" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_local_submit_trains_and_status_reports(make_job, tmp_path):
    job = make_job(n_subjects=2)
    proc = run_cli("submit", str(job), "--backend", "local", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit 0" in proc.stdout and "s0" in proc.stdout and "done" in proc.stdout
    proc = run_cli("status", str(tmp_path / "out" / "t"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    states = {s["id"]: s["state"] for s in report["subjects"]}
    assert states == {"s0": "done", "s1": "done"}
    assert report["summary"]["counts"]["done"] == 2
    again = run_cli("submit", str(job), "--backend", "local", "--out", str(tmp_path / "r"))
    assert again.returncode == 0 and "nothing to train: all 2 subject(s)" in again.stdout, again.stderr
    assert "training.worker" not in again.stderr and "shard 0/1" not in again.stderr  # no worker started


@pytest.mark.slow
def test_demo_builds_its_assets_and_trains(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "demo", "train.steps=3", "prior.num_class_images=1",
                           "prior.sample_steps=1", "train.samples.num_inference_steps=1"],
                          cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    root = tmp_path / "outputs" / "quickstart" / "subjects"
    for sid in ("red-ball", "green-box", "blue-ball"):
        assert (root / sid / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((root / sid / "status.json").read_text())["state"] == "done"
    assert "adapters under ./outputs/quickstart/subjects/" in proc.stdout
    assert "report: ./outputs/quickstart/report.html" in proc.stdout
    # the first run a user sees: no progress-bar noise, no warnings about parts it does not use
    assert not any(noise in proc.stderr for noise in ("Loading weights", " WARNING ", "[transformers]")), proc.stderr[-3000:]
    page = (tmp_path / "outputs" / "quickstart" / "report.html").read_text()
    assert all(f"id='subject-{sid}'" in page for sid in ("red-ball", "green-box", "blue-ball"))
    # a second `make demo` shows what the first trained, without loading the model again
    again = subprocess.run([sys.executable, "-m", "launcher.cli", "demo"], cwd=tmp_path, env=worker_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to train: all 3 subject(s) are settled" in again.stdout and "red-ball" in again.stdout
    assert "loaded a sd model" not in again.stderr


@pytest.mark.slow
def test_demo_trains_the_tiny_sdxl_model_on_request(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "demo", "model.family=sdxl", "train.steps=2",
                           "prior.enabled=false", "train.samples.enabled=false"],
                          cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / ".dreamfleet" / "demo" / "tiny-sdxl" / "text_encoder_2").is_dir()
    root = tmp_path / "outputs" / "quickstart-sdxl" / "subjects"
    for sid in ("red-ball", "green-box", "blue-ball"):
        assert json.loads((root / sid / "status.json").read_text())["state"] == "done"
        assert (root / sid / "pytorch_lora_weights.safetensors").exists()


def test_relative_paths_get_a_note_where_workers_run_in_containers(make_job, tmp_path):
    job = make_job(output={"uri": "./outputs"})
    for backend, extra, where in (("kubernetes", [], "inside the pod"),
                                  ("slurm", ["cluster.slurm.runtime=podman"], "inside the container"),
                                  ("slurm", [], None), ("local", [], None)):
        proc = run_cli("render", str(job), *extra, "--backend", backend, "--out", str(tmp_path / backend))
        assert proc.returncode == 0, proc.stderr
        if where:
            assert f"note: relative paths resolve {where}, not in this directory: output.uri ./outputs." in proc.stderr
        else:
            assert "relative paths" not in proc.stderr


def test_render_refuses_an_out_that_is_a_file_or_holds_the_job_file_itself(make_job, tmp_path):
    job = tmp_path / "mine" / "job.yaml"  # named as the render names the resolved job file
    job.parent.mkdir()
    job.write_text(make_job().read_text() + "# my notes\n")
    original = job.read_text()
    here = run_cli("render", str(job), "--backend", "slurm", "--out", str(job.parent))
    assert here.returncode == 2 and "holds the job file" in here.stderr and "Traceback" not in here.stderr
    assert job.read_text() == original
    for out in (job, "/proc/nowhere"):
        proc = run_cli("submit", str(job), "--backend", "slurm", "--dry-run", "--out", str(out))
        assert proc.returncode == 2 and f"error: --out {out}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["submit", "render", "logs"])
def test_a_mistyped_backend_is_refused_before_anything_else(make_job, tmp_path, command):
    """Even on a finished job (where submit would say "nothing to train"), a backend name that is
    not one of the three is the error, with the valid choices."""
    from launcher import ledger
    from launcher.ledger import SubjectStatus

    job = make_job(n_subjects=1)
    ledger.write_status(str(tmp_path / "out" / "t"), SubjectStatus(id="s0", state="done", attempts=1))
    extra = ["--out", str(tmp_path / "r")] if command != "logs" else []
    proc = run_cli(command, str(job), "--backend", "lcoal", *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing to train" not in proc.stdout
    said = " ".join(proc.stderr.replace("│", " ").split())  # the message as one line, out of its box
    assert "'lcoal' is not a backend; choose one of local, slurm, kubernetes" in said, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [[], ["validate"], ["submit"], ["status"]], ids=["launcher", "validate", "submit", "status"])
def test_help_shows_plain_flags_as_flags_without_a_type(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--help" in proc.stdout and "<bool>" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("backend", ["slurm", "kubernetes"])
def test_a_credential_in_the_job_renders_nothing_and_is_not_echoed(make_job, tmp_path, backend):
    job = make_job(cluster={"env": {"DB_PASS": "planted-pass-7c1d"}})
    proc = run_cli("render", str(job), "--backend", backend, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join(proc.stderr.split())
    assert "cluster.env.DB_PASS: holds a credential" in said and "cluster.kubernetes.credentials_secret" in said
    assert "planted-pass-7c1d" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


# The CLI's commands, their arguments and options: the surface grows only on purpose (STYLE.md 3).
CLI_SURFACE = {
    "cancel": (["TARGET"], ["--backend", "--namespace", "-b", "-n"]),
    "convert": (["SRC", "DST"], ["--model", "--to"]),
    "demo": (["OVERRIDES"], ["--job"]),
    "logs": (["JOB_FILE"], ["--backend", "--job-id", "--lines", "-b", "-n"]),
    "merge": (["MODEL", "ADAPTER", "OUT"], []),
    "render": (["JOB_FILE", "OVERRIDES"], ["--backend", "--out", "-b", "-o"]),
    "report": (["TARGET"], ["--out", "-o"]),
    "retry-failed": (["TARGET", "OVERRIDES"], ["--flagged"]),
    "status": (["TARGET"], ["--all", "--flagged", "--json"]),
    "submit": (["JOB_FILE", "OVERRIDES"], ["--backend", "--dry-run", "--force-new", "--inputs", "--no-inputs", "--out",
                                           "--skip-invalid", "-b", "-o"]),
    "validate": (["JOB_FILE", "OVERRIDES"], ["--inputs", "--json", "--min-side", "--no-inputs"]),
    "version": ([], []),
}


def test_the_cli_surface_is_pinned():
    import typer.main

    from launcher.cli import app

    group = typer.main.get_command(app)
    ctx = typer.main.get_command(app).context_class(group)
    surface = {}
    for name in group.list_commands(ctx):
        params = group.get_command(ctx, name).params
        surface[name] = ([p.name.upper() for p in params if p.param_type_name == "argument"],
                         sorted(o for p in params if p.param_type_name == "option" for o in p.opts + p.secondary_opts))
    assert surface == CLI_SURFACE, "a command or option was added or removed: update CLI_SURFACE and the docs"
