"""Kubernetes manifests: golden files per flavour, the official schemas in strict mode, the
operators' CRD schemas, kustomize, checkov, no secret values, and a simulation that runs the
pods of a rendered Indexed Job as local processes which rendezvous and train.

Regenerate golden files and k8s/examples/ after a deliberate change:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_kubernetes.py
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_dict, subject_entry, worker_env
from launcher.backends import kubernetes as k8s
from launcher.config import job_from_dict, load_job

GOLDEN = Path(__file__).parent / "golden" / "kubernetes"
CRDS = REPO.parent / "shared" / "k8s-crds"
UPDATE = bool(os.environ.get("UPDATE_GOLDEN"))
SECRET = "planted-secret-3f9a"

BASE = {"name": "pets", "model": {"source": "s3://models/sd15"}, "output": {"uri": "s3://adapters"},
        "subjects": [{"id": f"dog-{i}", "images": f"s3://photos/dog-{i}/", "instance_prompt": "a photo of sks dog"}
                     for i in range(6)]}


def case(flavour: str, nnodes: int = 2, shards: int | None = None, **k8s_cfg) -> dict:
    return {**BASE, "distributed": {"nnodes": nnodes, "nproc_per_node": 8},
            "cluster": {"image": "registry.example.com/dreamfleet:0.1.0", "shards": shards,
                        "kubernetes": {"flavour": flavour, "namespace": "ml", "gpus_per_pod": 8,
                                       "credentials_secret": "bucket-creds", **k8s_cfg}}}


CASES = {
    "indexed-job": case("indexed-job"),
    "indexed-job-fleet": case("indexed-job", nnodes=1, shards=3, parallelism=2, queue="team-a"),
    "pytorchjob": case("pytorchjob"),
    "jobset": case("jobset", shards=2, service_account="trainer"),
    "trainjob": case("trainjob"),
    "trainjob-fleet": case("trainjob", shards=2, queue="team-a", runtime="dreamfleet-torch"),
}


def rendered(name: str) -> dict[str, str]:
    cfg = job_from_dict(CASES[name])
    return k8s.render_files(cfg, list(cfg.subjects))


def objects(files: dict[str, str]) -> list[dict]:
    return [yaml.safe_load(text) for name, text in sorted(files.items()) if name.endswith(".yaml")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_manifests_match_golden(name):
    text = "".join(f"# {fname}\n{body}---\n" for fname, body in sorted(rendered(name).items()))
    path = GOLDEN / f"{name}.yaml"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
        pytest.fail(f"{path.name} differs from the renderer; if intended: UPDATE_GOLDEN=1 pytest {Path(__file__).name}\n{diff}")


@pytest.mark.parametrize("example", ["sd15-kubernetes", "fleet-kubernetes"])
def test_k8s_examples_are_what_the_renderer_writes(example, tmp_path):
    job = load_job(REPO / "examples" / f"{example}.yaml")
    files = k8s.render_files(job, list(job.subjects))
    target = REPO / "k8s" / "examples" / example
    if UPDATE:
        k8s.render(job, list(job.subjects), target)
    on_disk = {p.name: p.read_text() for p in target.iterdir()}
    assert on_disk == files, f"k8s/examples/{example} is stale: UPDATE_GOLDEN=1 pytest {Path(__file__).name}"


def _versions():
    import kubernetes_validate

    return ["1.29.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_core_objects_validate_strictly_against_official_schemas(name):
    import kubernetes_validate

    checked = 0
    for obj in objects(rendered(name)):
        if obj["apiVersion"] in ("kubeflow.org/v1", "jobset.x-k8s.io/v1alpha2", "trainer.kubeflow.org/v1alpha1"):
            continue
        for version in _versions():
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
    assert checked >= 4


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as the API server prunes/rejects them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schema(file: str, version: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is not there (CI has shared/ beside the checkout)")
    crd = yaml.safe_load((CRDS / file).read_text())
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)


@pytest.mark.parametrize("name, crd, version", [("pytorchjob", "kubeflow.org_pytorchjobs.yaml", "v1"),
                                                 ("jobset", "jobset.x-k8s.io_jobsets.yaml", "v1alpha2")])
def test_operator_objects_validate_against_their_crds(name, crd, version):
    import jsonschema

    schema = _crd_schema(crd, version)
    group = "kubeflow.org/v1" if name == "pytorchjob" else "jobset.x-k8s.io/v1alpha2"
    workload = [o for o in objects(rendered(name)) if o["apiVersion"] == group]
    assert len(workload) == 1
    jsonschema.validate(workload[0], schema)
    # the pod template inside is a core PodTemplateSpec: check it strictly too
    import kubernetes_validate

    spec = workload[0]["spec"]
    templates = ([r["template"] for r in spec["pytorchReplicaSpecs"].values()] if name == "pytorchjob"
                 else [spec["replicatedJobs"][0]["template"]["spec"]["template"]])
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, _versions()[-1], strict=True)


@pytest.mark.parametrize("name", ["trainjob", "trainjob-fleet"])
def test_trainjobs_validate_strictly_against_the_trainjob_crd(name):
    import jsonschema
    import kubernetes_validate

    schema = _strict(_crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"))
    workloads = [o for o in objects(rendered(name)) if o["kind"] == "TrainJob"]
    assert len(workloads) == (2 if name == "trainjob-fleet" else 1)  # a fleet: one TrainJob per shard
    for obj in workloads:
        jsonschema.validate(obj, schema)
        # the trainer's env and the patched pod pieces are core types: check them strictly too
        spec = obj["spec"]
        pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        patch = pod["containers"][0]
        core = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                "spec": {**pod, "restartPolicy": "Never", "containers": [
                    {"name": patch["name"], "image": spec["trainer"]["image"], "command": spec["trainer"]["command"],
                     "args": spec["trainer"]["args"], "env": spec["trainer"]["env"],
                     "resources": spec["trainer"]["resourcesPerNode"], **patch}]}}
        kubernetes_validate.validate(core, _versions()[-1], strict=True)
    with pytest.raises(jsonschema.ValidationError):  # the strict schema does refuse an unknown field
        jsonschema.validate({**workloads[0], "spec": {**workloads[0]["spec"], "bogus": 1}}, schema)


def test_a_trainjob_fleet_is_one_trainjob_per_shard_with_its_own_rendezvous():
    jobs = [o for o in objects(rendered("trainjob-fleet")) if o["kind"] == "TrainJob"]
    assert [j["metadata"]["name"] for j in jobs] == ["pets-0", "pets-1"]
    for shard, j in enumerate(jobs):
        env = {e["name"]: e.get("value") for e in j["spec"]["trainer"]["env"]}
        assert env["DREAMFLEET_SHARD_INDEX"] == str(shard) and env["DREAMFLEET_NUM_SHARDS"] == "2"
        assert env["DREAMFLEET_RDZV_HOST"] == f"pets-{shard}-node-0-0.pets-{shard}"  # the torch plugin's PET_MASTER_ADDR
        assert j["spec"]["suspend"] is True and j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert j["spec"]["runtimeRef"]["name"] == "dreamfleet-torch"
        assert j["spec"]["trainer"]["numNodes"] == 2 and j["spec"]["trainer"]["numProcPerNode"] == 8
        assert j["spec"]["trainer"]["args"][:2] == ["-m", "training.agent"]
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in j["spec"]["trainer"]["env"] if "valueFrom" in e}
        assert refs == {"bucket-creds"}


def test_a_trainjob_refuses_what_it_cannot_carry():
    from launcher.errors import ConfigError

    cfg = job_from_dict({**case("trainjob", priority_class="high", backoff_limit=1), "name": "9pets"})
    with pytest.raises(ConfigError) as err:
        k8s.render_files(cfg, list(cfg.subjects))
    text = str(err.value)
    assert "cluster.kubernetes.priority_class" in text and "cluster.kubernetes.backoff_limit" in text
    assert "must start with a letter" in text


def test_the_clustertrainingruntime_example_builds_and_its_jobset_validates():
    import jsonschema

    from conftest import require_binary

    require_binary("kubectl")
    built = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "runtime")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (runtime,) = list(yaml.safe_load_all(built.stdout))
    assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and runtime["kind"] == "ClusterTrainingRuntime"
    assert "namespace" not in runtime["metadata"] and set(runtime["spec"]) == {"mlPolicy", "template"}
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    jobset_schema = _strict(_crd_schema("jobset.x-k8s.io_jobsets.yaml", "v1alpha2"))
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "x"},
              "spec": runtime["spec"]["template"]["spec"]}
    jsonschema.validate(jobset, jobset_schema)
    (node,) = jobset["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    rules = node["template"]["spec"]["podFailurePolicy"]["rules"]
    assert {r["onExitCodes"]["containerName"] for r in rules if "onExitCodes" in r} == {"node"}
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": node["template"]["spec"]["template"]["spec"]}
    kubernetes_validate.validate(pod, _versions()[-1], strict=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kustomize_builds_and_apply_f_sees_only_resources(name, tmp_path):
    from conftest import require_binary

    require_binary("kubectl")
    cfg = job_from_dict(CASES[name])
    k8s.render(cfg, list(cfg.subjects), tmp_path)
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout)]
    yaml_files = sorted(p.name for p in tmp_path.glob("*.yaml"))  # what `kubectl apply -f DIR` reads
    assert len(kinds) == len(yaml_files) and "Kustomization" not in kinds


def test_pods_are_hardened_and_credentials_are_references(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for name in CASES:
        files = rendered(name)
        assert SECRET not in "".join(files.values())
    job = next(o for o in objects(rendered("indexed-job")) if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert c["envFrom"] == [{"secretRef": {"name": "bucket-creds"}}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    fleet = next(o for o in objects(rendered("indexed-job-fleet")) if o["kind"] == "Job")
    assert fleet["spec"]["completions"] == 3 and fleet["spec"]["parallelism"] == 2
    assert fleet["spec"]["backoffLimitPerIndex"] == 3 and fleet["spec"]["suspend"] is True
    assert "FailJob" not in {r["action"] for r in fleet["spec"]["podFailurePolicy"]["rules"]}  # one bad shard fails only itself
    assert fleet["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_checkov_finds_nothing_unjustified(tmp_path):
    checkov = REPO / ".venv-tools" / "bin" / "checkov"
    if not checkov.exists():
        if os.environ.get("CI"):
            pytest.fail("checkov is missing: `make tools` installs it into .venv-tools")
        pytest.skip("checkov is installed by `make tools` into .venv-tools")
    for name in CASES:
        cfg = job_from_dict(CASES[name])
        k8s.render(cfg, list(cfg.subjects), tmp_path / name)
    proc = subprocess.run([str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
                           "-o", "json", "--config-file", str(REPO / ".checkov.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['resource']}" for r in reports for c in r["results"]["failed_checks"]]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert not failed and passed > 50, failed


def test_render_refuses_a_multi_node_fleet_as_an_indexed_job():
    from launcher.errors import ConfigError

    cfg = job_from_dict(case("indexed-job", nnodes=2, shards=3))
    with pytest.raises(ConfigError, match="use flavour jobset"):
        k8s.render_files(cfg, list(cfg.subjects))


def _fleet(count: int) -> dict:
    subjects = [{"id": f"customer-{i:06d}", "images": f"s3://photos/customer-{i:06d}/",
                 "instance_prompt": "a photo of sks person", "class_prompt": "a photo of a person"} for i in range(count)]
    return {**case("indexed-job", nnodes=1, shards=8), "subjects": subjects}


def test_a_large_fleet_travels_gzipped_in_a_configmap_the_worker_reads(tmp_path):
    """3,000 subjects make the job file and plan ~600 KiB of text: they travel gzipped in
    binaryData, the objects still validate, and what a pod mounts is what the worker reads."""
    import base64

    import kubernetes_validate

    from launcher.render.kubernetes import PLAIN_LIMIT
    from training.worker import _load_plan

    cfg = job_from_dict(_fleet(3000))
    files = k8s.render_files(cfg, list(cfg.subjects))
    assert files == k8s.render_files(cfg, list(cfg.subjects))  # same input, same bytes, gzip included
    cm = next(o for o in objects(files) if o["kind"] == "ConfigMap")
    assert "data" not in cm and sorted(cm["binaryData"]) == ["job.yaml.gz", "plan.json.gz"]
    packed = {name: base64.b64decode(b64) for name, b64 in cm["binaryData"].items()}
    assert sum(map(len, packed.values())) < PLAIN_LIMIT / 4
    for obj in objects(files):
        if obj["kind"] in ("ConfigMap", "Job"):
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    job = next(o for o in objects(files) if o["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--job", "/etc/dreamfleet/job.yaml.gz"]
    for name, data in packed.items():  # the ConfigMap as the pod mounts it
        (tmp_path / name).write_bytes(data)
    assert load_job(tmp_path / "job.yaml.gz") == cfg
    plan = _load_plan(None, str(tmp_path / "job.yaml.gz"))  # the plan beside the job file, gzipped too
    assert plan.num_shards == 8 and len(plan.shards) == 3000


@pytest.mark.parametrize("prompt", ["trailing spaces   ", "a\ttab", "--- a document marker", "# not a comment",
                                    "quotes ' \" and \\ backslash", "ünïcødé ✓", "line one\nline two", "$(rm -rf /)"])
def test_the_configmap_job_file_is_readable_and_holds_any_prompt_exactly(prompt):
    """The job file in the ConfigMap is a literal block (readable with kubectl get -o yaml) where
    YAML allows one, and quoted where it does not: either way the worker reads the same job."""
    from launcher.config import dump_job

    cfg = job_from_dict({**BASE, "subjects": [{**BASE["subjects"][0], "instance_prompt": prompt}]})
    files = k8s.render_files(cfg, list(cfg.subjects))
    text = files["00-configmap-pets-job.yaml"]
    cm = yaml.safe_load(text)
    assert cm["data"]["job.yaml"] == dump_job(cfg)
    assert job_from_dict(yaml.safe_load(cm["data"]["job.yaml"])).subjects[0].instance_prompt == prompt
    if "\t" not in prompt and "   " not in prompt:
        assert "job.yaml: |" in text


def test_a_fleet_too_large_for_a_configmap_is_refused_with_a_way_out(monkeypatch):
    from launcher.errors import ConfigError
    from launcher.render import kubernetes as render

    monkeypatch.setattr(render, "CONFIGMAP_LIMIT", 16 * 1024)  # 1 MiB holds ~100,000 subjects gzipped
    cfg = job_from_dict(_fleet(3000))
    with pytest.raises(ConfigError, match="over the 1 MiB a Kubernetes ConfigMap holds: split the subjects"):
        k8s.render_files(cfg, list(cfg.subjects))


def test_a_damaged_gzipped_job_file_is_a_clear_error(tmp_path):
    from launcher.errors import ConfigError

    (tmp_path / "job.yaml.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="job.yaml.gz cannot be read"):
        load_job(tmp_path / "job.yaml.gz")


# ----------------------------------------------------------------------------- pod simulation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


@pytest.mark.slow
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzipped"])
def test_simulated_pods_of_an_indexed_job_rendezvous_and_train(tmp_path, tiny_model, subjects_root, gzipped, monkeypatch):
    """Run each pod of the rendered Indexed Job as a local process: command, args, env and the
    job file come from the manifests; only the cluster's own pieces are substituted, each
    explicitly: the Service DNS name -> 127.0.0.1, the rendezvous port -> a free one, the
    ConfigMap and volumes -> local folders, `python` -> this interpreter."""
    subjects = [subject_entry(subjects_root, 0), subject_entry(subjects_root, 1)]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(tiny_model, subjects, tmp_path / "out",
                                                distributed={"nnodes": 2, "nproc_per_node": 1},
                                                cluster={"backend": "kubernetes", "image": "dreamfleet:test"})))
    job = load_job(job_file)
    if gzipped:  # as a large fleet's job file and plan travel
        monkeypatch.setattr("launcher.render.kubernetes.PLAIN_LIMIT", 0)
    rendered_dir = tmp_path / "manifests"
    k8s.render(job, list(job.subjects), rendered_dir)
    docs = [yaml.safe_load(p.read_text()) for p in sorted(rendered_dir.glob("*.yaml"))]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    batch = next(d for d in docs if d["kind"] == "Job")
    pod = batch["spec"]["template"]["spec"]
    c = pod["containers"][0]
    port = _free_port()

    mounts = {m["mountPath"]: tmp_path / "volumes" / m["name"] for m in c["volumeMounts"]}
    job_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "job")
    for path in mounts.values():
        path.mkdir(parents=True, exist_ok=True)
    for key, text in cm.get("data", {}).items():
        (mounts[job_mount] / key).write_text(text)
    for key, b64 in cm.get("binaryData", {}).items():
        (mounts[job_mount] / key).write_bytes(base64.b64decode(b64))
    assert sorted(p.name for p in mounts[job_mount].iterdir()) == (["job.yaml.gz", "plan.json.gz"] if gzipped
                                                                   else ["job.yaml", "plan.json"])

    def local(value: str) -> str:
        for mount_path, folder in mounts.items():
            if mount_path != "/dev/shm" and value.startswith(mount_path):
                value = str(folder) + value[len(mount_path):]
                break
        return value.replace(":29500", f":{port}")

    procs = []
    for index in range(batch["spec"]["completions"]):
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        env["JOB_COMPLETION_INDEX"] = str(index)
        env["DREAMFLEET_RDZV_HOST"] = "127.0.0.1"  # <job>-0.<service> resolves to pod 0: here, this host
        env = {k: local(v) for k, v in env.items()}
        argv = [sys.executable if c["command"] == ["python"] else c["command"][0]]
        argv += [local(_expand(a, env)) for a in c["args"]]
        procs.append(subprocess.Popen(argv, env=worker_env(env), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    text = "\n".join(outputs)
    assert "rank 0/2: 1 subject(s)" in text and "rank 1/2: 1 subject(s)" in text
    for sid in ("s0", "s1"):
        status = json.loads((tmp_path / "out" / "t" / "subjects" / sid / "status.json").read_text())
        assert status["state"] == "done"
