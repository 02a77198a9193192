"""Phase-2 evaluation: sliding window, multi-scale + flip, optional dense CRF, mIoU against ground truth.

Two ways to run the same per-image scoring (``score_sample``):
- ``evaluate_samples``: a plain loop in this process (tests, small sets, notebooks);
- ``evaluate_on_ray``: a Ray Data pipeline. The split's shards are read in parallel tasks, an actor pool
  (``eval.actors`` actors, ``eval.gpus_per_actor`` GPUs each) runs inference on every sample and returns that
  image's confusion-matrix contribution, and the driver sums them, so a 5k-image validation set spreads over the
  whole cluster and only K x K counts per image travel back.

Also the model-loading and single-image prediction helpers that ``weaktr predict`` uses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from weaktr import storage
from weaktr.config import Config, ConfigError, EvalConfig, from_dict, to_dict
from weaktr.crf import CRFParams, crf_refine_prediction, resolve_backend
from weaktr.data.shards import DataError, Failure, Manifest, Sample, SampleDecodeError, decode_sample
from weaktr.data.stream import FailureTracker, check_shards_exist, read_records
from weaktr.data.transforms import normalize_image
from weaktr.metrics import ConfusionMatrix
from weaktr.models.build import load_model
from weaktr.models.inference import predict_probs
from weaktr.models.segmenter import Segmenter
from weaktr.runtime import autocast, unwrap
from weaktr.tracking import check_tracking, log_results

REPORT_NAME = "eval_report.json"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model and single-image prediction


def load_segmenter(
    path: str | Path, device: str | torch.device = "cpu", classes: Optional[Sequence[str]] = None
) -> tuple[Segmenter, dict]:
    """A phase-2 model and its checkpoint, in eval mode on ``device`` (``load_model``); with ``classes``, refused
    unless trained on them."""
    return load_model(path, "seg", classes, device)


@torch.no_grad()
def predict_labels(
    model: Segmenter, image: np.ndarray, *, crf: Optional[CRFParams] = None, amp: bool = True, **inference
) -> np.ndarray:
    """Dataset ids uint8 [H, W] for one RGB image uint8 [H, W, 3] of any size.

    Probabilities from ``predict_probs`` (``inference``: its keyword arguments, e.g. scales, flip, window,
    stride, short_side, ensemble_weight), refined by the official dense CRF when ``crf`` is given, then argmax.
    """
    return predict_label_variants(model, image, [crf], amp=amp, **inference)[0]


@torch.no_grad()
def predict_label_variants(
    model: Segmenter, image: np.ndarray, crfs: Sequence[Optional[CRFParams]], *, amp: bool = True, **inference
) -> list[np.ndarray]:
    """``predict_labels`` once per entry of ``crfs`` (None: no CRF) from a single inference pass."""
    device = next(model.parameters()).device
    tensor = normalize_image(image, unwrap(model).normalization).to(device)  # [3, H, W]
    with autocast(device, amp):
        probs = predict_probs(model, tensor, **inference)  # [K, H, W]
    probs = probs.float().cpu().numpy()
    # A writable copy of the image: pydensecrf's bilateral kernel rejects read-only buffers.
    return [probs.argmax(0).astype(np.uint8) if crf is None else crf_refine_prediction(np.array(image), probs, crf)
            for crf in crfs]


def inference_kwargs(eval_cfg: EvalConfig) -> dict:
    """``predict_probs`` keyword arguments from the eval section."""
    return dict(scales=list(eval_cfg.scales), flip=eval_cfg.flip, window=eval_cfg.window, stride=eval_cfg.stride,
                short_side=eval_cfg.short_side, upsample_small=eval_cfg.upsample_small,
                ensemble_weight=eval_cfg.ensemble_weight)


def score_sample(model: Segmenter, sample: Sample, eval_cfg: EvalConfig, amp: bool = True) -> np.ndarray:
    """One image's confusion-matrix counts int64 [K, K] (rows ground truth, columns prediction)."""
    return score_sample_variants(model, sample, eval_cfg, [eval_cfg.crf], amp)[0]


