"""WeakTr's components on the built-in benchmark, each row over several seeds (issue 15), as the paper's tables do
for VOC.

    .venv/bin/python bench/ablation.py --config configs/synthetic.yaml --seeds 0 1 2 [--set ...]

For each seed (``run.seed``: model initialization, data order, augmentation; the dataset stays the same), this
runs the whole pipeline (``weaktr.pipeline``: phase 1, pseudo-labels, phase 2 with gradient clipping, evaluation)
into ``{out}/seed{s}``, then adds what the pipeline does not make:

- **CAM readouts** of the same phase-1 checkpoint, on the first ``--cam-samples`` images of the pseudo-label split
  with the pseudo-label pass's scales and flip: the coarse CAM M; the fine CAM G = PA (CA * M) with equal-weight
  fusion and with AAF; and the readouts without the PA refinement (CA * M, CA). Each is scored at a fixed
  background threshold (``--fixed-threshold``, the official VOC 0.43) and at the best one of a sweep. Equal-weight
  fusion is G with every map weighted 1 on the AAF-trained model: the fine loss term trains only the AAF, so the
  encoder is the one a run with equal weights would train; only the fusion differs.
- **Retraining the other way**: with gradient clipping when the config trains on plain cross-entropy, and the
  reverse (``seg_train.clip``), on the same pseudo-labels, evaluated as the pipeline evaluates its own.

Every finished piece is recorded under its seed's directory, so an interrupted ablation resumes where it stopped.
The table (mean, sample standard deviation and the per-seed values) goes to ``{out}/ablation.md`` and
``ablation.json``, the plot to ``ablation.png``; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import Config, ConfigError, load_config, resolve_paths, with_values  # noqa: E402

# (row name, attention_type, patch_attn_refine, fusion) of the CAM readouts scored on each phase-1 checkpoint.
READOUTS = (
    ("coarse CAM M", "patchcam", False, "aaf"),
    ("fine CAM G, equal-weight fusion", "fused", True, "equal"),
    ("fine CAM G, AAF (the paper's CAM)", "fused", True, "aaf"),
    ("CA * M, no PA refinement", "fused", False, "aaf"),
    ("CA, no PA refinement", "cross", False, "aaf"),
)
ARM = {True: "clip", False: "ce"}  # phase-2 loss -> the name of its figure
SWEEP = [round(0.01 * i, 2) for i in range(1, 91)]  # background thresholds searched for the "best t" column


def seed_config(cfg: Config, seed: int, out: Path) -> Config:
    return with_values(cfg, {"run.seed": seed, "run.name": f"seed{seed}", "run.storage_path": str(out)})


def cam_readouts(cfg: Config, records: dict, samples: int, fixed: float) -> dict:
    """{row name: {"fixed": mIoU at threshold ``fixed``, "best": best mIoU of the sweep, "best_t": its t}}."""
    import torch

    from weaktr.data.shards import Manifest
    from weaktr.metrics import BackgroundSweep, normalize_cams
    from weaktr.models.build import load_model
    from weaktr.models.inference import multiscale_cams
    from weaktr.train.cam_loop import cam_eval_samples

    class EqualWeights(torch.nn.Module):
        def forward(self, feats):  # feats [B, L, T, hd] -> weights [B, L], all 1
            return feats.new_ones(feats.shape[:2])

    p = cfg.pseudo
    manifest = Manifest.load(Path(records["data"]["outputs"]["manifest"]).parent)
    model, _ = load_model(records["phase1"]["outputs"]["checkpoint"], "cam", manifest.classes)
    aaf = model.aaf
    images = list(cam_eval_samples(manifest, p.split, samples))
    thresholds = sorted(set(SWEEP) | {fixed})
    rows = {}
    for name, attention_type, refine, fusion in READOUTS:
        model.aaf = EqualWeights() if fusion == "equal" else aaf
        sweep = BackgroundSweep(thresholds, manifest.num_classes)
        for start in range(0, len(images), p.batch_size):
            chunk = images[start:start + p.batch_size]
            cams = multiscale_cams(model, [s.image for s in chunk], p.scales, p.flip, model.patch_size[0],
                                   attention_type=attention_type, refine=refine)
            for sample, cam in zip(chunk, cams):
                sweep.update(normalize_cams(cam.cpu(), sample.labels), sample.labels, sample.mask)
        best_t, best = sweep.best()
        rows[name] = {"fixed": sweep.confusion_matrix(fixed).miou(), "best": best, "best_t": best_t}
    model.aaf = aaf
    rows["aaf_weights"] = aaf_weights(cfg, model, images[:p.batch_size * 4])
    return rows


def aaf_weights(cfg: Config, model, images) -> dict:
    """Do the AAF weights move, and where: the mean weight of each attention map (head-major, l = j*K + k) over
    ``images`` (scale 1, no flip) from the trained AAF and from the AAF phase 1 started with (rebuilt from the
    seed, as the training worker of rank 0 builds it), both on the trained encoder's features."""
    import torch

    from weaktr.models.inference import multiscale_cams
    from weaktr.runtime import seed_rngs

    # Rank 0 seeds its RNGs with run.seed, then builds the model: the same draws give the same initial AAF (loading
    # pretrained backbone weights replaces values after the draws, so the architecture alone rebuilds it).
    seed_rngs(cfg.run.seed)
    initial = type(model)(**model.arch).aaf
    captured, trained = [], model.aaf
    hook = lambda module, inputs, output: captured.append(output.detach())  # noqa: E731 [B, L]
    means = {}
    for name, aaf in (("trained", trained), ("initial", initial)):
        model.aaf, captured[:] = aaf, []
        handle = aaf.register_forward_hook(hook)
        with torch.no_grad():
            multiscale_cams(model, [s.image for s in images], [1.0], False, model.patch_size[0])
        handle.remove()
        means[name] = torch.cat(captured).mean(0).tolist()
    model.aaf = trained
    return means


