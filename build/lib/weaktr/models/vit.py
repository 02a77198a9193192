"""Shared helpers for timm ViT backbones (phase-1 CAM model and phase-2 Segmenter encoder).

Backbones are timm models with one class token: a ``VisionTransformer`` (DeiT, ViT augreg, DINOv2) in both phases,
or an ``Eva`` (EVA-02: rotary position embedding, SwiGLU MLPs) as the phase-2 encoder."""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from weaktr import storage
from weaktr.checkpoint import checkpoint_file

# The create_backbone arguments that shape the encoder (the rest say where its weights come from).
BACKBONE_SHAPE = ("img_size", "embed_dim", "depth", "num_heads", "drop_path_rate")
WEIGHT_SOURCES = ("pretrained", "weights_path")


def architecture(constructor_locals: dict[str, Any]) -> dict[str, Any]:
    """A model's constructor arguments except its weight source: what checkpoints record and check, and what
    ``Model(**arch)`` rebuilds. Call it as ``architecture(locals())`` first thing in ``__init__``."""
    return {k: v for k, v in constructor_locals.items() if k not in ("self", "__class__", *WEIGHT_SOURCES)}


def backbone_shape(arch: dict[str, Any]) -> dict[str, Any]:
    """The create_backbone keyword arguments held in a model's ``arch``."""
    return {k: arch[k] for k in BACKBONE_SHAPE}


class WeightsUnavailable(OSError):
    """Pretrained weights were asked for and cannot be had here."""


def create_backbone(
    name: str = "deit_small_patch16_224",
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    img_size: int | tuple[int, int] = 224,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> VisionTransformer | Eva:
    """A timm VisionTransformer or Eva without classifier head (num_classes=0).

    embed_dim / depth / num_heads, when given, override the named architecture (tests build tiny models this
    way). pretrained=True downloads timm's weights for `name`; weights_path instead loads a local timm/DeiT
    checkpoint (see load_backbone_weights). Extra keyword arguments go to timm.create_model.
    """
    if pretrained and weights_path is not None:
        raise ValueError("give either pretrained=True or weights_path, not both")
    overrides = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=0,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            **overrides,
            **timm_kwargs,
        )
    except OSError as err:  # no network, no hub cache (huggingface_hub's errors are OSErrors)
        if not pretrained:
            raise
        reason = " ".join(str(err).split())[:200]
        raise WeightsUnavailable(
            f"timm's pretrained weights for {name!r} could not be loaded ({type(err).__name__}: {reason}). Either let "
            f"this machine reach the Hugging Face hub (or a cache of it: HF_HOME), or set weights_path "
            f"(model.weights_path, seg_model.weights_path) to a local .safetensors/.pth file with pretrained: false"
        ) from None
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(f"backbone {name!r} is a {type(model).__name__}, expected a timm VisionTransformer or Eva")
    if weights_path is not None:
        load_backbone_weights(model, weights_path)
    return model


