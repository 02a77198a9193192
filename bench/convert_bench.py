"""Conversion speed: ``weaktr convert voc`` with one reading thread against ``--workers`` threads (and, with
``--ray``, against Ray tasks on a local Ray of ``--workers`` CPUs), in one invocation on the same files (issue 13:
COCO's 123k images should not take one core hours).

    .venv/bin/python bench/convert_bench.py [--images 400] [--workers N] [--repeats 2] [--ray]

Writes a VOC-layout stand-in of ``--images`` 500x375 JPEGs (VOC's typical size) with palette masks into a
temporary folder, converts it each way (best of ``--repeats``) and prints images/s and the ratio to one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weaktr.data.voc import convert_voc, save_palette_png  # noqa: E402


def write_stand_in(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(count)]
    yy, xx = np.mgrid[0:375, 0:500]
    for i, image_id in enumerate(ids):
        # Smooth colour fields plus noise: JPEG sizes near real photos' (flat noise would be far larger).
        base = np.stack([(np.sin(xx / (20 + i % 7) + c) + 1) * 100 for c in range(3)], -1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = np.zeros((375, 500), np.uint8)
        mask[100:250, 150:350] = 1 + i % 20
        save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also read in Ray tasks (a local Ray of --workers CPUs)")
    args = parser.parse_args(argv)
    ways = {"1 thread": {"workers": 1}, f"{args.workers} threads": {"workers": args.workers}}
    if args.ray:
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ways[f"Ray tasks, {args.workers} CPUs"] = {"use_ray": True}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC2012"
        write_stand_in(root, args.images)
        rates = {}
        for way, options in ways.items():
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                convert_voc(root, Path(tmp) / "out", splits=("train",), **options)
                best = min(best, time.perf_counter() - started)
            rates[way] = args.images / best
    print(f"\n{args.images} VOC-size JPEGs, {os.cpu_count()} cores:")
    for way, rate in rates.items():
        print(f"  {way}: {rate:.0f} images/s ({rate / rates['1 thread']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
