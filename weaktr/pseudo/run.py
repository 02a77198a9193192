"""Orchestration of the pseudo-label pipeline (see ``weaktr.pseudo``): settings checks, resume bookkeeping, the Ray
Data dataset, consuming its rows and the final report."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from weaktr import storage
from weaktr.config import Config
from weaktr.crf import resolve_backend
from weaktr.data.shards import FAILURES_NAME, DataError, Manifest, SplitInfo
from weaktr.metrics import BackgroundSweep, ConfusionMatrix, parse_sweep
from weaktr.pseudo.outputs import (
    RUN_CONFIG,
    STATS_DIR,
    _clear_outputs,
    _commit_shard,
    _json_bytes,
    _load_stats,
    _remove_stale_temps,
    _ShardResult,
    checkpoint_sha256,
)
from weaktr.pseudo.stages import CamStage, CrfStage, StageSettings, load_cam_model, read_shard
from weaktr.tracking import check_tracking, log_results

log = logging.getLogger(__name__)


class PseudoLabelError(ValueError):
    """Settings or an output directory the pipeline cannot work with (a clear, one-line message)."""


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def checkpoint_threshold(payload: dict, checkpoint: str | os.PathLike) -> float:
    """The background threshold phase 1's CAM-mIoU sweep chose at the checkpoint's epoch (``pseudo.bg_threshold:
    null``)."""
    threshold = payload.get("metrics", {}).get("cam_bg_threshold", float("nan"))
    if not threshold == threshold:  # NaN or missing: phase 1 did not score CAMs (train.cam_eval.split: null)
        raise PseudoLabelError(
            f"pseudo.bg_threshold is null, but checkpoint {checkpoint} records no background threshold (phase 1 "
            "ran without train.cam_eval.split); set pseudo.bg_threshold"
        )
    return float(threshold)


def run_pseudo_labels(cfg: Config, checkpoint: str | os.PathLike) -> dict:
    """Generate pseudo-labels for ``cfg.pseudo.split`` of the dataset at ``cfg.data.root`` (see the module
    docstring). Needs a connected Ray (``ray.init``). Returns the report (report.json) plus a "run" entry saying
    how many shards were processed / skipped."""
    from weaktr.launch import put_model  # imports Ray

    started = time.perf_counter()
    p = cfg.pseudo
    manifest = Manifest.load(cfg.data.root)
    split = manifest.split(p.split)
    shard_paths = manifest.shard_paths(p.split)
    for shard in split.shards:
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise PseudoLabelError(
                f"shard path {shard!r} in {manifest.root}/manifest.json must be relative, inside the dataset"
            )
    missing = [path for path in shard_paths if not storage.exists(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of split '{p.split}' do not exist, first: {missing[0]}")
    check_tracking(cfg)
    # Refuse a checkpoint of another dataset / architecture before any work.
    model, payload = load_cam_model(checkpoint, manifest.classes)
    bg_threshold = p.bg_threshold if p.bg_threshold is not None else checkpoint_threshold(payload, checkpoint)
    try:
        thresholds = parse_sweep(p.sweep_bg, key="pseudo.sweep_bg")
    except ValueError as err:
        raise PseudoLabelError(str(err)) from None
    if min(p.batch_size, p.forward_batch, p.cam_actors, p.crf_actors) < 1:
        raise PseudoLabelError("pseudo.batch_size, pseudo.forward_batch, pseudo.cam_actors and pseudo.crf_actors "
                               "must be >= 1")
    try:  # the backend the run records and every actor uses, whatever each node has installed
        crf = resolve_backend(p.crf)
    except ValueError as err:
        raise PseudoLabelError(str(err).replace("crf.backend", "pseudo.crf.backend")) from None
    if p.crf_in_cam_actors and crf.backend != "torch":
        raise PseudoLabelError("pseudo.crf_in_cam_actors needs pseudo.crf.backend: torch (pydensecrf runs on one CPU "
                               "core, not on the CAM actors' device)")

    out_dir = storage.absolute(p.out_dir).rstrip("/")
    if out_dir == storage.absolute(manifest.root).rstrip("/"):
        raise PseudoLabelError(f"pseudo.out_dir {out_dir} is the input dataset's directory; choose another")
    run_config = {
        "checkpoint_sha256": checkpoint_sha256(checkpoint),
        "data_root": storage.absolute(manifest.root),
        "split": p.split,
        "shards": split.shards,
        "settings": {
            name: getattr(p, name)
            for name in ("scales", "flip", "attention_type", "patch_attn_refine", "batch_size", "save_cams",
                         "overlay_samples", "sweep_bg")
        }
        | {"bg_threshold": bg_threshold, "crf": asdict(crf)},
    }
    if p.overwrite:
        _clear_outputs(out_dir, split.shards)
    storage.make_dirs(out_dir)
    _remove_stale_temps(out_dir)
    previous = storage.join(out_dir, RUN_CONFIG)
    if storage.exists(previous) and json.loads(storage.read_bytes(previous)) != run_config:
        raise PseudoLabelError(
            f"{out_dir} holds outputs made from another checkpoint, dataset or settings ({previous}); "
            "pass --overwrite (pseudo.overwrite=true) to start over, or choose another pseudo.out_dir"
        )
    storage.write_bytes(previous, _json_bytes(run_config))

    todo = [i for i, shard in enumerate(split.shards) if _load_stats(out_dir, shard) is None]
    skipped = len(split.shards) - len(todo)
    log.info("pseudo-labels: %d shards of '%s', %d already done, %d to process", len(split.shards), p.split, skipped,
             len(todo))
    if todo:
        settings = StageSettings(
            num_classes=manifest.num_classes, scales=list(p.scales), flip=p.flip, attention_type=p.attention_type,
            patch_attn_refine=p.patch_attn_refine, bg_threshold=bg_threshold, chunk_size=p.batch_size,
            forward_batch=p.forward_batch, overlay_samples=p.overlay_samples, save_cams=p.save_cams,
            sweep_thresholds=thresholds, crf=asdict(crf), crf_in_cam_actor=p.crf_in_cam_actors,
        )
        offsets = np.concatenate([[0], np.cumsum(split.shard_sizes)]).tolist()
        model_ref = put_model(model)
        dataset = _build_dataset(
            [{"shard_id": i, "path": shard_paths[i], "offset": offsets[i]} for i in todo], settings, model_ref, p
        )
        _consume(dataset, out_dir, split, shard_paths, settings, sum(split.shard_sizes[i] for i in todo))

    report = _finalize(out_dir, manifest, p.split, thresholds, str(checkpoint), bg_threshold)
    curve = (report["sweep"] or {}).get("curve", [])  # the background-threshold curve, step = t x 100
    log_results(cfg, "pseudo", out_dir, {k: report[k] for k in ("num_samples", "num_failures", "bg_threshold", "cam",
                                                                 "crf")},
                {"sweep_mIoU": [(round(t * 100), m) for t, m in curve]})
    report["run"] = {
        "shards": len(split.shards), "shards_skipped": skipped, "shards_processed": len(todo),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("pseudo-labels: processed %d shards, skipped %d finished shards; outputs in %s", len(todo), skipped,
             out_dir)
    return report


def _build_dataset(items: list[dict], settings: StageSettings, model_ref, p):
    import ray.data

    from weaktr.launch import actor_pool, quiet_ray_data

    quiet_ray_data()
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Reading is light (tar + image decode to validate): zero logical CPUs, so it never waits on the actor pools
    # holding every CPU of a small machine; its concurrency is bounded instead, as many readers as CAM actors to feed.
    readers = max(1, min(len(items), p.cam_actors))
    dataset = dataset.flat_map(
        read_shard, fn_kwargs={"settings": settings}, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=readers)
    )
    dataset = dataset.map_batches(
        CamStage, fn_constructor_kwargs={
            "model_ref": model_ref, "settings": settings, "use_gpu": p.cam_gpus_per_actor > 0,
            "num_threads": max(1, int(p.cam_cpus_per_actor)),
        },
        batch_size=1, batch_format="numpy",
        compute=actor_pool("pseudo.cam_actors", p.cam_actors, p.cam_cpus_per_actor, p.cam_gpus_per_actor,
                           p.cam_resources),
        num_gpus=p.cam_gpus_per_actor, num_cpus=p.cam_cpus_per_actor, resources=p.cam_resources or None,
    )
    if settings.crf_in_cam_actor:
        return dataset
    return dataset.map_batches(
        CrfStage, fn_constructor_kwargs={"settings": settings},
        batch_size=1, batch_format="numpy",
        compute=actor_pool("pseudo.crf_actors", p.crf_actors, 1, resources=p.crf_resources),
        num_cpus=1, resources=p.crf_resources or None,
    )


def _consume(
    dataset, out_dir: str, split: SplitInfo, shard_paths: list[str], settings: StageSettings, num_images: int
) -> None:
    """Drive the pipeline; commit each shard as soon as all its rows (one per image) are in. A shard that could not
    be read is not committed (a rerun with ``--resume`` tries it again): DataError naming it once the others are."""
    from weaktr.launch import progress

    num_thresholds = len(settings.sweep_thresholds or [])
    pending: dict[int, _ShardResult] = {}
    unreadable: dict[int, str] = {}
    with progress(num_images, "pseudo-labels") as bar:
        for row in dataset.iter_rows():
            shard_id = int(row["shard_id"])
            if row["kind"] == "unreadable":
                unreadable[shard_id] = row["reason"]
                continue
            result = pending.get(shard_id)
            if result is None:
                total = int(row["shard_total"])
                result = pending[shard_id] = _ShardResult(total, settings.num_classes, num_thresholds)
            bar.update(1)
            if result.add(row):
                _commit_shard(out_dir, split.shards[shard_id], shard_paths[shard_id], pending.pop(shard_id))
    if unreadable:
        raise DataError(
            f"{len(unreadable)} shard(s) could not be read and were not committed, first: "
            f"{next(iter(unreadable.values()))}. Every node reads the dataset: data.root must be where all of them "
            "see it (a bucket, or a file system mounted at the same path on every node); then rerun with --resume"
        )
    if pending:
        raise RuntimeError(f"the pipeline ended with incomplete shards: {[split.shards[i] for i in pending]}")


def _finalize(
    out_dir: str, manifest: Manifest, split_name: str, thresholds: Optional[list[float]], checkpoint: str,
    bg_threshold: float,
) -> dict:
    """Merge every shard's stats into manifest.json, failures.jsonl, report.json and the sweep curve."""
    split = manifest.split(split_name)
    K = manifest.num_classes + 1
    cam_cm, crf_cm = ConfusionMatrix(K), ConfusionMatrix(K)
    sweep = BackgroundSweep(thresholds, manifest.num_classes) if thresholds else None
    shards, sizes, failures = [], [], []
    for shard in split.shards:
        stats = _load_stats(out_dir, shard)
        if stats is None:
            raise RuntimeError(f"shard {shard} has no stats file in {storage.join(out_dir, STATS_DIR)}")
        if stats["num_samples"]:
            shards.append(shard)
            sizes.append(stats["num_samples"])
        failures += [
            {"key": f["key"], "shard": shard, "index": f["index"], "reason": f["reason"]} for f in stats["failures"]
        ]
        cam_cm.matrix += np.asarray(stats["cam_confusion"], dtype=np.int64)
        crf_cm.matrix += np.asarray(stats["crf_confusion"], dtype=np.int64)
        if sweep is not None and stats["sweep"] is not None:
            np.add.at(sweep.histogram.reshape(-1), stats["sweep"]["index"], stats["sweep"]["count"])

    out_manifest = Manifest(
        manifest.name, list(manifest.classes), {split_name: SplitInfo(shards, sum(sizes), sizes)}, out_dir,
        {"pseudo_labels": {"source": manifest.root, "split": split_name, "checkpoint": checkpoint}},
    )
    out_manifest.save()
    storage.write_bytes(storage.join(out_dir, FAILURES_NAME), "".join(json.dumps(f) + "\n" for f in failures).encode())

    names = ["background", *manifest.classes]
    has_gt = cam_cm.matrix.sum() > 0
    report = {
        "split": split_name,
        "num_samples": sum(sizes),
        "num_failures": len(failures),
        "bg_threshold": bg_threshold,
        "cam": cam_cm.to_dict(names) if has_gt else None,
        "crf": crf_cm.to_dict(names) if has_gt else None,
        "sweep": None,
    }
    if sweep is not None and sweep.histogram.sum() > 0:
        storage.write_bytes(storage.join(out_dir, "bg_sweep.csv"), sweep.csv().encode())
        plot = io.BytesIO()
        sweep.plot(plot)  # PNG (matplotlib's default format for a file object)
        storage.write_bytes(storage.join(out_dir, "bg_sweep.png"), plot.getvalue())
        best_t, best_miou = sweep.best()
        curve = [[t, None if math.isnan(m) else m] for t, m in sweep.curve()]
        report["sweep"] = {"best_threshold": best_t, "best_miou": best_miou, "curve": curve}
    storage.write_bytes(storage.join(out_dir, "report.json"), _json_bytes(report))
    print(format_report(report, names, cam_cm, crf_cm))
    return report


