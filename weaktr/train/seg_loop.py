"""Phase 2: retrain a Segmenter on the pseudo-labels with Ray Train (one ``train_loop_per_worker``).

Each worker streams a disjoint, per-epoch reshuffled subset of the pseudo-label shards (random rescale, crop,
flip; 255 ignored), trains under DDP on the per-pixel cross-entropy passed through the gradient-clipping loss of
SPEC.md (``seg_train.clip``; plain cross-entropy otherwise), scores validation mIoU against the ground-truth masks
on its share of the validation shards every ``eval_every`` epochs, and reports metrics; rank 0 attaches a
checkpoint (kind "seg") every epoch.

Training reads ``seg_train.data_root`` (default ``pseudo.out_dir``): a dataset whose training samples carry a
``pseudo`` label map. Validation reads ``data.root``, the dataset with ground-truth masks.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler

from weaktr import storage
from weaktr.config import Config, resolve_paths
from weaktr.data.shards import DataError, Manifest
from weaktr.data.stream import FailureTracker, iter_samples, make_loader, steps_per_epoch
from weaktr.data.transforms import IGNORE_INDEX, SegExample, SegTrainTransform, normalize_batch, normalize_image
from weaktr.evaluate import inference_kwargs
from weaktr.launch import PHASE2_PATHS
from weaktr.metrics import ConfusionMatrix
from weaktr.models.build import build_segmenter
from weaktr.models.inference import predict_probs
from weaktr.models.segmenter import Segmenter
from weaktr.ops import segmentation_loss
from weaktr.runtime import autocast, fused_optimizer_kwargs, unwrap
from weaktr.train.common import (
    all_gather,
    check_failures_across_ranks,
    epoch_metrics,
    fit_trainer,
    make_trainer,
    report_epoch,
    start_training,
    start_worker,
)


def train_data_root(cfg: Config) -> str:
    """The pseudo-label dataset: ``seg_train.data_root``, else the pseudo-label job's ``pseudo.out_dir``."""
    return cfg.seg_train.data_root or cfg.pseudo.out_dir


def require_pseudo_labels(manifest: Manifest, split: str) -> None:
    """Refuse a training split whose samples carry no pseudo-label (checked on its first sample)."""
    shards = manifest.shard_paths(split)
    first = next(iter(iter_samples(shards[:1])), None) if shards else None
    if first is None:
        raise DataError(f"dataset at {manifest.root} has no samples in split '{split}'")
    if first.pseudo is None:
        raise DataError(
            f"dataset at {manifest.root} has no pseudo-labels in split '{split}' (sample {first.key!r} has no "
            f"pseudo.png): phase 2 trains on pseudo-labels; run ray_jobs/make_pseudo_labels.py first or point "
            f"seg_train.data_root at its output"
        )


def phase1_checkpoint(pseudo_labels: Manifest) -> str:
    """The phase-1 checkpoint that made a pseudo-label dataset (recorded in its manifest by the pseudo-label job)."""
    checkpoint = pseudo_labels.meta.get("pseudo_labels", {}).get("checkpoint")
    if not checkpoint or not storage.exists(checkpoint):
        raise DataError(
            f"seg_train.init_encoder_from_phase1: the pseudo-labels at {pseudo_labels.root} name no phase-1 "
            f"checkpoint that exists here ({checkpoint!r}); set seg_model.weights_path to one instead"
        )
    return str(checkpoint)


def pixel_losses(logits: torch.Tensor, target: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, dict]:
    """The training loss (``ops.segmentation_loss`` with the ``seg_train`` settings) and its statistics for logits
    [B, K, H, W] and pseudo-labels [B, H, W] (255 ignored). Statistics (floats, synchronizing): "ce" = plain mean
    cross-entropy over labelled pixels, "clipped_fraction" = share of labelled pixels whose loss was clipped."""
    st = cfg.seg_train
    loss, pixel_loss, loss_map = segmentation_loss(
        logits, target, st.clip_start_value, st.clip_patch_size, clip=st.clip, count_ignored=st.count_ignored_pixels,
        ignore_index=IGNORE_INDEX,
    )
    labelled = target != IGNORE_INDEX  # [B, H, W]
    num_labelled = labelled.sum().clamp(min=1)
    clipped = (loss_map.detach() < pixel_loss.detach()) & labelled  # [B, H, W]
    stats = {
        "ce": (pixel_loss.detach().sum() / num_labelled).item(),
        "clipped_fraction": (clipped.sum() / num_labelled).item(),
    }
    return loss, stats


