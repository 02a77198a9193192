"""Dense inference for segmentation models: sliding window, multi-scale and flip (SPEC.md "Phase 2", recipe).

Works with any model that maps ImageNet-normalized images [B, 3, h, w] (sides multiples of its patch size) to
per-pixel logits [B, n_cls, h, w], e.g. Segmenter. The caller picks the mode (model.eval()) and autocast;
these functions only run forwards under torch.no_grad() and accumulate in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: Tensor,
    window: int = 480,
    stride: int = 320,
    num_classes: int | None = None,
    max_batch: int = 8,
) -> Tensor:
    """Logits [B, n_cls, H, W] of images [B, 3, H, W] (any H, W), averaged over overlapping window crops.

    Images smaller than the window are zero-padded at the bottom/right (zero = the mean colour after
    normalization) up to the window size, so the model always sees window x window crops (window must be a
    multiple of the model's patch size). Windows start every `stride` pixels and the last one is flush with the
    bottom/right edge, as in Segmenter. Each pixel's logits are the mean over the windows that cover it.
    Crops of up to `max_batch` images go through the model at once. num_classes, when given, is checked
    against the model's output.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(image.shape)}")
    if window < 1 or not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}")
    B, _, H, W = image.shape
    padded = F.pad(image, (0, max(window - W, 0), 0, max(window - H, 0)))  # [B, 3, Hp, Wp], Hp >= window
    Hp, Wp = padded.shape[-2:]
    corners = [(top, left) for top in _window_starts(Hp, window, stride) for left in _window_starts(Wp, window, stride)]

    logit_sum = None  # [B, n_cls, Hp, Wp], allocated once the class count is known
    count = padded.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)  # windows covering each pixel
    windows_per_call = max(1, max_batch // B)
    for first in range(0, len(corners), windows_per_call):
        chunk = corners[first : first + windows_per_call]
        crops = torch.cat([padded[:, :, t : t + window, l : l + window] for t, l in chunk])  # [k*B, 3, win, win]
        logits = model(crops).float()  # [k*B, n_cls, win, win], k = len(chunk), window-major
        if logit_sum is None:
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"model returned {logits.shape[1]} classes, expected num_classes={num_classes}")
            logit_sum = logits.new_zeros(B, logits.shape[1], Hp, Wp)
        for i, (t, l) in enumerate(chunk):
            logit_sum[:, :, t : t + window, l : l + window] += logits[i * B : (i + 1) * B]
            count[:, :, t : t + window, l : l + window] += 1
    return (logit_sum / count)[:, :, :H, :W]  # [B, n_cls, H, W]


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    window: int = 480,
    stride: int = 320,
    max_batch: int = 8,
) -> Tensor:
    """Class probabilities [n_cls, H, W] of one normalized image [3, H, W].

    Softmax of the sliding-window logits, averaged over every scale (image resized bilinearly by that factor)
    and, with flip, over the original and the horizontally flipped image (flipped back); each prediction is
    resized back to H x W before averaging.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}")
    H, W = image.shape[-2:]
    probs_sum = None
    for scale in scales:
        size = (max(round(H * scale), 1), max(round(W * scale), 1))
        x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)  # [1, 3, h_s, w_s]
        if flip:
            x = torch.cat([x, x.flip(-1)])  # [2, 3, h_s, w_s]
        logits = sliding_window_logits(model, x, window, stride, max_batch=max_batch)  # [1 or 2, n_cls, h_s, w_s]
        probs = logits.softmax(dim=1)
        if flip:
            probs = torch.cat([probs[:1], probs[1:].flip(-1)])
        probs = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False).sum(0)  # [n_cls, H, W]
        probs_sum = probs if probs_sum is None else probs_sum + probs
    return probs_sum / (len(scales) * (2 if flip else 1))  # [n_cls, H, W]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets every `stride` pixels, plus a last window flush with the end (size >= window)."""
    return list(range(0, size - window, stride)) + [size - window]
