"""Fully-connected CRF refinement (Kraehenbuehl & Koltun) (SPEC.md, "Dense CRF"), with two backends
(``CRFParams.backend``, the ``crf.backend`` config key):

- ``pydensecrf``: the reference, the densecrf C++ code the official WeakTr calls, one image at a time on one CPU
  core; an optional extra (``pip install 'weaktr[pydensecrf]'``: it needs a C++ compiler);
- ``torch``: the same CRF in PyTorch (``weaktr.crf_torch``), batched, on the CPU or a GPU; always installed;
- ``auto`` (default): pydensecrf where it is installed, torch elsewhere.

Two uses:
- phase 1 pseudo-labels: `crf_refine_labels` refines the CAM label map with a label unary over background +
  the image's present classes only;
- phase 2 evaluation: `crf_refine_probs` refines the segmenter's softmax with a softmax unary;
  `crf_refine_prediction` does so over the classes the prediction contains, as the official evaluation does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

BACKENDS = ("auto", "pydensecrf", "torch")
PYDENSECRF_HINT = "pip install 'weaktr[pydensecrf]' (needs a C++ compiler), or set crf.backend: torch"


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
    backend: str = "auto"  # pydensecrf | torch | auto (see the module docstring)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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


def resolve_backend(params: CRFParams) -> CRFParams:
    """``params`` with ``backend: auto`` made concrete; ValueError (one line) if pydensecrf is asked for and absent."""
    installed = importlib.util.find_spec("pydensecrf") is not None
    if params.backend == "auto":
        return replace(params, backend="pydensecrf" if installed else "torch")
    if params.backend == "pydensecrf" and not installed:
        raise ValueError(f"crf.backend is pydensecrf, which is not installed here: {PYDENSECRF_HINT}")
    return params


def label_unary(compact: np.ndarray, num_labels: int, gt_prob: float) -> np.ndarray:
    """Unary energies float32 [n, H*W] of a label map (compact label indices [H, W]): -log(gt_prob) for the
    pixel's label, -log((1 - gt_prob) / (n - 1)) for the others (pydensecrf's unary_from_labels, no unsure label)."""
    unary = np.full((num_labels, compact.size), -np.log((1.0 - gt_prob) / (num_labels - 1)), dtype=np.float32)
    unary[compact.reshape(-1), np.arange(compact.size)] = -np.log(gt_prob)
    return unary


def softmax_unary(probs: np.ndarray, clip: float = 1e-5) -> np.ndarray:
    """Unary energies float32 [K, H*W] of probabilities [K, H, W]: -log(max(p, clip)) (pydensecrf's
    unary_from_softmax)."""
    return -np.log(np.clip(probs, clip, 1.0)).reshape(probs.shape[0], -1).astype(np.float32)


def mean_field(images: Sequence[np.ndarray], unaries: Sequence[np.ndarray], params: CRFParams,
               device="cpu") -> list[np.ndarray]:
    """Posterior marginals float32 [K_i, H_i*W_i] of images uint8 [H_i, W_i, 3] (checked by `_check_image`) for
    unaries [K_i, H_i*W_i] (negative log-probabilities), with ``params.backend``: pydensecrf one image at a time;
    torch on ``device``, as one batch on a GPU and one image at a time on a CPU (a batch's lattice outgrows the
    CPU's caches: 1.1-2.7x slower per image in bench/crf_bench.py kernel)."""
    params = resolve_backend(params)
    if params.backend == "torch":
        import torch

        from weaktr.crf_torch import mean_field as torch_mean_field

        images = [torch.from_numpy(image).to(device) for image in images]
        unaries = [torch.from_numpy(u).to(device).reshape(len(u), *image.shape[:2])
                   for image, u in zip(images, unaries)]
        batches = [range(len(images))] if torch.device(device).type == "cuda" else [[i] for i in range(len(images))]
        posteriors = [q for batch in batches
                      for q in torch_mean_field([images[i] for i in batch], [unaries[i] for i in batch], params)]
        return [q.reshape(len(q), -1).cpu().numpy() for q in posteriors]

    import pydensecrf.densecrf as dcrf

    posteriors = []
    for image, unary in zip(images, unaries):
        height, width = image.shape[:2]
        crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
        )
        posteriors.append(np.asarray(crf.inference(params.iterations), dtype=np.float32))
    return posteriors


def crf_refine_labels(
    image, labels, present: Sequence[int], params: CRFParams = CRFParams()
) -> np.ndarray:
    """Refine a label map with a dense CRF; the pseudo-label step of phase 1.

    image uint8 [H, W, 3] RGB; labels [H, W] dataset ids (0 background, c+1 for class c); present: the image's
    foreground class indices c. The CRF only chooses among background + present labels. Returns uint8 [H, W]
    dataset ids.
    """
    return crf_refine_label_batch([image], [labels], [present], params)[0]


def crf_refine_label_batch(
    images: Sequence, labels: Sequence, presents: Sequence[Sequence[int]], params: CRFParams = CRFParams(),
    device="cpu",
) -> list[np.ndarray]:
    """`crf_refine_labels` of several images; the torch backend refines them as one batch on ``device``."""
    out: list[np.ndarray] = []
    pending = []  # (position in out, the image's dataset ids [n], the checked image, its unary [n, H*W])
    for image, label_map, present in zip(images, labels, presents, strict=True):
        label_map = np.asarray(label_map)
        if label_map.ndim != 2:
            raise ValueError(f"labels must be [H, W], got shape {label_map.shape}")
        if not np.issubdtype(label_map.dtype, np.integer):
            raise ValueError(f"labels must hold integer dataset ids, got dtype {label_map.dtype}")
        image = _check_image(image, *label_map.shape)
        # compact label space: index k <-> dataset id ids[k], background first
        ids = np.array([0] + sorted({int(c) + 1 for c in present}), dtype=np.int64)  # [n]
        if ids.size > 1 and (ids[1] < 1 or ids[-1] > 254):
            raise ValueError(f"present class indices must be in [0, 253], got {list(present)}")
        compact = np.searchsorted(ids, label_map)  # [H, W]
        unknown = (compact >= ids.size) | (ids[np.minimum(compact, ids.size - 1)] != label_map)
        if unknown.any():
            raise ValueError(
                f"labels contain ids {np.unique(label_map[unknown])[:10].tolist()} that are neither background "
                f"(0) nor a present class + 1 ({ids[1:].tolist()})"
            )
        out.append(label_map.astype(np.uint8))  # only background possible: nothing to refine
        if ids.size > 1:
            pending.append((len(out) - 1, ids, image, label_unary(compact, ids.size, params.gt_prob)))
    if pending:
        posteriors = mean_field([p[2] for p in pending], [p[3] for p in pending], params, device)
        for (position, ids, image, _), posterior in zip(pending, posteriors):
            out[position] = ids[posterior.argmax(0)].reshape(image.shape[:2]).astype(np.uint8)
    return out


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
    return mean_field([image], [softmax_unary(probs)], params)[0].reshape(num_labels, height, width)


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
