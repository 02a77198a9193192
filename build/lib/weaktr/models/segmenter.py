"""Phase 2: Segmenter-style segmentation network (SPEC.md "Phase 2").

A plain ViT encoder (timm VisionTransformer or Eva: one class token, final norm) followed by the mask-transformer
decoder of Segmenter (Strudel et al., ICCV 2021): n_cls learned class embeddings attend jointly with the projected
patch tokens, and each class mask is the cosine similarity between the patch features and that class's feature.
Parameter names follow the Segmenter reference code (encoder.*, decoder.cls_emb, decoder.proj_patch, ...).

Shapes: B batch, H x W input, p patch size, h x w = H/p x W/p grid, N = h*w patch tokens, D encoder width,
E = d_model decoder width, n = n_cls classes including background.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.eva import Eva
from timm.models.vision_transformer import Block
from torch import Tensor

from weaktr.models.vit import architecture, backbone_shape, create_backbone, input_normalization


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder: patch tokens [B, N, D] -> class masks [B, n, h, w] (grid resolution)."""

    def __init__(
        self,
        num_classes: int,
        encoder_dim: int,
        d_model: int,
        depth: int = 2,
        num_heads: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"decoder width d_model={d_model} must be divisible by decoder_heads={num_heads}")
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))  # [1, n, E]
        # Segmenter's blocks: qkv with bias, MLP 4x, dropout on attention, projections and MLP.
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  norm_layer=nn.LayerNorm)  # eps 1e-5 as Segmenter's blocks (timm's Block defaults to 1e-6)
            for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        # Plain matrices (no bias): the features are L2-normalized right after, so only directions matter.
        self.proj_patch = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.mask_norm = nn.LayerNorm(num_classes)

        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], both: bool = False) -> Tensor:
        """Class masks [B, n, h, w]; with ``both``, [B, 2n, h, w]: the masks read out before the last block, then
        the final ones (the official ``MultiMaskTransformer``, whose evaluation ensembles the two)."""
        B = patch_tokens.shape[0]
        x = self.proj_dec(patch_tokens)  # [B, N, E]
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)  # [B, N + n, E]
        for block in self.blocks[:-1]:
            x = block(x)
        final = self._masks(self.blocks[-1](x), grid)  # [B, n, h, w]
        return torch.cat([self._masks(x, grid), final], dim=1) if both else final

    def _masks(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Decoder tokens [B, N + n, E] -> masks [B, n, h, w]: cosine similarity of patch and class features."""
        B, n = x.shape[0], self.num_classes
        x = self.decoder_norm(x)
        patches = x[:, :-n] @ self.proj_patch  # [B, N, E]
        classes = x[:, -n:] @ self.proj_classes  # [B, n, E]
        patches = F.normalize(patches, dim=-1)
        classes = F.normalize(classes, dim=-1)
        masks = patches @ classes.transpose(1, 2)  # [B, N, n] cosine similarities
        masks = self.mask_norm(masks)  # normalized over the class axis
        return masks.transpose(1, 2).reshape(B, n, *grid)  # [B, n, h, w]


class Segmenter(nn.Module):
    """ViT encoder + mask-transformer decoder -> per-pixel logits [B, num_classes, H, W].

    num_classes counts the background (class 0 = background, c+1 = foreground class c, like the masks). Inputs are
    normalized [B, 3, H, W] (``self.normalization``) with H and W multiples of the patch size, any aspect ratio: the
    encoder is built with timm's dynamic_img_size, which resamples the patch positional embedding (stored for the
    img_size grid) to each input's grid. fused_attn chooses F.scaled_dot_product_attention (True) or timm's explicit
    softmax attention (False) in every attention layer.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "deit_small_patch16_224",
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        img_size: int = 224,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.1,
        patch_size: int | None = None,
        d_model: int | None = None,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        dropout: float = 0.1,
        fused_attn: bool = True,
        encoder_norm_eps: float | None = None,
        normalization: str = "backbone",
    ):
        arch = architecture(locals())
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes (background included) must be >= 2, got {num_classes}")
        if decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {decoder_depth}")
        self.arch = arch
        # The official Segmenter's own ViT uses LayerNorm's default eps 1e-5 where timm's DeiT uses 1e-6.
        norm = {} if encoder_norm_eps is None else {"norm_layer": functools.partial(nn.LayerNorm, eps=encoder_norm_eps)}
        # patch_size 16 on a 14-px backbone (DINOv2, EVA-02) resamples its pretrained patch embedding, as the
        # official phase 2 runs them (dinov2_small_patch16_224, eva02_small_patch16_224).
        patch = {} if patch_size is None else {"patch_size": patch_size}
        self.encoder = create_backbone(
            backbone, pretrained=pretrained, weights_path=weights_path, **backbone_shape(arch),
            dynamic_img_size=True, **norm, **patch,
        )
        _check_encoder(self.encoder, backbone)
        self.normalization = input_normalization(self.encoder, normalization)  # (mean, std) its inputs get
        self.num_classes = num_classes
        d_model = d_model or self.encoder.embed_dim
        self.decoder = MaskTransformer(
            num_classes,
            encoder_dim=self.encoder.embed_dim,
            d_model=d_model,
            depth=decoder_depth,
            num_heads=decoder_heads or max(d_model // 64, 1),
            dropout=dropout,
        )
        for module in self.modules():
            if hasattr(module, "fused_attn"):  # timm's Attention and Eva's EvaAttention
                module.fused_attn = fused_attn

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.patch_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay (timm's create_optimizer_v2 reads this)."""
        names = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        names |= {f"decoder.{name}" for name in self.decoder.no_weight_decay()}
        return names & dict(self.named_parameters()).keys()  # timm lists tokens this backbone may not have

    def param_groups(self, weight_decay: float, encoder_lr_scale: float = 1.0) -> list[dict]:
        """Optimizer parameter groups: timm's weight-decay rule (none for biases, 1-d weights and
        ``no_weight_decay()``), and ``lr_scale`` = ``encoder_lr_scale`` on the encoder's groups (timm's schedulers
        multiply it into the scheduled lr, as the official Segmenter's engine.py does)."""
        skip = self.no_weight_decay()
        groups: dict[tuple[bool, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim > 1 and not name.endswith(".bias") and name not in skip
            in_encoder = name.startswith("encoder.")
            group = groups.setdefault((in_encoder, decay), {
                "params": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": encoder_lr_scale if in_encoder else 1.0,
            })
            group["params"].append(param)
        return list(groups.values())

    def forward(self, x: Tensor, both: bool = False) -> Tensor:
        """Per-pixel logits [B, n, H, W]; with ``both``, [B, 2n, H, W]: the decoder's masks before its last block,
        then the final ones (see ``MaskTransformer.forward``)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"input size {H}x{W} must be a multiple of the patch size {ph}x{pw} (pad or crop it)")

        patch_tokens = self.encode(x)  # [B, N, D]
        masks = self.decoder(patch_tokens, (H // ph, W // pw), both)  # [B, n or 2n, h, w]
        return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)  # [B, n or 2n, H, W]


    def encode(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> the encoder's patch tokens [B, N, D] after its final norm.

        timm's forward_features, but for the position embedding at grids other than the stored one: resampled
        bilinearly (the official Segmenter's ``resize_pos_embed``) where timm resamples bicubically with
        antialiasing, so that official checkpoints give the official logits at every input size. An Eva encoder
        runs its own forward_features: its rotary embedding is computed for each input's grid."""
        vit = self.encoder
        if isinstance(vit, Eva):  # final norm: timm's Eva keeps it as fc_norm (for its pooled token) by default
            return final_norm(vit)(vit.forward_features(x))[:, vit.num_prefix_tokens:]  # [B, N, D]
        x = vit.patch_embed(x)  # [B, h, w, D]: dynamic_img_size keeps the grid
        B, h, w, D = x.shape
        pos_cls, pos_patch = vit.pos_embed[:, :1], vit.pos_embed[:, 1:]  # [1, 1, D], [1, h0 * w0, D]
        h0, w0 = vit.patch_embed.grid_size
        if (h, w) != (h0, w0):
            grid = pos_patch.reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # [1, D, h0, w0]
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # [1, D, h, w]
            pos_patch = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)
        tokens = torch.cat([vit.cls_token.expand(B, -1, -1) + pos_cls, x.reshape(B, h * w, D) + pos_patch], dim=1)
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))  # [B, 1 + N, D]
        return vit.norm(vit.blocks(tokens))[:, 1:]  # [B, N, D]


def _init_weights(module: nn.Module) -> None:
    """Segmenter's decoder initialization (the encoder keeps timm's own, or pretrained weights)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_encoder(vit: nn.Module, name: str) -> None:
    """The token layout the decoder relies on, with a clear error otherwise."""
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.pos_embed is None or vit.no_embed_class:
        raise ValueError(
            f"backbone {name!r} must have exactly one class token and a learned positional embedding "
            "(DeiT / ViT layout; no register or distillation tokens)"
        )
    if isinstance(final_norm(vit), nn.Identity):
        raise ValueError(f"backbone {name!r} has no final norm on its tokens (a global-pool ViT?)")


def final_norm(vit: nn.Module) -> nn.Module:
    """The encoder's last norm, applied to every token: ``norm``, or an Eva's ``fc_norm`` (timm's Eva keeps its
    final norm there, for the pooled token, unless built with ``use_fc_norm=False``; the official EVA-02 encoder
    applies it to every token, as a ViT does). An Eva with ``norm`` has an identity ``fc_norm``, and the reverse."""
    return vit.fc_norm if isinstance(vit, Eva) and isinstance(vit.norm, nn.Identity) else vit.norm
