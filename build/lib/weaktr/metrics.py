"""Evaluation metrics: segmentation confusion matrix / mIoU, multi-label mAP, background-threshold sweep.

Everything here is numpy and cheap to pickle, so cluster workers can accumulate locally and the driver merges:
a `ConfusionMatrix` is one int64 [K, K] array, a `BackgroundSweep` one int64 [T+1, K, K] histogram.

Conventions (SPEC.md): masks hold dataset ids, 0 background, c+1 for foreground class c, 255 ignored; K = C + 1.
mIoU comes from a confusion matrix accumulated over the whole split, never from a mean of per-image scores.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Optional, Sequence

import numpy as np
import torch

from weaktr import ops


def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy array or a (possibly CUDA, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (the ratio is undefined there, not zero)."""
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nan_to_none(values: np.ndarray) -> list:
    return [None if math.isnan(v) else float(v) for v in values]


# --------------------------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Pixel confusion matrix over `num_classes` labels (dataset ids 0..num_classes-1, background included).

    `matrix[i, j]` counts pixels with target i predicted as j (rows: ground truth, columns: prediction).
    Pixels whose target is `ignore_index` are skipped; any other out-of-range value is an error.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [K, K]

    @classmethod
    def from_matrix(cls, matrix, ignore_index: int | None = 255) -> "ConfusionMatrix":
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [K, K], got shape {matrix.shape}")
        if not np.issubdtype(matrix.dtype, np.integer) or (matrix < 0).any():
            raise ValueError(f"matrix must hold non-negative integer counts, got dtype {matrix.dtype}")
        cm = cls(matrix.shape[0], ignore_index)
        cm.matrix = matrix.astype(np.int64, copy=True)
        return cm

    def update(self, pred, target) -> "ConfusionMatrix":
        """Add one prediction / ground-truth pair (same shape, integer ids; numpy or torch; any shape)."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
        for name, a in (("pred", pred), ("target", target)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
        pred = pred.reshape(-1).astype(np.int64)  # int64 before k*K + j: uint8 would overflow
        target = target.reshape(-1).astype(np.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        K = self.num_classes
        for name, a in (("target", target), ("pred", pred)):
            if a.size and (a.min() < 0 or a.max() >= K):
                bad = np.unique(a[(a < 0) | (a >= K)])[:10].tolist()
                raise ValueError(
                    f"{name} has ids outside [0, {K}) (ignore_index={self.ignore_index}): {bad}"
                )
        self.matrix += np.bincount(target * K + pred, minlength=K * K).reshape(K, K)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another worker's counts into this one (in place); returns self."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            raise ValueError(
                f"can only merge a ConfusionMatrix with num_classes={self.num_classes}, got {other!r}"
            )
        self.matrix += other.matrix
        return self

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())})"

    # --- scores (NaN for a class where the ratio is undefined) ---

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix)

    def iou(self) -> np.ndarray:
        """Per-class IoU [K] = TP / (TP + FP + FN); NaN for a class absent from both target and prediction."""
        tp = self.true_positives
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return _safe_divide(tp, union)

    def miou(self) -> float:
        """Mean IoU over the classes that occur in the target or the prediction.

        A class that appears in neither has an undefined IoU (0/0) and is left out rather than counted as 0 or 1,
        so evaluating a subset of a split (e.g. the synthetic set, or a smoke run) is not dragged down by classes
        it never contains. A class that is only predicted (false positives) counts with IoU 0.
        """
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")

    def precision(self) -> np.ndarray:
        """Per-class precision [K] = TP / (TP + FP); NaN for a class never predicted."""
        return _safe_divide(self.true_positives, self.matrix.sum(0))

    def recall(self) -> np.ndarray:
        """Per-class recall [K] = TP / (TP + FN); NaN for a class absent from the target."""
        return _safe_divide(self.true_positives, self.matrix.sum(1))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.true_positives.sum() / total) if total else float("nan")

    # --- reporting ---

    def _check_names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [str(k) for k in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"need {self.num_classes} class names (background first), got {len(class_names)}"
            )
        return [str(n) for n in class_names]

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class IoU / precision / recall in percent, then mIoU and pixel accuracy."""
        names = self._check_names(class_names)
        width = max(12, *(len(n) for n in names))

        def pct(v: float) -> str:
            return f"{100 * v:8.2f}" if not math.isnan(v) else f"{'-':>8}"

        lines = [f"{'class':<{width}} {'IoU':>8} {'prec':>8} {'recall':>8}"]
        for name, i, p, r in zip(names, self.iou(), self.precision(), self.recall()):
            lines.append(f"{name:<{width}} {pct(i)} {pct(p)} {pct(r)}")
        lines.append(f"{'mIoU':<{width}} {pct(self.miou())}")
        lines.append(f"{'pixel acc':<{width}} {pct(self.pixel_accuracy())}")
        return "\n".join(lines)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-friendly summary (fractions in [0, 1]; None where undefined)."""
        names = self._check_names(class_names)
        miou, acc = self.miou(), self.pixel_accuracy()
        return {
            "miou": None if math.isnan(miou) else miou,
            "pixel_accuracy": None if math.isnan(acc) else acc,
            "num_pixels": int(self.matrix.sum()),
            "per_class": {
                name: {"iou": i, "precision": p, "recall": r}
                for name, i, p, r in zip(
                    names, _nan_to_none(self.iou()), _nan_to_none(self.precision()), _nan_to_none(self.recall())
                )
            },
        }


# --------------------------------------------------------------------------------------------------------------
# Multi-label mAP (phase-1 training metric)
# --------------------------------------------------------------------------------------------------------------


def _check_multilabel(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    scores = _to_numpy(scores).astype(np.float64)
    targets = _to_numpy(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must both be [N, C], got shapes {scores.shape} and {targets.shape}"
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be binary (0/1) multi-hot labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return scores, targets.astype(bool)


def _average_precision_1d(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, high to low (no interpolation).

    Tied scores form one threshold: they enter the ranking together. Same definition as
    sklearn.metrics.average_precision_score.
    """
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct score
    tp = np.cumsum(positive)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision(scores, targets) -> np.ndarray:
    """Per-class AP [C] of multi-label scores [N, C] against 0/1 targets [N, C]; NaN for classes without positives."""
    scores, targets = _check_multilabel(scores, targets)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            ap[c] = _average_precision_1d(scores[:, c], targets[:, c])
    return ap


