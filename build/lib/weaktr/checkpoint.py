"""Checkpoint files shared by both phases.

A checkpoint is a directory (the unit Ray Train keeps) holding ``checkpoint.pt``: the model
weights plus everything needed to rebuild and validate the model without the run that made
it: its kind ("cam" or "seg"), architecture arguments, class names, the resolved config and
the library version; optimizer/scheduler state and the epoch for resuming. Loading uses
``torch.load(weights_only=True)``, so a checkpoint can hold only tensors and plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import weaktr
from weaktr import storage

CHECKPOINT_FILE = "checkpoint.pt"

# weaktr 0.2.0 made the phase-1 model the official one (no final LayerNorm, head-major stride-split attention maps):
# earlier phase-1 weights would load but compute something else.
CAM_LAYOUT_SINCE = (0, 2, 0)

# Architecture arguments that change how a model runs but not which weights it has.
RUNTIME_ONLY_ARCH = frozenset({"fused_attn", "drop_path_rate", "dropout"})


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model or dataset it is loaded against."""


def save_checkpoint(
    directory: str | Path,
    *,
    kind: str,
    model_state: dict,
    arch: dict,
    classes: Sequence[str],
    config: dict,
    epoch: int,
    optimizer_state: Optional[dict] = None,
    scheduler_state: Optional[dict] = None,
    metrics: Optional[dict] = None,
    history: Optional[Sequence[dict]] = None,
    rng_states: Optional[Sequence[dict]] = None,
) -> Path:
    """``metrics``: this epoch's; ``history``: every epoch's so far (the run's curves, kept across resumes);
    ``rng_states``: every training rank's (``runtime.rng_state``), which a restarted run takes up."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": kind,
        "version": weaktr.__version__,
        "arch": dict(arch),
        "classes": list(classes),
        "config": config,
        "epoch": epoch,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "metrics": dict(metrics or {}),
        "history": [dict(m) for m in history or []],
        "rng_states": list(rng_states or []),
    }
    # Write under a temporary name so an interrupted save never leaves a truncated file.
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    return directory


def checkpoint_file(path: str | os.PathLike) -> str:
    """The checkpoint file of a checkpoint directory (or the file itself); local or a URI (``weaktr.storage``)."""
    path = storage.absolute(path)
    return storage.join(path, CHECKPOINT_FILE) if storage.is_dir(path) else path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint directory (or its ``checkpoint.pt``), local or a URI, with weights-only unpickling."""
    file = checkpoint_file(path)
    if not storage.exists(file):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)}")
    local = storage.local_copy(file, suffix=".pt")
    try:
        payload = torch.load(local, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, or one holding objects a weights-only load refuses to build
        reason = str(err).split(".")[0].strip()
        raise CheckpointMismatch(f"{file} is not a weaktr checkpoint ({type(err).__name__}: {reason})") from None
    finally:
        if local != file:
            os.unlink(local)
    if not isinstance(payload, dict) or "kind" not in payload or "model" not in payload:
        raise CheckpointMismatch(f"{file} is not a weaktr checkpoint")
    if isinstance(payload.get("arch"), dict):
        # Checkpoints from before the arch recorded it normalized every input with ImageNet's mean and std.
        payload["arch"].setdefault("normalization", "imagenet")
    return payload


def check_compatible(
    ckpt: dict, *, kind: str, classes: Sequence[str], arch: Optional[dict] = None, source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint of another phase, class list or architecture, saying what differs."""
    if ckpt["kind"] != kind:
        raise CheckpointMismatch(f"{source} is a '{ckpt['kind']}' checkpoint, expected '{kind}'")
    made_by = tuple(int(part) for part in str(ckpt.get("version", "0")).split(".")[:3] if part.isdigit())
    if kind == "cam" and made_by < CAM_LAYOUT_SINCE:
        raise CheckpointMismatch(
            f"{source} was made by weaktr {ckpt.get('version')}, whose phase-1 model applied the backbone's final "
            "LayerNorm and ordered the attention maps differently; retrain phase 1 with this version"
        )
    if list(ckpt["classes"]) != list(classes):
        raise CheckpointMismatch(
            f"{source} was trained on classes {list(ckpt['classes'])} "
            f"but the dataset has {list(classes)}"
        )
    if arch is not None:
        diffs = [
            f"{key}: checkpoint {ckpt['arch'].get(key)!r} vs config {value!r}"
            for key, value in arch.items()
            if key not in RUNTIME_ONLY_ARCH and ckpt["arch"].get(key) != value
        ]
        if diffs:
            raise CheckpointMismatch(f"{source} architecture differs from the config ({'; '.join(diffs)})")
