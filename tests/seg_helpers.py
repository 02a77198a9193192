"""Tiny datasets, configs and checkpoints for the phase-2 tests (not a test module).

Phase-2 tests must not depend on the pseudo-label pipeline: pseudo-labels here are the ground-truth masks
with one object per image relabelled, written into ``Sample.pseudo`` through the shard writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weaktr.checkpoint import save_checkpoint
from weaktr.config import Config, to_dict
from weaktr.data.shards import Manifest, write_dataset
from weaktr.data.stream import iter_samples
from weaktr.data.synthetic import SyntheticSpec, write_synthetic

NUM_CLASSES = 3


def with_pseudo_labels(samples, num_classes: int, seed: int = 0):
    """Copies of ``samples`` whose pseudo-label is the mask with a random ~5% of its pixels set to a wrong class."""
    rng = np.random.default_rng(seed)
    for sample in samples:
        pseudo = sample.mask.copy()
        noisy = (rng.random(pseudo.shape) < 0.05) & (pseudo != 255)
        pseudo[noisy] = rng.integers(0, num_classes + 1, size=int(noisy.sum()))
        sample.pseudo = pseudo
        yield sample


def write_pseudo_dataset(root: Path, num_train: int = 32, num_val: int = 8, pseudo: bool = True) -> Manifest:
    """A synthetic dataset (64-80 px images, 8 samples per shard) whose train split carries pseudo-labels."""
    spec = SyntheticSpec(
        num_classes=NUM_CLASSES, num_train=num_train, num_val=num_val, min_size=64, max_size=80, max_objects=2,
        samples_per_shard=8,
    )
    gt = write_synthetic(root / "gt", spec)
    train = iter_samples(gt.shard_paths("train"))
    return write_dataset(
        root / "pseudo", "synthetic-pseudo", gt.classes,
        {"train": with_pseudo_labels(train, gt.num_classes) if pseudo else train,
         "val": iter_samples(gt.shard_paths("val"))},
        samples_per_shard=8,
    )


def tiny_config(tmp_path: Path, data_root: Path) -> Config:
    cfg = Config()
    cfg.run.name = "seg-test"
    cfg.run.storage_path = str(tmp_path / "runs")
    cfg.data.root = str(data_root)
    cfg.data.synthetic.enabled = False  # the test writes its own datasets; prepare_data must not replace them
    cfg.data.loader_workers = 0
    cfg.data.shuffle_buffer = 8
    m = cfg.seg_model
    m.img_size, m.embed_dim, m.depth, m.num_heads, m.d_model, m.drop_path_rate = 64, 64, 2, 2, 64, 0.0
    t = cfg.seg_train
    t.data_root = str(data_root)
    t.epochs, t.batch_size, t.opt, t.lr, t.weight_decay = 3, 8, "adamw", 1e-3, 0.01  # 4 per worker
    t.base_size, t.crop_size, t.scale_min, t.scale_max = 64, 64, 0.75, 1.25
    t.num_workers, t.cpus_per_worker = 2, 1
    e = cfg.eval
    e.window, e.stride, e.scales, e.flip, e.actors = 64, 48, [1.0], False, 2
    return cfg


def save_random_checkpoint(directory: Path, cfg: Config, classes, kind: str = "seg", seed: int = 0) -> Path:
    """A checkpoint of an untrained (randomly initialized) Segmenter: its predictions are arbitrary but fixed."""
    import torch

    from weaktr.models.build import build_segmenter as build_model
    from weaktr.train.seg_loop import make_optimizer

    torch.manual_seed(seed)
    model = build_model(cfg, len(classes))
    optimizer, _ = make_optimizer(model, cfg, steps=1)
    save_checkpoint(
        directory, kind=kind, model_state=model.state_dict(), arch=model.arch, classes=classes,
        config=to_dict(cfg), epoch=0, optimizer_state=optimizer.state_dict(),
    )
    return directory