def mean_average_precision(scores, targets) -> float:
    """Multi-label mAP: mean of per-class AP over the classes with at least one positive in `targets`."""
    ap = average_precision(scores, targets)
    if np.isnan(ap).all():
        raise ValueError("mAP is undefined: no class has a positive example in targets")
    return float(np.nanmean(ap))


# --------------------------------------------------------------------------------------------------------------
# CAMs -> labels, and the background-threshold sweep
# --------------------------------------------------------------------------------------------------------------


def _present_classes(present: Sequence[int], num_classes: int) -> list[int]:
    """Sorted, de-duplicated foreground class indices, as weaktr.ops.cam_to_label reads them."""
    classes = sorted({int(c) for c in present})
    if any(c < 0 or c >= num_classes for c in classes):
        raise ValueError(f"present classes must be in [0, {num_classes}), got {list(present)}")
    return classes


def normalize_cams(cams, present: Sequence[int]) -> np.ndarray:
    """`weaktr.ops.normalize_cams` for numpy or torch cams [C, H, W] -> float32 numpy [C, H, W], so that
    thresholding these maps gives the same labels as `weaktr.ops.cam_to_label`."""
    cams = torch.as_tensor(_to_numpy(cams))
    if cams.ndim != 3:
        raise ValueError(f"cams must be [C, H, W], got shape {tuple(cams.shape)}")
    return ops.normalize_cams(cams, _present_classes(present, cams.shape[0])).numpy()


