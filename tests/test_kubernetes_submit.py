"""The Kubernetes backend through the CLI: `render --out DIR` writes what `kubectl apply -k` and
`-f` read, `submit --dry-run` prints it, and `submit` goes through the real kubectl. No API
server can run here, so the boundary is a kubeconfig: none (no context) or one whose server
refuses connections (kubectl's own error must reach the user).

    .venv/bin/python -m pytest tests/test_kubernetes_submit.py
"""

from __future__ import annotations

import os
import socket
import subprocess

import yaml

from conftest import REPO, require_binary, run_cli

EXAMPLE = str(REPO / "examples" / "sd15-kubernetes.yaml")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_render_writes_manifests_that_kustomize_builds(tmp_path):
    require_binary("kubectl")
    out = tmp_path / "deploy"
    proc = run_cli("render", EXAMPLE, "--backend", "kubernetes", "--out", str(out), "train.steps=10")
    assert proc.returncode == 0, proc.stderr
    assert (out / "Kustomization").exists()
    built = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    docs = list(yaml.safe_load_all(built.stdout))
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Service", "Job"}
    job_file = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["job.yaml"])
    assert job_file["train"]["steps"] == 10  # the override travels in the mounted job file


def test_submit_dry_run_prints_the_manifests_and_applies_nothing(tmp_path):
    proc = run_cli("submit", EXAMPLE, "--backend", "kubernetes", "--dry-run", "--out", str(tmp_path / "d"),
                   env={"KUBECONFIG": str(tmp_path / "missing")})
    assert proc.returncode == 0, proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]
    assert "Job" in kinds and "Kustomization" not in kinds


def test_submit_without_a_context_says_how_to_apply(tmp_path):
    require_binary("kubectl")
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    proc = run_cli("submit", EXAMPLE, "--backend", "kubernetes", "--out", str(tmp_path / "d"),
                   env={"KUBECONFIG": str(empty)})
    assert proc.returncode != 0
    assert "no kubectl context" in proc.stderr and "kubectl apply --server-side -k" in proc.stderr
    assert (tmp_path / "d" / "Kustomization").exists()  # rendered all the same, ready to apply


def test_submit_runs_kubectl_apply_k_and_reports_its_error(tmp_path):
    require_binary("kubectl")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{_closed_port()}"}}],
        "users": [{"name": "u", "user": {"token": "placeholder"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}]}))
    proc = run_cli("submit", EXAMPLE, "--backend", "kubernetes", "--out", str(tmp_path / "d"),
                   env={"KUBECONFIG": str(kubeconfig)}, timeout=120)
    assert proc.returncode != 0
    assert "kubectl apply failed" in proc.stderr and "connection refused" in proc.stderr


def _fake_kubectl(tmp_path, cases: str):
    """A kubectl that records every call and answers with the shell `case` arms given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    script = bin_dir / "kubectl"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n{cases}")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def _recording_kubectl(tmp_path):
    """A kubectl for a cluster without the JobSet and Kubeflow operators: its `delete` answers as
    the real one does there (error text as kubectl prints it), and records every call."""
    return _fake_kubectl(tmp_path, """case "$2" in
  job) echo 'job.batch "portraits-sd15" deleted' ;;
  *) echo "error: the server doesn't have a resource type \\"$2\\"" >&2; exit 1 ;;
