"""The one place that decides a run's precision on its device: the dtype of the frozen VAE and
text encoder (`model.dtype`), the autocast dtype of the forward (`train.mixed_precision`), and
whether fp16 gradients go through a GradScaler. Every loop, the priors, the samples and the
DDP engine ask `resolve`; nothing else looks at the device to choose a dtype. (DeepSpeed follows
launcher.deepspeed's config, fp32 on a CPU; accelerate runs fp16 on GPUs only, so a DDP run
with fp16 on a CPU is fp32 and says so; a pack cannot scale its loss and refuses fp16.)

The rule, the same for both settings:

- `auto` is the device's usual choice: on a GPU bf16 where it is supported, else fp16; on a CPU
  fp32 (no autocast), which is what CPU kernels run fastest on most processors.
- An explicit value is honoured on every device: `bf16` and `fp16` run the GPU's precision path
  on a CPU as well (CPU autocast supports both), and `no` / `fp32` keep fp32 on a GPU.

So the path a GPU takes can be run, and tested, on a CPU by naming the dtype
(`model.dtype: bf16`, `train.mixed_precision: bf16`), and a job written for a GPU cluster asks
for the same arithmetic wherever it runs. Whatever the setting, the UNet's base weights, every
adapter weight and all optimizer state stay fp32: autocast runs the forward in half precision,
and the adapters update in fp32.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from launcher.config import ModelConfig, TrainConfig

DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _auto(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_of(value: str, device: torch.device) -> torch.dtype:
    """A precision setting ('auto', 'no', 'fp32', 'bf16', 'fp16') as a dtype on `device`."""
    return _auto(device) if value == "auto" else DTYPES[value]


@dataclass(frozen=True)
class Precision:
    """What `resolve` decided for one device."""

    device_type: str
    frozen: torch.dtype  # the VAE and text encoder weights
    compute: torch.dtype  # the autocast dtype of the forward; fp32 means no autocast

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.compute == torch.float32 else self.compute

    @property
    def uses_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.compute == torch.float16

    @property
    def accelerate(self) -> str:
        """The `mixed_precision` argument of accelerate's Accelerator."""
        return {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.uses_scaler else None


def resolve(train: TrainConfig, model: ModelConfig, device: torch.device) -> Precision:
    return Precision(device.type, dtype_of(model.dtype, device), dtype_of(train.mixed_precision, device))


def refuse_loss_scaling(train: TrainConfig, model: ModelConfig, device: torch.device, what: str) -> None:
    """For what cannot scale the loss (a pack shares one backward among subjects with their own
    optimizers): a ConfigError where the run would be fp16, which `auto` is on a GPU without bf16."""
    if resolve(train, model, device).uses_scaler:
        from launcher.errors import ConfigError

        raise ConfigError(f"{what} needs bf16 or fp32, but train.mixed_precision {train.mixed_precision} is fp16 on "
                          f"this {device.type} (no bf16 support): set train.mixed_precision no, or train.pack 1")


def inference_autocast(*modules: torch.nn.Module):
    """Autocast for running frozen parts of different dtypes together (a pipeline over an fp32
    UNet and a half-precision VAE and text encoder): every matmul and convolution then takes
    inputs of one dtype, the lowest of the modules'. Nothing when they all share one dtype."""
    dtypes = {next(m.parameters()).dtype for m in modules}
    half = [d for d in (torch.float16, torch.bfloat16) if d in dtypes]
    if len(dtypes) == 1 or not half:
        return nullcontext()
    device = next(modules[0].parameters()).device
    return torch.autocast(device.type, dtype=half[0])
