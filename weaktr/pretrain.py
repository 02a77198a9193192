"""A pretraining stage standing in for ImageNet on the built-in benchmark (issue 24).

WeakTr assumes an ImageNet-pretrained ViT: its fine CAM refines the coarse one with patch-to-patch attention that
is already semantic. The benchmark's tiny ViT cannot download such weights, so ``weaktr pretrain`` makes them by
formula-driven supervised pretraining (the FractalDB / RCDB idea: images drawn from formulas, no natural images):
``FormulaSpec.num_classes`` texture classes, each a fixed sum of two or three cosine gratings at its own angles and
frequency ratios, thresholded at its own level (plaids, cells, moiré; none of the benchmark's eight textures),
painted on objects over the benchmark's kind of background, multi-label as the benchmark is. Classes and images
are disjoint from the benchmark's, as ImageNet's are from VOC's; the shapes and backgrounds (the "natural image
statistics") are shared, as photographs share theirs.

Two objectives (``pretrain.objective``): "image", the class token's multi-label loss, as ImageNet classification
trains DeiT; "dense" adds, for every patch token, a soft cross-entropy against the shares of the formula classes
(and the background) in its patch, as dense formula-driven pretraining does. ``pretrain.mimetic_init`` starts
from mimetic initialization (Trockman & Kolter 2023), whose attention already follows token similarity.
Which one the demo uses, and why, is measured in BENCHMARKS.md ("Pretrained stand-in").

The weights are a timm VisionTransformer's state dict (with its classifier ``head``, which loading drops), written
where ``model.weights_path`` / ``seg_model.weights_path`` load them the way users load DeiT. One process, no Ray:
the stage is minutes on a laptop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weaktr.config import Config
from weaktr.data.synthetic import generate_sample
from weaktr.data.transforms import SegTrainTransform, normalize_batch
from weaktr.models.vit import create_backbone, input_normalization
from weaktr.runtime import seed_rngs

log = logging.getLogger(__name__)

WEIGHTS_NAME = "backbone.pth"
RECORD_NAME = "pretrain.json"
CHECKED_STEPS = 10  # `weaktr pretrain --check` reruns this many steps
# The model fields that shape the backbone (recorded: weights fit the model they were made for).
BACKBONE_FIELDS = ("backbone", "img_size", "embed_dim", "depth", "num_heads", "normalization")


@dataclass(frozen=True)
class FormulaSpec:
    """The pretraining images (the fields ``synthetic.generate_sample`` reads, plus how many and which seed);
    ``pretrain`` makes it from the config's ``pretrain`` and ``model`` sections."""

    num_classes: int
    num_images: int
    min_size: int
    max_size: int
    seed: int  # image i draws from default_rng([seed, 1, i]): a stream of its own, not the benchmark's
    max_objects: int = 3  # as the benchmark's
    min_visible_fraction: float = 0.06


@dataclass(frozen=True)
class Grating:
    """One class's formula: pattern(u, v) = sum_i cos(2 pi r_i (u cos a_i + v sin a_i) / period + phase_i) > level."""

    angles: tuple[float, ...]  # radians, relative to the object's own rotation
    ratios: tuple[float, ...]  # frequency of each component relative to 1 / period
    level: float  # threshold on the sum, in units of its number of components
    period: tuple[float, float]  # the period's range (px), drawn per object


def formula_classes(num_classes: int, seed: int) -> list[Grating]:
    """``num_classes`` distinct formulas, fixed by ``seed``. Two components at least 25 degrees apart (one grating
    alone would be the benchmark's stripes), frequency ratios in 0.6..1.6."""
    rng = np.random.default_rng([seed, 7])
    classes = []
    while len(classes) < num_classes:
        count = int(rng.integers(2, 4))
        angles = np.sort(rng.uniform(0, np.pi, size=count))
        gaps = np.diff(np.concatenate([angles, angles[:1] + np.pi]))
        if gaps.min() < np.deg2rad(25):
            continue
        low = float(rng.uniform(6.0, 10.0))
        classes.append(Grating(
            angles=tuple(float(a) for a in angles), ratios=tuple(float(r) for r in rng.uniform(0.6, 1.6, size=count)),
            level=float(rng.uniform(-0.3, 0.3)), period=(low, low + 3.0),
        ))
    return classes


