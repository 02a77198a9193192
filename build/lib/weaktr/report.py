"""The pipeline's report: one self-contained HTML page (figures embedded as PNG) and the same numbers as JSON.

Sections: the stages (status, time, headline), the mIoU of every stage with per-class IoU (CAM labels and
pseudo-labels on the training split, the retrained model with and without the CRF on the evaluation split),
training curves of both phases, the background-threshold sweep, a grid of samples (image, CAM, pseudo-label,
prediction, ground truth) and the run's config.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Optional

import numpy as np
import yaml

# Figures drawn straight to PNG bytes: no pyplot, so importing this module leaves the process's backend alone.
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from weaktr import storage
from weaktr.config import Config, to_dict

SAMPLE_ROWS = 6  # images in the sample grid
SAMPLES_PNG = "samples.png"  # the grid alone, beside report.html


def miou_table(records: dict) -> list[dict]:
    """One row per stage that measured mIoU: {stage, split, miou, per_class {name: iou}} (fractions)."""
    rows = []
    pseudo, evaluation = records["pseudo"]["metrics"], records["eval"]["metrics"]
    for label, split, result in (
        (f"CAM labels (background threshold {pseudo['bg_threshold']:g})", pseudo["split"], pseudo["cam"]),
        ("CRF pseudo-labels", pseudo["split"], pseudo["crf"]),
        ("retrained (phase 2)", evaluation["eval"]["split"], evaluation["eval"]),
        ("retrained + dense CRF", evaluation["eval_crf"]["split"], evaluation["eval_crf"]),
    ):
        rows.append({"stage": label, "split": split, "miou": result["miou"],
                     "per_class": {name: c["iou"] for name, c in result["per_class"].items()}})
    return rows


def write_html_report(cfg: Config, directory: str, records: dict) -> tuple[str, str]:
    """Write ``report.html`` and ``report.json`` into ``directory`` (local or a URI; and the sample grid alone as
    ``samples.png``); returns the first two's paths."""

    classes = ["background", *records["data"]["metrics"]["classes"]]
    stages = {
        stage: {"status": r.get("status", "ran"), "seconds": r["seconds"], "finished": r["finished"],
                "headline": headline(stage, r["metrics"])}
        for stage, r in records.items()
    }
    sweep = records["pseudo"]["metrics"].get("sweep") or {}
    data = {
        "run": cfg.run.name,
        "stages": stages,
        "miou": miou_table(records),
        "curves": {phase: records[phase]["metrics"]["history"] for phase in ("phase1", "phase2")},
        "bg_sweep": sweep,
        "checkpoints": {phase: records[phase]["outputs"]["checkpoint"] for phase in ("phase1", "phase2")},
        "config": to_dict(cfg),
    }
    json_path = storage.join(directory, "report.json")
    storage.write_bytes(json_path, json.dumps(data, indent=1).encode())

    figures = {
        "Phase 1: CAM training": _png(_phase1_figure(data["curves"]["phase1"])),
        f"Phase 2: retraining {'with gradient clipping' if cfg.seg_train.clip else 'on plain cross-entropy'}":
            _png(_phase2_figure(data["curves"]["phase2"])),
    }
    if sweep.get("curve"):
        figures["Background threshold"] = _png(_sweep_figure(sweep, records["pseudo"]["metrics"]["bg_threshold"]))
    grid = _sample_grid(cfg, directory, records, classes)
    if grid is not None:
        samples = _png_bytes(grid)
        storage.write_bytes(storage.join(directory, SAMPLES_PNG), samples)
        figures["Samples"] = base64.b64encode(samples).decode("ascii")
    html_path = storage.join(directory, "report.html")
    storage.write_bytes(html_path, _html(cfg, data, classes, figures).encode())
    return html_path, json_path


# ----------------------------------------------------------------------------------------------- figures


