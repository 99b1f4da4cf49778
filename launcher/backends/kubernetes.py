"""The Kubernetes backend: write manifests (and a kustomization) to a directory, and apply them
with kubectl when a context is configured.

The kustomization file is named `Kustomization` (a name kustomize reads) rather than
`kustomization.yaml`, because `kubectl apply -f DIR` reads every *.yaml in DIR and would try to
apply the kustomization itself; this way both `kubectl apply -k DIR` and `-f DIR` work.

`submit` applies server-side: a client-side apply keeps a copy of every object in an annotation
limited to 256 KiB, which the job file's ConfigMap of a large fleet outgrows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Collection

import yaml

from launcher.backends import run_tool
from launcher.config import YAML_DUMPER, YAML_LOADER, JobConfig, Subject, dump_job
from launcher.errors import UserError
from launcher.plan import ShardPlan, make_plan, shard_plan as pure_shard_plan
from launcher.render.kubernetes import render_manifests

KUSTOMIZATION = "Kustomization"
APPLY = ["kubectl", "apply", "--server-side", "-k"]  # followed by the rendered directory


class _Dumper(YAML_DUMPER):
    """Multi-line strings (the job file and plan in the ConfigMap) as literal blocks: readable
    with `kubectl get configmap -o yaml`, and diffable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=120)


RENDERED_NAME = re.compile(r"\d{2}-[a-z]+-[a-z0-9.-]+\.yaml")  # what file_name gives, and all a re-render removes


def file_name(index: int, obj: dict) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def render_files(job: JobConfig, subjects: list[Subject], shard_plan: ShardPlan | None = None) -> dict[str, str]:
    """{file name: YAML text} for the job's manifests and its kustomization."""
    shard_plan = shard_plan or pure_shard_plan(job, subjects, {})
    objs = render_manifests(job, make_plan(job, len(subjects)), dump_job(job), shard_plan.to_json())
    files = {file_name(i, obj): dump(obj) for i, obj in enumerate(objs)}
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": sorted(files)}
    files[KUSTOMIZATION] = dump(kustomization)
    return files


def render(job: JobConfig, subjects: list[Subject], out_dir: Path, shard_plan: ShardPlan | None = None) -> list[Path]:
    """Write the files into out_dir. The manifests an earlier render wrote there (the ones its
    Kustomization lists) and this one does not are removed, after this render has succeeded;
    no other file in out_dir is touched."""
    files = render_files(job, subjects, shard_plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(_rendered_before(out_dir)) - set(files):
        (out_dir / stale).unlink(missing_ok=True)
    paths = []
    for name, text in files.items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    return paths


def _rendered_before(out_dir: Path) -> list[str]:
    try:
        listed = yaml.load((out_dir / KUSTOMIZATION).read_text(), Loader=YAML_LOADER)["resources"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return []
    return [name for name in listed if isinstance(name, str) and RENDERED_NAME.fullmatch(name)]


def _kubectl(args: list[str], what: str) -> str:
    return run_tool(["kubectl", *args], what, f"apply the rendered directory from where it is: {' '.join(APPLY)} DIR")


def submit(job: JobConfig, subjects: list[Subject], out_dir: Path, dry_run: bool = False,
           shard_plan: ShardPlan | None = None, settled: Collection[str] = ()) -> str:
    """`settled` is not used: an Indexed Job runs every index, and a shard whose subjects are all
    settled exits before it loads the model (training.lease.without_settled)."""
    paths = render(job, subjects, out_dir, shard_plan)
    if dry_run:
        return "".join(f"---\n# {p.name}\n{p.read_text()}" for p in sorted(paths) if p.name != KUSTOMIZATION)
    context = subprocess.run(["kubectl", "config", "current-context"], capture_output=True, text=True) \
        if shutil.which("kubectl") else None
    if context is None or context.returncode:
        raise UserError(f"no kubectl context is configured; the manifests are in {out_dir}: "
                        f"apply them with `{' '.join(APPLY)} {out_dir}` where a cluster is reachable")
    return _kubectl([*APPLY[1:], str(out_dir)], "kubectl apply")


WORKLOAD_KINDS = {"indexed-job": "job", "jobset": "jobset", "pytorchjob": "pytorchjob", "trainjob": "trainjob"}  # by flavour
# by name, owners before what they own: a TrainJob's JobSet and a JobSet's Jobs go with it
BY_NAME = ("trainjob", "jobset", "pytorchjob", "job")


def cancel(name: str, namespace: str = "default", kinds: Collection[str] = BY_NAME) -> str:
    """Delete the job's workload (its pods go with it). Kinds the cluster does not serve (no
    JobSet or Kubeflow operator installed) are passed over, not an error."""
    said = []
    for kind in kinds:
        try:
            said.append(_kubectl(["delete", kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={name}",
                                  "--ignore-not-found"], "kubectl delete"))
        except UserError as exc:
            if "doesn't have a resource type" not in str(exc):
                raise
    return "".join(said) or f"no workload of {name} in namespace {namespace}\n"


def cancel_job(job: JobConfig) -> str:
    k = job.cluster.kubernetes
    return cancel(job.name, k.namespace, [WORKLOAD_KINDS[k.flavour]])


def status(job: JobConfig) -> str:
    """kubectl's view of the job's workload of its flavour's kind (a fleet's TrainJobs, one per
    shard); the subjects' own states are in the ledger (`launcher status`)."""
    k = job.cluster.kubernetes
    return _kubectl(["get", WORKLOAD_KINDS[k.flavour], "-n", k.namespace, "-l", f"app.kubernetes.io/instance={job.name}"],
                    "kubectl get")


def logs(job: JobConfig, job_id: str | None = None, lines: int = 50) -> str:
    return _kubectl(["logs", "-n", job.cluster.kubernetes.namespace, "-l", f"app.kubernetes.io/instance={job.name}",
                     "--tail", str(lines), "--prefix", "--max-log-requests", "20"], "kubectl logs")
