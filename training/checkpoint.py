"""Resumable checkpoints: adapter weights, optimizer, LR schedule, RNG states and step.

    <subject>/checkpoints/step-00000100/   files + MANIFEST.json (written last)
    <subject>/checkpoints/latest           "step-00000100", moved only after that manifest exists

A checkpoint without a manifest is incomplete: it is ignored on resume and cleaned up.

Data-parallel runs (training.dataparallel) add the engine state, one part per rank, each
published by its own node (so nodes need not share a disk) before the folder's manifest:

    step-00000100/engine/rank-00000/    rank 0's engine files (DeepSpeed: its optimizer shard,
    step-00000100/engine/rank-00001/    the module file, `latest`), each part with its MANIFEST.json
    step-00000100/MANIFEST.json         lists the adapter files and names the parts (engine_ranks)

Uploads run off the training path: `Uploader.submit` publishes on a background thread, at most
one upload in flight (a second submit first waits for the first), and `Uploader.wait` is called
before a subject's final publish, so the adapter never lands before its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from launcher import storage

log = logging.getLogger(__name__)
LATEST = "latest"
ENGINE = "engine"  # the optimizer state of a data-parallel run (DeepSpeed: its checkpoint) in a checkpoint folder


def checkpoints_uri(subject_uri: str) -> str:
    return storage.join(subject_uri, "checkpoints")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_uri(subject_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri(subject_uri), step_name(step))


def engine_part_uri(checkpoint_uri: str, rank: int) -> str:
    return storage.join(checkpoint_uri, ENGINE, f"rank-{rank:05d}")


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def write_local(directory: Path, adapters: dict[str, dict[str, torch.Tensor]], trainer_state: dict) -> Path:
    """Write a checkpoint folder: one safetensors per adapted model and a torch file for the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    for part, state in adapters.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / f"adapter_{part}.safetensors"))
    torch.save(trainer_state, directory / "trainer_state.pt")
    return directory


def read_local(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    adapters = {p.stem.removeprefix("adapter_"): load_file(str(p)) for p in sorted(directory.glob("adapter_*.safetensors"))}
    trainer_state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    return adapters, trainer_state


def stage(work: Path, step: int, adapters: dict[str, dict[str, torch.Tensor]], stepper_state: dict,
          generator: torch.Generator, metrics: Path | None = None) -> Path:
    """Write one subject's checkpoint into `work/checkpoint/step-N` (the training loops' shared
    format: a single run and a packed slot can resume each other's checkpoints)."""
    local = work / "checkpoint" / step_name(step)
    write_local(local, adapters, {"step": step, "stepper": stepper_state, "rng": rng_state(generator)})
    if metrics is not None and metrics.exists():
        (local / "metrics.jsonl").write_bytes(metrics.read_bytes())
    return local


@dataclass
class Resume:
    name: str
    step: int
    adapters: dict[str, dict[str, torch.Tensor]]
    trainer_state: dict
    metrics: bytes | None


def resume(subject_uri: str) -> Resume | None:
    """The subject's newest complete checkpoint, fetched, or None."""
    latest = find_latest(subject_uri)
    if latest is None:
        return None
    adapters, trainer_state = fetch(latest)
    try:
        metrics = storage.read_bytes(storage.join(latest, "metrics.jsonl"))
    except FileNotFoundError:
        metrics = None
    return Resume(latest.rsplit("/", 1)[-1], int(trainer_state["step"]), adapters, trainer_state, metrics)


def publish(local_dir: Path, subject_uri: str, step: int, keep: int, extra: dict | None = None) -> str:
    """Upload a checkpoint, then move `latest` to it, then prune to the newest `keep`. Engine
    parts (publish_engine_part) must be complete before: the folder's manifest vouches for them."""
    root = checkpoints_uri(subject_uri)
    name = step_name(step)
    storage.publish_dir(local_dir, storage.join(root, name), extra={"step": step, **(extra or {})})
    storage.write_text(storage.join(root, LATEST), name + "\n")
    complete = [n for n in storage.list_names(root) if n.startswith("step-")]
    for old in sorted(complete)[:-keep]:
        storage.remove(storage.join(root, old))
    log.info("checkpoint %s published to %s", name, storage.redact(root))
    return name


def unpublish(checkpoint_uri: str) -> None:
    """Withdraw a checkpoint folder's manifest before its parts are replaced (the same step
    written again after a resume), so that it is never complete with a mix of old and new parts."""
    storage.remove(storage.join(checkpoint_uri, storage.MANIFEST))


def publish_engine_part(local_dir: Path, checkpoint_uri: str, rank: int) -> None:
    """Upload one rank's engine files (a complete part with its own manifest)."""
    storage.publish_dir(local_dir, engine_part_uri(checkpoint_uri, rank), extra={"rank": rank})


def fetch_for_rank(checkpoint_uri: str, local_dir: Path, rank: int, all_parts: bool = False) -> dict:
    """Download a checkpoint for one rank: the adapter files and trainer state, and of the engine
    only rank 0's part (DeepSpeed's module file and `latest`) and the rank's own (its optimizer
    shard), all checksummed, into `local_dir/engine/`; `all_parts` takes every rank's. Returns
    the folder's manifest."""
    manifest = storage.fetch_dir(checkpoint_uri, local_dir)
    ranks = manifest.get("engine_ranks", [])
    parts = ranks if all_parts else sorted({0, rank} & set(ranks))
    for part in parts:
        storage.fetch_dir(engine_part_uri(checkpoint_uri, part), local_dir / ENGINE)
    if ranks:
        log.info("checkpoint %s: rank %d fetched the engine part(s) of rank(s) %s", checkpoint_uri.rsplit("/", 1)[-1],
                 rank, ", ".join(map(str, parts)))
    return manifest


class Uploader:
    """Publishes checkpoints on one background thread; at most one upload is in flight.

    An upload's error is raised by the next `submit` or `wait`, so a failed checkpoint stops the
    run at the next checkpoint at the latest, with its cause."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s or float(os.environ.get("DREAMFLEET_UPLOAD_TIMEOUT_S", "3600"))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, local_dir: Path, subject_uri: str, step: int, keep: int) -> None:
        self.wait()

        def upload() -> None:
            try:
                publish(local_dir, subject_uri, step, keep)
                shutil.rmtree(local_dir, ignore_errors=True)  # published: the local copy is no longer needed
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=upload, name=f"checkpoint-upload-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) is published; raise its error."""
        if self._thread is not None:
            self._thread.join(self.timeout_s)
            if self._thread.is_alive():
                raise storage.StorageError(f"checkpoint upload still running after {self.timeout_s:.0f}s")
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def find_latest(subject_uri: str) -> str | None:
    """URI of the newest complete checkpoint; incomplete ones are removed."""
    root = checkpoints_uri(subject_uri)
    try:
        pointer = storage.read_text(storage.join(root, LATEST)).strip()
    except FileNotFoundError:
        pointer = None
    names = [n for n in storage.list_names(root) if n.startswith("step-")]
    complete = [n for n in names if storage.is_complete(storage.join(root, n))]
    for name in names:
        if name not in complete:
            log.warning("removing incomplete checkpoint %s (no manifest)", name)
            storage.remove(storage.join(root, name))
    if pointer in complete:
        return storage.join(root, pointer)
    return storage.join(root, max(complete)) if complete else None


def fetch(uri: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    with tempfile.TemporaryDirectory(prefix="dreamfleet-ckpt-") as tmp:
        storage.fetch_dir(uri, tmp)
        return read_local(Path(tmp))


def clear(subject_uri: str) -> None:
    storage.remove(checkpoints_uri(subject_uri))