esac
""")


def test_cancel_by_job_file_deletes_its_workload_in_its_namespace(tmp_path):
    env, calls = _recording_kubectl(tmp_path)
    proc = run_cli("cancel", EXAMPLE, env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'job.batch "portraits-sd15" deleted' in proc.stdout
    assert calls.read_text().splitlines() == [
        "delete job -n dreamfleet -l app.kubernetes.io/instance=portraits-sd15 --ignore-not-found"]


def test_cancel_by_name_passes_over_kinds_the_cluster_does_not_serve(tmp_path):
    env, calls = _recording_kubectl(tmp_path)
    proc = run_cli("cancel", "portraits-sd15", "--backend", "kubernetes", "--namespace", "team-a", env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'job.batch "portraits-sd15" deleted' in proc.stdout
    assert [line.split()[1:4] for line in calls.read_text().splitlines()] == [  # owners before what they own
        ["trainjob", "-n", "team-a"], ["jobset", "-n", "team-a"], ["pytorchjob", "-n", "team-a"], ["job", "-n", "team-a"]]


def _trainjob_kubectl(tmp_path):
    """A kubectl for a cluster with Kubeflow Trainer v2: delete and get of trainjobs answer as the
    real one prints them (TrainJob's printer columns: NAME, STATE, AGE); every call recorded."""
    return _fake_kubectl(tmp_path, """case "$1 $2" in
  "delete trainjob") printf 'trainjob.trainer.kubeflow.org "portraits-sd15-0" deleted\\ntrainjob.trainer.kubeflow.org "portraits-sd15-1" deleted\\n' ;;
  "get trainjob") printf 'NAME               STATE      AGE\\nportraits-sd15-0   Complete   3h\\nportraits-sd15-1   Suspended  3h\\n' ;;
  *) echo "error: unexpected kubectl $*" >&2; exit 1 ;;
esac
""")


def test_cancel_and_status_of_a_trainjob_fleet_ask_for_trainjobs(tmp_path, monkeypatch):
    from launcher.backends import kubernetes as k8s
    from launcher.config import load_job

    env, calls = _trainjob_kubectl(tmp_path)
    job_dict = yaml.safe_load(open(EXAMPLE))
    job_dict["cluster"]["kubernetes"]["flavour"] = "trainjob"
    job_dict["cluster"]["shards"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    proc = run_cli("cancel", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'trainjob.trainer.kubeflow.org "portraits-sd15-1" deleted' in proc.stdout
    assert calls.read_text().splitlines() == [
        "delete trainjob -n dreamfleet -l app.kubernetes.io/instance=portraits-sd15 --ignore-not-found"]
    monkeypatch.setenv("PATH", env["PATH"])
    assert "portraits-sd15-1   Suspended" in k8s.status(load_job(path))
    assert calls.read_text().splitlines()[-1] == "get trainjob -n dreamfleet -l app.kubernetes.io/instance=portraits-sd15"


def test_a_render_replaces_only_the_files_it_wrote_before(tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "mine.yaml").write_text("kind: NotDreamfleet\n")  # a user's file beside the manifests
    assert run_cli("render", EXAMPLE, "--backend", "kubernetes", "--out", str(out)).returncode == 0
    first = {p.name for p in out.glob("*.yaml")}
    assert "mine.yaml" in first
    renamed = run_cli("render", EXAMPLE, "--backend", "kubernetes", "--out", str(out), "name=portraits-v2")
    assert renamed.returncode == 0, renamed.stderr
    now = {p.name for p in out.glob("*.yaml")}
    assert "mine.yaml" in now and not any("portraits-sd15" in n for n in now) and any("portraits-v2" in n for n in now)
    # a render that fails leaves the last good one as it was
    failed = run_cli("render", EXAMPLE, "--backend", "kubernetes", "--out", str(out), "cluster.kubernetes.flavour=pytorchjob",
                     "cluster.shards=4")
    assert failed.returncode == 2, failed.stderr
    assert {p.name for p in out.glob("*.yaml")} == now


def test_a_render_leaves_files_it_could_not_have_written(tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "precious.yaml").write_text("kind: Mine\n")  # listed by a kustomization of the user's own
    (out / "Kustomization").write_text("resources: [precious.yaml, ../elsewhere.yaml]\n")
    assert run_cli("render", EXAMPLE, "--backend", "kubernetes", "--out", str(out)).returncode == 0
    assert (out / "precious.yaml").read_text() == "kind: Mine\n"
