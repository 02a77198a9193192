"""Ray-free runtime helpers shared by training, inference and the benches: autocast, unwrapping DDP/compiled
models, seeding and optimizer options. Importing this loads no Ray."""

from __future__ import annotations

import contextlib
import inspect
import random

import numpy as np
import torch
from timm.optim import get_optimizer_class


def seed_rngs(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy's global RNG in this training process. The augmentations draw
    from Python's ``random``, which PyTorch seeds only in DataLoader worker processes: with
    ``data.loader_workers: 0`` they run here, and were left to the interpreter's random seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states (the three ``seed_rngs`` seeds, and CUDA's), in types a weights-only
    ``torch.load`` reads back: a checkpoint keeps them so a restarted run draws what the uninterrupted one would."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Undo the draws since ``rng_state`` returned ``state``."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU; full precision on CPU, where bf16 is slower and only adds rounding."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers (its state_dict has no wrapper prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        else:
            return model


def fused_optimizer_kwargs(opt: str, device: torch.device, enabled: bool) -> dict:
    """``{"fused": True}`` for timm's ``create_optimizer_v2`` when asked for, on a GPU, and the optimizer class
    has a fused kernel (torch's SGD / Adam / AdamW): one kernel per step for all parameters instead of several
    per tensor, the same update up to float rounding. ``{}`` otherwise (the default multi-tensor path)."""
    if not enabled or device.type != "cuda":
        return {}
    opt_class = get_optimizer_class(opt.lower().split("_")[-1], bind_defaults=False)  # as create_optimizer_v2 parses
    return {"fused": True} if "fused" in inspect.signature(opt_class).parameters else {}
