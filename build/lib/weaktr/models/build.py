"""The two models, built from a config (the one place that maps config sections to constructor arguments) or
loaded from a weaktr checkpoint (``load_model``: the one loader for pseudo-labels, evaluation and prediction)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch

from weaktr.checkpoint import CheckpointMismatch, check_compatible, load_checkpoint
from weaktr.config import Config
from weaktr.models.cam import WeakTrCAM
from weaktr.models.segmenter import Segmenter

MODELS = {"cam": WeakTrCAM, "seg": Segmenter}
NEEDED_FOR = {"cam": "a phase-1 CAM ('cam') checkpoint from ray_jobs/train_cam.py",
              "seg": "a phase-2 segmentation ('seg') checkpoint from ray_jobs/train_seg.py"}


def build_cam_model(cfg: Config, num_classes: int) -> WeakTrCAM:
    """The phase-1 model of ``cfg.model`` for ``num_classes`` classes (its fields are WeakTrCAM's arguments)."""
    return WeakTrCAM(num_classes, **dataclasses.asdict(cfg.model))


def build_segmenter(cfg: Config, num_classes: int) -> Segmenter:
    """A Segmenter of ``cfg.seg_model`` (its fields are Segmenter's arguments) for ``num_classes`` foreground
    classes (+ background)."""
    return Segmenter(num_classes + 1, **dataclasses.asdict(cfg.seg_model))


def load_model(
    path: str | os.PathLike, kind: str, classes: Optional[Sequence[str]] = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """The model of a weaktr checkpoint (weights-only loading; its arch names no weight source, so nothing is
    downloaded), in eval mode on ``device``, and the checkpoint. Refuses (CheckpointMismatch), saying what differs,
    a checkpoint of the other ``kind`` ("cam" or "seg"), one trained on other ``classes`` (when given), and one
    whose architecture or weights do not fit."""
    payload = load_checkpoint(path)
    source = f"checkpoint {path}"
    if payload["kind"] != kind:
        raise CheckpointMismatch(f"{source} is a '{payload['kind']}' checkpoint; this needs {NEEDED_FOR[kind]}")
    # Also refuses phase-1 checkpoints of the pre-0.2.0 layout, whatever the classes.
    check_compatible(payload, kind=kind, classes=payload["classes"] if classes is None else classes, source=source)
    arch = dict(payload["arch"])
    try:
        model = rebuild(kind, arch, payload["model"])
    except (TypeError, ValueError) as exn:  # the constructor's
        raise CheckpointMismatch(f"{source}: cannot rebuild the model from its arch {arch}: {exn}") from exn
    except RuntimeError as exn:  # load_state_dict's
        raise CheckpointMismatch(f"{source}: weights do not fit its architecture: {exn}") from exn
    return model.to(device), payload


def rebuild(kind: str, arch: dict, weights: dict) -> torch.nn.Module:
    """The ``kind`` model of a checkpoint's ``arch`` with ``weights``, in eval mode on the CPU."""
    model = MODELS[kind](**arch)
    model.load_state_dict(weights)
    return model.eval()
