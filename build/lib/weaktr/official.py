"""Import checkpoints of the official WeakTr code (github hustvl/WeakTr) as weaktr checkpoint directories.

The official training writes ``{'model': state_dict, ...}``. Phase 1 (``main.py``, ``models.py``):

    cls_token [1, C, D]            -> cls_tokens
    pos_embed [1, C + N, D]        -> cls_pos_embed [1, C, D] + patch_pos_embed [1, N, D]
    patch_embed.*, blocks.i.*, head.{weight [C, D, 3, 3], bias}   -> the same names
    adaptive_attention_fusion.attn_feat_ffn.{0,1}.{weight,bias}   -> aaf.feat_score.{0,1}.*
    adaptive_attention_fusion.attn_head_ffn.{0,2}.weight          -> aaf.map_gate.{0,2}.weight
    norm.*                                                        -> dropped (the official heads never read it)

Phase 2 (``OnlineRetraining/segm``): ``encoder.*`` is a timm-layout ViT (its classifier ``encoder.head.*`` is
dropped) and ``decoder.*`` has the same names as weaktr's MaskTransformer.

The architecture comes from the weaktr config (``model`` / ``seg_model``), the class names from the caller; a
checkpoint that does not fit is refused naming the first mismatching key. Nothing here needs Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from weaktr.checkpoint import CheckpointMismatch, save_checkpoint
from weaktr.config import Config, to_dict
from weaktr.models.build import build_cam_model, build_segmenter

AAF_KEYS = {  # official AdaptiveAttentionFusion -> weaktr AdaptiveAttentionFusion
    "adaptive_attention_fusion.attn_feat_ffn.0.": "aaf.feat_score.0.",
    "adaptive_attention_fusion.attn_feat_ffn.1.": "aaf.feat_score.1.",
    "adaptive_attention_fusion.attn_head_ffn.0.": "aaf.map_gate.0.",
    "adaptive_attention_fusion.attn_head_ffn.2.": "aaf.map_gate.2.",
}


def read_official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint file (``{'model': ...}``, or a bare state dict), without
    DDP ``module.`` prefixes. Loaded with ``weights_only=True``: a checkpoint cannot run code."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path}: not an official WeakTr checkpoint (expected {{'model': state_dict}})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def convert_cam_state(state: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Official phase-1 state dict -> WeakTrCAM's (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["cls_tokens"] = value
        elif key == "pos_embed":
            out["cls_pos_embed"], out["patch_pos_embed"] = value[:, :num_classes], value[:, num_classes:]
        elif key.startswith("norm."):
            continue
        else:
            prefix = next((p for p in AAF_KEYS if key.startswith(p)), None)
            out[AAF_KEYS[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def convert_seg_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official phase-2 state dict -> Segmenter's: the encoder's unused classifier dropped, the rest as is."""
    return {key: value for key, value in state.items() if not key.startswith("encoder.head")}


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)``, refusing any missing, unexpected or mis-shaped key by naming the first."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointMismatch(f"{source}: no weights for {key} {tuple(value.shape)} (check the config's model)")
        if state[key].shape != value.shape:
            raise CheckpointMismatch(
                f"{source}: {key} is {tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the "
                f"model built from the config (architecture or number of classes differ)"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointMismatch(f"{source}: the model has no parameter {extra[0]} ({len(extra)} unexpected keys)")
    model.load_state_dict(state)


def import_official(kind: str, src: str | os.PathLike, out: str | os.PathLike, cfg: Config,
                    classes: Sequence[str]) -> Path:
    """Convert an official phase-1 (``kind`` "cam") or phase-2 ("seg") checkpoint into a weaktr checkpoint
    directory ``out`` that make_pseudo_labels.py, evaluate.py and ``weaktr predict`` accept."""
    source = f"official checkpoint {src}"
    state = read_official_state(src)
    if kind == "cam":
        cfg.model.pretrained, cfg.model.weights_path = False, None  # the weights come from the checkpoint
        model = build_cam_model(cfg, len(classes))
        state = convert_cam_state(state, len(classes))
    elif kind == "seg":
        cfg.seg_model.pretrained, cfg.seg_model.weights_path = False, None
        model = build_segmenter(cfg, len(classes))
        state = convert_seg_state(state)
    else:
        raise ValueError(f"kind must be 'cam' or 'seg', got {kind!r}")
    load_exactly(model, state, source)
    return save_checkpoint(
        out, kind=kind, model_state=model.state_dict(), arch=model.arch, classes=classes, config=to_dict(cfg),
        epoch=0, metrics={"imported_from": os.fspath(src)},
    )