def retrain(cfg: Config, directory: Path, clip: bool) -> float:
    """Val mIoU of phase 2 retrained on the seed's pseudo-labels with ``seg_train.clip`` = ``clip``."""
    from weaktr.evaluate import evaluate_variants_on_ray
    from weaktr.launch import best_checkpoint
    from weaktr.pipeline import PipelineError, stage_config
    from weaktr.train import seg_loop

    arm = stage_config(with_values(cfg, {"seg_train.clip": clip}), str(directory))
    result = seg_loop.fit(arm, name=f"phase2_{ARM[clip]}")
    if result.checkpoint is None:
        raise PipelineError(f"phase-2 retraining ({ARM[clip]}) ended without a checkpoint ({result.error})")
    (report,) = evaluate_variants_on_ray(arm, best_checkpoint(result, "val_mIoU"), [False])
    return report["miou"]


def run_seed(cfg: Config, seed: int, out: Path, samples: int, fixed: float) -> dict:
    """The seed's figures (resumed from ``ablation_seed.json`` pieces already there)."""
    from weaktr.pipeline import run_pipeline

    seed_cfg = seed_config(cfg, seed, out)
    records = run_pipeline(seed_cfg, log=lambda line: print(f"[seed {seed}] {line}", flush=True))
    directory = out / f"seed{seed}"
    saved = directory / "ablation_seed.json"
    figures = json.loads(saved.read_text()) if saved.exists() else {}
    if "readouts" not in figures:
        figures["readouts"] = cam_readouts(seed_cfg, records, samples, fixed)
        _save(saved, figures)
    other = not cfg.seg_train.clip
    if f"{ARM[other]}_miou" not in figures:
        figures[f"{ARM[other]}_miou"] = retrain(seed_cfg, directory, other)
        _save(saved, figures)
    pseudo = records["pseudo"]["metrics"]
    figures |= {
        "cam_labels": pseudo["cam"]["miou"], "crf_labels": pseudo["crf"]["miou"],
        "bg_threshold": pseudo["bg_threshold"],
        f"{ARM[cfg.seg_train.clip]}_miou": records["eval"]["metrics"]["eval"]["miou"],
        "phase1_cam_miou": records["phase1"]["metrics"]["best"]["cam_mIoU"],
    }
    return figures


