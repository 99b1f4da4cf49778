"""Per-subject scores (DINO, CLIP-I, CLIP-T), the quality gate and the retry of flagged subjects.

The score math on inputs with a known answer; the whole path (samples rendered, scored by tiny
random-weight CLIP and DINOv2 models built on the fly, gated, recorded in status.json,
metrics.jsonl and `launcher status`); and `retry-failed --flagged` retraining a flagged subject
with an override, its old adapter readable until the new one is published over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_cli
from launcher import quality
from launcher.config import EvalConfig, ModelConfig, Subject, load_job
from launcher.errors import ConfigError
from launcher.ledger import SubjectStatus
from training.scores import clip_t_texts, load_evaluators, mean_matched_cosine, mean_pairwise_cosine


@pytest.fixture(scope="module")
def evaluators_dir(tmp_path_factory) -> dict[str, Path]:
    from training.tiny import build_tiny_clip, build_tiny_dino

    root = tmp_path_factory.mktemp("evaluators")
    return {"clip": build_tiny_clip(root / "clip"), "dino": build_tiny_dino(root / "dino")}


def test_score_math_has_known_answers():
    e = torch.eye(3)
    assert mean_pairwise_cosine(e[:1], e[:1]) == pytest.approx(1.0)
    assert mean_pairwise_cosine(e[:1], e[1:2]) == pytest.approx(0.0)  # orthogonal embeddings
    assert mean_pairwise_cosine(e[:1], e[:2]) == pytest.approx(0.5)  # the mean over every pair
    assert mean_pairwise_cosine(5 * e[:2], e[:2] * 0.1) == pytest.approx(0.5)  # cosine: the length does not count
    assert mean_pairwise_cosine(e[:1], -e[:1]) == pytest.approx(-1.0)
    # CLIP-T pairs sample i with prompt i only: [1, 0, 0] with itself, [0, 1, 0] with [0, 0, 1]
    assert mean_matched_cosine(e[:2], e[[0, 2]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 images against 1 texts"):
        mean_matched_cosine(e[:2], e[:1])


def test_identical_images_score_one_on_tiny_clip_and_dino(evaluators_dir):
    ev = load_evaluators(EvalConfig(clip=str(evaluators_dir["clip"]), dino=str(evaluators_dir["dino"])),
                         ModelConfig(source="unused"), torch.device("cpu"))
    red = Image.new("RGB", (48, 48), (200, 20, 20))
    striped = Image.new("RGB", (48, 48), (20, 20, 200))
    for x in range(0, 48, 4):
        striped.paste((240, 240, 0), (x, 0, x + 2, 48))
    same = ev.score([red, red], [red], ["a red square", "a red square"])
    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    other = ev.score([red], [striped], ["a red square"])
    assert other["dino"] < 0.999 and other["clip_i"] < 0.999
    # CLIP-T is the cosine of the sample's image embedding with its prompt's text embedding
    img, txt = ev.clip_images([red]), ev.clip_texts(["a red square"])
    expected = torch.nn.functional.cosine_similarity(img, txt).item()
    assert same["clip_t"] == pytest.approx(expected, abs=1e-5) and -1 <= expected <= 1


def test_clip_t_text_removes_the_identifier_through_the_class_prompt():
    subject = Subject(id="a", images="x", instance_prompt="a photo of sks dog", class_prompt="a photo of a dog")
    prompts = ["{instance} in a garden", "{instance} on the moon"]
    assert clip_t_texts(EvalConfig(), subject, prompts) == ["a photo of a dog in a garden", "a photo of a dog on the moon"]
    assert clip_t_texts(EvalConfig(clip_t_text="sample"), subject, prompts)[0] == "a photo of sks dog in a garden"
    no_class = Subject(id="b", images="x", instance_prompt="a photo of sks cat")
    assert clip_t_texts(EvalConfig(), no_class, prompts[:1]) == ["a photo of sks cat in a garden"]


def test_the_gate_flags_a_score_below_its_threshold_and_regates_on_new_thresholds():
    scores = {"dino": 0.41, "clip_i": 0.8, "clip_t": 0.3}
    assert quality.gate(scores, {"dino": 0.5, "clip_i": 0.7}) == ["DINO 0.410 < eval.min_dino 0.5"]
    assert quality.gate(scores, {"clip_t": 0.31, "clip_i": 0.81}) == ["CLIP-I 0.800 < eval.min_clip_i 0.81",
                                                                      "CLIP-T 0.300 < eval.min_clip_t 0.31"]
    assert quality.gate(scores, {}) == [] and quality.gate(None, {"dino": 0.9}) == []
    done = SubjectStatus(id="a", state="done", scores=scores, flagged=True, flag_reasons=["old"])
    running = SubjectStatus(id="b", state="running")
    quality.regate([done, running], EvalConfig(dino="d", min_dino=0.4))
    assert not done.flagged and done.flag_reasons == [] and not running.flagged
    quality.regate([done], EvalConfig(clip="c", min_clip_t=0.5))
    assert done.flagged and done.flag_reasons == ["CLIP-T 0.300 < eval.min_clip_t 0.5"]


def test_eval_config_mistakes_name_the_key(make_job):
    with pytest.raises(ConfigError) as err:
        load_job(make_job(eval={"min_dino": 0.5, "min_clip_t": 2}))
    said = "\n".join(err.value.problems)
    assert "eval.min_clip_t" in said and "less than or equal to 1" in said, said
    with pytest.raises(ConfigError) as err:
        load_job(make_job(eval={"min_dino": 0.5}))
    assert "eval.min_dino needs eval.dino" in "\n".join(err.value.problems)
    with pytest.raises(ConfigError) as err:
        load_job(make_job(eval={"clipp": "x"}))
    assert "eval.clipp: unknown key; valid keys here: base_model, clip, clip_t_text, dino" in "\n".join(err.value.problems)


def _subject_dir(job) -> Path:
    return Path(job.job_uri) / "subjects" / "s0"


def test_scores_gate_status_and_a_flagged_retry_that_replaces_the_adapter_only_on_publish(make_job, evaluators_dir,
                                                                                         monkeypatch):
    from launcher import storage
    from training.env import Preemption, WorkerEnv
    from training.runner import Worker

    path = make_job(train={"steps": 2, "samples": {"enabled": True, "num_inference_steps": 1,
                                                   "prompts": ["{instance} in a garden", "{instance} at night"]}},
                    eval={"clip": str(evaluators_dir["clip"]), "dino": str(evaluators_dir["dino"]), "base_model": True,
                          "min_dino": 0.999, "min_clip_i": -1.0})
    job = load_job(path)
    outcomes = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "test").run(list(job.subjects))
    assert [o.state for o in outcomes] == ["done"]
    where = _subject_dir(job)
    status = json.loads((where / "status.json").read_text())
    scores = status["scores"]
    assert set(scores) >= {"dino", "clip_i", "clip_t", "base"} and set(scores["base"]) == {"dino", "clip_i", "clip_t"}
    assert all(-1 <= scores[k] <= 1 for k in ("dino", "clip_i", "clip_t")) and scores["dino"] < 0.999
    assert scores["clip_t_text"] == "class" and scores["photos"] == 3 and scores["samples"] == 2
    assert status["state"] == "done" and status["flagged"] is True
    assert status["flag_reasons"] == [f"DINO {scores['dino']:.3f} < eval.min_dino 0.999"]
    lines = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"step": 2, "scores": scores} and [li["step"] for li in lines[:-1]] == [1, 2]
    assert sorted(p.name for p in (where / "samples" / "base").glob("*.png")) == ["00.png", "01.png"]
    thumbs = json.loads((where / "samples" / "thumbnails.json").read_text())
    assert [len(thumbs[k]) for k in ("photos", "samples", "base")] == [3, 2, 2]
    assert all(t.startswith("data:image/jpeg;base64,") for t in thumbs["photos"])

    text = run_cli("status", str(path)).stdout
    assert run_cli("report", str(path)).returncode == 0
    report = (Path(job.job_uri) / "report.html").read_text()
    assert f"flagged for review: DINO {scores['dino']:.3f} &lt; eval.min_dino 0.999" in report
    assert "done, flagged" in text and "DINO" in text and "flagged for review: 1 done subject(s)" in text, text
    listed = json.loads(run_cli("status", str(path), "--flagged", "--json").stdout)
    assert [s["id"] for s in listed["subjects"]] == ["s0"] and listed["summary"]["flagged"][0]["id"] == "s0"
    assert listed["subjects"][0]["scores"] == scores
    # a threshold the scores pass, given after training: the job file's thresholds re-gate the recorded scores
    relaxed = make_job(name="t", train={"steps": 2}, eval={"dino": str(evaluators_dir["dino"]), "min_dino": -1.0})
    assert "no subject is flagged for review" in run_cli("status", str(relaxed), "--flagged").stdout
    page = Path(job.job_uri).parent / "relaxed.html"
    assert run_cli("report", str(relaxed), "--out", str(page)).returncode == 0
    assert "flagged for review" not in page.read_text() and "DINO " in page.read_text()
    path = make_job(train={"steps": 2, "samples": {"enabled": True, "num_inference_steps": 1,
                                                   "prompts": ["{instance} in a garden", "{instance} at night"]}},
                    eval={"clip": str(evaluators_dir["clip"]), "dino": str(evaluators_dir["dino"]), "base_model": True,
                          "min_dino": 0.999, "min_clip_i": -1.0})  # the job file as trained, again

    bad = run_cli("retry-failed", str(path), "--flagged", "train.batch_size=2")
    assert bad.returncode == 2 and "train.batch_size: cannot differ per subject" in bad.stderr, bad.stderr
    assert json.loads((where / "status.json").read_text())["state"] == "done"  # nothing was reset
    retried = run_cli("retry-failed", str(path), "--flagged", "train.steps=3")
    assert "reset 1 flagged subject(s) with train.steps=3: s0" in retried.stdout, retried.stdout + retried.stderr
    status = json.loads((where / "status.json").read_text())
    assert status["state"] == "pending" and status["overrides"] == {"steps": 3} and not status["flagged"]
    assert status["history"][-1]["reset_by"] == "retry-failed --flagged" and status["history"][-1]["scores"] == scores
    adapter = where / "pytorch_lora_weights.safetensors"
    old = adapter.read_bytes()

    seen_at_publish = []
    real_publish = storage.publish_dir

    def publish(local_dir, dest_uri, extra=None):
        if dest_uri.endswith("/subjects/s0"):  # the old adapter is there, whole, until the new one is published
            seen_at_publish.append(adapter.read_bytes())
        return real_publish(local_dir, dest_uri, extra)

    monkeypatch.setattr(storage, "publish_dir", publish)
    job = load_job(path)
    outcomes = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "test").run(list(job.subjects))
    assert [o.state for o in outcomes] == ["done"] and seen_at_publish == [old]
    assert adapter.read_bytes() != old  # replaced by the new attempt's
    status = json.loads((where / "status.json").read_text())
    assert status["state"] == "done" and status["steps"] == 3 and status["step"] == 3 and status["attempts"] == 1
    steps = [json.loads(line)["step"] for line in (where / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # three training steps this time, then the scores


@pytest.mark.integration
def test_an_evaluator_in_a_bucket_is_staged_into_the_node_cache_once(s3, evaluators_dir, tmp_path):
    from launcher import storage

    uri = f"s3://{s3['bucket']}/evaluators/dino"
    fs, path = storage._fs(uri)
    fs.put(str(evaluators_dir["dino"]) + "/", path, recursive=True)
    model = ModelConfig(source="unused", cache_dir=str(tmp_path / "cache"))
    red = Image.new("RGB", (40, 40), (200, 20, 20))
    blue = Image.new("RGB", (40, 40), (20, 20, 200))
    s3["proxy"].reset()
    staged = load_evaluators(EvalConfig(dino=uri), model, torch.device("cpu"))
    assert s3["proxy"].count("GET", "model.safetensors") == 1
    assert [p.name for p in (tmp_path / "cache").glob("dino-*/model.safetensors")] == ["model.safetensors"]
    again = load_evaluators(EvalConfig(dino=uri), model, torch.device("cpu"))  # the next worker on the node
    assert s3["proxy"].count("GET", "model.safetensors") == 1  # reused, not downloaded again
    local = load_evaluators(EvalConfig(dino=str(evaluators_dir["dino"])), model, torch.device("cpu"))
    assert staged.score([red], [blue], ["x"]) == again.score([red], [blue], ["x"]) == local.score([red], [blue], ["x"])


def test_validate_names_a_missing_evaluator_and_an_evaluator_without_samples(make_job, tmp_path):
    job = make_job(train={"samples": {"enabled": True}}, eval={"clip": str(tmp_path / "no-such-clip")})
    proc = run_cli("validate", str(job))
    assert proc.returncode == 2 and f"eval.clip: {tmp_path / 'no-such-clip'} does not exist" in proc.stderr, proc.stderr
    job = make_job(eval={"dino": str(tmp_path)})  # make_job renders no samples
    proc = run_cli("validate", str(job), "--no-inputs")
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "eval.dino scores the samples, and train.samples renders none" in said, said


def test_packed_subjects_are_scored_and_gated_as_single_runs_are(make_job, evaluators_dir, caplog):
    """The packed loop publishes through the same step: every subject of a pack gets its scores."""
    from training.distributed import run_strategy
    from training.env import Preemption, WorkerEnv

    job = load_job(make_job(n_subjects=2, train={"steps": 2, "pack": 2, "samples": {"enabled": True,
                                                                                      "num_inference_steps": 1}},
                            eval={"dino": str(evaluators_dir["dino"]), "min_dino": 0.999}))
    with caplog.at_level("INFO", logger="training.packed_loop"):
        outcomes = run_strategy(job, WorkerEnv(), Preemption(), list(job.subjects))
    assert [o.state for o in outcomes] == ["done", "done"]
    assert "subject s1: training in packed slot 1" in caplog.text
    for sid in ("s0", "s1"):
        status = json.loads((Path(job.job_uri) / "subjects" / sid / "status.json").read_text())
        assert set(status["scores"]) >= {"dino"} and "clip_i" not in status["scores"]
        assert status["flagged"] and status["flag_reasons"][0].startswith("DINO ")
