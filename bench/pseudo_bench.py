"""Pseudo-label pipeline benchmark (issue 3): CAM inference batched vs one image at a time, CRF actor throughput and
1 -> 2 actor scaling on a local Ray, and peak memory of the whole job for N vs 10N images.

    python bench/pseudo_bench.py                      # all three, CPU defaults for a 2-core machine
    python bench/pseudo_bench.py cam --arch deit_small --images 8 --height 320 --width 480
    python bench/pseudo_bench.py crf --images 48
    python bench/pseudo_bench.py rss --images 40      # runs the job on 40 and 400 images

Every figure is measured in this process (cam), a local Ray started here (crf) or separate job processes (rss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weaktr.checkpoint import save_checkpoint  # noqa: E402
from weaktr.data.synthetic import SyntheticSpec, iter_synthetic, write_synthetic  # noqa: E402
from weaktr.models.cam import WeakTrCAM  # noqa: E402
from weaktr.models.inference import multiscale_cams  # noqa: E402
from weaktr.pseudo.stages import _png  # noqa: E402

ARCHS = {
    # DeiT-S as in the paper (random weights: the speed is the same).
    "deit_small": dict(backbone="deit_small_patch16_224", img_size=224, drop_path_rate=0.0),
    # A small ViT (the synthetic demo's model when the figures were taken; the config now uses width 64, depth 2,
    # patch 8).
    "synthetic": dict(
        img_size=96, embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0, reduction=4, feat_reduction=4
    ),
}


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, {threads} torch threads"


# --------------------------------------------------------------------------------------------------------------


def bench_cam(args) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    model = WeakTrCAM(20, **ARCHS[args.arch]).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)]
    scales = [1.0, 1.2]

    multiscale_cams(model, images[:1], scales, True, 16, reference=True)  # warm-up (allocator, kernels)
    # The machine is shared: interleave the two paths chunk by chunk so both see the same load.
    seconds = {"reference": 0.0, "batched": 0.0}
    results = {"reference": [], "batched": []}
    for _ in range(args.repeats):
        results = {"reference": [], "batched": []}
        for i in range(0, len(images), args.batch_size):  # a chunk, as the pipeline's CAM actors get them
            chunk = images[i : i + args.batch_size]
            for name in ("reference", "batched"):
                start = time.perf_counter()
                results[name] += multiscale_cams(model, chunk, scales, True, 16, reference=name == "reference")
                seconds[name] += time.perf_counter() - start
    rates = {name: args.repeats * len(images) / value for name, value in seconds.items()}
    what = f"CAM {args.arch} {args.height}x{args.width}, {args.images} images x {args.repeats}, scales 1.0+1.2 + flip"
    rows = [
        (f"{what}: reference (one image at a time)", f"{rates['reference']:.3g} img/s"),
        (f"{what}: batched (chunks of {args.batch_size})", f"{rates['batched']:.3g} img/s"),
    ]
    a, b = results.values()
    worst = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))
    rows.append((f"CAM {args.arch}: batched / reference throughput", f"{rates['batched'] / rates['reference']:.2f}x"))
    rows.append((f"CAM {args.arch}: batched vs reference max relative difference", f"{worst:.1e}"))
    return rows


# --------------------------------------------------------------------------------------------------------------


def _crf_rows(count: int, height: int, width: int) -> list[dict]:
    """CRF-stage input rows: synthetic images with their GT mask (ignore -> background) as the CAM label."""
    spec = SyntheticSpec(
        num_classes=6, num_train=count, num_val=0, min_size=min(height, width), max_size=max(height, width)
    )
    rows = []
    for i, sample in enumerate(iter_synthetic(spec, 0, count)):
        cam_label = np.where(sample.mask == 255, 0, sample.mask)
        rows.append({
            "kind": "sample", "shard_id": 0, "shard_total": count, "index": i, "key": sample.key, "reason": "",
            "labels": json.dumps(sample.labels), "image": _rgb_png(sample.image),
            "mask": _png(sample.mask), "cam_label": _png(cam_label),
            "cam_cm": b"", "sweep": b"", "cams": b"", "overlay": b"",
        })
    return rows


def _rgb_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_crf(args) -> list[tuple[str, str]]:
    import ray
    import ray.data

    from weaktr.crf import CRFParams, crf_refine_labels
    from weaktr.data.images import load_rgb
    from weaktr.pseudo.stages import CrfStage, StageSettings, _decode_label_png

    rows = _crf_rows(args.images, args.height, args.width)
    sizes = {(load_rgb(r["image"]).shape[:2]) for r in rows[:4]}

    # One process, no Ray: what one CRF actor can do at most.
    start = time.perf_counter()
    subset = rows[: max(4, args.images // 4)]
    for row in subset:
        image, cam_label = load_rgb(row["image"]), _decode_label_png(row["cam_label"])
        crf_refine_labels(image, cam_label, json.loads(row["labels"]), CRFParams())
    single = len(subset) / (time.perf_counter() - start)

    settings = StageSettings(num_classes=6, scales=[1.0], flip=True, attention_type="fused", patch_attn_refine=True,
                             bg_threshold=0.43, chunk_size=1, forward_batch=8, overlay_samples=0, save_cams=False,
                             sweep_thresholds=None, crf=asdict(CRFParams()))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = [("CRF, one process (no Ray), images ~" + "/".join(f"{h}x{w}" for h, w in sorted(sizes)[:2]),
                f"{single:.2f} img/s")]
    rates = {}
    for actors in (1, 2):
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            CrfStage, fn_constructor_kwargs={"settings": settings}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        )
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in dataset.iter_rows()]
        wall = time.perf_counter() - start
        # Steady state: from the output of the first image (actors up) to the last.
        rates[actors] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        results.append((f"CRF on local Ray, {actors} actor(s): steady-state / end-to-end",
                        f"{rates[actors]:.2f} / {len(stamps) / wall:.2f} img/s"))
    results.append(("CRF scaling 1 -> 2 actors (steady state)", f"{rates[2] / rates[1]:.2f}x"))
    ray.shutdown()
    return results


# --------------------------------------------------------------------------------------------------------------


def _tree_rss_kib(root_pid: int) -> tuple[int, int]:
    """(RSS of root_pid, summed RSS of root_pid and all its descendants), KiB, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid, ppid = int(entry), int(fields["PPid"])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return rss.get(root_pid, 0), total


