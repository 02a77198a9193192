"""Fully-connected CRF refinement (Kraehenbuehl & Koltun) through pydensecrf (SPEC.md, "Dense CRF").

Two uses:
- phase 1 pseudo-labels: `crf_refine_labels` refines the CAM label map with a label unary over background +
  the image's present classes only;
- phase 2 evaluation: `crf_refine_probs` refines the segmenter's softmax with a softmax unary;
  `crf_refine_prediction` does so over the classes the prediction contains, as the official evaluation does.

Pure numpy, CPU only (pydensecrf is single-threaded C++): the pseudo-label pipeline runs it in a CPU actor pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# pydensecrf is imported where a CRF runs: CRFParams is part of the config, which machines without pydensecrf (the
# GPU bench machine) load too.


@dataclass(frozen=True)
class CRFParams:
    """Kernel settings; the defaults are the VOC ones of SPEC.md."""

    gaussian_sxy: float = 4.0  # smoothness kernel: spatial std (px)
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 83.0  # appearance kernel: spatial std (px) ...
    bilateral_srgb: float = 5.0  # ... and colour std (0..255 units)
    bilateral_compat: float = 3.0
    iterations: int = 10  # mean-field steps
    gt_prob: float = 0.7  # confidence of the label unary (crf_refine_labels only)

    def __post_init__(self):
        if not 0 < self.gt_prob < 1:
            raise ValueError(f"gt_prob must be in (0, 1), got {self.gt_prob}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _check_image(image, height: int, width: int) -> np.ndarray:
    """The image as the C-contiguous, writable uint8 [H, W, 3] array pydensecrf's bilateral
    kernel requires (it rejects read-only buffers such as ``np.asarray`` of a PIL image)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (0..255), got dtype {image.dtype}")
    if image.shape != (height, width, 3):
        raise ValueError(f"image must be [H, W, 3] = {(height, width, 3)}, got shape {image.shape}")
    if image.flags.c_contiguous and image.flags.writeable:
        return image
    return np.array(image, order="C")


def _mean_field(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """Posterior marginals [K, H*W] float32 for a unary [K, H*W] (negative log-probabilities)."""
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
    )
    return np.asarray(crf.inference(params.iterations), dtype=np.float32)


def crf_refine_labels(
    image, labels, present: Sequence[int], params: CRFParams = CRFParams()
) -> np.ndarray:
    """Refine a label map with a dense CRF; the pseudo-label step of phase 1.

    image uint8 [H, W, 3] RGB; labels [H, W] dataset ids (0 background, c+1 for class c); present: the image's
    foreground class indices c. The CRF only chooses among background + present labels. Returns uint8 [H, W]
    dataset ids.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integer dataset ids, got dtype {labels.dtype}")
    height, width = labels.shape
    image = _check_image(image, height, width)

    # compact label space: index k <-> dataset id ids[k], background first
    ids = np.array([0] + sorted({int(c) + 1 for c in present}), dtype=np.int64)  # [n]
    if ids.size > 1 and (ids[1] < 1 or ids[-1] > 254):
        raise ValueError(f"present class indices must be in [0, 253], got {list(present)}")
    compact = np.searchsorted(ids, labels)  # [H, W]
    unknown = (compact >= ids.size) | (ids[np.minimum(compact, ids.size - 1)] != labels)
    if unknown.any():
        raise ValueError(
            f"labels contain ids {np.unique(labels[unknown])[:10].tolist()} that are neither background (0) "
            f"nor a present class + 1 ({ids[1:].tolist()})"
        )
    if ids.size == 1:  # only background possible: nothing to refine
        return labels.astype(np.uint8)

    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(compact, ids.size, gt_prob=params.gt_prob, zero_unsure=False)  # [n, H*W]
    posterior = _mean_field(image, unary, params)  # [n, H*W]
    return ids[posterior.argmax(0)].reshape(height, width).astype(np.uint8)


def crf_refine_probs(image, probs, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine per-pixel class probabilities with a dense CRF (softmax unary); phase-2 evaluation.

    image uint8 [H, W, 3] RGB; probs float [K, H, W] softmax over the K = C + 1 dataset ids. Returns the CRF
    posterior, float32 [K, H, W]; the refined label map is `.argmax(0)`. (`params.gt_prob` is not used.)
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [K, H, W], got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
        raise ValueError(f"probs must be finite floating-point probabilities, got dtype {probs.dtype}")
    num_labels, height, width = probs.shape
    image = _check_image(image, height, width)
    if num_labels == 1:  # a single label: the CRF cannot change anything
        return np.ones_like(probs, dtype=np.float32)

    from pydensecrf.utils import unary_from_softmax

    unary = unary_from_softmax(probs)  # [K, H*W] float32, -log(clip(p))
    return _mean_field(image, unary, params).reshape(num_labels, height, width)


def crf_refine_prediction(image, probs, params: CRFParams = CRFParams()) -> np.ndarray:
    """The official phase-2 CRF (``segm/eval/make_crf.py``): dataset ids uint8 [H, W] from probs float [K, H, W].

    Only the classes that win some pixel of ``probs.argmax(0)`` take part: their probability rows are the
    softmax unary of the CRF, and each pixel gets the class of its largest posterior among them."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [K, H, W], got shape {probs.shape}")
    present = np.unique(probs.argmax(0))  # [P] dataset ids, sorted
    posterior = crf_refine_probs(image, probs[present], params)  # [P, H, W]
    return present[posterior.argmax(0)].astype(np.uint8)
