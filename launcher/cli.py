"""`launcher`: the command-line interface. Typer commands only; the work is done elsewhere.

    launcher validate job.yaml train.steps=400
    launcher render job.yaml --backend slurm --out deploy/
    launcher submit job.yaml --backend local
    launcher status job.yaml
    launcher demo
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from launcher.errors import UserError



def _flags_without_a_type(command, ctx) -> None:
    """Typer's help prints a value type beside every option, `<bool>` beside plain flags too
    (--dry-run, --no-inputs, --help) although they take no value: an empty metavar leaves it out."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class _Commands(typer.core.TyperGroup):
    """The app's command group: every command's flags, and its own --help, shown as flags."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _flags_without_a_type(command, ctx)
        return command

    def format_help(self, ctx, formatter):
        _flags_without_a_type(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="dreamfleet: DreamBooth adapters for many subjects on Slurm, Kubernetes or this machine.")

JobArg = typer.Argument(..., help="Job file (YAML).", show_default=False)
OverridesArg = typer.Argument(None, help="Dotted overrides after the job file, e.g. train.steps=400.", show_default=False)


def _backend_name(value: Optional[str]) -> Optional[str]:
    """--backend is checked as it is parsed, before the job is read: a mistyped name is the error,
    not whatever the job's state would have led to ("nothing to train")."""
    from launcher.backends import BACKENDS

    if value is not None and value not in BACKENDS:
        raise typer.BadParameter(f"{value!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return value


BackendOpt = typer.Option(None, "--backend", "-b", callback=_backend_name,
                          help="local | slurm | kubernetes (default: cluster.backend).")


def _err(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)


def user_errors(fn):
    """Print user mistakes as a message and exit 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(2) from None

    return wrapper


def _load(job_file: Path, overrides: Optional[List[str]], read_subjects: bool = True):
    """The job, and its subjects (read from the manifest when the job names one)."""
    from launcher.config import load_job
    from launcher.subjects import resolve_subjects

    job = load_job(job_file, overrides or [])
    if not read_subjects:
        return job, job.subjects if isinstance(job.subjects, list) else []
    return job, resolve_subjects(job)


@app.command()
@user_errors
def validate(job_file: Path = JobArg, overrides: Optional[List[str]] = OverridesArg,
             inputs: bool = typer.Option(True, "--inputs/--no-inputs", help="Also check the model and the subjects' images (the fleet data check, docs/fleet.md)."),
             as_json: bool = typer.Option(False, "--json", help="Print the data check as JSON: per subject the images it trains on, its problems and warnings."),
             min_side: int = typer.Option(8, "--min-side", min=1, help="Smallest image side in pixels that is not a problem.")):
    """Check a job file and the inputs it names; list every problem at once."""
    import json

    from launcher.errors import InputError
    from launcher.inputs_check import as_json as report_json, summary
    from launcher.validate import check_data, check_job

    job, subjects = _load(job_file, overrides, read_subjects=inputs)
    if inputs:
        found = check_data(job, subjects, min_side, progress=True)
        errors, warnings, notes = found.errors, found.warnings, found.notes
    else:
        (errors, notes), warnings, found = check_job(job, check_inputs=False), [], None
    for note in notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if as_json:
        report = report_json(found.reports, found.seconds) if found else {"subjects": []}
        typer.echo(json.dumps({**report, "errors": errors, "warnings": warnings}, indent=1))
    else:
        for warning in warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
        if found:
            typer.echo(summary(found.reports, found.seconds))
    if errors:
        raise InputError(f"{job_file}: {len(errors)} problem(s) with the inputs", errors)
    if as_json:
        return
    count = f"{len(subjects)} subject(s)" if subjects or inputs else f"subjects from {job.subjects}"
    typer.echo(f"{job_file}: ok ({count}, adapter {job.adapter.type} rank {job.adapter.rank}, "
               f"strategy {job.distributed.strategy}, {job.distributed.nnodes}x{job.distributed.nproc_per_node} processes)")


@app.command()
@user_errors
def render(job_file: Path = JobArg, overrides: Optional[List[str]] = OverridesArg, backend: Optional[str] = BackendOpt,
           out: Path = typer.Option(..., "--out", "-o", help="Directory to write the rendered files into.")):
    """Write what would be submitted (batch script or manifests) and the resolved job file."""
    from launcher.backends import get_backend
    from launcher.validate import container_notes

    job, subjects = _load(job_file, overrides)
    name = backend or job.cluster.backend
    for note in container_notes(job, name):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    _check_out(out, job_file)
    paths = get_backend(name).render(job, subjects, out)
    for path in paths:
        typer.echo(str(path))


INPUTS_HELP = ("Read the storage first: the earlier plan and the ledger (to skip settled subjects), every subject's "
               "images (counted to balance shards; local backend: the model and every image checked). --no-inputs "
               "reads only a subjects manifest.")


@app.command()
@user_errors
def submit(job_file: Path = JobArg, overrides: Optional[List[str]] = OverridesArg, backend: Optional[str] = BackendOpt,
           dry_run: bool = typer.Option(False, "--dry-run", help="Print exactly what would be submitted, submit nothing."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where rendered files go (default .dreamfleet/<job>/<backend>)."),
           inputs: bool = typer.Option(True, "--inputs/--no-inputs", help=INPUTS_HELP),
           skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Record subjects with bad inputs as failed (with the reason) and go on with the rest."),
           force_new: bool = typer.Option(False, "--force-new", help="The output was trained with other settings: train every subject again under these (docs/fleet.md).")):
    """Render and submit a job; the local backend trains in the foreground."""
    from launcher.backends import get_backend
    from launcher.errors import InputError
    from launcher.validate import check_job, container_notes

    from launcher import fingerprint

    job, subjects = _load(job_file, overrides)
    name = backend or job.cluster.backend
    # only --force-new writes here: the workers record the fingerprint (the output may be writable
    # by the workers' user alone, as a container's non-root user)
    done = fingerprint.check(job, force_new=force_new, record=force_new and not dry_run) \
        if inputs or force_new else "not read (--no-inputs)"
    if done.startswith(("started over", "would start over")):
        typer.secho(f"note: {done}; every subject trains again", fg=typer.colors.YELLOW, err=True)
    settled = _settled(job, subjects) if inputs or skip_invalid else {}
    if skip_invalid:
        from launcher.fleet import record_invalid

        for sid, problems in record_invalid(job, subjects).items():
            typer.secho(f"skipping subject {sid}: {'; '.join(problems)}", fg=typer.colors.YELLOW, err=True)
            settled.setdefault(sid, INVALID_NOW)  # recorded as failed (never trained): no shard starts for it
    if _all_settled(job, subjects, settled):
        return
    if skip_invalid:
        from launcher.validate import check_model

        inputs = False
        errors, notes = check_job(job, check_inputs=False)
        errors += check_model(job)
    else:
        errors, notes = check_job(job, check_inputs=inputs and name == "local")
    for note in notes + container_notes(job, name):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if errors:
        raise InputError(f"{job_file}: {len(errors)} problem(s) with the inputs", errors)
    out = out or Path(".dreamfleet") / job.name / name
    _check_out(out, job_file)
    plan = None
    if inputs or skip_invalid:  # weigh images and keep an earlier submit's placements (plan.json)
        from launcher.backends import gather_shard_plan

        plan = gather_shard_plan(job, subjects)
    result = get_backend(name).submit(job, subjects, out, dry_run=dry_run, shard_plan=plan, settled=settled)
    typer.echo(result)
    if name == "local" and not dry_run:
        _finish_local(job.job_uri)
        code = int(result.split()[-1])
        if code:
            raise typer.Exit(code)


INVALID_NOW = "invalid input"


def _check_out(out: Path, job_file: Path) -> None:
    """The render directory: creatable, and not the place of the job file the render would overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    rendered = out / "job.yaml"
    if rendered.exists() and rendered.samefile(job_file):
        raise UserError(f"--out {out} holds the job file {job_file} itself, which the rendered job.yaml would "
                        "overwrite: choose another directory")


def _settled(job, subjects) -> dict[str, str]:
    """{id: why} of the subjects the ledger says need no more training."""
    from launcher import ledger

    return ledger.settled_subjects(job.job_uri, [s.id for s in subjects], job.output.max_attempts)


def _all_settled(job, subjects, settled: dict[str, str]) -> bool:
    """Say how many subjects need no training; when that is all of them, what to do instead."""
    from launcher import ledger, storage

    if not settled:
        return False
    done = sum(why == ledger.ALREADY_DONE for why in settled.values())
    invalid = sum(why in (ledger.INVALID_INPUT, INVALID_NOW) for why in settled.values())
    failed = len(settled) - done - invalid
    what = f"{done} done" + (f", {failed} failed with no attempts left" if failed else "")
    what += f", {invalid} with invalid inputs" if invalid else ""
    where = storage.redact(job.job_uri)
    if len(settled) < len(subjects):
        typer.secho(f"note: {len(settled)} of {len(subjects)} subject(s) need no training ({what}); "
                    f"the rest are submitted", fg=typer.colors.YELLOW, err=True)
        return False
    typer.echo(f"nothing to train: all {len(subjects)} subject(s) are settled in {where} ({what}).")
    typer.echo(f"  launcher status {where}   lists them")
    if failed or invalid:
        typer.echo(f"  launcher retry-failed {where}   gives the failed ones new attempts")
    typer.echo("  a new job name (or output.uri) trains every subject again")
    return True


def _target(target: str):
    """(job output URI, job or None) for a job file or a job's output URI. A URI with no job
    output there is an error: a typo would otherwise look like an empty fleet."""
    from launcher import ledger, storage

    if target.lower().endswith((".yaml", ".yml")) and "://" not in target:
        if not Path(target).is_file():
            raise UserError(f"job file {target} {'is a directory' if Path(target).is_dir() else 'does not exist'}")
        from launcher.config import load_job

        job = load_job(target)
        return job.job_uri, job
    if not (storage.exists(ledger.subjects_uri(target)) or storage.exists(storage.join(target, "job.yaml"))):
        raise UserError(f"no job output at {storage.redact(target)}: a job's output is <output.uri>/<job name>, "
                        "with subjects/ and job.yaml in it (or pass the job file)")
    return target, None


def _job_uri(target: str) -> str:
    return _target(target)[0]


TABLE_ROWS = 40  # subjects listed by `status` before it summarizes (--all lists every one)


def _print_status_table(job_uri: str, statuses: list | None = None, show_all: bool = True,
                        stale_after_s: float | None = None) -> None:
    """One row per subject; for a larger fleet without show_all, the unfinished ones first (running,
    failed, pending) up to TABLE_ROWS, and a line for the rest."""
    from rich.console import Console
    from rich.table import Table

    from launcher import fleet, ledger, quality, storage

    statuses = ledger.list_statuses(job_uri) if statuses is None else statuses
    rows = statuses
    if not show_all and len(statuses) > TABLE_ROWS:
        order = {"running": 0, "failed": 1, "pending": 2, "done": 3}
        rows = sorted(statuses, key=lambda s: order.get(s.state, 4))[:TABLE_ROWS]
    table = Table(title=f"subjects in {storage.redact(job_uri)}")
    scored = any(s.scores for s in statuses)
    for col in ("subject", "state", "step", "final loss", *(["scores"] if scored else []), "output"):
        table.add_column(col)
    for s in rows:
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        where = ledger.subject_uri(job_uri, s.id) if s.state == "done" else (s.error or "")[:80]
        state = s.state
        if state == "running" and s.is_stale(stale_after_s or fleet.STALE_AFTER_S):
            state = "running (stale heartbeat)"
        if state == "done" and s.flagged:
            state, where = "done, flagged", "; ".join(s.flag_reasons)
        table.add_row(s.id, state, f"{s.step}/{s.steps}", loss, *([quality.format_scores(s.scores)] if scored else []),
                      where)
    Console(stderr=False, width=160).print(table)
    if len(rows) < len(statuses):
        typer.echo(f"... and {len(statuses) - len(rows)} more subjects (--all lists every one, --json gives them all)")


@app.command()
@user_errors
def status(target: str = typer.Argument(..., help="Job file or the job's output URI (<output>/<job name>)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           show_all: bool = typer.Option(False, "--all", help=f"List every subject (default: at most {TABLE_ROWS}, "
                                                                "unfinished first)."),
           flagged: bool = typer.Option(False, "--flagged", help="Only the done subjects flagged for review (a score "
                                                                  "below its eval.min_*).")):
    """Counts by state, throughput, ETA, failures, and each subject, from the ledger in the output."""
    from launcher import fleet

    job_uri, job = _target(target)
    statuses = fleet.job_statuses(job_uri, job)
    if flagged:
        statuses = [s for s in statuses if s.state == "done" and s.flagged]
    if as_json:
        typer.echo(fleet.status_json(statuses))
        return
    if flagged and not statuses:
        typer.echo("no subject is flagged for review")
        return
    stale_after_s = job.output.stale_after_s if job else fleet.STALE_AFTER_S
    _print_status_table(job_uri, statuses, show_all, stale_after_s)
    summary = fleet.summarize(statuses, stale_after_s=stale_after_s)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    rate = f"{summary['subjects_per_hour']:.1f} subjects/hour" if summary["subjects_per_hour"] else "no throughput yet"
    eta = ""
    if summary["steps_left"]:
        eta = (f", ETA {fleet.format_duration(summary['eta_s'])} ({summary['steps_left']} steps left)"
               if summary["eta_s"] is not None else f", {summary['steps_left']} steps left")
    typer.echo(f"{summary['total']} subjects: {counts}; {rate}{eta}")
    if summary["stale_running"]:
        typer.secho(f"stale: {len(summary['stale_running'])} running subject(s) with no heartbeat for over "
                    f"{stale_after_s:.0f} s (their worker may be gone; "
                    f"a resubmit takes them over): {', '.join(summary['stale_running'][:20])}", fg=typer.colors.YELLOW)
    failures = summary["failures"] if show_all else summary["failures"][:TABLE_ROWS]
    for failure in failures:
        tried = "never trained" if failure["invalid"] else f"{failure['attempts']} attempt(s)"
        typer.secho(f"failed {failure['id']} ({tried}): {failure['error']}", fg=typer.colors.RED)
    if len(failures) < len(summary["failures"]):
        typer.echo(f"... and {len(summary['failures']) - len(failures)} more failures (--all, or --json)")
    if summary["flagged"] and not flagged:
        typer.secho(f"flagged for review: {len(summary['flagged'])} done subject(s) with a score below its eval.min_* "
                    f"(launcher status --flagged lists them; launcher retry-failed --flagged retrains them)",
                    fg=typer.colors.YELLOW)


@app.command()
@user_errors
def report(target: str = typer.Argument(..., help="Job file or the job's output URI."),
           out: Optional[Path] = typer.Option(None, "--out", "-o",
                                              help="A local file to write instead (default: report.html in the job's output).")):
    """One self-contained HTML page: score and loss distributions, the worst subjects, and each subject's photos, samples, loss curve and scores."""
    job_uri, job = _target(target)
    typer.echo(_write_report(job_uri, out, job))


def _finish_local(job_uri: str) -> None:
    """After a local run: the status table, and the report in the job's output."""
    _print_status_table(job_uri, show_all=False)
    try:
        typer.echo(f"report: {_write_report(job_uri)}")
    except (OSError, UserError) as exc:  # the training is done either way; say why there is no page
        typer.secho(f"warning: the report could not be written: {exc}", fg=typer.colors.YELLOW, err=True)


def _write_report(job_uri: str, out: Optional[Path] = None, job=None) -> str:
    """The report, written to `out` or beside the subjects (the output contract's place); returns
    where. With the job: its subjects without a status yet too, and its current eval thresholds."""
    from launcher import fleet, storage
    from launcher.report import FILE as REPORT_FILE, render

    page = render(job_uri, fleet.job_statuses(job_uri, job) if job is not None else None)
    if out is not None:
        out.write_text(page)
        return str(out)
    uri = storage.join(job_uri, REPORT_FILE)
    storage.write_text(uri, page)
    return uri


@app.command("retry-failed")
@user_errors
def retry_failed(target: str = typer.Argument(..., help="Job file or the job's output URI."),
                 overrides: Optional[List[str]] = typer.Argument(None, help="Per-subject settings of the retry: "
                                                                 "train.steps=N, train.learning_rate=X.", show_default=False),
                 flagged: bool = typer.Option(False, "--flagged", help="Retrain the done subjects flagged for review "
                                                                       "instead of the failed ones (their adapters stay "
                                                                       "until the new ones are published).")):
    """Give failed (or flagged) subjects a fresh attempt; the next submit trains them again."""
    from launcher.fleet import retry_failed as reset, retry_overrides

    fields = retry_overrides(overrides or [])
    job_uri, job = _target(target)
    ids = reset(job_uri, flagged=flagged, overrides=fields, job=job)
    what = "flagged" if flagged else "failed"
    settings = f" with {', '.join(overrides)}" if fields else ""
    typer.echo(f"reset {len(ids)} {what} subject(s){settings}: {', '.join(ids) or '-'}")


def _scheduler(backend: str):
    from launcher.backends import get_backend

    module = get_backend(backend)
    if not hasattr(module, "cancel"):
        raise UserError(f"the {backend} backend runs in the foreground: there is no scheduler job to ask about")
    return module


@app.command()
@user_errors
def logs(job_file: Path = JobArg, job_id: Optional[str] = typer.Option(None, "--job-id", help="Only this scheduler job."),
         lines: int = typer.Option(50, "--lines", "-n", help="Lines from the end of each log."),
         backend: Optional[str] = BackendOpt):
    """The tail of a submitted job's logs."""
    from launcher.config import load_job

    job = load_job(job_file)
    typer.echo(_scheduler(backend or job.cluster.backend).logs(job, job_id, lines), nl=False)


@app.command()
@user_errors
def cancel(target: str = typer.Argument(..., help="The job file, or a Slurm job id, or a Kubernetes job name."),
           backend: Optional[str] = typer.Option(None, "--backend", "-b", callback=_backend_name,
                                                 help="slurm | kubernetes (default: the job file's, else slurm)."),
           namespace: str = typer.Option("default", "--namespace", "-n",
                                         help="Kubernetes namespace, when TARGET is a name (a job file names its own).")):
    """Cancel a submitted job: every scheduler job of a job file, or one by id or name.

    Slurm: every queued job named after it. Kubernetes: its workload, in its namespace.
    Running workers checkpoint and stop; a later submit resumes their subjects."""
    if target.lower().endswith((".yaml", ".yml")):
        _, job = _target(target)
        typer.echo(_scheduler(backend or job.cluster.backend).cancel_job(job).rstrip("\n"))
    else:
        name = backend or "slurm"
        module = _scheduler(name)
        typer.echo((module.cancel(target, namespace) if name == "kubernetes" else module.cancel(target)).rstrip("\n"))


@app.command()
@user_errors
def demo(overrides: Optional[List[str]] = OverridesArg,
         job_file: Optional[Path] = typer.Option(None, "--job", help="Job to run (default: examples/quickstart.yaml).")):
    """Build a tiny random-weight model and synthetic subjects if missing, and train them locally."""
    from launcher.demo import run_demo

    raise typer.Exit(run_demo(job_file, overrides or []))


def _run_training_tool(module: str, args: list[str]) -> None:
    # launcher never imports training (DESIGN: one arrow down), so the offline tools run as a child
    import subprocess

    done = subprocess.run([sys.executable, "-m", module, *args])
    if done.returncode:
        raise typer.Exit(done.returncode)


@app.command()
@user_errors
def convert(src: Path = typer.Argument(..., help="PEFT adapter dir, diffusers LoRA file or kohya/LyCORIS file."),
            dst: Path = typer.Argument(..., help="Output dir (peft, diffusers) or .safetensors file (kohya)."),
            to: str = typer.Option(..., "--to", help="peft | diffusers | kohya."),
            model: Optional[Path] = typer.Option(None, "--model", help="Base model dir (needed to read kohya files).")):
    """Convert an adapter between the PEFT, diffusers and kohya/A1111/ComfyUI/LyCORIS formats."""
    if to not in ("peft", "diffusers", "kohya"):
        raise UserError(f"--to must be one of peft, diffusers, kohya; got {to!r}")
    _run_training_tool("training.convert", [str(src), str(dst), "--to", to] + (["--model", str(model)] if model else []))


@app.command()
@user_errors
def merge(model: Path = typer.Argument(..., help="Base diffusers pipeline dir."),
          adapter: Path = typer.Argument(..., help="PEFT adapter dir (a run's adapter/ folder)."),
          out: Path = typer.Argument(..., help="Output dir for the merged pipeline.")):
    """Bake an adapter into the UNet and text encoder weights and save a full diffusers pipeline."""
    _run_training_tool("training.merge", [str(model), str(adapter), str(out)])


@app.command()
def version():
    """Versions of dreamfleet and the libraries it trains with (for bug reports)."""
    from launcher.versions import collect

    for name, value in collect().items():
        typer.echo(f"{name:14} {value}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