def format_report(report: dict, names: Sequence[str], cam_cm: ConfusionMatrix, crf_cm: ConfusionMatrix) -> str:
    lines = [f"split '{report['split']}': {report['num_samples']} pseudo-labels, {report['num_failures']} failures"]
    if report["cam"] is None:
        lines.append("no ground-truth masks: no quality figures")
        return "\n".join(lines)

    def pct(values):
        return [f"{100 * v:7.2f}" if not math.isnan(v) else f"{'-':>7}" for v in values]

    width = max(12, *(len(n) for n in names))
    cam_title = f"CAM label (t={report['bg_threshold']:g})"
    lines.append(f"{'':<{width}} {cam_title:^23} | {'CRF pseudo-label':^23}")
    lines.append(f"{'class':<{width}} {'IoU':>7} {'prec':>7} {'recall':>7} | {'IoU':>7} {'prec':>7} {'recall':>7}")
    columns = [pct(cm.iou()) + pct(cm.precision()) + pct(cm.recall()) for cm in (cam_cm, crf_cm)]
    K = len(names)
    for k, name in enumerate(names):
        cam = " ".join(columns[0][k + j * K] for j in range(3))
        crf = " ".join(columns[1][k + j * K] for j in range(3))
        lines.append(f"{name:<{width}} {cam} | {crf}")
    lines.append(f"{'mIoU':<{width}} {pct([cam_cm.miou()])[0]} {'':15} | {pct([crf_cm.miou()])[0]}")
    if report["sweep"]:
        s = report["sweep"]
        lines.append(
            f"background-threshold sweep: best t={s['best_threshold']:g} (CAM mIoU {100 * s['best_miou']:.2f})"
        )
    return "\n".join(lines)
