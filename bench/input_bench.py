"""Input-pipeline benchmark (issue 5): images/s per CPU core of each phase's shard reader + augmentation.

Runs the training loops' own loaders (``cam_loop.make_train_loader``, ``seg_loop.make_train_loader``) in this
process with one torch thread and no loader workers, so the rate is what one core delivers; divide a GPU's
images/s by it for the cores that keep that GPU fed.

    python bench/input_bench.py                                   # VOC-like stand-in, configs/voc12.yaml settings
    python bench/input_bench.py --config configs/synthetic.yaml --size 96 160 --format png   # the demo's data
    python bench/input_bench.py --data-root data/voc12            # a converted dataset (needs its pseudo-labels
                                                                  # for phase 2: point it at pseudo.out_dir)

Without ``--data-root`` it writes a stand-in dataset first: synthetic images of the given size range and
format (VOC: JPEG, ~500x375), with the ground truth copied into the pseudo-label field so that phase 2 decodes
and augments exactly what it would on real pseudo-labels.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weaktr.config import load_config  # noqa: E402
from weaktr.data.shards import Manifest, write_dataset  # noqa: E402
from weaktr.data.synthetic import CLASS_NAMES, SyntheticSpec, iter_synthetic  # noqa: E402
from weaktr.train import cam_loop, seg_loop  # noqa: E402

# Images/s one H200 trains at: the compiled bf16 rows of BENCHMARKS.md's gpu_bench table (2026-11-28).
# What the cores-per-GPU column divides by.
GPU_RATES = {"phase 1": 2484.0, "phase 2": 666.0}


def write_stand_in(out_dir: Path, count: int, size: tuple[int, int], image_format: str) -> Manifest:
    spec = SyntheticSpec(num_classes=6, num_train=count, num_val=0, min_size=size[0], max_size=size[1])

    def with_pseudo(samples):
        for sample in samples:
            sample.pseudo = sample.mask
            yield sample

    return write_dataset(
        out_dir, "input-bench", CLASS_NAMES[:6], {"train": with_pseudo(iter_synthetic(spec, 0, count))},
        samples_per_shard=64, image_format=image_format,
    )


def images_per_second(loader, batch_size: int, warmup: int) -> float:
    batches = iter(loader)
    for _ in range(warmup):  # fills the shuffle buffer (raw bytes) and warms the allocator
        next(batches)
    started = time.perf_counter()
    timed = sum(1 for _ in batches)
    return timed * batch_size / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/voc12.yaml"), help="the phases' augmentation settings")
    parser.add_argument("--data-root", help="a converted dataset (default: write a synthetic stand-in)")
    parser.add_argument("--images", type=int, default=512, help="stand-in size; also images timed per phase")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("MIN", "MAX"))
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    cfg.data.loader_workers = 0  # decode + augment in this process: one core
    cfg.train.batch_size = cfg.seg_train.batch_size = args.batch_size
    cfg.train.num_workers = cfg.seg_train.num_workers = 1  # one loader, one core: its batch is the whole batch
    steps = max(1, args.images // args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            manifest = Manifest.load(Path(args.data_root) / "manifest.json")
            source = args.data_root
        else:
            manifest = write_stand_in(Path(tmp), args.images, tuple(args.size), args.format)
            source = f"synthetic stand-in, {args.images} {args.format.upper()} images {args.size[0]}-{args.size[1]} px"
        shards = manifest.shard_paths(cfg.data.train_split if args.data_root else "train")
        num_classes = len(manifest.classes)
        loaders = {
            "phase 1": cam_loop.make_train_loader(shards, cfg, num_classes, epoch=0, steps=steps + args.warmup),
            "phase 2": seg_loop.make_train_loader(shards, cfg, num_classes=num_classes, epoch=0,
                                                  steps=steps + args.warmup),
        }
        what = {
            "phase 1": f"crop {cfg.train.img_size}, jitter {cfg.train.color_jitter}, "
                       f"autoaug {cfg.train.auto_augment} (erasing and normalization: on the device)",
            "phase 2": f"base {cfg.seg_train.base_size} x U({cfg.seg_train.scale_min}, {cfg.seg_train.scale_max}), "
                       f"crop {cfg.seg_train.crop_size} (normalization: on the device)",
        }
        rates = {phase: images_per_second(loader, args.batch_size, args.warmup) for phase, loader in loaders.items()}

    print(f"# input pipeline, {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
          f"1 torch thread, no loader workers; {source}; config {args.config}")
    print("| phase | augmentation | images/s per core | cores per H200 (issue 5 rate) |")
    print("| --- | --- | --- | --- |")
    for phase, rate in rates.items():
        gpu = GPU_RATES[phase]
        print(f"| {phase} | {what[phase]} | {rate:.0f} | {gpu / rate:.1f} (at {gpu:.0f} img/s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
