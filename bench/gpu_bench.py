"""GPU efficiency benchmark (issue 5): the straightforward and the optimized version of each stage, one table.

    python bench/gpu_bench.py                              # the issue's sizes: DeiT-S on a GPU (meant: < 5 min)
    python bench/gpu_bench.py --no-compile --stages phase2 # one stage, without the torch.compile rows
    python bench/gpu_bench.py --tiny --device cpu          # tiny models on the CPU: checks the bench works (tests)

Stages (random weights and inputs: the speed does not depend on them):
- phase2: a Segmenter step (DeiT-S encoder at 480x480 + 2-layer mask transformer, 21 classes), per-pixel
  cross-entropy through the gradient-clipping loss, SGD with momentum. Reference = the WeakTr recipe: fp32, batch
  4, explicit attention; then bf16 autocast with fused attention at batch 16 and 32, fused SGD, torch.compile.
- cam: the pseudo-label CAM pass, fine CAMs of 320x480 images at scales 1.0 and 1.2 with flips (the VOC config),
  upsampled and summed (`weaktr.models.inference.cam_pass`). Reference = one image at a time in fp32 with
  explicit attention (`cam_pass_reference`, as the WeakTr code, all classes); then chunks of images in bf16,
  forwards of 8 to 64 images (flips included), each image's 2 present classes carried to full resolution.
- crf: the dense CRF of the pseudo-labels (`weaktr.crf_torch`, crf.backend torch) on photo-like images of VOC size
  (375x500; smooth regions and edges, generated), 5 labels (background + 4 classes) and all 21, VOC kernels.
  Reference = the torch CRF on this machine's CPU, one image at a time, one thread (the GPU machine has no
  pydensecrf; on the 2-core sandbox pydensecrf is 1.37x faster than that row per image with 5 labels:
  BENCHMARKS.md, so the issue's goal, 20x pydensecrf per core, is ~27x this reference); then batches on the GPU.
- phase1: a WeakTrCAM training step, batch 64 at 224x224, 20 classes, AdamW. Reference = explicit attention in
  fp16 autocast with a gradient scaler (the WeakTr code); then SDPA attention in bf16, torch.compile; and the
  baseline the target is measured against: a plain timm DeiT-S classification step, bf16, eager and compiled.

Every step ends by reading its loss back (`.item()` / WeakTrCAM.loss), as the training loops do. Times come from
CUDA events around `--iters` steps after `--warmup` steps (the first step of a compiled row compiles); peak memory
is torch.cuda.max_memory_allocated per row. On a CPU, autocast is off (fp32, like the training loops) and the
compiled rows are skipped: the CPU run only shows that the bench works.

This file needs only torch, timm and weaktr.ops / weaktr.models (the GPU machine has no Ray or webdataset).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weaktr import ops  # noqa: E402
from weaktr.models.cam import WeakTrCAM  # noqa: E402
from weaktr.models.inference import cam_pass, cam_pass_reference  # noqa: E402
from weaktr.models.segmenter import Segmenter  # noqa: E402

IGNORE_INDEX = 255
STAGES = ("phase2", "cam", "crf", "phase1")


@dataclass
class Sizes:
    """Model and input sizes of one bench run."""

    backbone: str = "deit_small_patch16_224"
    arch: dict = field(default_factory=dict)  # ViT width/depth/heads overrides; {} = the backbone's own
    num_classes: int = 20  # foreground classes (VOC)
    seg_size: int = 480
    seg_batches: tuple[int, int, int] = (4, 16, 32)  # reference, optimized, larger optimized
    clip_patch_size: int = 120  # gradient-clipping regions (VOC config)
    cam_size: tuple[int, int] = (320, 480)
    cam_scales: tuple[float, ...] = (1.0, 1.2)
    cam_chunk: int = 32  # images per batched call
    cam_forward_batches: tuple[int, ...] = (8, 16, 64)  # images per forward (flips included)
    crf_size: tuple[int, int] = (375, 500)
    crf_batches: tuple[int, ...] = (8, 32)
    cls_size: int = 224
    cls_batch: int = 64


FULL = Sizes()
# Tiny models and inputs so that the whole bench runs on a CPU in seconds (the tests run it).
TINY = Sizes(
    arch=dict(embed_dim=32, depth=2, num_heads=2), num_classes=4, seg_size=64, seg_batches=(2, 4, 8),
    clip_patch_size=16, cam_size=(48, 64), cam_chunk=4, cam_forward_batches=(4, 8), crf_size=(40, 56),
    crf_batches=(4,), cls_size=64, cls_batch=8,
)


@dataclass
class Row:
    stage: str
    variant: str
    batch: int  # images per step (per call for the CAM pass)
    precision: str
    ms_per_step: Optional[float] = None  # None: skipped (see note)
    images_per_s: Optional[float] = None
    peak_mib: Optional[float] = None  # GPU only
    ratio: Optional[float] = None  # images/s over the stage's reference row
    kind: str = "optimized"  # "reference" (the stage's first row), "optimized" or "baseline" (plain ViT)
    note: str = ""


# --------------------------------------------------------------------------------------------------------------
# Timing


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on a GPU; fp32 (no autocast) for dtype None and on the CPU, like the training loops."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of step(), over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) * 1e3 / iters


def measure(row: Row, build: Callable[[], Callable[[], object]], device: torch.device, args) -> Row:
    """Fill in a row: build() makes the models and inputs and returns the step function to time."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = build()
    row.ms_per_step = time_steps(step, device, args.warmup, args.iters)
    row.images_per_s = row.batch * 1e3 / row.ms_per_step
    if device.type == "cuda":
        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    del step
    gc.collect()
    torch._dynamo.reset()  # drop compiled graphs: each row compiles its own model
    print(f"  {row.stage:<7} {row.variant:<52} {row.ms_per_step:9.2f} ms/step", flush=True)
    return row


