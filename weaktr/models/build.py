"""The two models built from a config: the one place that maps config sections to constructor arguments."""

from __future__ import annotations

from weaktr.config import Config
from weaktr.models.cam import WeakTrCAM
from weaktr.models.segmenter import Segmenter


def build_cam_model(cfg: Config, num_classes: int) -> WeakTrCAM:
    """The phase-1 model of ``cfg.model`` for ``num_classes`` classes."""
    m = cfg.model
    return WeakTrCAM(
        num_classes,
        backbone=m.backbone, pretrained=m.pretrained, weights_path=m.weights_path, img_size=m.img_size,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, drop_path_rate=m.drop_path_rate,
        reduction=m.reduction, feat_reduction=m.feat_reduction, pool=m.pool, fused_attn=m.fused_attn,
    )


def build_segmenter(cfg: Config, num_classes: int) -> Segmenter:
    """A Segmenter for ``num_classes`` foreground classes (+ background)."""
    m = cfg.seg_model
    return Segmenter(
        num_classes + 1,
        backbone=m.backbone, pretrained=m.pretrained, weights_path=m.weights_path, img_size=m.img_size,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, drop_path_rate=m.drop_path_rate,
        d_model=m.d_model, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, dropout=m.dropout,
        fused_attn=m.fused_attn, encoder_norm_eps=m.encoder_norm_eps,
    )
