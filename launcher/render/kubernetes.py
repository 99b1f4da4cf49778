"""Render a job as Kubernetes manifests: plain dicts, dumped by the backend with a YAML library.

Flavours:
- `indexed-job` (default, no operator): an Indexed Job plus a headless Service. Multi-node:
  completions = parallelism = nnodes, pods resolve as `<job>-<index>.<job>`, torchrun agents
  rendezvous at index 0. Fleet (`cluster.shards` > 1, one node per shard): completions = shards,
  parallelism from the job, `backoffLimitPerIndex` so one bad shard does not fail the fleet,
  and the shard index is the completion index.
- `pytorchjob`: Kubeflow's PyTorchJob (kubeflow.org/v1), Master + Workers.
- `jobset`: a JobSet (jobset.x-k8s.io/v1alpha2): one replicated Job per shard, nnodes pods each.
- `trainjob`: Kubeflow Trainer v2 TrainJobs, one per shard (launcher/render/trainjob.py).

Credentials are only referenced (a Secret by name, or a service account); the job file and the
shard plan travel in a ConfigMap: as text, or gzipped (`job.yaml.gz`, `plan.json.gz` in
binaryData) when a fleet's subjects make them larger than PLAIN_LIMIT, so that thousands of
subjects fit in the 1 MiB a ConfigMap holds. `queue` adds Kueue's queue-name label and creates
the workload suspended.
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import dataclass
from typing import Any

from launcher.config import JobConfig, KubernetesConfig
from launcher.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, ConfigError
from launcher.plan import Plan
from launcher.render import AGENT_MODULE

JOB_MOUNT = "/etc/dreamfleet"
CACHE_MOUNT = "/cache"
RDZV_PORT = 29500
UID = 10001  # the worker image's non-root user
CONFIGMAP_LIMIT = 1024 * 1024  # bytes of data a ConfigMap may hold (Kubernetes' validation)
PLAIN_LIMIT = 256 * 1024  # larger job files and plans are gzipped


def labels(job: JobConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dreamfleet", "app.kubernetes.io/instance": job.name,
            "app.kubernetes.io/component": "worker"}


def _meta(job: JobConfig, name: str, extra_labels: dict | None = None) -> dict:
    meta = {"name": name, "namespace": job.cluster.kubernetes.namespace, "labels": {**labels(job), **(extra_labels or {})}}
    return meta


@dataclass(frozen=True)
class JobFiles:
    """The ConfigMap's payload, mounted at JOB_MOUNT, and the job file's path in the pod (the
    worker reads the plan beside it, gzipped beside a gzipped job file)."""

    data: dict[str, str]
    binary_data: dict[str, str]
    job_path: str


def job_files(job_yaml: str, plan_json: str) -> JobFiles:
    texts = {"job.yaml": job_yaml, "plan.json": plan_json}
    if sum(len(t.encode()) for t in texts.values()) <= PLAIN_LIMIT:
        return JobFiles(texts, {}, f"{JOB_MOUNT}/job.yaml")
    packed = {f"{name}.gz": gzip.compress(text.encode(), mtime=0) for name, text in texts.items()}  # same input, same bytes
    size = sum(len(b) for b in packed.values())
    if size > CONFIGMAP_LIMIT - 4096:
        raise ConfigError(f"the job file and shard plan are {size / 2**20:.1f} MiB even gzipped, over the 1 MiB a "
                          "Kubernetes ConfigMap holds: split the subjects into several jobs (or use the Slurm backend, "
                          "which reads the job file from shared storage)")
    return JobFiles({}, {name: base64.b64encode(b).decode() for name, b in packed.items()}, f"{JOB_MOUNT}/job.yaml.gz")


def configmap(job: JobConfig, files: JobFiles) -> dict:
    """The resolved job file and the shard plan, mounted side by side at JOB_MOUNT."""
    cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, f"{job.name}-job")}
    if files.data:
        cm["data"] = files.data
    if files.binary_data:
        cm["binaryData"] = files.binary_data
    return cm


def headless_service(job: JobConfig) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(job, job.name),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"app.kubernetes.io/instance": job.name},
                     "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}}


def network_policy(job: JobConfig) -> dict:
    """Only the job's own pods may connect to its workers (the rendezvous and collectives);
    egress stays open for buckets and model stores."""
    own = {"matchLabels": {"app.kubernetes.io/instance": job.name}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(job, job.name),
            "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own}]}]}}


def torchrun_args(plan: Plan, multi_node: bool, files: JobFiles) -> list[str]:
    args = ["-m", AGENT_MODULE, f"--nnodes={plan.nnodes}", f"--nproc-per-node={plan.nproc_per_node}"]
    if multi_node:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint=$(DREAMFLEET_RDZV_HOST):{RDZV_PORT}", "--rdzv-id=$(DREAMFLEET_RDZV_ID)"]
    else:
        args += ["--standalone"]
    return args + worker_args(files)


def worker_args(files: JobFiles) -> list[str]:
    return ["-m", "training.worker", "--job", files.job_path]


def _env(job: JobConfig, plan: Plan, extra: list[dict]) -> list[dict]:
    fixed = {"DREAMFLEET_CACHE_DIR": f"{CACHE_MOUNT}/models", "HF_HOME": f"{CACHE_MOUNT}/hf",
             "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONUNBUFFERED": "1", **plan.env}
    return [{"name": k, "value": v} for k, v in sorted(fixed.items())] + extra


def container(job: JobConfig, plan: Plan, args: list[str], env_extra: list[dict]) -> dict:
    k: KubernetesConfig = job.cluster.kubernetes
    resources: dict[str, Any] = {"cpu": k.cpu, "memory": k.memory}
    if k.gpus_per_pod:
        resources["nvidia.com/gpu"] = str(k.gpus_per_pod)
    spec: dict[str, Any] = {
        "name": "worker", "image": job.cluster.image, "imagePullPolicy": k.image_pull_policy,
        "command": ["python"], "args": args, "env": _env(job, plan, env_extra),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT}],
        "volumeMounts": [{"name": "job", "mountPath": JOB_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "cache", "mountPath": CACHE_MOUNT},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if k.credentials_secret:
        spec["envFrom"] = [{"secretRef": {"name": k.credentials_secret}}]
    return spec


def pod_spec(job: JobConfig, plan: Plan, args: list[str], env_extra: list[dict], subdomain: str | None,
             restart: str = "Never") -> dict:
    k = job.cluster.kubernetes
    cache = ({"persistentVolumeClaim": {"claimName": k.cache_claim}} if k.cache_claim
             else {"emptyDir": {"sizeLimit": k.cache_size}})
    spec: dict[str, Any] = {
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": k.termination_grace_s,
        "automountServiceAccountToken": bool(k.service_account),
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container(job, plan, args, env_extra)],
        "volumes": [{"name": "job", "configMap": {"name": f"{job.name}-job"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
                    {"name": "cache", **cache},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if subdomain:
        spec["subdomain"] = subdomain
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    for key, value in (("nodeSelector", k.node_selector), ("tolerations", k.tolerations), ("affinity", k.affinity),
                       ("priorityClassName", k.priority_class)):
        if value:
            spec[key] = value
    return spec


def _pod_template(job: JobConfig, spec: dict) -> dict:
    return {"metadata": {"labels": labels(job)}, "spec": spec}


def _failure_policy(per_index: bool = False) -> dict:
    """A user error is not retried: it fails the job at once, or in a fleet only its own index
    (one bad shard must not fail the others); a preemption (disruption, or exit 75 after a
    checkpoint) does not count against the retries."""
    return {"rules": [
        {"action": "FailIndex" if per_index else "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [EXIT_USER_ERROR]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [EXIT_PREEMPTED]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _kueue(job: JobConfig, meta: dict, spec: dict) -> None:
    if job.cluster.kubernetes.queue:
        meta["labels"]["kueue.x-k8s.io/queue-name"] = job.cluster.kubernetes.queue
        spec["suspend"] = True


def indexed_job(job: JobConfig, plan: Plan, files: JobFiles) -> list[dict]:
    k = job.cluster.kubernetes
    fleet = plan.num_shards > 1
    if fleet and plan.nnodes > 1:
        raise ConfigError("cluster.kubernetes.flavour indexed-job runs a fleet with one pod per shard: "
                          "set distributed.nnodes to 1, or use flavour jobset for multi-node shards")
    multi_node = plan.nnodes > 1
    env_extra = [{"name": "DREAMFLEET_RDZV_HOST", "value": f"{job.name}-0.{job.name}"},
                 {"name": "DREAMFLEET_RDZV_ID", "value": job.name}] if multi_node else []
    if not fleet:
        # JOB_COMPLETION_INDEX is the node index here, not a shard: pin the shard
        env_extra.append({"name": "DREAMFLEET_SHARD_INDEX", "value": "0"})
    completions = plan.num_shards if fleet else plan.nnodes
    spec: dict[str, Any] = {
        "completionMode": "Indexed", "completions": completions,
        "parallelism": min(k.parallelism or completions, completions) if fleet else completions,
        "template": _pod_template(job, pod_spec(job, plan, torchrun_args(plan, multi_node, files), env_extra, job.name)),
    }
    if fleet:
        spec["backoffLimitPerIndex"] = k.backoff_limit
        spec["maxFailedIndexes"] = completions
    else:
        spec["backoffLimit"] = k.backoff_limit
    spec["podFailurePolicy"] = _failure_policy(per_index=fleet)
    meta = _meta(job, job.name)
    _kueue(job, meta, spec)
    out = [{"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}]
    return ([headless_service(job)] if multi_node else []) + out


def pytorchjob(job: JobConfig, plan: Plan, files: JobFiles) -> list[dict]:
    k = job.cluster.kubernetes
    if plan.num_shards > 1:
        raise ConfigError("cluster.kubernetes.flavour pytorchjob runs one shard: use indexed-job or jobset for fleets")
    args = ["-m", AGENT_MODULE, f"--nnodes={plan.nnodes}", f"--nproc-per-node={plan.nproc_per_node}",
            "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
            *worker_args(files)]
    env_extra = [{"name": "DREAMFLEET_SHARD_INDEX", "value": "0"}]

    def replica(count: int) -> dict:
        pod = pod_spec(job, plan, args, env_extra, None, restart="OnFailure")
        pod["containers"][0]["name"] = "pytorch"  # the operator finds the container by this name
        return {"replicas": count, "restartPolicy": "OnFailure", "template": _pod_template(job, pod)}

    specs = {"Master": replica(1)}
    if plan.nnodes > 1:
        specs["Worker"] = replica(plan.nnodes - 1)
    spec: dict[str, Any] = {"pytorchReplicaSpecs": specs, "nprocPerNode": str(plan.nproc_per_node),
                            "runPolicy": {"backoffLimit": k.backoff_limit}}
    meta = _meta(job, job.name)
    if k.queue:
        meta["labels"]["kueue.x-k8s.io/queue-name"] = k.queue
        spec["runPolicy"]["suspend"] = True
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta, "spec": spec}]


def jobset(job: JobConfig, plan: Plan, files: JobFiles) -> list[dict]:
    k = job.cluster.kubernetes
    multi_node = plan.nnodes > 1
    shard = "$(DREAMFLEET_SHARD_INDEX)"
    env_extra = [{"name": "DREAMFLEET_SHARD_INDEX",
                  "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}}]
    if multi_node:
        env_extra += [{"name": "DREAMFLEET_RDZV_HOST", "value": f"{job.name}-workers-{shard}-0.{job.name}"},
                      {"name": "DREAMFLEET_RDZV_ID", "value": f"{job.name}-{shard}"}]
    pod = pod_spec(job, plan, torchrun_args(plan, multi_node, files), env_extra, None)
    job_spec = {"completionMode": "Indexed", "completions": plan.nnodes, "parallelism": plan.nnodes,
                "backoffLimit": 0, "podFailurePolicy": _failure_policy(), "template": _pod_template(job, pod)}
    spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True, "subdomain": job.name},
        "failurePolicy": {"maxRestarts": k.backoff_limit},
        "replicatedJobs": [{"name": "workers", "replicas": plan.num_shards, "template": {"spec": job_spec}}],
    }
    meta = _meta(job, job.name)
    _kueue(job, meta, spec)
    return [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta, "spec": spec}]


FLAVOURS = {"indexed-job": indexed_job, "pytorchjob": pytorchjob, "jobset": jobset}


def render_manifests(job: JobConfig, plan: Plan, job_yaml: str, plan_json: str) -> list[dict]:
    """Every object to apply, in apply order: the job file's ConfigMap first."""
    files = job_files(job_yaml, plan_json)
    flavour = job.cluster.kubernetes.flavour
    if flavour == "trainjob":
        from launcher.render.trainjob import trainjob as workload  # built on this module's pod pieces
    else:
        workload = FLAVOURS[flavour]
    return [configmap(job, files), network_policy(job)] + workload(job, plan, files)
