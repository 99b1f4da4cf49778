"""dreamfleet vs a reference DreamBooth LoRA script (diffusers' examples/dreambooth/train_dreambooth_lora.py,
train_dreambooth_lora_sdxl.py with --family sdxl, train_dreambooth_lora_flux.py with --family flux), same model, images, resolution, batch, rank,
targets, optimizer, steps and seed, in one run on one machine.

    python benchmarks/vs_reference.py --reference-script PATH [--python .venv-bench/bin/python]
        [--family sd|sdxl|flux] [--model tiny|sd15|sdxl|flux] [--resolution 64] [--steps 40 200] [--reps 3]
        [--out DIR] [--set train.compile=true] [--batch-set train.pack=4]

The reference script is not shipped: point to your copy (the one that matches --family).
--model tiny is the family's tiny random-weight model (`training.tiny model DIR [--family sdxl|flux]`);
sd15, sdxl and flux are random weights at the real layer sizes (for GPU runs). Both trainers run as fresh processes
with the same Python (so the same torch), runs interleave (both short runs, then both long
ones; repetitions alternate which trainer goes first), and:

- steps/s is marginal: (N_long - N_short) / (T_long - T_short) over whole-process wall times,
  the same definition for both trainers, with start-up and saving cancelled out;
- seconds per subject is the whole-process wall time of the N_long run (start-up included);
- with --subjects K > 1, dreamfleet also trains K subjects in one job (its normal use: one
  process, one model load, K adapters) and reports that wall time / K; the reference trains one
  subject per process, so its seconds per subject stay those of one run;
- `--set KEY=VALUE` changes dreamfleet's job for every run (e.g. train.compile=true), and
  `--batch-set` only its K-subject job (e.g. train.pack=4: the K subjects packed in one batch);
  the settings that must match the reference (data, batch, rank, steps, seed, precision) are
  not meant to be changed this way;
- with --family sdxl dreamfleet's job sets train.attention=sdpa (PyTorch's attention, as the
  reference runs it; no CPU kernel of ours), so that a CPU figure says something about the GPU;
  Flux's transformer runs SDPA in both (diffusers' Flux attention; no kernel of ours applies);
- with --family flux both train the same LoRA targets (--lora_layers), with the same guidance
  (3.5, the reference's default and ours), uniform timesteps (weighting_scheme none), T5 padded to
  the same length (the reference's --max_sequence_length set to the tokenizer's, as ours), and
  the reference caches its latents (--cache_latents: its best setting, as ours always does);
- peak RSS is the child's own ru_maxrss (os.wait4); on GPU, peak GPU memory is polled from
  nvidia-smi for the child's pid.

Results print as a table and append to OUT/results.json; copy the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # both references' UNet LoRA targets
WEIGHT_DECAY = 1e-2  # dreamfleet's AdamW default; the SDXL reference's own default is 1e-4, so it is passed
# model choice -> the `python -m training.tiny` arguments that build it, per family
BUILDERS = {("sd", "tiny"): ["model"], ("sd", "sd15"): ["sd15"],
            ("sdxl", "tiny"): ["model", "--family", "sdxl"], ("sdxl", "sdxl"): ["sdxl"],
            ("flux", "tiny"): ["model", "--family", "flux"], ("flux", "flux"): ["flux"]}


def prepare(args, work: Path) -> tuple[Path, Path]:
    model, images = work / f"model-{args.family}-{args.model}", work / "images-0"
    if not (model / "model_index.json").exists():
        subprocess.run([args.python, "-m", "training.tiny", *BUILDERS[args.family, args.model], str(model)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for path in sorted(model.rglob("*")):  # warm the page cache: no trainer pays a cold first read of the weights
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    for i in range(args.subjects):
        if not (work / f"images-{i}").exists():
            code = ("from training.tiny import write_subject_images; import sys; "
                    f"write_subject_images(sys.argv[1], {i}, count=4, size={args.resolution})")
            subprocess.run([args.python, "-c", code, str(work / f"images-{i}")], check=True, cwd=REPO)
    return model, images


def ours_command(args, model: Path, images: Path, steps: int, out: Path, subjects: int = 1) -> list[str]:
    import yaml

    job = {
        "name": "bench", "model": {"source": str(model)},
        "adapter": {"type": "lora", "rank": args.rank, "targets": TARGETS},
        "train": {"steps": steps, "batch_size": 1, "resolution": args.resolution, "learning_rate": 1e-4,
                  "optimizer": "adamw", "weight_decay": WEIGHT_DECAY, "lr_scheduler": "constant", "seed": 0,
                  "log_every": max(1, steps // 10), "mixed_precision": args.mixed_precision,
                  "samples": {"enabled": False}},
        "subjects": [{"id": f"bench-{i}", "images": str(images.parent / f"images-{i}"), "instance_prompt": "a photo of sks thing"}
                     for i in range(subjects)],
        "output": {"uri": str(out)},
    }
    if args.family == "sdxl":
        job["train"]["attention"] = "sdpa"  # the condition for the SDXL figure; --set may still change it
    for setting in args.set + (args.batch_set if subjects > 1 else []):
        _set(job, setting)
    job_file = out.parent / f"{out.name}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    return [args.python, "-m", "training.worker", "--job", str(job_file)]


def _set(job: dict, setting: str) -> None:
    import yaml

    key, sep, value = setting.partition("=")
    if not sep:
        raise SystemExit(f"--set {setting!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = job
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def reference_command(args, model: Path, images: Path, steps: int, out: Path) -> list[str]:
    """The reference's flags for the same run. Both scripts target to_k/to_q/to_v/to_out.0 and train
    no text encoder unless told; the SD one encodes the prompt once only with
    --pre_compute_text_embeddings, the SDXL one always does when one prompt serves every image
    (it has no such flag, and no latent cache: its VAE encodes every step)."""
    cmd = [args.python, str(args.reference_script),
           f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={images}",
           "--instance_prompt=a photo of sks thing", f"--output_dir={out}", f"--resolution={args.resolution}",
           "--train_batch_size=1", f"--max_train_steps={steps}", "--learning_rate=1e-4", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", "--seed=0", f"--rank={args.rank}", f"--mixed_precision={args.mixed_precision_ref}",
           f"--adam_weight_decay={WEIGHT_DECAY}", "--checkpointing_steps=1000000", "--report_to=tensorboard",
           "--dataloader_num_workers=0", "--center_crop"]
    if args.family == "sd":
        cmd.append("--pre_compute_text_embeddings")
    if args.family == "flux":
        cmd += [f"--lora_layers={','.join(TARGETS)}", "--guidance_scale=3.5", "--weighting_scheme=none",
                f"--max_sequence_length={t5_length(model)}", "--cache_latents"]
    return cmd


def t5_length(model: Path) -> int:
    """The T5 prompt length dreamfleet pads to: min(512, the tokenizer's model_max_length), as FluxPipeline."""
    config = json.loads((model / "tokenizer_2" / "tokenizer_config.json").read_text())
    return min(512, int(config.get("model_max_length", 512)))


class GpuPoller(threading.Thread):
    """Peak GPU memory (MiB) of one pid, from nvidia-smi every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self._stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, mib = line.partition(",")
                if pid.strip() == str(self.pid):
                    self.peak_mib = max(self.peak_mib, int(mib))

    def stop(self) -> None:
        self._stop.set()


def timed(cmd: list[str], log: Path, gpu: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        poller = GpuPoller(proc.pid) if gpu else None
        if poller:
            poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if poller:
        poller.stop()
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}); see {log}")
    return {"wall_s": wall, "rss_mib": usage.ru_maxrss / 1024, "gpu_mib": poller.peak_mib if poller else None}


def run(args) -> dict:
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, images = prepare(args, work)
    gpu = shutil.which("nvidia-smi") is not None  # peak GPU memory is polled wherever a GPU is
    makers = {"dreamfleet": ours_command, "reference": reference_command}
    samples: dict[str, list[dict]] = {name: [] for name in makers}
    short, long = args.steps
    for rep in range(args.reps):
        # interleaved (A short, B short, A long, B long; the order flips every rep), so that a
        # shared machine's drift in speed lands on both trainers alike
        order = list(makers) if rep % 2 == 0 else list(reversed(makers))
        res: dict[str, dict[int, dict]] = {name: {} for name in makers}
        for steps in (short, long):
            for name in order:
                out = work / f"{name}-{rep}-{steps}"
                shutil.rmtree(out, ignore_errors=True)
                res[name][steps] = timed(makers[name](args, model, images, steps, out), work / f"{out.name}.log", gpu)
        for name in order:
            r = res[name]
            extra_s = r[long]["wall_s"] - r[short]["wall_s"]
            if extra_s <= 0:  # start-up noise (a cold page cache for the model) larger than the extra steps
                print(f"rep {rep} {name}: the {long}-step run was not slower than the {short}-step run; "
                      "its steps/s is left out (use more steps)", flush=True)
            sample = {"steps_per_s": (long - short) / extra_s if extra_s > 0 else float("nan"),
                      "s_per_subject": r[long]["wall_s"], "rss_mib": r[long]["rss_mib"], "gpu_mib": r[long]["gpu_mib"],
                      "s_per_subject_batch": r[long]["wall_s"]}
            if name == "dreamfleet" and args.subjects > 1:
                out = work / f"{name}-{rep}-{long}-x{args.subjects}"
                shutil.rmtree(out, ignore_errors=True)
                batch = timed(ours_command(args, model, images, long, out, args.subjects), work / f"{out.name}.log", gpu)
                sample["s_per_subject_batch"] = batch["wall_s"] / args.subjects
            samples[name].append(sample)
            print(f"rep {rep} {name:10} {sample['steps_per_s']:.2f} steps/s, {sample['s_per_subject']:.1f} s/subject, "
                  f"RSS {sample['rss_mib']:.0f} MiB", flush=True)
    return summarize(args, samples)


def summarize(args, samples: dict[str, list[dict]]) -> dict:
    def median(values: list) -> float | None:
        kept = [v for v in values if v is not None and v == v]  # None: not measured; NaN: left out
        return statistics.median(kept) if kept else None

    med = {name: {k: median([s[k] for s in runs]) for k in runs[0]} for name, runs in samples.items()}
    ours, ref = med["dreamfleet"], med["reference"]
    ratios = {"steps_per_s": ours["steps_per_s"] / ref["steps_per_s"] if ours["steps_per_s"] and ref["steps_per_s"] else float("nan"),
              "s_per_subject": ref["s_per_subject"] / ours["s_per_subject"],
              "rss": ours["rss_mib"] / ref["rss_mib"],
              "s_per_subject_batch": ref["s_per_subject_batch"] / ours["s_per_subject_batch"]}
    import torch

    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "python": platform.python_version(), "torch": torch.__version__, "args": vars(args) | {"out": str(args.out), "reference_script": str(args.reference_script)},
              "median": med, "ratios": ratios, "samples": samples}
    k = args.subjects
    print(f"\n| trainer | steps/s (min-max) | s/subject, 1 subject (with start-up) | s/subject, {k}-subject batch | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, m in med.items():
        rates = [s["steps_per_s"] for s in samples[name] if s["steps_per_s"] == s["steps_per_s"]] or [float("nan")]
        print(f"| {name} | {m['steps_per_s'] or float('nan'):.2f} ({min(rates):.2f}-{max(rates):.2f}) | {m['s_per_subject']:.1f} | "
              f"{m['s_per_subject_batch']:.1f} | {m['rss_mib']:.0f} |")
    print(f"\nratios: steps/s x{ratios['steps_per_s']:.2f}; seconds per subject x{ratios['s_per_subject']:.2f} (1 subject), "
          f"x{ratios['s_per_subject_batch']:.2f} ({k}-subject batch) (reference / ours); RSS x{ratios['rss']:.2f} (ours / reference)")
    with open(args.out / "results.json", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options, checked (a model of the wrong family, a missing reference script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-script", type=Path, required=True)
    parser.add_argument("--python", default=sys.executable, help="interpreter both trainers run with (one torch)")
    parser.add_argument("--family", choices=["sd", "sdxl", "flux"], default="sd",
                        help="sd: against train_dreambooth_lora.py; sdxl: train_dreambooth_lora_sdxl.py; "
                             "flux: train_dreambooth_lora_flux.py")
    parser.add_argument("--model", choices=["tiny", "sd15", "sdxl", "flux"], default="tiny",
                        help="the family's tiny model, or random weights at SD 1.5's (sd), SDXL's (sdxl) or "
                             "FLUX.1's (flux) sizes")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 200], metavar=("SHORT", "LONG"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=4, help="subjects in dreamfleet's batch run (1: skip it)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dreamfleet-bench"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dreamfleet job setting, every run")
    parser.add_argument("--batch-set", action="append", default=[], metavar="KEY=VALUE",
                        help="dreamfleet job setting for the K-subject job only (e.g. train.pack=4)")
    args = parser.parse_args(argv)
    args.mixed_precision_ref = args.mixed_precision
    if (args.family, args.model) not in BUILDERS:
        raise SystemExit(f"--model {args.model} is not a {args.family} model; with --family {args.family} use one of "
                         + ", ".join(m for f, m in BUILDERS if f == args.family))
    if not args.reference_script.exists():
        raise SystemExit(f"--reference-script {args.reference_script} does not exist")
    return args


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
