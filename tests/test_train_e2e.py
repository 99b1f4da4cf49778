"""End to end on the tiny model through the real worker entry point: every adapter kind, UNet
only and UNet + text encoder; the contract outputs; diffusers loading; priors; resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.export import read_peft_weights  # either key form of the PEFT folder

from conftest import REPO, run_worker, worker_env

pytestmark = pytest.mark.slow


def subject_dir(job_path: Path, sid: str = "s0") -> Path:
    import yaml

    job = yaml.safe_load(job_path.read_text())
    return Path(job["output"]["uri"]) / job["name"] / "subjects" / sid


def status_of(job_path: Path, sid: str = "s0") -> dict:
    return json.loads((subject_dir(job_path, sid) / "status.json").read_text())


def initial_adapter(tiny_model: Path, adapter: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter weights a run starts from (attached right after seeding with train.seed)."""
    from launcher.config import JobConfig
    from training import adapters
    from training.components import load_components

    job = JobConfig.model_validate({"name": "x", "model": {"source": str(tiny_model)}, "adapter": adapter,
                                    "subjects": [{"id": "a", "images": "/x", "instance_prompt": "p"}]})
    c = load_components(job.model, torch.device("cpu"))
    torch.manual_seed(seed)
    adapters.attach(c.denoiser, job.adapter, c.family.targets("unet"), "unet")
    return adapters.adapter_state_dict(c.denoiser)