def skipped(row: Row, why: str) -> Row:
    row.note = f"skipped: {why}"
    print(f"  {row.stage:<7} {row.variant:<52} {row.note}", flush=True)
    return row


# --------------------------------------------------------------------------------------------------------------
# Stages


def seg_step(sizes: Sizes, device, batch: int, amp, fused_attn=True, fused_sgd=False, use_compile=False):
    """A phase-2 training step with phase 2's loss (``ops.segmentation_loss``, as seg_loop.pixel_losses calls it)."""
    torch.manual_seed(0)
    model = Segmenter(
        sizes.num_classes + 1, backbone=sizes.backbone, img_size=sizes.seg_size, fused_attn=fused_attn, **sizes.arch
    ).to(device).train()
    # timm's "sgd" (Nesterov momentum 0.9) as seg_loop.make_optimizer builds it.
    fused = {"fused": True} if fused_sgd else {}
    optimizer = create_optimizer_v2(model, opt="sgd", lr=1e-4, weight_decay=0.0, momentum=0.9, **fused)
    forward = torch.compile(model) if use_compile else model
    S = sizes.seg_size
    images = torch.randn(batch, 3, S, S, device=device)  # [B, 3, S, S]
    targets = torch.randint(0, sizes.num_classes + 1, (batch, S, S), device=device)  # [B, S, S]
    targets[:, : S // 8] = IGNORE_INDEX  # some ignored pixels, like crop padding

    def step():
        with autocast_for(device, amp):
            logits = forward(images)  # [B, K, S, S]
        loss, _, _ = ops.segmentation_loss(logits, targets, 1.2, sizes.clip_patch_size, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def cam_model(sizes: Sizes, device, fused_attn: bool) -> WeakTrCAM:
    torch.manual_seed(0)
    model = WeakTrCAM(
        sizes.num_classes, backbone=sizes.backbone, img_size=sizes.cls_size, drop_path_rate=0.0,
        fused_attn=fused_attn, **sizes.arch,
    )
    return model.to(device).eval()


def cam_inputs(sizes: Sizes, count: int, patch: int) -> tuple[list[list[torch.Tensor]], list[tuple[int, int]]]:
    """`cam_pass` inputs for `count` images of cam_size: [scale][image] normalized [3, h, w] on the CPU, at the
    size weaktr.pseudo's resize + crop gives (decoding and resizing are the input pipeline's, not timed here)."""
    H, W = sizes.cam_size
    g = torch.Generator().manual_seed(0)
    inputs = []
    for scale in sizes.cam_scales:
        h, w = max(patch, round(H * scale)) // patch * patch, max(patch, round(W * scale)) // patch * patch
        inputs.append(list(torch.randn(count, 3, h, w, generator=g).unbind(0)))
    return inputs, [(H, W)] * count


def cam_reference_step(sizes: Sizes, device):
    """One image per call, fp32, explicit attention: the WeakTr reference CAM pass."""
    model = cam_model(sizes, device, fused_attn=False)
    inputs, out_sizes = cam_inputs(sizes, sizes.cam_chunk, model.patch_size[0])
    calls = itertools.count()

    def step():
        i = next(calls) % len(out_sizes)
        cams = cam_pass_reference(model, [scaled[i : i + 1] for scaled in inputs], out_sizes[i : i + 1])
        return cams[0][0, 0, 0].item()  # the CAM actor reads every image's result back

    return step


def cam_batched_step(sizes: Sizes, device, amp, forward_batch: int, use_compile: bool = False):
    """`cam_chunk` images per call (same size), `forward_batch` images per forward (flips included), 2 present
    classes per image. Without autograd WeakTrCAM runs explicit attention (it needs the probabilities anyway),
    whatever its fused_attn."""
    model = cam_model(sizes, device, fused_attn=True)
    inputs, out_sizes = cam_inputs(sizes, sizes.cam_chunk, model.patch_size[0])
    present = [[i % sizes.num_classes, (i + 7) % sizes.num_classes] for i in range(sizes.cam_chunk)]
    if use_compile:
        model = torch.compile(model)  # one graph per input shape: 2 scales here

    def step():
        with autocast_for(device, amp):
            cams = cam_pass(model, inputs, out_sizes, classes=present, max_batch=forward_batch)
        return cams[-1][0, 0, 0].item()

    return step


def photo_like(size: tuple[int, int], count: int, seed: int = 0) -> list[torch.Tensor]:
    """uint8 [H, W, 3] images with a photo's structure for the CRF's lattice: smooth colour fields (noise blurred at
    several scales), a few flat regions with sharp edges, sensor noise. (Random pixels would give a lattice of one
    point per pixel, nothing like a photo's.)"""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    images = []
    for _ in range(count):
        field = sum(F.interpolate(torch.rand(1, 3, max(1, H // s), max(1, W // s), generator=g), size=(H, W),
                                  mode="bilinear", align_corners=False) for s in (64, 16, 4)) / 3  # [1, 3, H, W]
        image = field[0].permute(1, 2, 0) * 255  # [H, W, 3]
        for _ in range(4):  # flat rectangles: objects with edges
            top, left = (torch.randint(0, H // 2, (1,), generator=g).item(),
                         torch.randint(0, W // 2, (1,), generator=g).item())
            image[top : top + H // 3, left : left + W // 3] = torch.rand(3, generator=g) * 255
        image = image + torch.randn(H, W, 3, generator=g) * 3
        images.append(image.clamp(0, 255).to(torch.uint8))
    return images


def crf_step(sizes: Sizes, device, batch: int, num_labels: int):
    """The torch CRF (VOC pseudo-label kernels, 10 iterations) on `batch` photo-like images as one batch; a unary
    of `num_labels` labels favouring a blocky label map."""
    from weaktr.crf import CRFParams
    from weaktr.crf_torch import mean_field

    images = [image.to(device) for image in photo_like(sizes.crf_size, batch)]
    H, W = sizes.crf_size
    g = torch.Generator().manual_seed(1)
    unaries = []
    for _ in range(batch):
        blocks = torch.randint(0, num_labels, (1, 1, H // 40 + 1, W // 40 + 1), generator=g).float()
        labels = F.interpolate(blocks, size=(H, W), mode="nearest")[0, 0].long()  # [H, W]
        probs = torch.full((num_labels, H, W), 0.4 / max(1, num_labels - 1))
        probs.scatter_(0, labels[None], 0.6)
        unaries.append((-probs.log()).to(device))  # [K, H, W]
    params = CRFParams(backend="torch")

    def step():
        posteriors = mean_field(images, unaries, params)
        return posteriors[-1][0, 0, 0].item()

    return step


def cam_train_step(sizes: Sizes, device, amp, fused_attn=True, fused_adamw=True, use_compile=False):
    """A phase-1 training step: WeakTrCAM's three-term loss (which reads the loss terms back), AdamW."""
    torch.manual_seed(0)
    model = WeakTrCAM(
        sizes.num_classes, backbone=sizes.backbone, img_size=sizes.cls_size, fused_attn=fused_attn, **sizes.arch
    ).to(device).train()
    return _classification_step(model, lambda out, labels: model.loss(out, labels)[0], sizes, device, amp,
                                fused_adamw, use_compile)


def plain_vit_step(sizes: Sizes, device, amp, fused_adamw=True, use_compile=False):
    """The baseline: a plain timm ViT classification step (one class token, SDPA attention), same loss type."""
    torch.manual_seed(0)
    model = timm.create_model(
        sizes.backbone, num_classes=sizes.num_classes, img_size=sizes.cls_size, drop_path_rate=0.1, **sizes.arch
    ).to(device).train()
    return _classification_step(model, lambda logits, labels: F.multilabel_soft_margin_loss(logits.float(), labels),
                                sizes, device, amp, fused_adamw, use_compile)


def _classification_step(model, loss_fn, sizes: Sizes, device, amp, fused_adamw: bool, use_compile: bool):
    fused = {"fused": True} if fused_adamw else {}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=6e-4, weight_decay=0.03, **fused)
    # fp16 needs loss scaling (the reference code's NativeScaler); a disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16 and device.type == "cuda")
    forward = torch.compile(model) if use_compile else model
    B, S = sizes.cls_batch, sizes.cls_size
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(B, 3, S, S, device=device, generator=g)  # [B, 3, S, S]
    labels = (torch.rand(B, sizes.num_classes, device=device, generator=g) < 0.15).float()  # [B, C] multi-hot

    def step():
        with autocast_for(device, amp):
            loss = loss_fn(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    return step


# --------------------------------------------------------------------------------------------------------------


def run_stage(stage: str, sizes: Sizes, device: torch.device, args) -> list[Row]:
    """Every row of one stage, its reference first; ratios are images/s over the reference's."""
    gpu = device.type == "cuda"
    bf16, fp16 = torch.bfloat16, torch.float16

    def row(variant: str, batch: int, amp, kind: str = "optimized") -> Row:
        precision = "fp32" if amp is None or not gpu else {bf16: "bf16", fp16: "fp16"}[amp]
        return Row(stage, variant, batch, precision, kind=kind)

    # (row, build, compiles): build() returns the step function to time.
    if stage == "phase2":
        ref, mid, big = sizes.seg_batches
        plan = [
            (row("reference: explicit attention, SGD", ref, None, "reference"),
             lambda: seg_step(sizes, device, ref, None, fused_attn=False), False),
            (row("SDPA attention, SGD", mid, bf16), lambda: seg_step(sizes, device, mid, bf16), False),
            (row("SDPA attention, SGD", big, bf16), lambda: seg_step(sizes, device, big, bf16), False),
            (row("SDPA attention, fused SGD", big, bf16),
             lambda: seg_step(sizes, device, big, bf16, fused_sgd=True), False),
            (row("SDPA attention, fused SGD, torch.compile", big, bf16),
             lambda: seg_step(sizes, device, big, bf16, fused_sgd=True, use_compile=True), True),
        ]
    elif stage == "cam":
        chunk, forwards = sizes.cam_chunk, sizes.cam_forward_batches
        plan = [(row("reference: one image at a time, explicit attention", 1, None, "reference"),
                 lambda: cam_reference_step(sizes, device), False)]
        plan += [(row(f"batched, forwards of {n}, present classes", chunk, bf16),
                  lambda n=n: cam_batched_step(sizes, device, bf16, n), False) for n in forwards]
        plan.append((row(f"batched, forwards of {forwards[1]}, present classes, torch.compile", chunk, bf16),
                     lambda: cam_batched_step(sizes, device, bf16, forwards[1], use_compile=True), True))
    elif stage == "crf":
        # The reference runs on the CPU whatever --device is: the GPU rows' ratios are GPU / one CPU thread.
        cpu = torch.device("cpu")
        plan = [(row("reference: torch CRF on the CPU, one image, 1 thread, 5 labels", 1, None, "reference"),
                 lambda: single_thread(crf_step(sizes, cpu, 1, 5)), False)]
        plan += [(row(f"torch CRF on {device.type}, batch of {n}, {k} labels", n, None),
                  lambda n=n, k=k: crf_step(sizes, device, n, k), False)
                 for k in (5, 21) for n in sizes.crf_batches]
    elif stage == "phase1":
        batch = sizes.cls_batch
        plan = [
            (row("reference: explicit attention, AdamW", batch, fp16, "reference"),
             lambda: cam_train_step(sizes, device, fp16, fused_attn=False, fused_adamw=False), False),
            (row("SDPA attention, fused AdamW", batch, bf16), lambda: cam_train_step(sizes, device, bf16), False),
            (row("SDPA attention, fused AdamW, torch.compile", batch, bf16),
             lambda: cam_train_step(sizes, device, bf16, use_compile=True), True),
            (row("plain timm ViT baseline, fused AdamW", batch, bf16, "baseline"),
             lambda: plain_vit_step(sizes, device, bf16), False),
            (row("plain timm ViT baseline, fused AdamW, torch.compile", batch, bf16, "baseline"),
             lambda: plain_vit_step(sizes, device, bf16, use_compile=True), True),
        ]
    else:
        raise ValueError(f"unknown stage {stage!r}")

    rows = []
    for r, build, compiles in plan:
        if compiles and args.no_compile:
            rows.append(skipped(r, "--no-compile"))
        elif compiles and not gpu:
            rows.append(skipped(r, "torch.compile rows run on GPU only"))
        else:
            rows.append(measure(r, build, device, args))
    for r in rows:
        if r.images_per_s is not None:
            r.ratio = r.images_per_s / rows[0].images_per_s
    return rows


def single_thread(step: Callable[[], object]) -> Callable[[], object]:
    """step() run with one torch CPU thread (restoring the count after)."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return step()
        finally:
            torch.set_num_threads(threads)

    return run


def targets(rows: list[Row]) -> list[dict]:
    """The issues' targets from the measured rows (skipped rows do not count)."""
    def measured(stage: str) -> list[Row]:
        return [r for r in rows if r.stage == stage and r.images_per_s is not None]

    out = []
    if seg := measured("phase2"):
        best = max((r for r in seg if r.kind == "optimized"), key=lambda r: r.images_per_s)
        out.append(dict(name=f"phase 2: best ({best.variant}, batch {best.batch}) / reference images/s",
                        value=best.ratio, goal=">= 5x", met=best.ratio >= 5))
    if cam := measured("cam"):
        best = max((r for r in cam if r.kind == "optimized"), key=lambda r: r.images_per_s)
        out.append(dict(name=f"CAM pass: best ({best.variant}) / one at a time images/s",
                        value=best.ratio, goal=">= 10x", met=best.ratio >= 10))
    if crf := measured("crf"):
        best = max((r for r in crf if r.kind == "optimized" and "5 labels" in r.variant), key=lambda r: r.images_per_s)
        out.append(dict(name=f"CRF: best 5-label ({best.variant}) / torch on one CPU thread images/s",
                        value=best.ratio, goal=">= 27x", met=best.ratio >= 27))
    if cls := measured("phase1"):
        best = min((r for r in cls if r.kind == "optimized"), key=lambda r: r.ms_per_step)
        base = min((r for r in cls if r.kind == "baseline"), key=lambda r: r.ms_per_step)
        ratio = best.ms_per_step / base.ms_per_step
        out.append(dict(name=f"phase 1: best WeakTr ({best.variant}) ms / {base.variant} ms",
                        value=ratio, goal="<= 1.15", met=ratio <= 1.15))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def print_table(rows: list[Row], header: dict, goals: list[dict]) -> None:
    print()
    for key, value in header.items():
        print(f"{key}: {value}")
    columns = ("stage", "variant", "batch", "precision", "ms/step", "images/s", "peak MiB", "vs reference", "note")
    lines = [columns]
    for r in rows:
        measured = r.ms_per_step is not None
        lines.append((
            r.stage, r.variant, str(r.batch), r.precision,
            f"{r.ms_per_step:.2f}" if measured else "-",
            f"{r.images_per_s:.1f}" if measured else "-",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
            f"{r.ratio:.2f}x" if measured else "-",
            r.note,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for i, line in enumerate(lines):
        cells = [cell.rjust(w) if 2 <= j < len(columns) - 1 else cell.ljust(w)
                 for j, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for goal in goals:
        value = f"{goal['value']:.2f}" + ("x" if goal["goal"].startswith(">") else "")
        print(f"{goal['name']}: {value} (target {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and inputs (CPU tests)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compiled rows compile here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--json", default=None, help="also write the rows and targets to this JSON file")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {','.join(STAGES)}")
    device = torch.device(args.device)
    sizes = TINY if args.tiny else FULL
    header = {
        "device": device_name(device),
        "torch": f"{torch.__version__}, timm {timm.__version__}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python bench/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "sizes": "tiny (CPU check)" if args.tiny else "issue 5 (DeiT-S)",
    }
    print(f"{header['device']} | torch {header['torch']}", flush=True)
    started = time.perf_counter()
    rows = [row for stage in stages for row in run_stage(stage, sizes, device, args)]
    header["wall"] = f"{time.perf_counter() - started:.0f} s"
    goals = targets(rows)
    print_table(rows, header, goals)
    if device.type != "cuda":
        print("(CPU run: autocast off, compiled rows skipped; the targets are GPU targets)")
    if args.json:
        report = {**header, "rows": [asdict(r) for r in rows], "targets": goals}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