def _image(path: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
        return np.asarray(image)


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _png(figure) -> str:
    return base64.b64encode(_png_bytes(figure)).decode("ascii")


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs counted from 1, values) of ``key``, leaving out epochs that did not measure it (NaN)."""
    points = [(m["epoch"] + 1, m[key]) for m in history if key in m and m[key] == m[key]]
    return [e for e, _ in points], [v for _, v in points]


def _percent(axes, history: list[dict], key: str, title: str, ylabel: str, **style) -> None:
    """Plot the fraction ``key`` of each epoch as a percentage."""
    epochs, values = _series(history, key)
    axes.plot(epochs, [100 * v for v in values], **style)
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)


def _phase1_figure(history: list[dict]):
    figure = Figure(figsize=(14, 3.6))
    losses, score, cam = figure.subplots(1, 3)
    for key, label in (("loss", "total"), ("loss_cls", "class tokens"), ("loss_coarse", "coarse CAM"),
                       ("loss_fine", "fine CAM")):
        losses.plot(*_series(history, key), marker=".", label=label)
    losses.set(title="training loss (multi-label soft margin)", xlabel="epoch", ylabel="loss")
    losses.legend()
    score.plot(*_series(history, "val_mAP"), marker=".", color="tab:green")
    score.set(title="validation mAP", xlabel="epoch", ylabel="mAP", ylim=(0, 1))
    _percent(cam, history, "cam_mIoU", "CAM mIoU (best background threshold)", "mIoU (%)", marker=".",
             color="tab:purple")
    for axes in (losses, score, cam):
        axes.grid(alpha=0.3)
    return figure


def _phase2_figure(history: list[dict]):
    figure = Figure(figsize=(14, 3.6))
    losses, clipped, score = figure.subplots(1, 3)
    losses.plot(*_series(history, "loss"), marker=".", label="clipped loss (trained on)")
    losses.plot(*_series(history, "ce"), marker=".", label="cross-entropy, all pixels")
    losses.set(title="training loss on pseudo-labels", xlabel="epoch", ylabel="loss")
    losses.legend()
    _percent(clipped, history, "clipped_fraction", "pixels dropped by gradient clipping", "% of labelled pixels",
             marker=".", color="tab:red")
    _percent(score, history, "val_mIoU", "validation mIoU", "mIoU (%)", marker="o", color="tab:green")
    for axes in (losses, clipped, score):
        axes.grid(alpha=0.3)
    return figure


def _sweep_figure(sweep: dict, used: float):
    thresholds, mious = zip(*sweep["curve"])
    figure = Figure(figsize=(6, 3.6))
    axes = figure.subplots()
    axes.plot(thresholds, [100 * m for m in mious], marker=".")
    axes.axvline(used, color="tab:gray", linestyle="--", label=f"used: {used:g}")
    axes.axvline(sweep["best_threshold"], color="tab:green", linestyle=":",
                 label=f"best: {sweep['best_threshold']:g} ({100 * sweep['best_miou']:.2f}%)")
    axes.set(title="CAM-label mIoU vs background threshold", xlabel="background threshold", ylabel="mIoU (%)")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def _sample_grid(cfg: Config, directory: str, records: dict, classes: list[str]):
    """Rows of (image, CAM, pseudo-label, prediction, ground truth) for the first samples with a CAM overlay."""
    from weaktr.data.shards import Manifest
    from weaktr.data.stream import FailureTracker, iter_samples
    from weaktr.data.voc import colorize, voc_palette
    from weaktr.evaluate import inference_kwargs, load_segmenter, predict_labels

    pseudo_dir = storage.parent(records["pseudo"]["outputs"]["dataset"])
    overlay_dir = storage.join(pseudo_dir, "overlays")
    overlays = {name.removesuffix(".jpg") for name in storage.list_names(overlay_dir) if name.endswith(".jpg")}
    if not overlays:
        return None
    manifest = Manifest.load(records["data"]["outputs"]["manifest"])
    samples = []
    # Broken samples are the other stages' to count (and refuse above data.max_failure_fraction); a figure skips them.
    shards = manifest.shard_paths(records["pseudo"]["metrics"]["split"])
    for sample in iter_samples(shards, FailureTracker(max_failure_fraction=1.0), manifest.num_classes):
        if sample.key in overlays:
            samples.append(sample)
        if len(samples) == SAMPLE_ROWS:
            break
    model, _ = load_segmenter(records["phase2"]["outputs"]["checkpoint"])
    e = cfg.eval
    palette = voc_palette()
    figure = Figure(figsize=(11, 2.3 * len(samples)))
    axes = figure.subplots(len(samples), 5, squeeze=False)
    titles = ("image", "CAM, strongest class", "pseudo-label", "retrained model", "ground truth")
    for row, sample in zip(axes, samples):
        prediction = predict_labels(model, sample.image, amp=False, **inference_kwargs(e))
        pseudo = _image(storage.join(pseudo_dir, "pseudo_png", f"{sample.key}.png"))
        panels = (sample.image, _image(storage.join(overlay_dir, f"{sample.key}.jpg")), colorize(pseudo, palette),
                  colorize(prediction, palette), colorize(sample.mask, palette))
        for axes_, panel in zip(row, panels):
            axes_.imshow(panel)
            axes_.set_xticks([])
            axes_.set_yticks([])
        row[0].set_ylabel(sample.key, fontsize=8)
    for axes_, title in zip(axes[0], titles):
        axes_.set_title(title, fontsize=9)
    colours = np.asarray(palette, dtype=float).reshape(256, 3) / 255
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(classes)]
    handles.append(Patch(color=colours[255], label="ignored"))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False,
                  bbox_to_anchor=(0.5, -0.02))
    return figure


# ----------------------------------------------------------------------------------------------- page


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _html(cfg: Config, data: dict, classes: list[str], figures: dict[str, str]) -> str:
    esc = html.escape
    stage_rows = "".join(
        f"<tr><td>{esc(stage)}</td><td>{esc(s['status'])}</td><td class=n>{s['seconds']:.0f} s</td>"
        f"<td>{esc(s['headline'])}</td></tr>"
        for stage, s in data["stages"].items()
    )
    head = "".join(f"<th>{esc(name)}</th>" for name in classes)
    miou_rows = "".join(
        f"<tr><td>{esc(row['stage'])}</td><td>{esc(row['split'])}</td><td class=n><b>{_pct(row['miou'])}</b></td>"
        + "".join(f"<td class=n>{_pct(row['per_class'].get(name))}</td>" for name in classes) + "</tr>"
        for row in data["miou"]
    )
    sections = "".join(
        f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
        for title, png in figures.items()
    )
    total = sum(s["seconds"] for s in data["stages"].values() if s["status"] == "ran")
    config = yaml.safe_dump(data["config"], sort_keys=False)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>weaktr run {esc(cfg.run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; font-size: 0.8em; overflow-x: auto; }}
.note {{ color: #666; font-size: 0.9em; }}
</style></head><body>
<h1>weaktr run <code>{esc(cfg.run.name)}</code></h1>
<p class=note>WeakTr weakly-supervised segmentation: phase 1 learns CAMs from image-level labels, CAMs become
pseudo-labels (background threshold + dense CRF), phase 2 retrains a segmenter on them with the gradient-clipping
loss. Stages that ran in this invocation took {total / 60:.1f} min.</p>
<h2>Stages</h2>
<table><tr><th>stage</th><th>status</th><th>time</th><th>result</th></tr>{stage_rows}</table>
<h2>mIoU at each stage (%)</h2>
<p class=note>CAM labels and pseudo-labels are scored on the split they label (the training images, against their
ground-truth masks, which training never sees); the retrained model on the evaluation split.</p>
<table><tr><th>stage</th><th>split</th><th>mIoU</th>{head}</tr>{miou_rows}</table>
{sections}
<h2>Config</h2><pre>{esc(config)}</pre>
</body></html>
"""


