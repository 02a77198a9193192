"""Phase 1: multi-class-token ViT with adaptive attention fusion (WeakTr, SPEC.md "Phase 1 model").

The encoder is a timm VisionTransformer (DeiT-S by default); this module reuses its patch embedding and blocks,
replaces the single class token by C class tokens, and runs each block with a small forward of its own so that
every head's attention probabilities A_kj and attention-branch output F_kj come out alongside. As in the official
model the heads read the last block's raw output: the backbone's final LayerNorm is not applied (its output's mean
over features is nearly constant, which all but froze the class-token logit), and the maps are laid out as the
official code lays them out (head-major, features split by stride) so that its checkpoints load 1:1.

Shapes: B batch, C classes, D width, K blocks, Hd heads, L = K*Hd maps (l = j*K + k, head-major), h x w patch
grid, N = h*w, T = C + N tokens (class tokens first).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from weaktr import ops
from weaktr.models.vit import architecture, backbone_shape, create_backbone, input_normalization, resize_patch_pos_embed


class CamOutput(NamedTuple):
    cls_logits: Tensor  # [B, C] y_cls: mean over D of each final class token
    coarse_logits: Tensor  # [B, C] y_coarse = avgpool(M)
    fine_logits: Tensor  # [B, C] y_fine = avgpool(G)
    coarse_cam: Tensor  # [B, C, h, w] M
    fine_cam: Tensor  # [B, C, h, w] G, the CAM used for pseudo-labels
    fused_attn: Tensor  # [B, T, T] A_bar: with coarse_cam, every CAM readout (ops.attention_cam)


class AdaptiveAttentionFusion(nn.Module):
    """Per-image weights w [B, L] for the L attention maps, from the heads' attention-branch features.

    f_l = pool over tokens of F_l; s_l = Linear(hd -> 1)(Linear(hd -> hd / feat_reduction)(f_l)), shared over l;
    w = sigmoid(W2 relu(W1 s)), W1: L -> L / reduction, W2: L / reduction -> L, no biases.
    Hidden widths are floored at 1 so that tiny test models (L < reduction) work.
    """

    def __init__(self, num_maps: int, head_dim: int, reduction: int = 8, feat_reduction: int = 8, pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        if reduction < 1 or feat_reduction < 1:
            raise ValueError(f"reduction and feat_reduction must be >= 1, got {reduction}, {feat_reduction}")
        self.pool = pool
        feat_hidden = max(1, head_dim // feat_reduction)
        map_hidden = max(1, num_maps // reduction)
        self.feat_score = nn.Sequential(nn.Linear(head_dim, feat_hidden), nn.Linear(feat_hidden, 1))
        self.map_gate = nn.Sequential(
            nn.Linear(num_maps, map_hidden, bias=False),
            nn.ReLU(),
            nn.Linear(map_hidden, num_maps, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, feats: Tensor) -> Tensor:
        # feats [B, L, T, hd] -> weights [B, L]
        pooled = feats.amax(2) if self.pool == "max" else feats.mean(2)  # [B, L, hd]
        scores = self.feat_score(pooled).squeeze(-1)  # [B, L]
        return self.map_gate(scores)


class WeakTrCAM(nn.Module):
    """WeakTr phase-1 model: C class tokens + coarse CAM head + adaptive attention fusion.

    fused_attn=True runs the encoder with F.scaled_dot_product_attention and computes the attention probabilities
    for the fusion separately without autograd (the fusion only uses them detached); fused_attn=False is the
    explicit softmax(q k^T * scale) @ v, which is also what runs when autograd is off (inference needs the
    probabilities anyway). Both give the same outputs and encoder gradients up to float rounding.
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
        reduction: int = 8,
        feat_reduction: int = 8,
        pool: str = "max",
        fused_attn: bool = True,
        normalization: str = "backbone",
    ):
        arch = architecture(locals())
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        vit = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path, **backbone_shape(arch))
        _check_backbone(vit, backbone)
        self.normalization = input_normalization(vit, normalization)  # (mean, std) its inputs get
        self.num_classes = num_classes
        self.fused_attn = fused_attn
        self.embed_dim = D = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads

        # Reused backbone parts; its single class token, pos_embed and heads are not kept (they would be unused).
        self.patch_embed = vit.patch_embed
        self.patch_embed.strict_img_size = False  # any H, W that are multiples of the patch size
        self.grid_size = tuple(self.patch_embed.grid_size)  # (h0, w0) of the stored patch positions
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks  # no final norm: see the module docstring

        # C class tokens and their positions start as copies of the backbone's class token / its position.
        self.cls_tokens = nn.Parameter(vit.cls_token.detach().expand(-1, num_classes, -1).clone())  # [1, C, D]
        self.cls_pos_embed = nn.Parameter(vit.pos_embed[:, :1].detach().expand(-1, num_classes, -1).clone())
        # A contiguous copy: a clone of the slice would keep the [1, 1 + h0*w0, D] strides, unlike its gradient.
        self.patch_pos_embed = nn.Parameter(vit.pos_embed[:, 1:].detach().clone(memory_format=torch.contiguous_format))

        self.head = nn.Conv2d(D, num_classes, kernel_size=3, padding=1)  # coarse CAM M
        self.aaf = AdaptiveAttentionFusion(
            num_maps=len(self.blocks) * self.num_heads,
            head_dim=D // self.num_heads,
            reduction=reduction,
            feat_reduction=feat_reduction,
            pool=pool,
        )

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_tokens", "cls_pos_embed", "patch_pos_embed"}

    def forward(self, x: Tensor) -> CamOutput:
        B, _, H, W = x.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"input size {H}x{W} must be a multiple of the patch size {ph}x{pw}")
        h, w = H // ph, W // pw
        C, Hd = self.num_classes, self.num_heads

        x = self.patch_embed(x) + self._patch_pos_embed((h, w))  # [B, N, D]
        cls = (self.cls_tokens + self.cls_pos_embed).expand(B, -1, -1)  # [B, C, D]
        # Positions added before the concatenation, not after: each position parameter's gradient then has the
        # parameter's own layout instead of being a view into a [1, T, D] one (which DDP copies every step).
        x = self.pos_drop(torch.cat([cls, x], dim=1))  # [B, T, D]
        x = self.norm_pre(x)
        attn_probs, attn_feats = [], []
        for block in self.blocks:
            x, probs, branch = self._block_forward(block, x)
            attn_probs.append(probs.detach())  # [B, Hd, T, T]
            attn_feats.append(branch.detach())  # [B, T, D]

        cls_logits = x[:, :C].mean(-1)  # [B, C]
        patches = x[:, C:].transpose(1, 2).reshape(B, self.embed_dim, h, w)  # [B, D, h, w]
        coarse_cam = self.head(patches)  # [B, C, h, w]
        coarse_logits = coarse_cam.mean((2, 3))

        K, T = len(self.blocks), x.shape[1]
        feats = torch.stack(attn_feats, dim=1)  # [B, K, T, D]
        # Feature d goes to head d mod Hd (the official view(K, B, T, D/Hd, Hd)), maps head-major: l = j*K + k.
        feats = feats.reshape(B, K, T, -1, Hd).permute(0, 4, 1, 2, 3).reshape(B, Hd * K, T, -1)  # [B, L, T, D/Hd]
        weights = self.aaf(feats)  # [B, L], head-major
        # Fused block by block ([B, Hd, T, T] each, weights reordered block-major): stacking the L maps first
        # would hold them twice, the largest tensors of the pass.
        block_major = weights.view(B, Hd, K).transpose(1, 2).reshape(B, K * Hd)  # [B, L], l' = k*Hd + j
        fused = ops.fuse_attention(attn_probs, block_major)  # [B, T, T]
        fine_cam = ops.refine_cam(coarse_cam.detach(), fused)  # [B, C, h, w]; trains only the AAF
        fine_logits = fine_cam.mean((2, 3))
        return CamOutput(cls_logits, coarse_logits, fine_logits, coarse_cam, fine_cam, fused)

    def loss(self, out: CamOutput, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """MLSM(y_cls) + MLSM(y_coarse) + MLSM(y_fine) against multi-hot labels [B, C]."""
        if labels.shape != out.cls_logits.shape:
            raise ValueError(f"labels must be [B, C] = {tuple(out.cls_logits.shape)}, got {tuple(labels.shape)}")
        labels = labels.float()
        terms = {
            "loss_cls": F.multilabel_soft_margin_loss(out.cls_logits.float(), labels),
            "loss_coarse": F.multilabel_soft_margin_loss(out.coarse_logits.float(), labels),
            "loss_fine": F.multilabel_soft_margin_loss(out.fine_logits.float(), labels),
        }
        total = terms["loss_cls"] + terms["loss_coarse"] + terms["loss_fine"]
        values = torch.stack([total, *terms.values()]).tolist()  # one device sync for all four numbers
        return total, dict(zip(["loss", *terms], values))

    def _patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        return resize_patch_pos_embed(self.patch_pos_embed, self.grid_size, grid)  # [1, h*w, D]

    def _block_forward(self, block: Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """timm Block.forward, also returning attention probs [B, Hd, T, T] and the attention branch [B, T, D]."""
        branch, probs = self._attention(block.attn, block.norm1(x))
        x = x + block.drop_path1(block.ls1(branch))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, probs, branch

    def _attention(self, attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
        """timm Attention.forward (weights reused), also returning the attention probabilities."""
        B, T, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, Hd, T, hd]
        q, k = attn.q_norm(q), attn.k_norm(k)
        # Without autograd (CAM pass, validation) the probabilities are computed anyway: reuse them for the output.
        if self.fused_attn and torch.is_grad_enabled():
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, Hd, T, hd]
            with torch.no_grad():  # the fusion reads them detached: no second autograd graph
                probs = _attention_probs(q, k, attn.scale)
        else:
            probs = _attention_probs(q, k, attn.scale)  # [B, Hd, T, T]
            out = probs @ v
        out = out.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))  # [B, T, D]
        return out, probs


def _attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, Hd, T, T]


def _check_backbone(vit: VisionTransformer, name: str) -> None:
    """The token layout and block structure this model relies on, with a clear error otherwise."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"backbone {name!r} is a timm {type(vit).__name__}; phase 1 needs a VisionTransformer (one class token, "
            "plain attention blocks: DeiT, ViT, DINOv2). EVA-02 is a phase-2 backbone (seg_model.backbone)"
        )
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.no_embed_class or vit.pos_embed is None:
        raise ValueError(
            f"backbone {name!r} must have exactly one class token with a learned positional embedding "
            "(DeiT / ViT layout; no register or distillation tokens)"
        )
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or not isinstance(block.attn, Attention):
            raise ValueError(f"backbone {name!r} block {i} is {type(block).__name__}, expected a plain timm Block")
        # Attention dropout would make the fused and explicit paths differ and the fused maps random.
        if block.attn.attn_drop.p != 0:
            raise ValueError(f"backbone {name!r} has attention dropout {block.attn.attn_drop.p}; WeakTr needs 0")
    if vit.embed_dim % vit.blocks[0].attn.num_heads:
        raise ValueError(f"embed_dim {vit.embed_dim} must be divisible by num_heads {vit.blocks[0].attn.num_heads}")