def score_sample_variants(
    model: Segmenter, sample: Sample, eval_cfg: EvalConfig, crf_variants: Sequence[bool], amp: bool = True
) -> np.ndarray:
    """``score_sample`` once per entry of ``crf_variants`` (without / with the CRF), int64 [V, K, K], from one
    inference pass."""
    if sample.mask is None:
        raise DataError(f"sample {sample.key!r} has no ground-truth mask: evaluation needs a split with masks")
    crfs = [eval_cfg.crf_params if crf else None for crf in crf_variants]
    preds = predict_label_variants(model, sample.image, crfs, amp=amp, **inference_kwargs(eval_cfg))
    return np.stack([ConfusionMatrix(model.num_classes).update(pred, sample.mask).matrix for pred in preds])


def evaluate_samples(
    model: Segmenter, samples: Iterable[Sample], eval_cfg: EvalConfig, amp: bool = True
) -> ConfusionMatrix:
    """The confusion matrix over ``samples``, scored one by one in this process."""
    confusion = ConfusionMatrix(model.num_classes)
    for sample in samples:
        confusion.matrix += score_sample(model, sample, eval_cfg, amp)
    return confusion


# --------------------------------------------------------------------------- Ray Data pipeline


def _read_shard(row: dict) -> list[dict]:
    """One shard -> its records as stored (the encoded bytes, pickled; decoded by the actors): a record crosses to
    an actor's node several times smaller than its pixels would. A shard cut short ends in one failure row."""
    check_shards_exist([row["shard"]])  # missing on this node: a setup error, not a broken sample
    failures: list[Failure] = []
    rows = [{"shard": row["shard"], "key": raw.get("__key__", ""), "record": pickle.dumps(raw), "failure": ""}
            for raw in read_records([row["shard"]], failures.append, keep_going=False)]
    return rows + [{"shard": f.url, "key": f.key, "record": b"", "failure": f.reason} for f in failures]


class SegEvalActor:
    """An actor-pool stage: loads the model once, then maps batches of samples to per-image confusion counts."""

    def __init__(self, model_ref: list, config: dict, crf_variants: Sequence[bool]):
        from weaktr.launch import take_model  # Ray: only inside the actor

        cfg: Config = from_dict(config)
        device = "cuda" if cfg.eval.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model = take_model("seg", model_ref, device)
        self.eval_cfg, self.amp, self.crf_variants = cfg.eval, cfg.seg_train.amp, list(crf_variants)

    def __call__(self, batch: dict) -> dict:
        confusions, failures = [], []
        for key, record, failure in zip(batch["key"], batch["record"], batch["failure"]):
            num_classes = self.model.num_classes  # K, background included
            counts = np.zeros((len(self.crf_variants), num_classes, num_classes), np.int64)  # [V, K, K]
            if not failure:
                try:
                    sample = decode_sample(pickle.loads(record), num_classes=num_classes - 1)
                except SampleDecodeError as exn:
                    failure = str(exn)
                else:
                    counts = score_sample_variants(self.model, sample, self.eval_cfg, self.crf_variants, self.amp)
            confusions.append(counts.reshape(-1))  # [V*K*K]; zeros for a sample that failed
            failures.append(failure)
        return {"shard": batch["shard"], "key": batch["key"], "confusion": np.stack(confusions),
                "failure": np.asarray(failures)}


def evaluate_on_ray(cfg: Config, checkpoint: str | Path) -> dict:
    """Evaluate ``checkpoint`` on ``data.root`` / ``eval.split`` with Ray Data; returns the report dict.

    Needs a connected Ray (``weaktr.launch.init_ray``).
    """
    return evaluate_variants_on_ray(cfg, checkpoint, [cfg.eval.crf])[0]