def _save(path: Path, figures: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    tmp.replace(path)


def table_rows(cfg: Config, per_seed: dict[int, dict], fixed: float) -> list[tuple[str, str, list[float]]]:
    """(row, what it is measured on, per-seed mIoU values)."""
    seeds = sorted(per_seed)
    p = cfg.pseudo
    split = f"{p.split}, first {{n}} images"
    rows = []
    for name, *_ in READOUTS:
        rows.append((f"{name}, t = {fixed:g}", split, [per_seed[s]["readouts"][name]["fixed"] for s in seeds]))
        rows.append((f"{name}, best t of a sweep", split, [per_seed[s]["readouts"][name]["best"] for s in seeds]))
    readout = {"fused": "CA * M", "patchcam": "M", "cross": "CA"}[p.attention_type]
    readout += " refined by PA" if p.patch_attn_refine else ", no PA refinement"
    threshold = "phase 1's t" if p.bg_threshold is None else f"t = {p.bg_threshold:g}"
    rows += [
        (f"CAM labels ({readout}, {threshold})", f"{p.split}, all", [per_seed[s]["cam_labels"] for s in seeds]),
        ("CRF pseudo-labels", f"{p.split}, all", [per_seed[s]["crf_labels"] for s in seeds]),
        ("retrained, plain cross-entropy", cfg.eval.split, [per_seed[s]["ce_miou"] for s in seeds]),
        ("retrained, gradient clipping", cfg.eval.split, [per_seed[s]["clip_miou"] for s in seeds]),
    ]
    return rows


def markdown(rows, seeds: list[int], samples: int) -> str:
    per_seed = ", ".join(map(str, seeds))
    lines = [f"| row | measured on | mIoU % (mean ± std over {len(seeds)} seeds) | per seed ({per_seed}) |",
             "| --- | --- | --- | --- |"]
    for name, split, values in rows:
        v = 100 * np.asarray(values)
        spread = f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"
        lines.append(f"| {name} | {split.format(n=samples)} | {spread} | {' / '.join(f'{x:.2f}' for x in v)} |")
    return "\n".join(lines)


def aaf_markdown(per_seed: dict[int, dict]) -> str:
    """The AAF weights per seed: each map's mean weight, trained and as phase 1 started."""
    lines = ["| seed | AAF weight per map (l = head * depth + block), trained | at the start of phase 1 |",
             "| --- | --- | --- |"]
    for seed, figures in sorted(per_seed.items()):
        weights = figures["readouts"].get("aaf_weights")
        if weights:
            lines.append(f"| {seed} | {' / '.join(f'{w:.3f}' for w in weights['trained'])} | "
                         f"{' / '.join(f'{w:.3f}' for w in weights['initial'])} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    from matplotlib.figure import Figure

    names = [name for name, _, _ in rows][::-1]
    values = [100 * np.asarray(v) for _, _, v in rows][::-1]
    figure = Figure(figsize=(9, 0.38 * len(rows) + 1))
    axes = figure.add_subplot()
    means = [v.mean() for v in values]
    axes.barh(names, means, xerr=[[m - v.min() for m, v in zip(means, values)],
                                   [v.max() - m for m, v in zip(means, values)]], color="tab:blue", alpha=0.7)
    for y, v in enumerate(values):
        axes.plot(v, [y] * len(v), "k.", markersize=4)
    axes.set(xlabel="mIoU (%): bars are means, whiskers the range, dots the seeds", title="WeakTr ablation")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--cam-samples", type=int, default=400, help="images scored for the CAM readout rows")
    parser.add_argument("--fixed-threshold", type=float, default=0.43,
                        help="the fixed background threshold of the readout rows (the official VOC value)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    resolve_paths(cfg)  # as the jobs do: relative paths (the demo's pretrained weights) against this directory
    from weaktr.launch import init_ray

    out = Path(args.out).resolve()
    init_ray()
    started = time.perf_counter()
    per_seed = {seed: run_seed(cfg, seed, out, args.cam_samples, args.fixed_threshold) for seed in args.seeds}
    rows = table_rows(cfg, per_seed, args.fixed_threshold)
    text = markdown(rows, args.seeds, args.cam_samples) + "\n\n" + aaf_markdown(per_seed)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({str(s): f for s, f in per_seed.items()}, indent=1))
    plot(rows, out / "ablation.png")
    print(text)
    print(f"ablation: {(time.perf_counter() - started) / 60:.1f} min in this invocation; {out}/ablation.md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
