"""Packed multi-subject training through the real worker entry point, against single runs:
same adapters (fp32 CPU), each subject's own step count under continuous batching, and the
same diffusers pipeline output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_worker, subject_entry

pytestmark = pytest.mark.slow

LORA = {"type": "lora", "rank": 4, "targets": "comprehensive", "alpha": 8}
ATOL = 1e-4
# Why eps=1e-3 and not AdamW's default 1e-8: packed and single runs compute the same gradients
# with different (batched) kernels, so they agree only to float rounding (~1e-7 relative). In its
# first steps AdamW moves each element by about lr * sign(grad) whenever |grad| >> eps, so an
# element whose true gradient is within rounding of zero can move by up to 2 * lr per step in
# either direction: with eps=1e-8 the max-abs bound is ~2 * lr * steps (seen: 1.4e-3 at lr 1e-3),
# not 1e-4, although the losses agree to 1e-5. A larger eps makes the update a smooth function of
# the gradient, so rounding stays rounding and the 1e-4 bound tests the semantics (routing,
# per-subject loss, clipping, LR schedule, optimizer state, continuous batching).
EPS = 1e-3


def _subject_dir(out: Path, name: str, sid: str) -> Path:
    return out / name / "subjects" / sid


def _adapter(out: Path, name: str, sid: str) -> dict[str, torch.Tensor]:
    return load_file(_subject_dir(out, name, sid) / "adapter" / "unet" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, subjects_root):
    """The same 5 subjects (different step counts) trained one at a time and packed 4 at a time."""
    from conftest import job_dict, write_job

    tmp = tmp_path_factory.mktemp("packed")
    steps = [3, 3, 2, 4, 1]  # subject 4 joins the pack when subject 2 leaves it
    subjects = [subject_entry(subjects_root, i, steps=s) for i, s in enumerate(steps)]
    out = tmp / "out"
    for name, pack in (("alone", 1), ("packed", 4)):
        job = write_job(tmp / f"{name}.yaml", job_dict(tiny_model, subjects, out, name=name, adapter=LORA,
                                                     train={"pack": pack, "learning_rate": 1e-3, "eps": EPS}))
        proc = run_worker(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out, steps


def test_packed_adapters_equal_single_runs(runs):
    out, steps = runs
    for i in range(len(steps)):
        alone, packed = _adapter(out, "alone", f"s{i}"), _adapter(out, "packed", f"s{i}")
        assert alone.keys() == packed.keys()
        worst = max((alone[k] - packed[k]).abs().max().item() for k in alone)
        assert worst < ATOL, f"s{i}: max abs difference {worst}"
        # and training moved them (the comparison is not between two untouched inits)
        assert any(packed[k].abs().max() > 0 for k in packed if "lora_B" in k)


def test_continuous_batching_gives_each_subject_its_own_step_count(runs):
    out, steps = runs
    for i, n in enumerate(steps):
        d = _subject_dir(out, "packed", f"s{i}")
        status = json.loads((d / "status.json").read_text())
        assert status["state"] == "done" and status["step"] == n
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(1, n + 1))
        alone = [json.loads(x) for x in (_subject_dir(out, "alone", f"s{i}") / "metrics.jsonl").read_text().splitlines()]
        for a, p in zip(alone, lines):
            assert a["lr"] == p["lr"]
            assert abs(a["loss"] - p["loss"]) < 1e-4


def test_packed_diffusers_lora_renders_like_its_single_twin(runs, tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out, _ = runs

    def render(name: str | None):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if name:
            d = _subject_dir(out, name, "s0")
            assert (d / "pytorch_lora_weights.safetensors").exists()
            pipe.load_lora_weights(d)
        return pipe("a photo of sks0 thing", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base, alone, packed = render(None), render("alone"), render("packed")
    assert abs(base - packed).max() > 1e-4  # the adapter changes the image
    assert abs(alone - packed).max() < 1e-3


def test_packed_layer_matches_peft_per_sample(tiny_model):
    """The batched layer, with different weights per slot, equals PEFT run on each sample alone."""
    from launcher.config import JobConfig
    from training import adapters, packed
    from training.components import load_components

    job = JobConfig.model_validate({"name": "x", "model": {"source": str(tiny_model)}, "adapter": LORA,
                                    "subjects": [{"id": "a", "images": "/x", "instance_prompt": "p"}]})
    c = load_components(job.model, torch.device("cpu"))
    torch.manual_seed(0)
    adapters.attach(c.denoiser, job.adapter, c.family.targets("unet"), "unet")
    keys = set(adapters.adapter_state_dict(c.denoiser))
    router, layers = packed.install(c.denoiser, 3)
    with torch.no_grad():
        for p in packed.slot_parameters(layers):
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, 4, generator=gen)
    emb = torch.randn(3, 77, c.text_encoders["text_encoder"].config.hidden_size, generator=gen)
    ts = torch.tensor([10, 500, 900])
    router.index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        batched = c.denoiser(x, ts, encoder_hidden_states=emb).sample
    slices = [packed.slot_state_dict(layers, s) for s in range(3)]
    assert set(slices[0]) == keys
    packed.uninstall(c.denoiser, layers)
    for row, slot in enumerate([2, 0, 1]):
        adapters.load_adapter_state_dict(c.denoiser, slices[slot])
        with torch.no_grad():
            alone = c.denoiser(x[row:row + 1], ts[row:row + 1], encoder_hidden_states=emb[row:row + 1]).sample
        assert (alone - batched[row:row + 1]).abs().max() < 1e-5


@pytest.mark.parametrize("change, message", [
    ({"adapter": {"type": "loha", "rank": 4}}, "trains LoRA only, got adapter.type loha"),
    ({"adapter": {"type": "lora", "rank": 4, "dropout": 0.1}}, "needs adapter.dropout 0 and adapter.bias none"),
    ({"adapter": {"type": "lora", "rank": 4, "text_encoder": {"rank": 2}}}, "trains the UNet only"),
    ({"adapter": {"type": "lora", "rank": 4, "text_encoder_2": {"rank": 2}}}, "drop adapter.text_encoder and adapter.text_encoder_2"),
    ({"train": {"pack": 2, "mixed_precision": "fp16"}}, "needs bf16 or fp32"),
    ({"distributed": {"strategy": "ddp", "nproc_per_node": 2}}, "needs distributed.strategy subject"),
])
def test_what_a_pack_cannot_train_is_refused_before_anything_runs(change, message):
    """By `launcher validate` and by the worker, which both read `unsupported`."""
    from launcher.config import JobConfig
    from launcher.validate import unsupported

    job = {"name": "x", "model": {"source": "/m"}, "train": {"pack": 2},
           "subjects": [{"id": "a", "images": "/x", "instance_prompt": "p"}]}
    assert unsupported(JobConfig.model_validate(job)) == []
    problems = unsupported(JobConfig.model_validate({**job, **change}))
    assert len(problems) == 1 and message in problems[0], problems


def test_preempted_pack_checkpoints_every_slot_and_resumes_to_the_straight_result(tiny_model, subjects_root, tmp_path):
    """SIGUSR1 mid-pack: every live slot checkpoints (in the single-run format), the worker
    exits 75 with its subjects pending, and the next run resumes each slot to the adapters an
    uninterrupted packed run gives."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, job_dict, worker_env, write_job

    steps = 40
    subjects = [subject_entry(subjects_root, i) for i in range(2)]
    train = {"pack": 2, "steps": steps, "learning_rate": 1e-3, "eps": EPS, "log_every": 5, "checkpoint_every": 10}
    out = tmp_path / "out"
    straight = write_job(tmp_path / "straight.yaml", job_dict(tiny_model, subjects, out, name="straight", adapter=LORA,
                                                              train=train))
    assert run_worker(straight).returncode == 0
    job = write_job(tmp_path / "stopped.yaml", job_dict(tiny_model, subjects, out, name="stopped", adapter=LORA,
                                                        train=train, output={"heartbeat_s": 1}))
    worker = subprocess.Popen([sys.executable, "-m", "training.worker", "--job", str(job)], cwd=REPO,
                              env=worker_env(), stderr=subprocess.PIPE, text=True)
    status_path = _subject_dir(out, "stopped", "s0") / "status.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if status_path.exists() and json.loads(status_path.read_text())["step"] >= 12:
            break
        time.sleep(0.1)
    worker.send_signal(signal.SIGUSR1)
    _, stderr = worker.communicate(timeout=240)
    assert worker.returncode == 75, stderr[-3000:]
    for sid in ("s0", "s1"):
        status = json.loads((_subject_dir(out, "stopped", sid) / "status.json").read_text())
        assert status["state"] == "pending" and 12 <= status["step"] < steps, status
        assert (_subject_dir(out, "stopped", sid) / "checkpoints" / "latest").read_text().strip() == \
            f"step-{status['step']:08d}"
        assert not (_subject_dir(out, "stopped", sid) / "MANIFEST.json").exists()

    again = run_worker(job)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resuming from step-") == 2
    for sid in ("s0", "s1"):
        a, b = _adapter(out, "straight", sid), _adapter(out, "stopped", sid)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, f"{sid}: {worst}"
        lines = [json.loads(x)["step"] for x in (_subject_dir(out, "stopped", sid) / "metrics.jsonl").read_text().splitlines()]
        assert lines == list(range(5, steps + 1, 5))
