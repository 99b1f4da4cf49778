"""A packed step over bucketed subjects (train.pack with train.buckets): what running one
forward per bucket shape costs, against a pack whose subjects share a shape and against single
runs. In one process, on the tiny random-weight model.

    python benchmarks/buckets_pack.py [--resolution 64] [--step 16] [--steps 10] [--reps 3]

Cases, each training two subjects for `--steps` steps (medians of `--reps`, after one warm-up step):
  same-shape pack   two portrait subjects in a pack of 2: one forward of 2 rows a step
  mixed-shape pack  a portrait and a landscape subject in a pack of 2: two forwards of 1 row a step
  single runs       the portrait and the landscape subject one after the other (a pack of 1 each)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _images(folder: Path, size: tuple[int, int], seed: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(3):
        img = Image.new("RGB", size, (40 * i + seed * 20, 90, 160))
        img.paste((200, 30 * seed, 30), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        img.save(folder / f"{i:03d}.png")
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--step", type=int, default=16, help="train.bucket_step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from launcher.config import job_from_dict
    from launcher.subjects import image_uris
    from training.env import Preemption, WorkerEnv
    from training.loop import prepare_subject
    from training.packed_loop import PackedTrainer
    from training.runner import Worker
    from training.tiny import build_tiny_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="bench-buckets-"))
    model = build_tiny_model(work / "model")
    portrait, landscape = (args.resolution * 3 // 4 * 2, args.resolution * 2), (args.resolution * 2, args.resolution * 9 // 8)
    subjects = [{"id": "p1", "images": _images(work / "p1", portrait, 1), "instance_prompt": "sks1 toy"},
                {"id": "p2", "images": _images(work / "p2", portrait, 2), "instance_prompt": "sks2 toy"},
                {"id": "l1", "images": _images(work / "l1", landscape, 3), "instance_prompt": "sks3 toy"}]
    job = job_from_dict({"name": "b", "model": {"source": str(model)}, "adapter": {"type": "lora", "rank": 4},
                         "train": {"steps": 10_000, "resolution": args.resolution, "buckets": True,
                                   "bucket_step": args.step, "optimizer": "adamw", "samples": {"enabled": False}},
                         "subjects": subjects, "output": {"uri": str(work / "out")}})
    worker = Worker(job, WorkerEnv(), Preemption(), torch.device("cpu"), "bench")
    worker.setup(job.subjects)
    c = worker.c
    c.denoiser.train()
    data = {s.id: prepare_subject(c, job, s, image_uris(s), None, False) for s in job.subjects}
    shapes = {sid: [tuple(cache.shape) for cache in d.instance] for sid, d in data.items()}

    def timed(pack: list[str], slots: int) -> float:
        trainer = PackedTrainer(c, job, slots, worker.init_state[c.family.denoiser])
        try:
            for i, sid in enumerate(pack):
                trainer.open(i, next(s for s in job.subjects if s.id == sid), data[sid])
            trainer.step()  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            return time.perf_counter() - start
        finally:
            trainer.close()

    cases = {"same-shape pack": lambda: timed(["p1", "p2"], 2),
             "mixed-shape pack": lambda: timed(["p1", "l1"], 2),
             "single runs": lambda: timed(["p1"], 1) + timed(["l1"], 1)}
    results = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, run in cases.items():
            results[name].append(run())
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"resolution {args.resolution}, bucket_step {args.step}; latent shapes {shapes}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:18s} {median / args.steps * 1000:7.1f} ms per step of two subjects "
              f"({2 * args.steps / median:5.2f} subject-steps/s)")


if __name__ == "__main__":
    main()
