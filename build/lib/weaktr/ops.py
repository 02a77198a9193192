"""The WeakTr equations as pure tensor functions (SPEC.md, "The method's core as pure functions").

No modules, no state, no Ray: the models and training loops call these, and the tests compare them
with direct loop implementations of the equations.

Notation: B batch, L = K*Hd attention maps, C foreground classes, h x w patch grid, N = h*w patch tokens,
T = C + N tokens (the C class tokens come first).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def fuse_attention(attn: Tensor | Sequence[Tensor], weights: Tensor) -> Tensor:
    """Adaptive attention fusion: A_bar = (1/L) sum_l w_l * A_l.

    attn [B, L, T, T] attention probabilities of all layers and heads, or the same maps as chunks [B, L_i, T, T]
    along L (each block's heads as the encoder makes them: no [B, L, T, T] copy); weights [B, L] -> [B, T, T].
    """
    chunks = [attn] if isinstance(attn, Tensor) else list(attn)
    if any(c.ndim != 4 or c.shape[-1] != c.shape[-2] or c.shape[0] != chunks[0].shape[0] for c in chunks):
        raise ValueError(f"attn must be [B, L, T, T], got shapes {[tuple(c.shape) for c in chunks]}")
    B, L = chunks[0].shape[0], sum(c.shape[1] for c in chunks)
    if weights.shape != (B, L):
        raise ValueError(f"weights must be [B, L] = {(B, L)}, got shape {tuple(weights.shape)}")
    fused, start = None, 0
    for chunk in chunks:
        part = torch.einsum("bl,blst->bst", weights[:, start : start + chunk.shape[1]].to(chunk.dtype), chunk)
        fused = part if fused is None else fused + part
        start += chunk.shape[1]
    return fused / L


ATTENTION_TYPES = ("fused", "patchcam", "cross")  # the official --attention-type choices


def refine_cam(coarse_cam: Tensor, fused: Tensor) -> Tensor:
    """Fine CAM: G_c = PA . vec(CA_c * relu(M_c)).

    coarse_cam M [B, C, h, w]; fused A_bar [B, T, T] with T = C + h*w -> G [B, C, h, w].
    CA = A_bar[class rows, patch cols] (how much each class token attends to each patch),
    PA = A_bar[patch rows, patch cols]; G[b, c, n] = sum_m PA[b, n, m] * CA[b, c, m] * relu(M)[b, c, m].
    """
    return attention_cam(coarse_cam, fused, "fused", refine=True)


def attention_cam(coarse_cam: Tensor, fused: Tensor, attention_type: str = "fused", refine: bool = True) -> Tensor:
    """The CAM read off the model as the official CAM generation offers it (``--attention-type``,
    ``--[no-]patch-attn-refine``): ``fused`` CA_c * relu(M_c), ``patchcam`` relu(M_c) alone, ``cross`` CA_c alone;
    each multiplied by PA when ``refine``. ("fused", True) is the fine CAM G of the paper and the default.

    coarse_cam M [B, C, h, w]; fused A_bar [B, T, T] with T = C + h*w -> [B, C, h, w].
    """
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    if coarse_cam.ndim != 4:
        raise ValueError(f"coarse_cam must be [B, C, h, w], got shape {tuple(coarse_cam.shape)}")
    B, C, h, w = coarse_cam.shape
    T = C + h * w
    if fused.shape != (B, T, T):
        raise ValueError(
            f"fused must be [B, T, T] = {(B, T, T)} (T = C + h*w for coarse_cam {tuple(coarse_cam.shape)}), "
            f"got shape {tuple(fused.shape)}"
        )
    cross_attn = fused[:, :C, C:]  # [B, C, N]
    patch_attn = fused[:, C:, C:]  # [B, N, N]
    activation = F.relu(coarse_cam).flatten(2).to(fused.dtype)  # [B, C, N]
    if attention_type == "fused":
        cams = cross_attn * activation
    elif attention_type == "patchcam":
        cams = activation
    else:
        cams = cross_attn
    if refine:
        # Row-vector form of PA @ v: (PA @ v_c)^T = v_c^T @ PA^T for every class at once.
        cams = cams @ patch_attn.transpose(1, 2)  # [B, C, N]
    return cams.reshape(B, C, h, w)


def gradient_clipping_loss(pixel_loss: Tensor, valid: Tensor, start_value: float, patch_size: int) -> Tensor:
    """Per-pixel loss map with WeakTr's gradient clipping (SPEC.md, "Gradient-clipping loss").

    pixel_loss l [B, H, W] (per-pixel cross-entropy); valid [B, H, W] bool (False where the label is ignored).
    mu = mean of l over valid pixels. While mu > start_value the map is l itself (warm-up). Otherwise the plane is
    split into patch_size x patch_size regions from the top-left (edge regions keep what they have); region r gets
    tau_r = max(m_r, mu), m_r the mean of l over the valid pixels of r in all images of the batch (mu for a region
    without valid pixels), and the map is min(l, tau_r): pixels above their region's threshold carry no gradient.
    All thresholds are detached. Returns [B, H, W], zero where not valid; the training loss is
    `out.sum() / valid.sum()`.

    Sync-free (no .item()): both branches are computed and torch.where picks one.
    """
    if pixel_loss.ndim != 3:
        raise ValueError(f"pixel_loss must be [B, H, W], got shape {tuple(pixel_loss.shape)}")
    if valid.shape != pixel_loss.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(pixel_loss.shape)}, got {valid.dtype} {tuple(valid.shape)}"
        )
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")

    zero = pixel_loss.new_zeros(())
    # torch.where (not multiplication) so that inf/nan at ignored pixels neither leak into the sums nor the grads.
    loss = torch.where(valid, pixel_loss, zero)  # [B, H, W]
    stats = loss.detach()
    num_valid = valid.sum()
    mean_loss = stats.sum() / num_valid.clamp(min=1)  # mu, 0 when nothing is valid (the map is all zero anyway)

    thresholds = _region_thresholds(stats, valid, mean_loss, patch_size)  # [H, W]
    clipped = torch.where(loss > thresholds, thresholds, loss)  # min(l, tau); ties keep their gradient
    clipped = torch.where(valid, clipped, zero)
    return torch.where(mean_loss > start_value, loss, clipped)


def segmentation_loss(
    logits: Tensor, target: Tensor, start_value: float, patch_size: int, *, clip: bool = True,
    count_ignored: bool = True, ignore_index: int = 255,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 2's training loss for logits [B, K, H, W] and labels [B, H, W] (``ignore_index`` ignored).

    Per-pixel cross-entropy l (0 where ignored), through ``gradient_clipping_loss`` with ``clip``; the loss is the
    mean of the map. With ``count_ignored`` (the official decoder.GradientClipping + engine.py) ignored pixels take
    part as loss 0 in the clipping statistics and the mean; otherwise both run over labelled pixels only.
    Returns (loss, l [B, H, W], the map l' [B, H, W]); sync-free.
    """
    pixel_loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    labelled = target != ignore_index  # [B, H, W]
    # cross_entropy gives 0 at ignored pixels: counting them is treating every pixel as valid.
    counted = torch.ones_like(labelled) if count_ignored else labelled
    if clip:
        loss_map = gradient_clipping_loss(pixel_loss, counted, start_value, patch_size)  # [B, H, W]
    else:
        loss_map = torch.where(counted, pixel_loss, pixel_loss.new_zeros(()))
    return loss_map.sum() / counted.sum().clamp(min=1), pixel_loss, loss_map


def _region_thresholds(loss: Tensor, valid: Tensor, mean_loss: Tensor, patch_size: int) -> Tensor:
    """tau per pixel [H, W]: max(region mean over valid pixels of the whole batch, mu), mu for empty regions."""
    B, H, W = loss.shape
    P = patch_size
    pad = (0, -W % P, 0, -H % P)  # right, bottom: regions start at the top-left corner
    loss_sum = F.pad(loss, pad).sum(0)  # [Hp, Wp], summed over the batch
    count = F.pad(valid.to(loss.dtype), pad).sum(0)  # [Hp, Wp]
    Rh, Rw = loss_sum.shape[0] // P, loss_sum.shape[1] // P
    region_sum = loss_sum.reshape(Rh, P, Rw, P).sum((1, 3))  # [Rh, Rw]
    region_count = count.reshape(Rh, P, Rw, P).sum((1, 3))  # [Rh, Rw]
    region_mean = region_sum / region_count.clamp(min=1)
    tau = torch.where(region_count > 0, torch.maximum(region_mean, mean_loss), mean_loss)  # [Rh, Rw]
    return tau.repeat_interleave(P, 0).repeat_interleave(P, 1)[:H, :W]  # [H, W]


def normalize_cams(cams: Tensor, present: Sequence[int]) -> Tensor:
    """Min-max normalize each present class's map of cams [C, H, W] to [0, 1] (float32; a constant map
    becomes all 0); absent classes become 0. The normalization `cam_to_label` thresholds."""
    classes = sorted({int(c) for c in present})
    out = torch.zeros(cams.shape, dtype=torch.float32, device=cams.device)  # [C, H, W]
    if classes:
        maps = cams[classes].float()  # [P, H, W]
        lo = maps.amin((1, 2), keepdim=True)
        hi = maps.amax((1, 2), keepdim=True)
        out[classes] = (maps - lo) / (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
    return out


def cam_to_label(cams: Tensor, present: Sequence[int], bg_threshold: float) -> Tensor:
    """CAM label map: dataset ids [H, W] int64 (0 background, c+1 for foreground class c).

    cams [C, H, W] (absent classes already zeroed or not: only `present` classes are read). Each present class's
    map is min-max normalized to [0, 1] (a constant map becomes all 0); background scores `bg_threshold`
    everywhere; each pixel takes the argmax over {background} + present classes. Ties go to background, then to
    the lower class index.
    """
    if cams.ndim != 3:
        raise ValueError(f"cams must be [C, H, W], got shape {tuple(cams.shape)}")
    C, H, W = cams.shape
    classes = sorted({int(c) for c in present})
    if any(c < 0 or c >= C for c in classes):
        raise ValueError(f"present classes must be in [0, {C}), got {list(present)}")
    if not classes:
        return torch.zeros(H, W, dtype=torch.int64, device=cams.device)

    maps = normalize_cams(cams, classes)[classes]  # [P, H, W] in [0, 1]
    background = maps.new_full((1, H, W), float(bg_threshold))
    scores = torch.cat([background, maps])  # [1 + P, H, W]; argmax returns the first maximum: ties -> background
    ids = torch.tensor([0] + [c + 1 for c in classes], dtype=torch.int64, device=cams.device)
    return ids[scores.argmax(0)]