def input_normalization(
    model: VisionTransformer | Eva, normalization: str = "backbone"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of an input in 0..1: with "backbone", what the backbone's pretrained weights expect (timm's
    pretrained config: ImageNet's for DeiT, 0.5 everywhere for the ImageNet-21k augreg ViTs, CLIP's for EVA-02);
    with "imagenet", ImageNet's whatever the backbone."""
    if normalization not in ("backbone", "imagenet"):
        raise ValueError(f"normalization must be 'backbone' or 'imagenet', got {normalization!r}")
    cfg = model.pretrained_cfg if normalization == "backbone" else {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def load_backbone_weights(model: VisionTransformer | Eva, weights_path: str | os.PathLike) -> None:
    """Load a ViT checkpoint (a local file or a URI, ``weaktr.storage``) into `model` (in place, strict).

    The file is a state dict, possibly nested under "model" / "state_dict" (DeiT releases, timm training
    checkpoints), possibly with DDP "module." prefixes; it is read with torch.load(weights_only=True). The
    classifier head is dropped, and timm's checkpoint filter converts foreign layouts and resamples the
    positional embedding to the model's grid and the patch embedding to its patch size (DINOv2's and EVA-02's
    14-px patches at 16 px, as the official phase 2 runs them). A weaktr phase-1 checkpoint (its directory or
    checkpoint.pt) also loads into a VisionTransformer: see ``vit_state_from_phase1``.
    """
    path = checkpoint_file(weights_path)  # a weaktr checkpoint directory's file, or the file itself
    if not storage.exists(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    local = storage.local_copy(path, suffix=os.path.splitext(path)[1])  # timm picks the reader by the extension
    try:
        state_dict = load_state_dict(local, use_ema=False, weights_only=True)
    finally:
        if local != path:
            os.unlink(local)
    from_phase1 = "cls_tokens" in state_dict
    if from_phase1 and isinstance(model, Eva):
        raise ValueError(f"{path} is a phase-1 (ViT) checkpoint; the backbone {type(model).__name__} cannot take it")
    if from_phase1:
        state_dict = vit_state_from_phase1(state_dict)
    classifier = model.pretrained_cfg.get("classifier", "head")
    heads = (f"{classifier}.", "head.", "head_dist.")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    if isinstance(model, Eva):
        state_dict = eva_checkpoint_filter_fn(state_dict, model)
    else:
        state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if from_phase1:  # phase 1 has no final norm: the encoder keeps its freshly initialized one
        missing = [key for key in missing if not key.startswith("norm.")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit the backbone {model.pretrained_cfg.get('architecture', '')}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )


def vit_state_from_phase1(cam_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A WeakTrCAM state dict as a one-class-token timm ViT's: patch embedding and blocks as they are; the class
    token and its position the mean of the C class tokens' (the way WeakTrCAM copies one token into C, undone);
    the classifier heads (coarse CAM, AAF) dropped. The phase-2 encoder can then start from phase 1, the benchmark's
    stand-in for ImageNet weights when nothing can be downloaded (``seg_train.init_encoder_from_phase1``)."""
    state = {k: v for k, v in cam_state.items() if k.startswith(("patch_embed.", "norm_pre.", "blocks."))}
    state["cls_token"] = cam_state["cls_tokens"].mean(1, keepdim=True)  # [1, 1, D]
    cls_pos = cam_state["cls_pos_embed"].mean(1, keepdim=True)  # [1, 1, D]
    state["pos_embed"] = torch.cat([cls_pos, cam_state["patch_pos_embed"]], dim=1)  # [1, 1 + h0*w0, D]
    return state


def resize_patch_pos_embed(
    pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], antialias: bool = False
) -> Tensor:
    """Bicubically resample the patch part of a positional embedding: [1, h0*w0, D] -> [1, h*w, D].

    Grids are (rows, cols) and may be non-square. No antialiasing by default, like the reference
    implementations (DeiT/DINO/WeakTr interpolate_pos_encoding, plain F.interpolate).
    """
    h0, w0 = old_grid
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != h0 * w0:
        raise ValueError(
            f"pos_embed must be [1, {h0}*{w0}, D] for grid {tuple(old_grid)}, got shape {tuple(pos_embed.shape)}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    (h, w), D = new_grid, pos_embed.shape[-1]
    grid = pos_embed.reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # [1, D, h0, w0]
    # The official interpolate_pos_encoding: bicubic with scale factors (n + 0.1) / n0 (the 0.1 guards the output
    # size against float error, as in DINO), not with the output size: the two sample at slightly different places.
    grid = F.interpolate(
        grid.float(), scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic", align_corners=False,
        antialias=antialias,
    ).to(pos_embed.dtype)
    if tuple(grid.shape[-2:]) != (h, w):
        raise ValueError(f"resized grid {tuple(grid.shape[-2:])} != requested {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, D)  # [1, h*w, D]