def make_optimizer(model: Segmenter, cfg: Config, steps: int):
    """timm's optimizer for ``seg_train.opt`` (SGD or AdamW; no weight decay on norms, biases, tokens; the encoder's
    groups at ``encoder_lr_scale`` x the lr; fused kernels on GPU with ``seg_train.fused_optimizer``) and the
    polynomial decay from ``lr`` to ``min_lr`` over the whole run, stepped every iteration (``step_update``), as in
    the official Segmenter (timm's scheduler multiplies each group's ``lr_scale`` into the scheduled lr, as its
    engine.py does). ``model`` is already on its device."""
    st = cfg.seg_train
    fused = fused_optimizer_kwargs(st.opt, next(model.parameters()).device, st.fused_optimizer)
    optimizer = create_optimizer_v2(
        model.param_groups(st.weight_decay, encoder_lr_scale=st.encoder_lr_scale), opt=st.opt, lr=st.lr,
        weight_decay=st.weight_decay, momentum=st.momentum, **fused,
    )
    scheduler = PolyLRScheduler(
        optimizer, t_initial=st.epochs * steps, power=st.poly_power, lr_min=st.min_lr, t_in_epochs=False
    )
    return optimizer, scheduler


def make_train_loader(shards: list[str], cfg: Config, *, num_classes: int, epoch: int, steps: int, rank: int = 0,
                      world_size: int = 1):
    """``steps`` batches {"image": uint8 [B, 3, S, S], "mask": int64 [B, S, S]} of this rank's shards, the target being
    each sample's pseudo-label (random rescale around ``base_size``, crop, flip; padding is 255)."""
    st = cfg.seg_train
    to_example = SegExample(
        SegTrainTransform(
            st.crop_size, scale_range=(st.scale_min, st.scale_max), base_size=st.base_size,
            cat_max_ratio=st.cat_max_ratio, photometric=st.photometric,
        ),
        target="pseudo",
    )
    return make_loader(
        shards, transform=to_example, batch_size=st.worker_batch_size, rank=rank, world_size=world_size, epoch=epoch,
        seed=cfg.run.seed, num_workers=cfg.data.loader_workers, steps=steps, shuffle_buffer=cfg.data.shuffle_buffer,
        label_maps=(to_example.target,), num_classes=num_classes, pin_memory=st.use_gpu,
    )


