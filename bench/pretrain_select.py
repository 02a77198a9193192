"""Which pretraining stands in for ImageNet on the built-in benchmark (issue 24): one phase-1 run per variant, its
CAM readouts (bench/ablation.py's) and where its patches' attention goes.

    .venv/bin/python bench/pretrain_select.py --out runs/pretrain-select [--variants scratch dense ...]

Variants (``VARIANTS``): a backbone from ``weaktr pretrain`` with the given ``pretrain.*`` settings (or none:
from scratch), then phase 1 on configs/synthetic.yaml with the given ``train.*`` settings. For each: the five CAM
readouts at VOC's threshold 0.43 and at the best of a sweep, on the first ``--samples`` training images; and the
fused patch-to-patch attention PA of the phase-1 model (and of the backbone before phase 1), on the first 64
training images at scale 1: the share of a background patch's attention that lands on object patches
(``bg_to_fg``), the same for object patches (``fg_to_fg``), the object patches' share of all patches (``fg_share``:
uniform attention would give it to both), and PA's row entropy over log N (1: uniform). A semantic PA has
``bg_to_fg`` well below ``fg_share``. Each variant's result is kept in ``{out}/{variant}.json``: a rerun skips it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from weaktr.config import load_config, resolve_paths, with_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name: (pretrain settings or None for from scratch, phase-1 settings); the rest of `pretrain` as configs/synthetic.yaml
IMAGE = {"pretrain.objective": "image", "pretrain.epochs": 30, "pretrain.mimetic_init": False}
DENSE = {"pretrain.objective": "dense", "pretrain.epochs": 30, "pretrain.mimetic_init": False}
MIMETIC = {"pretrain.epochs": 0, "pretrain.mimetic_init": True}  # no pretraining steps: the initialization alone
BOTH = {"pretrain.objective": "dense", "pretrain.epochs": 15, "pretrain.mimetic_init": True}  # the demo's
LONG, GENTLE, SHORT = ({"train.epochs": 20, "train.lr": 1e-3}, {"train.epochs": 10, "train.lr": 2e-4},
                       {"train.epochs": 5, "train.lr": 1e-4})
VARIANTS = {
    "scratch": (None, LONG),
    "image": (IMAGE, LONG),
    "dense": (DENSE, LONG),
    "mimetic": (MIMETIC, LONG),
    "dense, gentle phase 1": (DENSE, GENTLE),
    "dense + mimetic, gentle phase 1": (BOTH, GENTLE),
    "dense + mimetic, short gentle phase 1 (the demo)": (BOTH, SHORT),
}


def attention_stats(model, manifest, samples: int = 64) -> dict:
    """Where the fused patch-to-patch attention goes (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from weaktr.data.transforms import normalize_image
    from weaktr.train.cam_loop import cam_eval_samples

    C, patch = model.num_classes, model.patch_size[0]
    stats = {"bg_to_fg": [], "fg_to_fg": [], "fg_share": [], "entropy": []}
    for sample in cam_eval_samples(manifest, "train", samples):
        H, W = (s // patch * patch for s in sample.image.shape[:2])
        with torch.no_grad():
            fused = model(normalize_image(sample.image[:H, :W], model.normalization)[None]).fused_attn
        mask = torch.from_numpy(sample.mask[:H, :W].astype(np.int64))[None, None]  # [1, 1, H, W]
        fg = F.avg_pool2d(((mask > 0) & (mask < 255)).float(), patch).flatten() > 0.5  # [N]
        bg = F.avg_pool2d((mask == 0).float(), patch).flatten() > 0.5
        if not fg.any() or not bg.any():
            continue
        pa = fused[0, C:, C:]
        pa = pa / pa.sum(-1, keepdim=True)  # [N, N], rows over patches only
        stats["bg_to_fg"].append(pa[bg][:, fg].sum(-1).mean().item())
        stats["fg_to_fg"].append(pa[fg][:, fg].sum(-1).mean().item())
        stats["fg_share"].append(fg.float().mean().item())
        stats["entropy"].append((-(pa * pa.clamp_min(1e-12).log()).sum(-1).mean() / np.log(pa.shape[1])).item())
    return {k: float(np.mean(v)) for k, v in stats.items()}


def run_variant(name: str, out: Path, samples: int) -> dict:
    import ablation

    from weaktr import pipeline
    from weaktr.data.shards import Manifest
    from weaktr.models.build import build_cam_model, load_model
    from weaktr.pretrain import pretrain
    from weaktr.runtime import seed_rngs

    settings, phase1 = VARIANTS[name]
    slug = name.replace(" ", "").replace(",", "_").replace("+", "_")
    # Phase 1 keeps the epoch whose CA * M scores best (patch_attn_refine false), the same for every variant.
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [
        f"run.storage_path={out / 'runs'}", f"run.name={slug}", "model.weights_path=null",
        "seg_model.weights_path=null", "pseudo.patch_attn_refine=false"])
    resolve_paths(cfg)
    cfg = with_values(cfg, phase1)
    if settings is not None:
        cfg = with_values(cfg, {**settings, "pretrain.out": str(out / "weights" / slug)})
        pretrain(cfg)
        cfg = with_values(cfg, {"model.weights_path": str(out / "weights" / slug / "backbone.pth")})
    directory = str(out / "runs" / slug)
    stage_cfg = pipeline.stage_config(cfg, directory)
    records = {"data": asdict(pipeline.run_data(stage_cfg, directory, {}))}
    records["phase1"] = asdict(pipeline.run_phase1(stage_cfg, directory, records))
    manifest = Manifest.load(Path(records["data"]["outputs"]["manifest"]).parent)
    seed_rngs(cfg.run.seed)
    before = attention_stats(build_cam_model(cfg, manifest.num_classes).eval(), manifest)
    model, _ = load_model(records["phase1"]["outputs"]["checkpoint"], "cam", manifest.classes)
    return {"readouts": ablation.cam_readouts(cfg, records, samples, 0.43), "pa_before_phase1": before,
            "pa_after_phase1": attention_stats(model, manifest),
            "phase1_cam_mIoU": [round(m["cam_mIoU"], 4) for m in records["phase1"]["metrics"]["history"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pretrain-select")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=200, help="images scored for the CAM readouts")
    args = parser.parse_args(argv)
    from weaktr.launch import init_ray

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    lines = ["| variant | M | G, equal | G, AAF | CA * M | CA | PA bg->fg before / after phase 1 (fg share) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.variants:
        path = out / f"{name.replace(' ', '_')}.json"
        if not path.exists():
            path.write_text(json.dumps(run_variant(name, out, args.samples), indent=1))
        result = json.loads(path.read_text())
        best = [100 * result["readouts"][row]["best"] for row, *_ in __import__("ablation").READOUTS]
        before, after = result["pa_before_phase1"], result["pa_after_phase1"]
        lines.append(f"| {name} | " + " | ".join(f"{b:.1f}" for b in best)
                     + f" | {before['bg_to_fg']:.2f} / {after['bg_to_fg']:.2f} ({after['fg_share']:.2f}) |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