ADAPTERS = {
    "lora": {"type": "lora", "rank": 4, "targets": "comprehensive"},
    "loha": {"type": "loha", "rank": 4},
    "lokr": {"type": "lokr", "rank": 4, "decompose_both": True},
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
@pytest.mark.parametrize("with_te", [False, True], ids=["unet", "unet+te"])
def test_each_adapter_trains_and_writes_the_contract(make_job, tiny_model, kind, with_te):
    adapter = dict(ADAPTERS[kind])
    if with_te:
        adapter["text_encoder"] = {"type": kind, "rank": 2, "targets": "comprehensive"}
    job = make_job(adapter=adapter, train={"steps": 3, "samples": {"enabled": True, "num_inference_steps": 2}})
    proc = run_worker(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subject_dir(job)
    status = status_of(job)
    assert status["state"] == "done" and status["step"] == 3 and status["attempts"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)

    # contract outputs
    assert (out / "adapter" / "unet" / "adapter_config.json").exists()
    assert (out / "adapter" / "text_encoder" / "adapter_model.safetensors").exists() == with_te
    assert (out / "s0.safetensors").exists()
    assert (out / "pytorch_lora_weights.safetensors").exists() == (kind == "lora")
    # the sample, its prompts, and the report's thumbnails of the photos and samples (launcher/thumbnails.py)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00.png", "prompts.txt", "thumbnails.json"]
    assert (out / "MANIFEST.json").exists()
    assert (out.parent.parent / "job.yaml").exists()

    # adapter weights moved away from their initial values
    trained = read_peft_weights(out / "adapter" / "unet" / "adapter_model.safetensors")
    start = initial_adapter(tiny_model, ADAPTERS[kind])
    assert trained.keys() == start.keys()
    moved = max((trained[k] - start[k]).abs().max().item() for k in trained)
    assert moved > 1e-5


def test_base_weights_stay_bit_identical(make_job, tiny_model):
    """Train in-process and compare every non-adapter tensor with a fresh load."""
    from launcher.config import load_job
    from training.components import load_components
    from training.env import Preemption, WorkerEnv
    from training.runner import Worker

    job = load_job(make_job(adapter={"type": "lora", "rank": 4, "targets": "comprehensive",
                                     "text_encoder": {"type": "lora", "rank": 2}}, train={"steps": 2}))
    worker = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "test")
    outcomes = worker.run(list(job.subjects))
    assert [o.state for o in outcomes] == ["done"]
    fresh = load_components(job.model, torch.device("cpu"))
    for trained_model, fresh_model in ((worker.c.denoiser, fresh.denoiser),
                                       (worker.c.text_encoders["text_encoder"], fresh.text_encoders["text_encoder"]),
                                       (worker.c.vae, fresh.vae)):
        base = {k.replace(".base_layer", ""): v for k, v in trained_model.state_dict().items()
                if not any(m in k for m in ("lora_", "hada_", "lokr_"))}
        ref = fresh_model.state_dict()
        assert base.keys() == ref.keys()
        assert all(torch.equal(base[k], ref[k]) for k in ref)
        assert all(not p.requires_grad for n, p in trained_model.named_parameters() if "lora_" not in n)


def test_lora_output_loads_in_diffusers_and_changes_the_image(make_job, tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    job = make_job(adapter={"type": "lora", "rank": 4, "targets": "comprehensive", "alpha": 8,
                            "text_encoder": {"type": "lora", "rank": 2}}, train={"steps": 4, "learning_rate": 5e-2})
    proc = run_worker(job)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def render(with_lora: bool):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(subject_dir(job))
            _assert_loaded_exactly(pipe, subject_dir(job))
        return pipe("a photo of sks0 thing", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base, adapted = render(False), render(True)
    assert abs(base - adapted).max() > 1e-3


def _assert_loaded_exactly(pipe, out: Path) -> None:
    """Every tensor of the PEFT adapter arrived in the pipeline's UNet and text encoder."""
    from peft import get_peft_model_state_dict

    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        expected = read_peft_weights(out / "adapter" / part / "adapter_model.safetensors")
        name = next(iter(model.peft_config))
        loaded = get_peft_model_state_dict(model, adapter_name=name)
        assert loaded.keys() == expected.keys(), part
        assert all(torch.equal(loaded[k].float(), expected[k]) for k in expected), part


def test_prior_images_are_generated_once_and_reused(make_job, tmp_path):
    prior = {"enabled": True, "num_class_images": 2, "sample_steps": 2}
    job = make_job(n_subjects=2, prior=prior)
    first = run_worker(job)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("generating 2 class images") == 1  # both subjects share one class prompt
    manifests = list((tmp_path / "out" / "t" / "priors").glob("*/MANIFEST.json"))
    assert len(manifests) == 1
    before = manifests[0].stat().st_mtime_ns
    # a second job with the same prior store reuses the set instead of generating again
    second_job = make_job(n_subjects=2, name="t2", prior={**prior, "store": str(tmp_path / "out" / "t" / "priors")})
    second = run_worker(second_job)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "generating" not in second.stderr and "reusing 2 class images" in second.stderr
    assert manifests[0].stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2", prediction_type="v_prediction", shape="sd2")


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_sd2_shaped_v_prediction_model_trains_every_adapter(tmp_path, subjects_root, sd2_model, kind):
    """SD 2.x's traits (v-prediction, linear projections, a head count per block, three blocks, a
    64-wide text encoder), with a text-encoder adapter: trains, and the files load back in diffusers."""
    from diffusers import StableDiffusionPipeline

    from conftest import job_dict, subject_entry, write_job

    adapter = {**ADAPTERS[kind], "text_encoder": {"type": kind, "rank": 2}}
    job = write_job(tmp_path / "job.yaml", job_dict(sd2_model, [subject_entry(subjects_root, 0)], tmp_path / "out",
                                                    adapter=adapter))
    proc = run_worker(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert status_of(job)["state"] == "done" and "loaded a sd model" in proc.stderr
    assert json.loads((sd2_model / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert {p.name for p in (subject_dir(job) / "adapter").iterdir()} == {"unet", "text_encoder"}
    if kind == "lora":
        pipe = StableDiffusionPipeline.from_pretrained(sd2_model, safety_checker=None)
        pipe.load_lora_weights(str(subject_dir(job) / f"{subject_dir(job).name}.safetensors"))
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def _adapter(job: Path) -> dict[str, torch.Tensor]:
    return read_peft_weights(subject_dir(job) / "adapter" / "unet" / "adapter_model.safetensors")


def test_resume_after_preemption_matches_a_straight_run(make_job, tmp_path):
    """2N steps straight == stopped part-way (SIGUSR1 -> checkpoint -> exit 75) + restart."""
    steps = 200
    train = {"steps": steps, "optimizer": "adamw", "lr_scheduler": "cosine", "warmup_steps": 2, "log_every": 50}
    adapter = {"type": "lora", "rank": 4, "dropout": 0.1, "text_encoder": {"type": "lora", "rank": 2}}
    straight = make_job(name="straight", adapter=adapter, train=train)
    proc = run_worker(straight)
    assert proc.returncode == 0, proc.stderr[-3000:]

    resumed = make_job(name="resumed", adapter=adapter, train=train, output={"heartbeat_s": 1})
    worker = subprocess.Popen([sys.executable, "-m", "training.worker", "--job", str(resumed)], cwd=REPO,
                              env=worker_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        status_path = subject_dir(resumed) / "status.json"
        if status_path.exists():
            status = json.loads(status_path.read_text())
            if status["state"] == "running" and status["step"] >= 5:  # the heartbeat carries the step
                break
        time.sleep(0.1)
    worker.send_signal(signal.SIGUSR1)
    _, stderr = worker.communicate(timeout=240)
    assert worker.returncode == 75, stderr[-3000:]
    status = status_of(resumed)
    assert status["state"] == "pending" and 0 < status["step"] < steps, status
    assert (subject_dir(resumed) / "checkpoints" / "latest").exists()
    assert not (subject_dir(resumed) / "MANIFEST.json").exists()  # nothing published as complete

    again = run_worker(resumed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step-" in again.stderr
    status = status_of(resumed)
    assert status["state"] == "done" and status["attempts"] == 2
    a, b = _adapter(straight), _adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    metrics = [json.loads(line)["step"] for line in (subject_dir(resumed) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == steps and metrics == sorted(set(metrics))