class FormulaTexture:
    """``synthetic.generate_sample``'s ``texture`` for the formula classes."""

    def __init__(self, classes: list[Grating]):
        self.classes = classes

    def __call__(self, cls: int, rng: np.random.Generator):
        grating = self.classes[cls]
        period = rng.uniform(*grating.period)

        def paint(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # u, v [P] -> bool [P]
            total = np.zeros_like(u)
            for angle, ratio in zip(grating.angles, grating.ratios):
                along = u * np.cos(angle) + v * np.sin(angle)
                total += np.cos(2 * np.pi * ratio * along / period + rng.uniform(0, 2 * np.pi))
            return total > grating.level * len(grating.angles)

        return paint


def formula_dataset(spec: FormulaSpec) -> list:
    """The pretraining samples (``synthetic.Sample``: image, labels, mask)."""
    texture = FormulaTexture(formula_classes(spec.num_classes, spec.seed))
    return [generate_sample(np.random.default_rng([spec.seed, 1, index]), spec, index, texture=texture)
            for index in range(spec.num_images)]


def mimetic_init(vit: nn.Module, alpha: float = 0.7, beta: float = 0.7) -> None:
    """Mimetic initialization (Trockman & Kolter 2023), per head: W_q W_k^T ~ alpha Z + beta I (tokens attend to
    similar tokens), W_v W_proj ~ alpha Z - beta I."""
    with torch.no_grad():
        for block in vit.blocks:
            attn = block.attn
            D, H, hd = attn.qkv.in_features, attn.num_heads, attn.head_dim
            wq, wk, wv = attn.qkv.weight.view(3, H * hd, D)  # [H*hd, D] each, y = x W^T
            for h in range(H):
                rows = slice(h * hd, (h + 1) * hd)
                target = alpha * torch.randn(D, D) / D ** 0.5 + beta * torch.eye(D)
                u, sv, vh = torch.linalg.svd(target)
                wq[rows] = (u[:, :hd] * sv[:hd].sqrt()).T  # q = x U sqrt(S)
                wk[rows] = (vh[:hd].T * sv[:hd].sqrt()).T
            target = alpha * torch.randn(D, D) / D ** 0.5 - beta * torch.eye(D)
            u, sv, vh = torch.linalg.svd(target)
            wv.copy_((u[:, :H * hd] * sv[:H * hd].sqrt()).T)
            attn.proj.weight.copy_((vh[:H * hd].T * sv[:H * hd].sqrt()))


class Classifier(nn.Module):
    """A timm ViT backbone and a linear head on its class token (the ImageNet recipe's model), and one on its patch
    tokens (K + 1 with the background) for the dense objective."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        self.patch_head = nn.Linear(backbone.embed_dim, num_classes + 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.forward_features(x)  # [B, 1 + N, D]
        return self.head(tokens[:, 0]), self.patch_head(tokens[:, 1:])  # [B, K], [B, N, K + 1]


def pretrain(cfg: Config, max_steps: Optional[int] = None) -> dict:
    """Pretrain ``cfg.model``'s backbone as ``cfg.pretrain`` says; write ``{pretrain.out}/backbone.pth`` and its
    record (``pretrain.json``: the settings, the loss per epoch and of each of the first ``CHECKED_STEPS`` steps,
    each tensor's sum and norm at the end). ``max_steps`` stops early and writes nothing (``check_pretrained``).
    Returns the record."""
    started = time.perf_counter()
    p, m = cfg.pretrain, cfg.model
    seed_rngs(p.seed)
    backbone = create_backbone(m.backbone, img_size=m.img_size, embed_dim=m.embed_dim, depth=m.depth,
                               num_heads=m.num_heads, drop_path_rate=0.0)
    if p.mimetic_init:
        mimetic_init(backbone)
    model = Classifier(backbone, p.num_classes)
    normalization = input_normalization(backbone, m.normalization)
    spec = FormulaSpec(num_classes=p.num_classes, num_images=p.num_images, min_size=m.img_size,
                       max_size=m.img_size * 3 // 2, seed=p.seed)
    samples = formula_dataset(spec)
    log.info("pretraining data: %d formula images of %d classes (%.0f s)", len(samples), p.num_classes,
             time.perf_counter() - started)
    transform = SegTrainTransform(m.img_size, scale_range=(0.7, 1.3), base_size=m.img_size)
    patch = backbone.patch_embed.patch_size[0]
    K = p.num_classes
    steps_per_epoch = len(samples) // p.batch_size
    planned = p.epochs * steps_per_epoch
    total = planned if max_steps is None else min(max_steps, planned)  # the schedule is the planned run's
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=max(planned, 1),
                                                   pct_start=0.05)
    order_rng = torch.Generator().manual_seed(p.seed)
    history, first_losses, step = [], [], 0
    model.train()
    while step < total:
        order = torch.randperm(len(samples), generator=order_rng)
        losses = []
        for start in range(0, steps_per_epoch * p.batch_size, p.batch_size):
            pairs = [transform(samples[i].image, samples[i].mask) for i in order[start:start + p.batch_size].tolist()]
            images = torch.stack([image for image, _ in pairs])  # uint8 [B, 3, S, S]
            masks = torch.stack([mask for _, mask in pairs])  # [B, S, S]: 0 background, c + 1, 255 ignored
            onehot = F.one_hot(masks.clamp(max=K + 1), K + 2)[..., :K + 1].float()  # [B, S, S, K + 1]; 255: zeros
            present = (onehot.sum((1, 2))[:, 1:] > 0).float()  # [B, K]: the classes the crop shows
            cls_logits, patch_logits = model(normalize_batch(images, normalization))  # [B, K], [B, N, K + 1]
            loss = F.multilabel_soft_margin_loss(cls_logits, present)
            if p.objective == "dense":
                shares = F.avg_pool2d(onehot.permute(0, 3, 1, 2), patch).flatten(2).transpose(1, 2)  # [B, N, K + 1]
                patch_loss = -(shares * patch_logits.log_softmax(-1)).sum()  # soft cross-entropy, labelled pixels
                loss = loss + patch_loss / shares.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step <= CHECKED_STEPS:
                first_losses.append(losses[-1])
            if step == total:
                break
        history.append({"epoch": len(history), "loss": round(float(np.mean(losses)), 5)})
        log.info("pretrain epoch %d/%d: loss %.4f", len(history), p.epochs, history[-1]["loss"])
    record = {
        "pretrain": asdict(p), "model": {k: getattr(m, k) for k in BACKBONE_FIELDS}, "steps": step,
        "history": history, "first_losses": first_losses,
        "weights_summary": weights_summary(backbone), "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    if max_steps is None:  # a check run leaves the recorded weights alone
        os.makedirs(p.out, exist_ok=True)
        state = {**backbone.state_dict(), **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
        torch.save(state, os.path.join(p.out, WEIGHTS_NAME))
        with open(os.path.join(p.out, RECORD_NAME), "w") as f:
            json.dump(record, f, indent=1)
    return record


def weights_summary(model: nn.Module) -> dict[str, list[float]]:
    """Each tensor's sum and L2 norm (to tell weights files apart by reading the record)."""
    return {name: [float(t.double().sum()), float(t.double().norm())] for name, t in sorted(model.state_dict().items())}


def check_pretrained(cfg: Config) -> str:
    """That ``weaktr pretrain`` still makes the weights recorded in ``cfg.pretrain.out``: the settings match the
    record's, and the first ``CHECKED_STEPS`` steps have its losses (to 1e-4). A line saying so; ValueError naming
    what differs otherwise."""
    path = os.path.join(cfg.pretrain.out, RECORD_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pretraining record at {path}: run `weaktr pretrain` first")
    with open(path) as f:
        recorded = json.load(f)
    settings = {"pretrain": {k: v for k, v in asdict(cfg.pretrain).items() if k != "out"},  # not a setting: a place
                "model": {k: getattr(cfg.model, k) for k in BACKBONE_FIELDS}}
    for section, values in settings.items():
        differ = {k: (v, recorded[section].get(k)) for k, v in values.items() if recorded[section].get(k) != v}
        if differ:
            raise ValueError(f"{path} was made with other settings ({section}: "
                             + ", ".join(f"{k} {theirs!r} here {ours!r}" for k, (ours, theirs) in differ.items()) + ")")
    # The losses, not the weights: parameters whose gradient is zero in exact arithmetic (the key biases) take
    # Adam steps of +-lr from rounding noise, which another thread count draws differently.
    rerun = pretrain(cfg, max_steps=CHECKED_STEPS)["first_losses"]
    expected = recorded["first_losses"]
    if len(rerun) != len(expected) or not np.allclose(rerun, expected, rtol=1e-4, atol=0):
        step = next((i for i, (a, b) in enumerate(zip(rerun, expected)) if not np.isclose(a, b, rtol=1e-4, atol=0)),
                    min(len(rerun), len(expected)))
        raise ValueError(f"step {step + 1} of {CHECKED_STEPS} has loss {rerun[step] if step < len(rerun) else None}, "
                         f"the record {expected[step] if step < len(expected) else None}: the command no longer "
                         f"makes {path}'s weights")
    return f"{cfg.pretrain.out}: the first {CHECKED_STEPS} steps reproduce the recorded losses"
