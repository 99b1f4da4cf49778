"""Exact attention for small heads on the CPU, and the UNet attention processor that uses it.

On the CPU, PyTorch's scaled-dot-product attention runs a flash kernel made of tiled GEMMs. At a
head size of 4 or 8 (the tiny test model: 8 heads on 32 or 64 channels, over 1,024 latent
tokens) those GEMMs do almost no arithmetic per byte, and attention is three quarters of a
training step. `kernels/attention.c` computes the same softmax attention in one pass over the
keys per query row, scores, exponentials and value products in registers, and a backward that
recomputes the probabilities from the saved log-sum-exp: about 5x faster than SDPA for the
forward and backward together at that shape (benchmarks/RESULTS.md).

The kernel is compiled with the system C compiler (`$CC`, else `cc`) on first use, for this
machine's CPU, and cached under `$DREAMFLEET_KERNEL_CACHE` (default
`~/.cache/dreamfleet/kernels`), keyed by the source, the flags, the compiler and the CPU, so
nodes of different kinds sharing a home directory each build their own. Without a compiler, or
if the build fails, attention stays on SDPA and one log line says why; training never depends
on the kernel. It applies to fp32 tensors on the CPU without an attention mask and with a head
size of at most `MAX_HEAD_DIM`; anything else (GPUs, half precision, torch.compile) runs SDPA.
Work is split over OpenMP threads: the kernel is built with -fopenmp and, loaded into a process
where torch already loaded its libgomp, shares torch's thread pool and `torch.set_num_threads`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
# No -ffast-math: on a shared library GCC may link crtfastmath.o, which sets flush-to-zero for
# the whole process. These are the parts of it the kernel needs to vectorize its reductions.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-ffinite-math-only", "-fPIC", "-shared", "-std=c11"]
MAX_HEAD_DIM = 8  # MAX_D in the kernel: beyond it, measured slower than SDPA (RESULTS.md)

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": the reason it is None


def cache_dir() -> Path:
    configured = os.environ.get("DREAMFLEET_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "dreamfleet" / "kernels"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(directory: Path | None = None) -> Path:
    """The compiled kernel's path, compiling it first if this machine has no cached build.

    Raises FileNotFoundError (no compiler), another OSError (no writable cache) or RuntimeError
    (the build failed)."""
    command = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a wrapper: "ccache gcc"
    found = shutil.which(command[0]) if command else None
    if found is None:
        raise FileNotFoundError(f"no C compiler ({os.environ.get('CC') or 'cc'} is not on PATH)")
    command[0] = found
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"attention-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home in a container: build per machine in the temp dir
        directory = Path(tempfile.gettempdir()) / f"dreamfleet-kernels-{os.getuid()}"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / target.name
        if target.exists():
            return target
    fd, partial = tempfile.mkstemp(prefix=".attention-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        started = time.monotonic()
        done = subprocess.run([*command, *FLAGS, str(SOURCE), "-o", partial, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: concurrent workers each build, one file stays
        log.info("built the CPU attention kernel in %.1f s: %s", time.monotonic() - started, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library() -> ctypes.CDLL | None:
    """The kernel, built and loaded once per process; None (with the reason logged once) if unavailable."""
    if "lib" in _state:  # every attention call asks: no lock once settled
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            try:
                lib = ctypes.CDLL(str(build()))
                i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
                lib.df_attention_forward.argtypes = [ptr] * 5 + [i64] * 5 + [f32]
                lib.df_attention_backward.argtypes = [ptr] * 9 + [i64] * 5 + [f32]
                _state.update(lib=lib, why=None)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state.update(lib=None, why=str(exc))
                report = log.info if isinstance(exc, FileNotFoundError) else log.warning
                report("CPU attention kernel unavailable, attention runs PyTorch SDPA: %s", exc)
        return _state["lib"]


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class _KernelAttention(torch.autograd.Function):
    """softmax(scale * q k^T) v over [B, N, H*D] projections, without transposing q, o or their grads."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float):
        (B, N, C), M = q.shape, k.shape[1]
        D = C // heads
        q = q.contiguous()
        kt = k.reshape(B, M, heads, D).permute(0, 2, 3, 1).contiguous()  # [B, H, D, M]
        vt = v.reshape(B, M, heads, D).permute(0, 2, 3, 1).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B, heads, N, dtype=q.dtype)
        _check(_state["lib"].df_attention_forward(_p(q), _p(kt), _p(vt), _p(o), _p(lse), B, heads, N, M, D, scale))
        ctx.save_for_backward(q, kt, vt, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, kt, vt, o, lse = ctx.saved_tensors
        B, H, D, M = kt.shape
        grad = grad.contiguous()
        dq, dkt, dvt = torch.empty_like(q), torch.empty_like(kt), torch.empty_like(vt)
        _check(_state["lib"].df_attention_backward(_p(q), _p(kt), _p(vt), _p(o), _p(lse), _p(grad), _p(dq), _p(dkt),
                                                   _p(dvt), B, H, q.shape[1], M, D, ctx.scale))
        dk = dkt.permute(0, 3, 1, 2).reshape(B, M, H * D)
        dv = dvt.permute(0, 3, 1, 2).reshape(B, M, H * D)
        return dq, dk, dv, None, None


def _check(code: int) -> None:
    if code:
        raise RuntimeError(f"CPU attention kernel failed ({'out of memory' if code == 2 else f'error {code}'})")


def kernel_applies(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    return (q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and q.shape[-1] % heads == 0
            and q.shape[-1] // heads <= MAX_HEAD_DIM and not torch.compiler.is_compiling()
            and library() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
              use_kernel: bool = True) -> torch.Tensor:
    """Multi-head softmax attention of [B, N, H*D] queries over [B, M, H*D] keys and values."""
    if use_kernel and kernel_applies(q, k, heads):
        return _KernelAttention.apply(q, k, v, heads, scale)
    B, N, C = q.shape
    split = lambda t: t.reshape(B, -1, heads, C // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).reshape(B, N, C)


class SmallHeadAttnProcessor:
    """A diffusers attention processor for the plain attention blocks of SD's UNet (projections,
    attention, output projection and dropout), with the small-head CPU kernel where it applies.
    `install` sets it only on blocks with nothing more (no norms, residual or rescaling inside)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:  # SD's UNet passes none; anything else keeps diffusers' handling
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, attn.scale)
        return attn.to_out[1](attn.to_out[0](out))


def _plain(attn) -> bool:
    return (getattr(attn, "spatial_norm", None) is None and getattr(attn, "group_norm", None) is None
            and getattr(attn, "norm_cross", None) is None and getattr(attn, "norm_q", None) is None
            and getattr(attn, "norm_k", None) is None and getattr(attn, "add_k_proj", None) is None
            and getattr(attn, "inner_kv_dim", None) == getattr(attn, "inner_dim", 0)
            and not getattr(attn, "residual_connection", True) and getattr(attn, "rescale_output_factor", 0) == 1.0
            and not getattr(attn, "only_cross_attention", True) and len(getattr(attn, "to_out", ())) == 2)


def install(unet: torch.nn.Module, mode: str = "auto") -> int:
    """Give the UNet's plain attention blocks the small-head processor; how many got it.

    mode "auto": on a CPU, where the kernel builds; "sdpa": nothing changes."""
    from diffusers.models.attention_processor import Attention

    if mode == "sdpa" or next(unet.parameters()).device.type != "cpu":
        return 0
    blocks = [m for m in unet.modules() if isinstance(m, Attention) and _plain(m)]
    small = [m for m in blocks if m.inner_dim // m.heads <= MAX_HEAD_DIM]
    if not small or library() is None:
        return 0
    for block in small:
        block.set_processor(SmallHeadAttnProcessor())
    log.info("attention: the CPU small-head kernel on %d of %d attention blocks", len(small), len(blocks))
    return len(small)