def _run_job_measuring_rss(command: list[str], env: dict) -> tuple[float, int, int, str]:
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = [0, 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            driver, tree = _tree_rss_kib(process.pid)
            peaks[0], peaks[1] = max(peaks[0], driver), max(peaks[1], tree)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"job failed ({process.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - start, peaks[0], peaks[1], output


def bench_rss(args) -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pseudo_bench_"))
    torch.manual_seed(0)
    model = WeakTrCAM(6, **ARCHS["synthetic"])
    checkpoint = work / "ckpt"
    results = []
    peaks = {}
    for count in (args.images, 10 * args.images):
        data = work / f"data{count}"
        # The spec configs/synthetic.yaml + the --set below describe, so the job's prepare_data reuses these shards.
        manifest = write_synthetic(data, SyntheticSpec(num_classes=6, num_train=count, num_val=0))
        if not checkpoint.exists():
            save_checkpoint(checkpoint, kind="cam", model_state=model.state_dict(), arch=model.arch,
                            classes=manifest.classes, config={}, epoch=0)
        command = [
            sys.executable, str(ROOT / "ray_jobs" / "make_pseudo_labels.py"),
            "--config", str(ROOT / "configs" / "synthetic.yaml"), "--checkpoint", str(checkpoint),
            "--set", f"data.root={data}", "--set", f"pseudo.out_dir={work / f'out{count}'}",
            "--set", f"run.storage_path={work / 'runs'}", "--set", "pseudo.sweep_bg=0.30:0.60:0.01",
            "--set", f"data.synthetic.num_train={count}", "--set", "data.synthetic.num_val=0",
        ]
        # "local": a fresh Ray for the job (a bare ray.init() would join any `ray start` cluster on this machine).
        env = os.environ | {"RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
        seconds, driver, tree, output = _run_job_measuring_rss(command, env)
        peaks[count] = (driver, tree)
        shards = len(manifest.splits["train"].shards)
        results.append((f"job on {count} images ({shards} shards): wall, peak RSS driver / whole process tree",
                        f"{seconds:.0f} s, {driver / 1024:.0f} MiB / {tree / 1024:.0f} MiB"))
    small, large = peaks[args.images], peaks[10 * args.images]
    results.append((f"peak RSS ratio {10 * args.images} vs {args.images} images: driver / tree",
                    f"{large[0] / small[0]:.2f}x / {large[1] / small[1]:.2f}x"))
    return results


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "cam", "crf", "rss"))
    parser.add_argument("--arch", default="deit_small", choices=sorted(ARCHS))
    parser.add_argument("--images", type=int, default=None, help="cam: 8, crf: 48, rss: 40 (and 10x)")
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="cam: passes over the images")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    for what, default_images, fn in (("cam", 8, bench_cam), ("crf", 48, bench_crf), ("rss", 40, bench_rss)):
        if args.what in ("all", what):
            sub = argparse.Namespace(**vars(args))
            sub.images = args.images or default_images
            new = fn(sub)
            for name, value in new:
                print(f"  {name}: {value}", flush=True)
            rows += new
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))


if __name__ == "__main__":
    main()
