"""Phase 1: train the WeakTr CAM model with Ray Train (one ``train_loop_per_worker``).

Each worker streams a disjoint, per-epoch reshuffled subset of the training shards, runs the
three-term loss under DDP, evaluates validation mAP on its share of the validation shards,
and reports metrics; rank 0 attaches a checkpoint every epoch.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from weaktr.config import Config, ConfigError, resolve_paths
from weaktr.data.shards import DataError, Manifest
from weaktr.data.stream import FailureTracker, iter_samples, make_loader, steps_per_epoch
from weaktr.data.transforms import (
    CamExample,
    batch_random_erasing,
    cam_eval_transform,
    cam_train_transform,
    multi_hot,
    normalize_batch,
)
from weaktr.launch import PHASE1_PATHS
from weaktr.metrics import BackgroundSweep, mean_average_precision, normalize_cams, parse_sweep
from weaktr.models.build import build_cam_model
from weaktr.models.cam import WeakTrCAM
from weaktr.models.inference import multiscale_cams
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


def make_train_loader(
    shards: list[str], cfg: Config, num_classes: int, *, epoch: int, steps: int, rank: int = 0, world_size: int = 1
):
    """``steps`` batches {"image": uint8 [B, 3, S, S], "target": multi-hot [B, C]} of this rank's shards, with the
    DeiT-style augmentation of ``cfg.train`` but for random erasing (the loop's, on normalized batches); only
    images and labels are decoded (no label maps)."""
    t = cfg.train
    to_example = CamExample(
        cam_train_transform(
            t.img_size, scale_min=t.scale_min, color_jitter=t.color_jitter, auto_augment=t.auto_augment
        ),
        num_classes,
    )
    return make_loader(
        shards, transform=to_example, batch_size=t.worker_batch_size, rank=rank, world_size=world_size, epoch=epoch,
        seed=cfg.run.seed, num_workers=cfg.data.loader_workers, steps=steps, shuffle_buffer=cfg.data.shuffle_buffer,
        label_maps=(), num_classes=num_classes, pin_memory=t.use_gpu,
    )


def make_optimizer(model: WeakTrCAM, cfg: Config, steps: int):
    """timm's optimizer for ``train.opt`` at the scaled lr, weight decay on every parameter with ``train.decay_all``
    (the official main.py) or with timm's exemptions, fused kernels on GPU with ``train.fused_optimizer``; and the
    cosine schedule with warm-up, stepped every iteration (``step_update``; the official steps once per epoch) so
    warm-up is smooth even for short runs. ``model`` is already on its device."""
    t = cfg.train
    fused = fused_optimizer_kwargs(t.opt, next(model.parameters()).device, t.fused_optimizer)
    optimizer = create_optimizer_v2(
        model.parameters() if t.decay_all else model, opt=t.opt, lr=t.scaled_lr, weight_decay=t.weight_decay,
        **fused,
    )
    scheduler = CosineLRScheduler(
        optimizer, t_initial=t.epochs * steps, lr_min=t.min_lr, warmup_t=t.warmup_epochs * steps,
        warmup_lr_init=t.warmup_lr, t_in_epochs=False,
    )
    return optimizer, scheduler


def train_one_epoch(model, loader, optimizer, scheduler, cfg: Config, device, *, epoch: int, failures=None):
    """One pass over ``loader``; returns the per-step sums [loss, loss_cls, loss_coarse, loss_fine] (numpy) and the
    sample keys this rank saw."""
    steps = len(loader)
    sums = np.zeros(4)
    keys_seen: set[str] = set()
    random_erasing = batch_random_erasing(cfg.train.re_prob, device=device)
    model.train()
    for step, batch in enumerate(loader):
        if failures is not None:
            failures.update(batch)
        keys_seen.update(batch["key"])
        images = batch["image"].to(device, non_blocking=True)  # uint8 [B, 3, H, W]
        images = normalize_batch(images, unwrap(model).normalization)  # float [B, 3, H, W]
        if random_erasing is not None:
            images = random_erasing(images)
        targets = batch["target"].to(device, non_blocking=True)  # [B, C]
        with autocast(device, cfg.train.amp):
            out = model(images)
            loss, terms = unwrap(model).loss(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        sums += [terms["loss"], terms["loss_cls"], terms["loss_coarse"], terms["loss_fine"]]
    return sums, keys_seen


def train_loop_per_worker(loop_config: dict) -> None:
    cfg, rank, world_size, device = start_worker(loop_config)
    t = cfg.train

    manifest = Manifest.load(cfg.data.root)
    num_classes = len(manifest.classes)
    train_shards = manifest.shard_paths(cfg.data.train_split)
    steps = steps_per_epoch(manifest.split(cfg.data.train_split).num_samples, world_size, t.worker_batch_size)

    model = build_cam_model(cfg, num_classes).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, start_epoch, history, failures, tracked = start_training(
        model, optimizer, scheduler, cfg, t, kind="cam", classes=manifest.classes, steps=steps
    )
    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        loader = make_train_loader(
            train_shards, cfg, num_classes, epoch=epoch, steps=steps, rank=rank, world_size=world_size
        )
        sums, keys_seen = train_one_epoch(
            model, loader, optimizer, scheduler, cfg, device, epoch=epoch, failures=failures
        )
        elapsed = time.perf_counter() - started
        run_failures = check_failures_across_ranks(failures)

        val_map = evaluate_map(unwrap(model), manifest, cfg, rank, world_size, device)
        cam_miou, cam_threshold = evaluate_cam_miou(unwrap(model), manifest, cfg, rank, world_size, device)
        # Keys seen by more than one rank in this epoch: 0 when shard splitting is disjoint.
        all_keys = all_gather(sorted(keys_seen))
        overlap = sum(len(set(a) & set(b)) for i, a in enumerate(all_keys) for b in all_keys[i + 1:])
        losses = dict(zip(("loss", "loss_cls", "loss_coarse", "loss_fine"), sums))
        metrics = epoch_metrics(
            epoch, losses, steps=steps, world_size=world_size, batch_size=t.worker_batch_size, elapsed=elapsed,
            optimizer=optimizer, failures=run_failures, device=device,
        ) | {"val_mAP": val_map, "cam_mIoU": cam_miou, "cam_bg_threshold": cam_threshold, "rank_overlap_keys": overlap}

        history.append(metrics)
        report_epoch(
            metrics, kind="cam", model=model, optimizer=optimizer, scheduler=scheduler, classes=manifest.classes,
            cfg=cfg, history=history, epochs=t.epochs, started=started,
            tracked=tracked, shown=("loss", "loss_cls", "loss_coarse", "loss_fine", "val_mAP", "cam_mIoU"),
        )


@torch.no_grad()
def evaluate_map(model: WeakTrCAM, manifest: Manifest, cfg: Config, rank: int, world_size: int, device) -> float:
    """Validation mAP of the class-token + coarse predictions, each rank scoring its share of the shards."""
    shards = manifest.shard_paths(cfg.data.val_split)
    # Fewer shards than ranks: rank 0 scores them all rather than leaving ranks idle-but-waiting.
    mine = shards[rank::world_size] if len(shards) >= world_size else (shards if rank == 0 else [])
    transform = cam_eval_transform(cfg.train.img_size, unwrap(model).normalization)
    model.eval()
    scores, targets = [], []
    batch_images, batch_targets = [], []

    def flush():
        images = torch.stack(batch_images).to(device)
        with autocast(device, cfg.train.amp):
            out = model(images)
        # The class-token and coarse-CAM heads are both trained as classifiers; average them.
        probs = torch.sigmoid((out.cls_logits.float() + out.coarse_logits.float()) / 2)
        scores.append(probs.cpu().numpy())
        targets.append(torch.stack(batch_targets).numpy())
        batch_images.clear()
        batch_targets.clear()

    tracker = FailureTracker(cfg.data.max_failure_fraction)
    for sample in iter_samples(mine, tracker, num_classes=len(manifest.classes)):
        batch_images.append(transform(sample.image))
        batch_targets.append(multi_hot(sample.labels, len(manifest.classes)))
        if len(batch_images) == cfg.train.worker_batch_size:
            flush()
    if batch_images:
        flush()
    model.train()
    gathered = all_gather((scores, targets))
    all_scores = np.concatenate([s for rank_scores, _ in gathered for s in rank_scores])
    all_targets = np.concatenate([t for _, rank_targets in gathered for t in rank_targets])
    return float(mean_average_precision(all_scores, all_targets))


@torch.no_grad()
def evaluate_cam_miou(
    model: WeakTrCAM, manifest: Manifest, cfg: Config, rank: int, world_size: int, device
) -> tuple[float, float]:
    """(CAM mIoU, its background threshold) on the first ``train.cam_eval.samples`` samples of
    ``train.cam_eval.split`` (those without a mask skipped), the threshold searched over ``cam_eval.sweep`` in the
    same pass (the official main.py after every epoch), on the CAM readout the pseudo-labels will use
    (``pseudo.attention_type``, ``pseudo.patch_attn_refine``). Each rank reads and scores only its share of the
    shards (``cam_eval_samples``); (NaN, NaN) when ``split`` is None."""
    ce = cfg.train.cam_eval
    if ce.split is None:
        return float("nan"), float("nan")
    sweep = BackgroundSweep(parse_sweep(ce.sweep, key="train.cam_eval.sweep"), len(manifest.classes))
    patch_size = model.patch_size[0]
    model.eval()
    batch: list = []

    def flush():
        cams = multiscale_cams(
            model, [s.image for s in batch], ce.scales, ce.flip, patch_size,
            attention_type=cfg.pseudo.attention_type, refine=cfg.pseudo.patch_attn_refine,
        )  # [C, H, W] each
        for sample, cam in zip(batch, cams):
            sweep.update(normalize_cams(cam.cpu(), sample.labels), sample.labels, sample.mask)
        batch.clear()

    for sample in cam_eval_samples(manifest, ce.split, ce.samples, rank, world_size, cfg.data.max_failure_fraction):
        batch.append(sample)
        if len(batch) == ce.batch_size:
            flush()
    if batch:
        flush()
    model.train()
    merged = BackgroundSweep(sweep.thresholds, sweep.num_classes)
    for rank_sweep in all_gather(sweep):  # every rank merges the same sweeps: the same result everywhere
        merged.merge(rank_sweep)
    threshold, miou = merged.best()
    return miou, threshold


def cam_eval_samples(manifest: Manifest, split: str, limit: int, rank: int = 0, world_size: int = 1,
                     max_failure_fraction: float = 0.01):
    """This rank's share of the first ``limit`` samples of ``split`` (all of them for 0) that have a mask: the
    shards holding those samples are dealt round-robin to the ranks, so no rank decodes another's samples.
    Undecodable samples are skipped, up to ``max_failure_fraction`` of a shard's (``data.max_failure_fraction``)."""
    check_cam_eval_split(manifest, split)
    sizes = manifest.splits[split].shard_sizes
    starts = np.cumsum([0, *sizes[:-1]])  # index in the split of each shard's first sample
    needed = [i for i, start in enumerate(starts) if not limit or start < limit]
    shards = manifest.shard_paths(split)
    for i in needed[rank::world_size]:
        samples = iter_samples([shards[i]], FailureTracker(max_failure_fraction), manifest.num_classes)
        for position, sample in enumerate(samples, start=int(starts[i])):
            if limit and position >= limit:
                break
            if sample.mask is not None:
                yield sample


def check_cam_eval_split(manifest: Manifest, split: str) -> None:
    if split not in manifest.splits:
        raise DataError(f"train.cam_eval.split: dataset {manifest.root} has no split {split!r} "
                        f"(it has {sorted(manifest.splits)})")


def selection_metric(cfg: Config) -> str:
    """The metric the best phase-1 checkpoint is chosen by: CAM mIoU (as the official), val_mAP without it."""
    return "cam_mIoU" if cfg.train.cam_eval.split is not None else "val_mAP"


def fit(cfg: Config, name: Optional[str] = None, callbacks: Sequence = ()):
    """Run phase-1 training on the connected Ray cluster; returns Ray Train's ``Result``.

    The Ray Train run is ``name`` (default ``run.name``) under ``run.storage_path``; rerunning a finished or
    interrupted run of that name continues it. Paths are resolved here (workers run in other directories)."""
    resolve_paths(cfg)
    ce = cfg.train.cam_eval
    if ce.split is not None:  # refused here, before any worker starts, not after the first epoch's training
        try:
            parse_sweep(ce.sweep, key="train.cam_eval.sweep")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_cam_eval_split(Manifest.load(cfg.data.root), ce.split)
    trainer = make_trainer(
        train_loop_per_worker, cfg, cfg.train, name=name or cfg.run.name, score_attribute=selection_metric(cfg),
        paths=PHASE1_PATHS, callbacks=callbacks,
    )
    return fit_trainer(trainer, cfg.train, "train")