def parse_sweep(spec: Optional[str], key: str = "sweep") -> Optional[list[float]]:
    """"START:STOP:STEP" (STOP included) -> thresholds, e.g. "0.30:0.60:0.01" -> [0.30, 0.31, ..., 0.60]; None or ""
    -> None. A malformed spec is a ValueError naming ``key`` (the config key it came from)."""
    if not spec:
        return None
    try:
        start, stop, step = (float(part) for part in spec.split(":"))
    except ValueError:
        raise ValueError(f"{key} must be 'START:STOP:STEP' (e.g. 0.30:0.60:0.01), got {spec!r}") from None
    if not (0 <= start <= stop <= 1 and step > 0):
        raise ValueError(f"{key} {spec!r}: need 0 <= START <= STOP <= 1 and STEP > 0")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + k * step, 6) for k in range(count)]


class BackgroundSweep:
    """mIoU of CAM labels for many background thresholds at once, accumulated in one pass over the CAMs.

    thresholds: the background scores t to evaluate; num_classes: foreground classes C (the CAMs' first axis);
    the confusion matrices are over the K = C + 1 dataset ids.

    For a pixel with foreground argmax a and max score m, cam_to_label gives a + 1 if m > t else 0 (ties go to
    background). So with the thresholds sorted, the pixel is foreground exactly for the first n = #{t_k < m}
    of them. The state is therefore one histogram over (n, target, argmax id) [T+1, K, K]; the T confusion
    matrices follow from suffix / prefix sums over n (`confusion_matrices`). Scores and thresholds are compared
    in float32, as cam_to_label does.
    """

    def __init__(self, thresholds: Sequence[float], num_classes: int, ignore_index: int | None = 255):
        t = np.asarray(thresholds, dtype=np.float64)
        if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all():
            raise ValueError(f"thresholds must be a non-empty sequence of finite numbers, got {thresholds!r}")
        if np.unique(t).size != t.size:
            raise ValueError(f"thresholds contain duplicates: {thresholds!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.thresholds = np.sort(t)  # [T] ascending
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        K = self.num_classes + 1
        self.histogram = np.zeros((t.size + 1, K, K), dtype=np.int64)  # [T+1, K(target), K(argmax id)]

    def update(self, norm_cams, present: Sequence[int], target) -> "BackgroundSweep":
        """Add one image.

        norm_cams [C, H, W]: normalized CAMs (`normalize_cams`); only the `present` classes are read.
        present: the image's foreground class indices. target [H, W]: ground-truth dataset ids (255 ignored).
        """
        cams, target = _to_numpy(norm_cams), _to_numpy(target)
        if cams.ndim != 3 or cams.shape[0] != self.num_classes:
            raise ValueError(f"norm_cams must be [C={self.num_classes}, H, W], got shape {cams.shape}")
        if target.shape != cams.shape[1:]:
            raise ValueError(f"target must be [H, W] = {cams.shape[1:]}, got shape {target.shape}")
        if not np.issubdtype(target.dtype, np.integer):
            raise ValueError(f"target must hold integer dataset ids, got dtype {target.dtype}")
        classes = _present_classes(present, self.num_classes)

        target = target.reshape(-1).astype(np.int64)  # [HW]
        if classes:
            maps = cams[classes].astype(np.float32).reshape(len(classes), -1)  # [P, HW]
            best = maps.argmax(0)  # first maximum: ties -> lower class index, as in cam_to_label
            max_score = np.take_along_axis(maps, best[None], 0)[0]  # [HW]
            fg_id = np.asarray(classes, dtype=np.int64)[best] + 1  # [HW] dataset ids
            # number of thresholds strictly below the score = thresholds for which the pixel is foreground
            num_fg = np.searchsorted(self.thresholds.astype(np.float32), max_score, side="left")  # [HW]
        else:  # nothing present: background at every threshold
            fg_id = np.zeros_like(target)
            num_fg = np.zeros_like(target)

        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, fg_id, num_fg = target[keep], fg_id[keep], num_fg[keep]
        K = self.num_classes + 1
        if target.size and (target.min() < 0 or target.max() >= K):
            bad = np.unique(target[(target < 0) | (target >= K)])[:10].tolist()
            raise ValueError(f"target has ids outside [0, {K}) (ignore_index={self.ignore_index}): {bad}")
        index = (num_fg * K + target) * K + fg_id
        self.histogram += np.bincount(index, minlength=self.histogram.size).reshape(self.histogram.shape)
        return self

    def merge(self, other: "BackgroundSweep") -> "BackgroundSweep":
        """Add another worker's sweep (same thresholds and classes) into this one (in place); returns self."""
        if (
            not isinstance(other, BackgroundSweep)
            or other.num_classes != self.num_classes
            or not np.array_equal(other.thresholds, self.thresholds)
        ):
            raise ValueError("can only merge a BackgroundSweep with the same thresholds and num_classes")
        self.histogram += other.histogram
        return self

    def confusion_matrices(self) -> np.ndarray:
        """[T, K, K]: the confusion matrix at each threshold (ascending order)."""
        # Pixels with n > k are foreground at threshold k (keep their argmax column) ...
        suffix = np.cumsum(self.histogram[::-1], axis=0)[::-1]  # suffix[k] = sum_{n >= k}
        foreground = suffix[1:]  # [T, K, K]: sum_{n > k}
        # ... the rest are background: all their counts go to column 0.
        background = np.cumsum(self.histogram.sum(2), axis=0)[:-1]  # [T, K]: sum_{n <= k}, per target
        matrices = foreground.copy()
        matrices[:, :, 0] += background
        return matrices

    def confusion_matrix(self, threshold: float) -> ConfusionMatrix:
        """The confusion matrix at one of the swept thresholds."""
        k = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-12))
        if k.size == 0:
            raise ValueError(f"threshold {threshold} was not swept; thresholds are {self.thresholds.tolist()}")
        return ConfusionMatrix.from_matrix(self.confusion_matrices()[k[0]], self.ignore_index)

    def curve(self) -> list[tuple[float, float]]:
        """[(t, mIoU)] for every threshold, ascending t."""
        return [
            (float(t), ConfusionMatrix.from_matrix(m, self.ignore_index).miou())
            for t, m in zip(self.thresholds, self.confusion_matrices())
        ]

    def best(self) -> tuple[float, float]:
        """(t, mIoU) with the highest mIoU; the lowest such t on ties."""
        curve = self.curve()
        mious = np.array([m for _, m in curve])
        if np.isnan(mious).all():
            raise ValueError("no pixels accumulated: the sweep is empty")
        return curve[int(np.nanargmax(mious))]

    def csv(self) -> str:
        """The curve as CSV text: a ``bg_threshold,miou`` header, then one row per threshold."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["bg_threshold", "miou"])
        for t, miou in self.curve():
            writer.writerow([f"{t:.6g}", f"{miou:.6f}"])
        return text.getvalue()

    def plot(self, path, title: str = "CAM mIoU vs background threshold") -> None:
        """Save the mIoU curve, best threshold marked, as an image (format from the file extension)."""
        # A bare Figure renders with Agg and touches no global pyplot state: safe in headless workers.
        from matplotlib.figure import Figure

        ts, mious = zip(*self.curve())
        best_t, best_miou = self.best()
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(ts, [100 * m for m in mious], marker="o", markersize=3)
        ax.axvline(best_t, color="gray", linestyle="--", linewidth=1)
        ax.annotate(
            f"t={best_t:.3g}: {100 * best_miou:.2f}", (best_t, 100 * best_miou),
            textcoords="offset points", xytext=(5, 5),
        )
        ax.set_xlabel("background threshold t")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