def summary_table(records: dict) -> str:
    """The console's closing table: one row per stage with its headline figure."""
    rows = [("stage", "status", "time", "result")]
    for stage, record in records.items():  # in the pipeline's order
        if record is None:
            continue
        rows.append((stage, record["status"], f"{record['seconds']:.0f} s", headline(stage, record["metrics"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline(stage: str, metrics: dict) -> str:
    """A stage's figure, and what it skipped (unreadable or unusable inputs; their reasons are in its outputs)."""
    if stage == "data":
        splits = ", ".join(f"{n} {name}" for name, n in metrics["splits"].items())
        return f"{metrics['name']}: {len(metrics['classes'])} classes, {splits}{_skipped(metrics.get('skipped'))}"
    if stage in ("phase1", "phase2"):
        score = metrics.get("score", "val_mAP" if stage == "phase1" else "val_mIoU")
        best = metrics["best"]
        extra = f", val_mAP {best['val_mAP']:.4f}" if score == "cam_mIoU" else ""
        failed = metrics["history"][-1].get("samples_failed") if metrics.get("history") else None
        return (f"best {score} {best.get(score, float('nan')):.4f} (epoch {best.get('epoch', -1) + 1}{extra})"
                f"{_skipped(failed, 'broken-sample reads skipped')}")
    if stage == "pseudo":
        return (f"{metrics['split']} mIoU: CAM {_pct(metrics['cam']['miou'])}, CRF pseudo-labels "
                f"{_pct(metrics['crf']['miou'])} ({metrics['num_samples']} images{_skipped(metrics['num_failures'])})")
    if stage == "eval":
        return (f"{metrics['eval']['split']} mIoU {_pct(metrics['eval']['miou'])}, "
                f"with CRF {_pct(metrics['eval_crf']['miou'])}{_skipped(metrics['eval'].get('num_skipped'))}")
    return ""


def _skipped(count: Optional[int], what: str = "skipped") -> str:
    return f", {count} {what}" if count else ""


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