def train_one_epoch(model, loader, optimizer, scheduler, cfg: Config, device, *, epoch: int, failures=None):
    """One pass over ``loader``; returns the per-step sums [loss, ce, clipped_fraction] (numpy)."""
    steps = len(loader)
    sums = np.zeros(3)
    model.train()
    for step, batch in enumerate(loader):
        if failures is not None:
            failures.update(batch)
        images = batch["image"].to(device, non_blocking=True)  # uint8 [B, 3, S, S]
        images = normalize_batch(images, unwrap(model).normalization)  # float [B, 3, S, S]
        targets = batch["mask"].to(device, non_blocking=True)  # [B, S, S] pseudo-label ids, 255 ignored
        with autocast(device, cfg.seg_train.amp):
            logits = model(images)  # [B, K, S, S]
        loss, stats = pixel_losses(logits, targets, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        sums += [loss.item(), stats["ce"], stats["clipped_fraction"]]
    return sums


def train_loop_per_worker(loop_config: dict) -> None:
    cfg, rank, world_size, device = start_worker(loop_config)
    st = cfg.seg_train

    manifest = Manifest.load(train_data_root(cfg))
    val_manifest = Manifest.load(cfg.data.root)
    if val_manifest.classes != manifest.classes:
        raise DataError(
            f"the pseudo-label dataset's classes {manifest.classes} differ from the validation dataset's "
            f"{val_manifest.classes} ({cfg.data.root})"
        )
    train_shards = manifest.shard_paths(cfg.data.train_split)
    steps = steps_per_epoch(manifest.split(cfg.data.train_split).num_samples, world_size, st.worker_batch_size)

    model = build_segmenter(cfg, manifest.num_classes).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, start_epoch, history, failures, tracked = start_training(
        model, optimizer, scheduler, cfg, st, kind="seg", classes=manifest.classes, steps=steps
    )
    for epoch in range(start_epoch, st.epochs):
        started = time.perf_counter()
        loader = make_train_loader(train_shards, cfg, num_classes=manifest.num_classes, epoch=epoch, steps=steps,
                                   rank=rank, world_size=world_size)
        sums = train_one_epoch(model, loader, optimizer, scheduler, cfg, device, epoch=epoch, failures=failures)
        elapsed = time.perf_counter() - started
        run_failures = check_failures_across_ranks(failures)

        last_epoch = epoch == st.epochs - 1
        evaluated = (epoch + 1) % max(st.eval_every, 1) == 0 or last_epoch
        # NaN between evaluations: Ray Train ranks such checkpoints below every scored one.
        val_miou = float("nan")
        if evaluated:
            val_miou = evaluate_miou(unwrap(model), val_manifest, cfg, rank, world_size, device).miou()
        metrics = epoch_metrics(
            epoch, dict(zip(("loss", "ce", "clipped_fraction"), sums)), steps=steps, world_size=world_size,
            batch_size=st.worker_batch_size, elapsed=elapsed, optimizer=optimizer, failures=run_failures, device=device,
        ) | {"val_mIoU": val_miou}

        history.append(metrics)
        report_epoch(
            metrics, kind="seg", model=model, optimizer=optimizer, scheduler=scheduler, classes=manifest.classes,
            cfg=cfg, history=history, epochs=st.epochs, started=started,
            tracked=tracked, shown=("loss", "ce", "clipped_fraction", "val_mIoU"),
        )


@torch.no_grad()
def evaluate_miou(
    model: Segmenter, manifest: Manifest, cfg: Config, rank: int, world_size: int, device
) -> ConfusionMatrix:
    """Validation confusion matrix against the ground-truth masks, merged over ranks.

    Each rank scores its share of the validation shards with the ``eval`` section's protocol at a single scale
    without flip (as the official training loop validates): a cheap training-time signal; ``weaktr.evaluate``
    does the full multi-scale + flip (+ CRF) evaluation.
    """
    shards = manifest.shard_paths(cfg.data.val_split)
    # Fewer shards than ranks: rank 0 scores them all rather than leaving ranks idle-but-waiting.
    mine = shards[rank::world_size] if len(shards) >= world_size else (shards if rank == 0 else [])
    confusion = ConfusionMatrix(manifest.num_classes + 1)
    single_scale = {**inference_kwargs(cfg.eval), "scales": [1.0], "flip": False}
    model.eval()
    for sample in iter_samples(mine, FailureTracker(cfg.data.max_failure_fraction), manifest.num_classes):
        if sample.mask is None:
            raise DataError(f"validation sample {sample.key!r} in {manifest.root} has no ground-truth mask")
        image = normalize_image(sample.image, unwrap(model).normalization).to(device)  # [3, H, W]
        with autocast(device, cfg.seg_train.amp):
            probs = predict_probs(model, image, **single_scale)  # [K, H, W]
        confusion.update(probs.argmax(0).cpu().numpy(), sample.mask)
    model.train()
    merged = ConfusionMatrix(manifest.num_classes + 1)
    for part in all_gather(confusion):
        merged.merge(part)
    return merged


def fit(cfg: Config, name: Optional[str] = None, callbacks: Sequence = ()):
    """Run phase-2 training on the connected Ray cluster; returns Ray Train's ``Result``.

    Paths are resolved here (workers may run elsewhere) and the training data is checked for pseudo-labels
    before any worker starts. The Ray Train run is ``name``, by default ``{run.name}-seg`` so it never resumes
    a phase-1 run of the same name.
    """
    resolve_paths(cfg)
    cfg.seg_train.data_root = train_data_root(cfg)
    pseudo_labels = Manifest.load(cfg.seg_train.data_root)
    require_pseudo_labels(pseudo_labels, cfg.data.train_split)
    if cfg.seg_train.init_encoder_from_phase1:  # resolved like the paths: workers and checkpoints see the weights
        cfg.seg_model.weights_path = phase1_checkpoint(pseudo_labels)
        cfg.seg_train.init_encoder_from_phase1 = False  # ... as a plain weights_path, a config that loads again
    trainer = make_trainer(
        train_loop_per_worker, cfg, cfg.seg_train, name=name or seg_run_name(cfg), score_attribute="val_mIoU",
        paths=PHASE2_PATHS, callbacks=callbacks,
    )
    return fit_trainer(trainer, cfg.seg_train, "seg_train")


def seg_run_name(cfg: Config) -> str:
    return f"{cfg.run.name}-seg"
