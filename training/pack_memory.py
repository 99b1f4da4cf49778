"""How many subjects `train.pack: auto` puts in one pack on a GPU, from its free memory.

`pack_for_memory` is the sizing as a pure function of figures (free bytes, resolution, rows
per subject, the model's footprint), so it is unit-tested without a GPU; `model_footprint` reads
the footprint from the model's own safetensors headers (no weights are read); training.packed's
`auto_pack` reads the free memory and puts the two together.

The free memory is read before the model is loaded (training.distributed resolves the pack
size before `Worker.setup` loads the base), so the model's own footprint, which the base will
take once loaded, is subtracted from it. What is left, less a headroom for the allocator's
fragmentation and the autocast copies of the weights, is divided by the activations of one
subject's rows.

The activation figure is an estimate, not a measurement: about 2.5 GiB per 512 px sample for an
SD 1.5 UNet under half-precision autocast without gradient checkpointing, scaled by the pixel
area and by the UNet's parameter count relative to SD 1.5's. Gradient checkpointing makes the
true figure smaller, so the estimate errs towards smaller packs.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GiB = 2**30
SD15_UNET_PARAMS = 859_520_964
ACTIVATIONS_PER_512PX_SAMPLE = 2.5 * GiB  # SD 1.5 UNet, half-precision autocast (an estimate)
HEADROOM = 0.8  # the share of free memory a pack may plan to use


@dataclass(frozen=True)
class Footprint:
    """What the loaded base takes on the device, and the size of its denoiser."""

    bytes: int
    unet_params: int


# SD 1.5 (UNet 859.5M fp32, text encoder 123.1M and VAE 83.7M in half precision): the figure used
# when the model's files cannot be read before loading (a remote or Hub source not yet staged)
SD15 = Footprint(SD15_UNET_PARAMS * 4 + (123_060_480 + 83_653_863) * 2, SD15_UNET_PARAMS)


def pack_for_memory(free_bytes: int, resolution: int, rows_per_subject: int, model_bytes: int,
                    unet_params: int = SD15_UNET_PARAMS, max_pack: int = 16) -> int:
    """The pack size that fits: (HEADROOM x free - model still to load) // one subject's activations,
    between 1 and `max_pack`. `rows_per_subject` is the batch size, doubled with prior preservation."""
    per_subject = (ACTIVATIONS_PER_512PX_SAMPLE * (resolution / 512) ** 2 * rows_per_subject
                   * unet_params / SD15_UNET_PARAMS)
    usable = HEADROOM * free_bytes - model_bytes
    return max(1, min(max_pack, int(usable // per_subject)))


def _tensors(path: Path) -> dict[str, dict]:
    """A safetensors file's header: name -> {dtype, shape}, read without the weights."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one component: `name.safetensors` or its shards
    (`name-00001-of-00002.safetensors`), or those of the variant (`name.fp16.safetensors`)."""
    files = []
    for f in sorted(folder.glob("*.safetensors")):
        parts = f.name.split(".")
        if (variant is None and len(parts) == 2) or (variant and len(parts) == 3 and parts[1].startswith(variant)):
            files.append(f)
    return files


def _param_count(folder: Path, variant: str | None) -> int | None:
    files = _weight_files(folder, variant)
    if not files:
        return None
    total = 0
    for f in files:
        for t in _tensors(f).values():
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total


def model_footprint(model_dir: Path, frozen: torch.dtype, variant: str | None = None) -> Footprint | None:
    """The loaded base's device bytes (the denoiser fp32, VAE and text encoders in `frozen`, as
    training.components loads them), from the parameter counts in the safetensors headers.
    None where a component has no safetensors file (then the caller assumes SD 1.5)."""
    model_dir = Path(model_dir)
    denoiser = "transformer" if (model_dir / "transformer").is_dir() else "unet"  # a DiT family's, else the UNet
    frozen_parts = ["vae", "text_encoder"] + (["text_encoder_2"] if (model_dir / "text_encoder_2").is_dir() else [])
    counts = {name: _param_count(model_dir / name, variant) for name in [denoiser, *frozen_parts]}
    if any(n is None for n in counts.values()):
        return None
    frozen_size = torch.empty((), dtype=frozen).element_size()
    return Footprint(counts[denoiser] * 4 + sum(counts[n] for n in frozen_parts) * frozen_size, counts[denoiser])


def footprint_of(model, device: torch.device) -> Footprint:
    """The footprint of a job's base (`model`, its ModelConfig) from its local files; SD 1.5's
    where they cannot be read yet (a remote source is staged when the base loads)."""
    from launcher import storage
    from training.precision import dtype_of

    if model is not None and storage.is_local(model.source):
        found = model_footprint(storage.local_path(model.source), dtype_of(model.dtype, device), model.variant)
        if found is not None:
            return found
    return SD15


def auto_pack_cuda(device: torch.device, resolution: int, rows_per_subject: int, model, max_pack: int = 16) -> int:
    """Free memory read now; the base's footprint counted as still to load, less what is already
    allocated (nothing, when called before `Worker.setup`, as training.distributed does)."""
    free, _ = torch.cuda.mem_get_info(device)
    footprint = footprint_of(model, device)
    still_to_load = max(0, footprint.bytes - torch.cuda.memory_allocated(device))
    n = pack_for_memory(free, resolution, rows_per_subject, still_to_load, footprint.unet_params, max_pack)
    log.info("train.pack auto: %d subject(s) per pack (%.1f GiB free, %.1f GiB for the base still to load)", n,
             free / GiB, still_to_load / GiB)
    return n
