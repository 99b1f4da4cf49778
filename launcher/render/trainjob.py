"""The `trainjob` flavour: a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) per job,
or one per shard in a fleet (`<job>-<shard>`), over a ClusterTrainingRuntime built on JobSet
(`cluster.kubernetes.runtime`; k8s/runtime/ has dreamfleet's).

The runtime's torch plugin only sets PET_* variables; the command is ours: `python -m
training.agent` with the same c10d rendezvous arguments as the jobset flavour, meeting at the
pod the plugin names as master (`<trainjob>-node-0-0.<trainjob>`, port 29500). What the TrainJob
API cannot carry is refused at render (the runtime holds it: retries, pull policy, priority).
The API has no envFrom for the trainer: the credentials Secret is referenced key by key
(optional secretKeyRefs of CREDENTIAL_KEYS), never by value.
"""

from __future__ import annotations

from typing import Any

from launcher.config import JobConfig, KubernetesConfig
from launcher.errors import ConfigError
from launcher.render.kubernetes import JobFiles, _kueue, _meta, labels, pod_spec, torchrun_args

NODE = "node"  # the runtime's trainer Job and container name (the Trainer's constant)
MANAGER = "dreamfleet/launcher"  # runtimePatches' owner: a domain-prefixed path
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_CLIENT_ID",
                   "AZURE_CLIENT_SECRET", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCOUNT_NAME",
                   "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "AZURE_TENANT_ID", "HF_TOKEN")
PATCHED_POD = ("affinity", "nodeSelector", "securityContext", "serviceAccountName", "terminationGracePeriodSeconds",
               "tolerations", "volumes")
RUNTIME_POD = ("restartPolicy", "automountServiceAccountToken", "containers", "subdomain")  # the runtime's, or below
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
NOT_CARRIED = {  # field: where it lives instead
    "parallelism": "each shard is its own TrainJob: Kueue's quota decides how many run at once",
    "backoff_limit": "retries are the runtime's JobSet failurePolicy.maxRestarts",
    "priority_class": "set priorityClassName in the runtime, or a Kueue WorkloadPriorityClass",
    "image_pull_policy": "the runtime's container sets it",
}


def _refuse_what_a_trainjob_cannot_carry(job: JobConfig, names: list[str], nnodes: int) -> None:
    k = job.cluster.kubernetes
    problems = [f"cluster.kubernetes.{f} does not apply to flavour trainjob: {why}" for f, why in NOT_CARRIED.items()
                if getattr(k, f) != KubernetesConfig.model_fields[f].default]
    problems += [f"cluster.env.{n} is set by the Trainer's torch plugin" for n in RESERVED_ENV if n in job.cluster.env]
    if not job.name[0].isalpha():
        problems.append(f"name {job.name!r} must start with a letter for flavour trainjob (a TrainJob name is a DNS-1035 label)")
    longest = f"{names[-1]}-{NODE}-0-{nnodes - 1}"
    if len(longest) > 63:
        problems.append(f"name {job.name!r} is too long for flavour trainjob: pod hostname {longest} passes 63 characters")
    if problems:
        raise ConfigError("the job cannot render as a TrainJob", problems)


def _credentials(k: KubernetesConfig) -> list[dict]:
    if not k.credentials_secret:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": k.credentials_secret, "key": key, "optional": True}}}
            for key in CREDENTIAL_KEYS]


def trainjob(job: JobConfig, plan, files: JobFiles) -> list[dict]:
    k = job.cluster.kubernetes
    fleet = plan.num_shards > 1
    names = [f"{job.name}-{i}" for i in range(plan.num_shards)] if fleet else [job.name]
    _refuse_what_a_trainjob_cannot_carry(job, names, plan.nnodes)
    multi_node = plan.nnodes > 1
    out = []
    for shard, name in enumerate(names):
        env_extra = [{"name": "DREAMFLEET_SHARD_INDEX", "value": str(shard)}]
        if multi_node:  # where the torch plugin points PET_MASTER_ADDR: pod 0 of the JobSet's node Job
            env_extra += [{"name": "DREAMFLEET_RDZV_HOST", "value": f"{name}-{NODE}-0-0.{name}"},
                          {"name": "DREAMFLEET_RDZV_ID", "value": name}]
        pod = pod_spec(job, plan, torchrun_args(plan, multi_node, files), env_extra, None)
        c = pod["containers"][0]
        assert set(pod) <= set(PATCHED_POD) | set(RUNTIME_POD) | {"priorityClassName"}, sorted(pod)
        trainer = {"image": c["image"], "command": c["command"], "args": c["args"], "env": c["env"] + _credentials(k),
                   "numNodes": plan.nnodes, "numProcPerNode": plan.nproc_per_node, "resourcesPerNode": c["resources"]}
        patch_pod: dict[str, Any] = {key: pod[key] for key in PATCHED_POD if key in pod}
        patch_pod["containers"] = [{"name": NODE, "securityContext": c["securityContext"], "volumeMounts": c["volumeMounts"]}]
        patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": NODE, "template": {"spec": {"template": {"metadata": {"labels": labels(job)}, "spec": patch_pod}}}}]}}}}
        spec: dict[str, Any] = {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                               "name": k.runtime},
                                "trainer": trainer, "runtimePatches": [patch]}
        meta = _meta(job, name)
        _kueue(job, meta, spec)
        out.append({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": meta, "spec": spec})
    return out
