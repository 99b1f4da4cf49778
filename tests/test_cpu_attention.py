"""The CPU small-head attention kernel against PyTorch's SDPA (values and gradients), in the
tiny UNet, and what happens without a compiler, with a broken one and with concurrent builds."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import IN_CI
from training import cpu_attention

ATOL = 2e-5  # fp32 rounding of a different summation order


@pytest.fixture(scope="module")
def kernel():
    if cpu_attention.library() is None:
        reason = f"the kernel did not build: {cpu_attention._state['why']}"
        if IN_CI:
            pytest.fail(reason + " (make system-deps installs a C compiler as root)")
        pytest.skip(reason)
    return cpu_attention.library()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process with no kernel loaded yet, building into an empty cache."""
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setenv("DREAMFLEET_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def reference(q, k, v, heads, scale):
    B, N, C = q.shape
    split = lambda t: t.view(B, -1, heads, C // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale).transpose(1, 2).reshape(B, N, C)


def values_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("batch, heads, head_dim, queries, keys, threads", [
    (1, 8, 4, 1024, 1024, 2),  # the tiny UNet's self-attention at 64 px
    (2, 8, 8, 256, 256, 2),    # its mid block
    (2, 8, 4, 64, 77, 2),      # cross-attention over CLIP's 77 tokens (not a multiple of the vector width)
    (1, 1, 8, 100, 33, 2),     # one head: the backward splits the queries and sums dK, dV
    (3, 2, 3, 50, 20, 1),      # an odd head size, one thread
])
def test_kernel_matches_sdpa_values_and_gradients(kernel, batch, heads, head_dim, queries, keys, threads):
    torch.manual_seed(0)
    width = heads * head_dim
    q, grad = torch.randn(batch, queries, width) * 2, torch.randn(batch, queries, width)
    k, v = torch.randn(batch, keys, width) * 2, torch.randn(batch, keys, width)
    scale = head_dim ** -0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = values_and_grads(lambda *t: cpu_attention.attention(*t, heads, scale), q, k, v, grad)
    finally:
        torch.set_num_threads(previous)
    theirs = values_and_grads(lambda *t: reference(*t, heads, scale), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert (a - b).abs().max().item() < ATOL * max(1.0, b.abs().max().item()), name


def test_kernel_is_used_only_where_it_applies(kernel):
    q = torch.randn(1, 16, 32)
    assert cpu_attention.kernel_applies(q, q, heads=8)           # head size 4, fp32, CPU
    assert not cpu_attention.kernel_applies(q, q, heads=2)       # head size 16
    assert not cpu_attention.kernel_applies(q.double(), q.double(), heads=8)
    assert not cpu_attention.kernel_applies(q.bfloat16(), q.bfloat16(), heads=8)


def test_installed_unet_matches_diffusers_processors(kernel, tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)

    def run():
        unet.zero_grad()
        out = unet(x, t, text).sample
        out.square().mean().backward()
        return [out.detach()] + [p.grad for p in unet.parameters()]

    before = run()
    assert cpu_attention.install(unet, "sdpa") == 0
    assert cpu_attention.install(unet) == 8  # 2 attention blocks in each of 4 transformer layers
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SmallHeadAttnProcessor"}
    after = run()
    for a, b in zip(after, before):
        assert (a - b).abs().max().item() < ATOL * max(1.0, b.abs().max().item())


def test_no_compiler_falls_back_to_sdpa_with_one_log_line(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler")
    q = torch.randn(1, 16, 32)
    with caplog.at_level(logging.INFO, logger="training.cpu_attention"):
        assert not cpu_attention.kernel_applies(q, q, heads=8)
        assert not cpu_attention.kernel_applies(q, q, heads=8)
        out = cpu_attention.attention(q, q, q, 8, 0.5)
    assert torch.allclose(out, reference(q, q, q, 8, 0.5))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no C compiler (no-such-compiler is not on PATH)" in messages[0], messages
    assert not fresh.exists() or not any(fresh.iterdir())


def test_failing_build_falls_back_and_leaves_no_partial_file(fresh, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="training.cpu_attention"):
        assert cpu_attention.library() is None
    assert "internal compiler error" in caplog.text
    assert list(fresh.iterdir()) == []


def test_build_is_cached_and_concurrent_builds_leave_one_library(kernel, fresh):
    paths, errors = [], []

    def build():
        try:
            paths.append(cpu_attention.build())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in fresh.iterdir()] == [paths[0].name]  # no temporary files left
    built = paths[0].stat().st_mtime_ns
    assert cpu_attention.build() == paths[0] and paths[0].stat().st_mtime_ns == built  # reused, not rebuilt


def test_unwritable_cache_builds_in_the_temp_dir(kernel, fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DREAMFLEET_KERNEL_CACHE", str(blocker / "kernels"))  # below a file: mkdir fails
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    path = cpu_attention.build()
    assert path.parent == tmp_path / "tmp" / f"dreamfleet-kernels-{os.getuid()}" and path.exists()



def test_kernel_shares_torchs_openmp_runtime(kernel):
    """Built with -fopenmp, the kernel must bind to the libgomp torch loaded (one thread pool that
    torch.set_num_threads sizes), not load a second runtime whose idle threads spin against torch's."""
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.slow
def test_worker_trains_the_same_adapter_with_the_kernel_as_with_sdpa(kernel, make_job, tmp_path):
    """train.attention: auto (the kernel on CPU) against sdpa through the real worker: same losses,
    same adapter to fp32 rounding, and the log says which attention ran."""
    from safetensors.torch import load_file

    from conftest import run_worker

    runs = {}
    for mode in ("auto", "sdpa"):
        job = make_job(name=f"attn-{mode}", train={"steps": 4, "attention": mode, "optimizer": "adamw",
                                                   "eps": 1e-3, "samples": {"enabled": False}})
        proc = run_worker(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("the CPU small-head kernel on 8 of 8 attention blocks" in proc.stderr) == (mode == "auto")
        subject = tmp_path / "out" / f"attn-{mode}" / "subjects" / "s0"
        losses = [json.loads(line)["loss"] for line in (subject / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = losses, load_file(subject / "adapter" / "unet" / "adapter_model.safetensors")
    (losses_k, adapter_k), (losses_s, adapter_s) = runs["auto"], runs["sdpa"]
    assert losses_k == pytest.approx(losses_s, abs=1e-5)
    assert adapter_k.keys() == adapter_s.keys()
    assert max((adapter_k[k] - adapter_s[k]).abs().max().item() for k in adapter_k) < 1e-4
