"""What shapes a job's result, kept beside its outputs, so that a resubmit with other settings
is noticed instead of mixing two runs in one output.

    <output>/<job>/fingerprint.json   {"settings": {dotted key: value}, "sha256": ..., "superseded": [...]}

The settings are those that change a trained adapter: the model, the adapter, the training
hyper-parameters, prior preservation. Those that change only how or how fast it is trained, or
what is logged beside it (IGNORED), are left out, so a resubmit with `train.pack=8` or a
finer `train.log_every` goes on where the last one stopped. The `eval` section (evaluator models, score
thresholds) is not among SECTIONS: scoring never changes an adapter, so a changed threshold re-gates
the recorded scores (launcher.quality) instead of forcing a retrain. Subjects are not part of it: adding
subjects to a job is what resubmitting is for. The batch counts as the global batch (per-rank
batch x accumulation x data-parallel ranks), so a run resumed with another layout of the same
batch goes on.

On a difference, `launcher submit` refuses and lists it. `--force-new` starts the job over
under the new settings in the same output: the old fingerprint and job file are kept under
`superseded/<sha>/`, every subject goes back to pending with a fresh attempt budget (its
history says why), its checkpoints of the old settings are removed (they cannot be resumed
under the new ones), and each published adapter stays until the new one replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from launcher import ledger, storage
from launcher.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

FILE = "fingerprint.json"
SECTIONS = ("model", "adapter", "train", "prior")
IGNORED = {"model.cache_dir", "train.gradient_checkpointing", "train.checkpoint_every", "train.keep_checkpoints",
           "train.log_every", "train.pack", "train.compile", "train.attention", "train.samples", "prior.store",
           "train.trackers", "train.tracker_project"}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif prefix not in IGNORED and not any(prefix.startswith(i + ".") for i in IGNORED):
        out[prefix] = value


def settings(job) -> dict[str, Any]:
    """{dotted key: value} of what shapes the result, sorted."""
    data = job.model_dump(mode="json")
    out: dict[str, Any] = {}
    for section in SECTIONS:
        _flatten(section, data.get(section), out)
    # what a step sees is the global batch: 2 DDP ranks of batch 1 train as 1 process of batch 2
    d = job.distributed
    ranks = d.nnodes * d.nproc_per_node if d.strategy in ("ddp", "deepspeed") else 1
    out["train.global_batch"] = out.pop("train.batch_size") * out.pop("train.gradient_accumulation") * ranks
    return dict(sorted(out.items()))


def digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


# settings added after fingerprints were first recorded, with the value every earlier run had: a
# record without them was trained so, and must not read as changed
ADDED = {"model.family": "auto", "model.vae": None, "model.quantize": "none", "adapter.text_encoder_2": None, "train.guidance": 3.5,
         "train.weighting_scheme": "none", "train.logit_mean": 0.0, "train.logit_std": 1.0,
         "train.prompt_template": "{instance}", "train.caption_dropout": 0.0, "train.buckets": False,
         "train.bucket_step": 64}


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    missing = object()
    before = {**{k: v for k, v in ADDED.items() if k in now}, **before}
    keys = sorted(set(before) | set(now))
    return [f"{k}: {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in keys
            if before.get(k, missing) != now.get(k, missing)]


def read(job_uri: str) -> dict | None:
    return storage.read_json(storage.join(job_uri, FILE))


def check(job, force_new: bool = False, record: bool = True) -> str:
    """Compare the job with what its output was trained with; record it when there is nothing
    yet. Raises ConfigError listing the differences, unless `force_new` (then the job starts over,
    as the module docstring says). `record=False` (a dry run) checks and writes nothing.
    Returns what was done, for the log."""
    now = settings(job)
    try:
        stored = read(job.job_uri)
    except (OSError, StorageError) as exc:
        if record:
            raise
        # the launcher's look before submitting: the workers compare again before they train
        log.warning("cannot read %s (%s); the workers compare the settings before they train",
                    storage.redact(storage.join(job.job_uri, FILE)), exc)
        return "unreadable"
    if stored is None:
        if not record:
            return "nothing recorded yet"
        storage.write_json(storage.join(job.job_uri, FILE), {"settings": now, "sha256": digest(now), "superseded": []})
        return "recorded"
    changed = differences(stored.get("settings", {}), now)
    if not changed:
        return "unchanged"
    where = storage.redact(job.job_uri)
    if not force_new:
        raise ConfigError(
            f"{where} was trained with other settings; this submit would mix two runs in one output. Use a new job "
            "name (or output.uri) for a separate run, or `launcher submit --force-new` to train every subject again "
            "under the new settings (docs/fleet.md)", changed)
    if not record:
        return f"would start over: {len(changed)} setting(s) changed"
    old = stored.get("sha256") or digest(stored.get("settings", {}))
    archive = storage.join(job.job_uri, "superseded", old[:16])
    storage.write_json(storage.join(archive, FILE), stored)
    try:
        storage.write_bytes(storage.join(archive, "job.yaml"), storage.read_bytes(storage.join(job.job_uri, "job.yaml")))
    except FileNotFoundError:
        pass
    for status in ledger.list_statuses(job.job_uri):
        status.history.append({"superseded": old[:16], "at": time.time(), "state": status.state})
        status.state, status.attempts, status.step, status.error, status.invalid = "pending", 0, 0, None, False
        status.final_loss = None
        storage.remove(storage.join(ledger.subject_uri(job.job_uri, status.id), "checkpoints"))
        ledger.write_status(job.job_uri, status)
    superseded = stored.get("superseded", []) + [{"sha256": old, "until": time.time()}]
    storage.write_json(storage.join(job.job_uri, FILE), {"settings": now, "sha256": digest(now), "superseded": superseded})
    return f"started over: {len(changed)} setting(s) changed"