def evaluate_variants_on_ray(cfg: Config, checkpoint: str | Path, crf_variants: Sequence[bool]) -> list[dict]:
    """One report per entry of ``crf_variants`` (without / with the dense CRF), from a single inference pass."""
    import ray

    from weaktr.launch import actor_pool, progress, put_model, quiet_ray_data

    quiet_ray_data()
    check_tracking(cfg)
    if any(crf_variants):  # the backend the actors will use, checked here rather than in every actor
        try:
            cfg = copy.deepcopy(cfg)
            cfg.eval.crf_params = resolve_backend(cfg.eval.crf_params)
        except ValueError as err:
            raise ConfigError(str(err).replace("crf.backend", "eval.crf_params.backend")) from None
    started = time.perf_counter()
    checkpoint = storage.absolute(checkpoint)
    manifest = Manifest.load(cfg.data.root)
    # Loaded and checked here, on the driver (a clear message rather than one from every actor), and shared with
    # the actors through the object store.
    model, _ = load_segmenter(checkpoint, "cpu", manifest.classes)
    model_ref = put_model(model)
    shards = manifest.shard_paths(cfg.eval.split)
    num_classes = manifest.num_classes + 1

    ds = ray.data.from_items([{"shard": shard} for shard in shards], override_num_blocks=max(1, len(shards)))
    # Reading takes zero logical CPUs (with one CPU each it waited forever behind an actor pool holding every CPU of a
    # small machine), so its concurrency is bounded here instead: as many readers as actors to feed.
    readers = max(1, min(len(shards), cfg.eval.actors))
    ds = ds.flat_map(_read_shard, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=readers))
    num_cpus = 1 if cfg.eval.gpus_per_actor == 0 else None  # GPU actors: Ray Data's default
    ds = ds.map_batches(
        SegEvalActor,
        fn_constructor_kwargs={"model_ref": model_ref, "config": to_dict(cfg), "crf_variants": list(crf_variants)},
        batch_size=1,  # images differ in size; one image per call keeps batches rectangular
        batch_format="numpy",
        compute=actor_pool("eval.actors", cfg.eval.actors, num_cpus or 0, cfg.eval.gpus_per_actor,
                           cfg.eval.actor_resources),
        num_gpus=cfg.eval.gpus_per_actor,
        num_cpus=num_cpus,
        resources=cfg.eval.actor_resources or None,
    )
    confusions = [ConfusionMatrix(num_classes) for _ in crf_variants]
    tracker = FailureTracker(cfg.data.max_failure_fraction)  # over the whole split, as training counts its epoch
    with progress(manifest.splits[cfg.eval.split].num_samples, f"evaluating {cfg.eval.split}") as bar:
        for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
            counts = batch["confusion"].sum(0).reshape(len(crf_variants), num_classes, num_classes)
            for confusion, variant_counts in zip(confusions, counts):
                confusion.matrix += variant_counts
            failed = [Failure(str(shard), str(key), str(reason))
                      for shard, key, reason in zip(batch["shard"], batch["key"], batch["failure"]) if reason]
            for failure in failed:
                log.warning("skipping unreadable sample %r in %s: %s", failure.key, failure.url, failure.reason)
            tracker.add(len(batch["key"]) - len(failed), failed)
            bar.update(len(batch["key"]))
    tracker.check(final=True)
    num_images = tracker.seen - tracker.failed
    seconds = time.perf_counter() - started
    reports = []
    for crf, confusion in zip(crf_variants, confusions):
        variant_cfg = copy.deepcopy(cfg)
        variant_cfg.eval.crf = crf
        reports.append(make_report(confusion, manifest, variant_cfg, checkpoint, num_images, seconds))
    log_results(cfg, "eval", storage.join(checkpoint, cfg.eval.split), {
        "eval_crf" if crf else "eval": {k: report[k] for k in ("miou", "pixel_accuracy", "per_class")}
        for crf, report in zip(crf_variants, reports)
    } | {"num_images": num_images})
    return reports


def make_report(
    confusion: ConfusionMatrix, manifest: Manifest, cfg: Config, checkpoint: str, num_images: int, seconds: float
) -> dict:
    e = cfg.eval
    return {
        "checkpoint": checkpoint,
        "dataset": manifest.root,
        "split": e.split,
        "num_images": num_images,
        "num_skipped": manifest.splits[e.split].num_samples - num_images,  # undecodable (logged, counted)
        "settings": {**inference_kwargs(e), "crf": dataclasses.asdict(e.crf_params) if e.crf else None},
        **confusion.to_dict(class_names(manifest)),
        "confusion_matrix": confusion.matrix.tolist(),
        "seconds": seconds,
    }


def class_names(manifest: Manifest) -> list[str]:
    return ["background", *manifest.classes]


def report_dir(cfg: Config, checkpoint: str | Path) -> str:
    """``eval.out_dir``, else the checkpoint's own directory (local or a URI)."""
    if cfg.eval.out_dir:
        return storage.absolute(cfg.eval.out_dir)
    checkpoint = storage.absolute(checkpoint)
    return checkpoint if storage.is_dir(checkpoint) else storage.parent(checkpoint)


def write_report(report: dict, directory: str | Path) -> str:
    path = storage.join(directory, REPORT_NAME)
    storage.write_bytes(path, json.dumps(report, indent=1).encode())
    return path
