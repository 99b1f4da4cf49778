"""The Kubernetes backend through the CLI: `render --out DIR` writes what `kubectl apply -k` and
`-f` read, `submit --dry-run` prints it, and `submit` goes through the real kubectl. No API
server can run here, so the boundary is a kubeconfig: none (no context) or one whose server
refuses connections (kubectl's own error must reach the user).

    .venv/bin/python -m pytest tests/test_kubernetes_submit.py
"""

from __future__ import annotations

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
