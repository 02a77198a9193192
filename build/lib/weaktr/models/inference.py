"""Dense inference: sliding window, multi-scale and flip for segmentation models (SPEC.md "Phase 2", recipe),
and the multi-scale + flip CAM pass of the phase-1 model (SPEC.md "From CAMs to pseudo-labels").

The segmentation helpers work with any model that maps normalized images [B, 3, h, w] (its ``normalization``; sides
multiples of its patch size) to per-pixel logits [B, n_cls, h, w], e.g. Segmenter; the CAM pass with WeakTrCAM. The
caller picks the mode (model.eval()) and autocast; these functions only run forwards without autograd and accumulate
in float32. Nothing here needs Ray or the data readers, so bench/gpu_bench.py can time them on a bare GPU machine.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from weaktr import ops
from weaktr.runtime import autocast, unwrap

# Images (flips included) per forward of the CAM pass. WeakTrCAM keeps every block's attention maps for the fusion,
# the pass's largest tensors: DeiT-S at 320x480, scales 1.0 + 1.2, 8 images on a CPU peaked 1.3 GB above the
# model with forwards of 4 against 2.6 GB with 8 and 4.6 GB with 16 (and ran no slower): BENCHMARKS.md.
CAM_FORWARD_BATCH = 4


@torch.no_grad()
def sliding_window_logits(
    model: Callable[[Tensor], Tensor],
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
        crops = torch.cat([padded[:, :, top : top + window, left : left + window]
                           for top, left in chunk])  # [k*B, 3, win, win]
        logits = model(crops).float()  # [k*B, n_cls, win, win], k = len(chunk), window-major
        if logit_sum is None:
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"model returned {logits.shape[1]} classes, expected num_classes={num_classes}")
            logit_sum = logits.new_zeros(B, logits.shape[1], Hp, Wp)
        for i, (top, left) in enumerate(chunk):
            logit_sum[:, :, top : top + window, left : left + window] += logits[i * B : (i + 1) * B]
            count[:, :, top : top + window, left : left + window] += 1
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
    short_side: int | None = None,
    upsample_small: bool = True,
    ensemble_weight: float | None = None,
) -> Tensor:
    """Class probabilities [n_cls, H, W] of one normalized image [3, H, W], as the official Segmenter evaluates.

    Per scale r: the image resized bilinearly so its short side is ``short_side`` x r (mmseg's MultiScaleFlipAug;
    None: the image's own size x r), then, with ``upsample_small``, images whose short side is under the window
    upsampled to it (the official ``resize``; otherwise zero-padded), and with ``flip`` its mirror image too.
    The sliding-window logits are resized to H x W, flipped back, and only then softmaxed; the probabilities are
    averaged over scales and flips. With ``ensemble_weight`` w, the model is called with ``both=True`` and the
    probabilities are (w x softmax(masks before the decoder's last block) + softmax(final masks)) / (1 + w)
    (the official ``--backbone multi``: 0.8; the division changes neither the argmax nor a CRF's result).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}")
    H, W = image.shape[-2:]
    forward = model if ensemble_weight is None else functools.partial(model, both=True)
    probs_sum = None
    for scale in scales:
        factor = scale if short_side is None else short_side * scale / min(H, W)
        size = (max(round(H * factor), 1), max(round(W * factor), 1))
        if upsample_small and min(size) < window:  # short side up to the window, the long side truncated
            size = (int(size[0] * window / min(size)), int(size[1] * window / min(size)))
        x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)  # [1, 3, h_s, w_s]
        if flip:
            x = torch.cat([x, x.flip(-1)])  # [2, 3, h_s, w_s]
        logits = sliding_window_logits(forward, x, window, stride, max_batch=max_batch)  # [1|2, K', h_s, w_s]
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # [1|2, K', H, W]
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        if ensemble_weight is None:
            probs = logits.softmax(dim=1)
        else:
            first, final = logits.chunk(2, dim=1)  # [1|2, K, H, W] each
            probs = (ensemble_weight * first.softmax(dim=1) + final.softmax(dim=1)) / (1 + ensemble_weight)
        probs_sum = probs.sum(0) if probs_sum is None else probs_sum + probs.sum(0)  # [K, H, W]
    return probs_sum / (len(scales) * (2 if flip else 1))  # [K, H, W]


@torch.inference_mode()
def cam_pass(
    model: nn.Module, inputs: Sequence[Sequence[Tensor]], sizes: Sequence[tuple[int, int]], flip: bool = True,
    attention_type: str = "fused", refine: bool = True, classes: Sequence[Sequence[int]] | None = None,
    max_batch: int = CAM_FORWARD_BATCH,
) -> list[Tensor]:
    """Fine CAMs G (or another readout: `read_cam`) summed over scales (and flips): one float32 [C, H_i, W_i] per
    image, at `sizes[i]`, on the model's device (absent classes are not zeroed here); with ``classes``, only the
    maps of classes[i] (in that order), [len(classes[i]), H_i, W_i].

    inputs[s][i] is image i prepared for scale s: normalized [3, h, w], h and w multiples of the patch size (any
    device). Batched: per scale, the images with the same input shape and their flips go through the model
    ``max_batch`` images (flips included) at a time; a forward's attention maps grow with its batch, the pass's
    largest tensors. Each image's flip is added to it at the token grid (flipping and the bilinear upsampling
    commute), and only the kept classes are upsampled, once per scale. Same result as `cam_pass_reference` up to
    float rounding.
    """
    device = next(model.parameters()).device
    per_forward = max(1, max_batch // 2 if flip else max_batch)
    totals: list[Tensor | None] = [None] * len(sizes)
    for scaled in inputs:
        groups: dict[tuple, list[int]] = defaultdict(list)  # input shape -> images with that shape
        for i, x in enumerate(scaled):
            groups[tuple(x.shape)].append(i)
        for members in groups.values():
            for first in range(0, len(members), per_forward):
                chunk = members[first : first + per_forward]
                n = len(chunk)
                batch = torch.stack([scaled[i] for i in chunk]).to(device)  # [n, 3, h, w]
                if flip:
                    batch = torch.cat([batch, batch.flip(-1)])  # [2n, 3, h, w]
                cams = read_cam(model(batch), attention_type, refine)  # [n or 2n, C, h/p, w/p]
                if flip:
                    cams = cams[:n] + cams[n:].flip(-1)  # [n, C, h/p, w/p]
                for j, i in enumerate(chunk):
                    kept = cams[j] if classes is None else cams[j, list(classes[i])]  # [C or P, h/p, w/p]
                    cam = _upsample(kept, sizes[i])  # [C or P, H, W]
                    totals[i] = cam if totals[i] is None else totals[i] + cam
    return totals


def read_cam(out, attention_type: str = "fused", refine: bool = True) -> Tensor:
    """The CAM [B, C, h, w] of a WeakTrCAM output: the fine CAM G by default, or another of the official CAM
    generation's readouts (``ops.attention_cam``; ``pseudo.attention_type`` / ``pseudo.patch_attn_refine``)."""
    return ops.attention_cam(out.coarse_cam, out.fused_attn, attention_type, refine)


@torch.inference_mode()
def cam_pass_reference(
    model: nn.Module, inputs: Sequence[Sequence[Tensor]], sizes: Sequence[tuple[int, int]], flip: bool = True,
    attention_type: str = "fused", refine: bool = True,
) -> list[Tensor]:
    """`cam_pass` the way the WeakTr reference code runs it: one image at a time, one forward per scale (the image
    and its flip). The equivalence and benchmark baseline of `cam_pass`."""
    device = next(model.parameters()).device
    results = []
    for i, size in enumerate(sizes):
        total = None
        for scaled in inputs:
            x = scaled[i][None].to(device)  # [1, 3, h, w]
            if flip:
                x = torch.cat([x, x.flip(-1)])  # [2, 3, h, w]
            cams = read_cam(model(x), attention_type, refine)  # [1 or 2, C, h/p, w/p]
            cam = _upsample(cams[0], size)
            if flip:
                cam = cam + _upsample(cams[1], size).flip(-1)
            total = cam if total is None else total + cam
        results.append(total)
    return results


def _scaled_input(image: np.ndarray, scale: float, patch_size: int, normalization) -> Tensor:
    """uint8 [H, W, 3] -> float [3, h, w] normalized with the model's (mean, std): resized by `scale` (bicubic, as
    the WeakTr reference), then cropped at the top-left to multiples of the patch size (at least one patch per
    side)."""
    # Imported here: weaktr.data pulls in webdataset, which the bare GPU machine of bench/gpu_bench.py lacks.
    from weaktr.data.transforms import normalize_image

    height, width = image.shape[:2]
    size = (max(patch_size, round(width * scale)), max(patch_size, round(height * scale)))  # PIL order (w, h)
    if size != (width, height):
        image = np.array(Image.fromarray(image).resize(size, Image.BICUBIC))
    h, w = size[1] - size[1] % patch_size, size[0] - size[0] % patch_size
    return normalize_image(image[:h, :w], normalization)


def _scaled_inputs(
    images: Sequence[np.ndarray], scales: Sequence[float], patch_size: int, normalization
) -> list[list[Tensor]]:
    """The CAM pass's inputs: [scale][image] normalized float [3, h, w] (see `_scaled_input`)."""
    return [[_scaled_input(np.asarray(image), scale, patch_size, normalization) for image in images]
            for scale in scales]


def multiscale_cams(
    model: nn.Module,
    images: Sequence[np.ndarray],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    patch_size: int = 16,
    reference: bool = False,
    attention_type: str = "fused",
    refine: bool = True,
    classes: Sequence[Sequence[int]] | None = None,
    max_batch: int = CAM_FORWARD_BATCH,
) -> list[Tensor]:
    """Multi-scale (+ flip) fine CAMs G of uint8 [H, W, 3] images, each float32 [C, H, W] at its original size,
    on the model's device: per scale, resize, crop to multiples of `patch_size`, run the model, upsample G
    bilinearly, un-flip, and sum over scales and flips (absent classes are not zeroed here). `attention_type` and
    `refine` choose another readout than G (`read_cam`). With ``classes`` (e.g. each image's present classes),
    only those maps, [len(classes[i]), H, W], are carried to full resolution.

    Batched (`cam_pass`): per scale, the images with the same input grid and their flips go through the model
    ``max_batch`` at a time; bf16 autocast on GPU. With `reference`, the WeakTr reference loop instead
    (`cam_pass_reference`: one image at a time, one forward per scale, float32), the equivalence and benchmark
    baseline; the two agree up to float rounding. The model must be in eval mode.
    """
    device = next(model.parameters()).device
    sizes = [image.shape[:2] for image in images]
    inputs = _scaled_inputs(images, scales, patch_size, unwrap(model).normalization)
    if reference:
        cams = cam_pass_reference(model, inputs, sizes, flip, attention_type, refine)
        return cams if classes is None else [cam[list(kept)] for cam, kept in zip(cams, classes)]
    with autocast(device, enabled=True):
        return cam_pass(model, inputs, sizes, flip, attention_type, refine, classes, max_batch)


def _upsample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] -> float32 [C, H, W], bilinear."""
    return F.interpolate(cam[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets every `stride` pixels, plus a last window flush with the end (size >= window)."""
    return list(range(0, size - window, stride)) + [size - window]
