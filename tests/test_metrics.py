import json
import pickle

import numpy as np
import pytest
import torch

from weaktr.metrics import BackgroundSweep, ConfusionMatrix, average_precision, mean_average_precision, normalize_cams
from weaktr.ops import cam_to_label


def random_segmentation(rng, num_classes, shape, ignore_frac=0.1):
    target = rng.integers(0, num_classes, shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, num_classes, shape))
    target = np.where(rng.random(shape) < ignore_frac, 255, target)
    return pred.astype(np.uint8), target.astype(np.uint8)


def brute_force_matrix(pred, target, num_classes):
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != 255:
            m[t, p] += 1
    return m


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_matches_pixel_loop_and_skips_ignore():
    rng = np.random.default_rng(0)
    pred, target = random_segmentation(rng, 5, (3, 17, 23))
    cm = ConfusionMatrix(5).update(pred, target)
    np.testing.assert_array_equal(cm.matrix, brute_force_matrix(pred, target, 5))
    assert cm.matrix.sum() == (target != 255).sum()


def test_confusion_matrix_accepts_torch_tensors():
    rng = np.random.default_rng(1)
    pred, target = random_segmentation(rng, 4, (9, 11))
    a = ConfusionMatrix(4).update(torch.from_numpy(pred).long(), torch.from_numpy(target))
    b = ConfusionMatrix(4).update(pred, target)
    np.testing.assert_array_equal(a.matrix, b.matrix)


def test_scores_match_definitions_computed_from_pixels():
    rng = np.random.default_rng(2)
    K = 4
    pred, target = random_segmentation(rng, K, (40, 40))
    cm = ConfusionMatrix(K).update(pred, target)
    valid = target != 255
    p, t = pred[valid], target[valid]
    for k in range(K):
        tp = np.sum((p == k) & (t == k))
        assert cm.iou()[k] == pytest.approx(tp / np.sum((p == k) | (t == k)))
        assert cm.precision()[k] == pytest.approx(tp / np.sum(p == k))
        assert cm.recall()[k] == pytest.approx(tp / np.sum(t == k))
    assert cm.pixel_accuracy() == pytest.approx(np.mean(p == t))
    assert cm.miou() == pytest.approx(np.mean(cm.iou()))


def test_miou_skips_classes_absent_from_target_and_prediction():
    target = np.array([0, 0, 1, 1, 3])
    pred = np.array([0, 1, 1, 1, 0])  # class 2 nowhere, class 3 only in target (IoU 0)
    cm = ConfusionMatrix(4).update(pred, target)
    iou = cm.iou()
    assert np.isnan(iou[2])
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[3] == 0
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_merge_equals_single_accumulation_and_survives_pickle():
    rng = np.random.default_rng(3)
    pairs = [random_segmentation(rng, 6, (rng.integers(5, 30), rng.integers(5, 30))) for _ in range(6)]
    whole = ConfusionMatrix(6)
    for p, t in pairs:
        whole.update(p, t)
    workers = [ConfusionMatrix(6), ConfusionMatrix(6)]
    for i, (p, t) in enumerate(pairs):
        workers[i % 2].update(p, t)
    shipped = [pickle.loads(pickle.dumps(w)) for w in workers]
    np.testing.assert_array_equal(shipped[0].merge(shipped[1]).matrix, whole.matrix)
    merged = ConfusionMatrix.from_matrix(workers[0].matrix).merge(workers[1])
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.miou() == whole.miou()


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="pred has ids outside"):
        cm.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="target has ids outside"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="class names"):
        cm.table(["background", "a"])
    assert cm.matrix.sum() == 0  # failed updates left no trace


def test_table_and_dict_report_every_class():
    rng = np.random.default_rng(4)
    pred, target = random_segmentation(rng, 3, (20, 20))
    cm = ConfusionMatrix(3).update(pred, target)
    names = ["background", "cat", "dog"]
    text = cm.table(names)
    assert all(n in text for n in names) and f"{100 * cm.miou():.2f}" in text
    d = json.loads(json.dumps(cm.to_dict(names)))
    assert d["miou"] == pytest.approx(cm.miou())
    assert d["per_class"]["dog"]["iou"] == pytest.approx(cm.iou()[2])
    empty = ConfusionMatrix(3).to_dict(names)
    json.dumps(empty, allow_nan=False)  # undefined scores are None, not NaN
    assert empty["miou"] is None


# ---------------------------------------------------------------- mAP


def brute_force_ap(scores, positive):
    """AP by enumerating every distinct threshold: predicted positive = score >= t."""
    points = []
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = np.sum(predicted & positive)
        points.append((tp / positive.sum(), tp / predicted.sum()))  # (recall, precision)
    ap, prev_recall = 0.0, 0.0
    for recall, precision in points:
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_average_precision_matches_brute_force_with_ties():
    rng = np.random.default_rng(5)
    N, C = 60, 7
    targets = (rng.random((N, C)) < 0.3).astype(int)
    targets[:, 4] = 0  # a class without positives is left out of the mean
    scores = np.round(rng.normal(size=(N, C)) + targets, 1)  # rounding creates ties
    ap = average_precision(scores, targets)
    assert np.isnan(ap[4])
    for c in range(C):
        if c != 4:
            assert ap[c] == pytest.approx(brute_force_ap(scores[:, c], targets[:, c].astype(bool)))
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean([ap[c] for c in range(C) if c != 4]))
    # torch inputs, as a training loop has them
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(
        mean_average_precision(scores, targets)
    )


def test_average_precision_extremes():
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    assert mean_average_precision(targets * 2.0 - 1, targets) == pytest.approx(1.0)  # perfect ranking
    assert mean_average_precision(np.zeros((4, 2)), targets) == pytest.approx(0.5)  # all tied: AP = prevalence
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="binary"):
        mean_average_precision(np.zeros((2, 2)), np.full((2, 2), 2))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        mean_average_precision(np.zeros((2, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------- background sweep


def random_cam_image(rng, C, quantized):
    """Raw CAMs [C, H, W], present classes and a target correlated with the CAMs (some pixels ignored)."""
    H, W = rng.integers(8, 24, 2)
    present = sorted(rng.choice(C, size=rng.integers(1, 4), replace=False).tolist())
    if quantized:  # values k/4 after normalization: exact ties with the thresholds and between classes
        cams = rng.integers(0, 5, (C, H, W)).astype(np.float32)
        for c in present:
            cams[c, 0, 0], cams[c, 0, 1] = 0, 4  # min 0, max 4 -> normalized values exactly k/4
            # normalized to float32(0.3) / float32(0.55): ties with the thresholds only when compared in float32
            cams[c, 0, 2], cams[c, 0, 3] = np.float32(0.3) * 4, np.float32(0.55) * 4
    else:
        cams = rng.gamma(2.0, size=(C, H, W)).astype(np.float32) * 3
    labels = cam_to_label(torch.from_numpy(cams), present, 0.4).numpy()
    noise = rng.integers(0, C + 1, (H, W))
    target = np.where(rng.random((H, W)) < 0.7, labels, noise)
    target = np.where(rng.random((H, W)) < 0.05, 255, target).astype(np.uint8)
    return cams, present, target


@pytest.mark.parametrize("quantized", [False, True])
def test_sweep_matches_cam_to_label_at_every_threshold(quantized):
    rng = np.random.default_rng(6 + quantized)
    C = 5
    thresholds = np.r_[np.arange(0.05, 0.96, 0.05), 0.25, 0.5, 0.75]
    thresholds = np.unique(np.round(thresholds, 10))
    images = [random_cam_image(rng, C, quantized) for _ in range(8)]
    images.append((np.zeros((C, 6, 7), np.float32), [], np.zeros((6, 7), np.uint8)))  # no class present

    sweep = BackgroundSweep(thresholds[::-1], C)  # given unsorted on purpose
    brute = {float(t): ConfusionMatrix(C + 1) for t in thresholds}
    for cams, present, target in images:
        sweep.update(normalize_cams(cams, present), present, target)
        for t, cm in brute.items():
            cm.update(cam_to_label(torch.from_numpy(cams), present, t), target)

    matrices = sweep.confusion_matrices()
    for k, t in enumerate(sweep.thresholds):
        np.testing.assert_array_equal(matrices[k], brute[float(t)].matrix, err_msg=f"threshold {t}")
    curve = sweep.curve()
    assert [t for t, _ in curve] == sorted(brute)
    brute_curve = [(t, cm.miou()) for t, cm in sorted(brute.items())]
    assert curve == brute_curve
    best_t = max(brute_curve, key=lambda tm: tm[1])[0]  # max() keeps the first (lowest t) on ties
    assert sweep.best()[0] == best_t
    assert sweep.best()[1] == brute[best_t].miou()
    np.testing.assert_array_equal(sweep.confusion_matrix(best_t).matrix, brute[best_t].matrix)


def test_normalize_cams_agrees_with_cam_to_label():
    rng = np.random.default_rng(8)
    cams = rng.normal(size=(4, 10, 12)).astype(np.float32)
    cams[2] = 3.0  # constant map -> all 0, as cam_to_label does
    present = [2, 0]
    norm = normalize_cams(torch.from_numpy(cams), present)
    assert norm.dtype == np.float32 and norm.shape == cams.shape
    assert np.all(norm[[1, 3]] == 0) and np.all(norm[2] == 0)
    assert norm[0].min() == 0 and norm[0].max() == 1
    # labels thresholded from the normalized maps reproduce cam_to_label
    t = 0.3
    scores = np.concatenate([np.full((1, 10, 12), t, np.float32), norm[[0, 2]]])
    labels = np.array([0, 1, 3])[scores.argmax(0)]
    np.testing.assert_array_equal(labels, cam_to_label(torch.from_numpy(cams), present, t).numpy())


def test_sweep_merge_equals_single_pass_and_writes_outputs(tmp_path):
    rng = np.random.default_rng(9)
    C, thresholds = 4, [0.2, 0.4, 0.6]
    images = [random_cam_image(rng, C, quantized=False) for _ in range(6)]
    whole = BackgroundSweep(thresholds, C)
    parts = [BackgroundSweep(thresholds, C), BackgroundSweep(thresholds, C)]
    for i, (cams, present, target) in enumerate(images):
        norm = normalize_cams(cams, present)
        whole.update(norm, present, target)
        parts[i % 2].update(torch.from_numpy(norm), present, torch.from_numpy(target))
    shipped = [pickle.loads(pickle.dumps(p)) for p in parts]
    assert shipped[0].merge(shipped[1]).curve() == whole.curve()
    assert parts[0].merge(parts[1]).curve() == whole.curve()
    with pytest.raises(ValueError, match="same thresholds"):
        whole.merge(BackgroundSweep([0.2, 0.5], C))

    rows = whole.csv().strip().splitlines()
    assert rows[0] == "bg_threshold,miou" and len(rows) == 1 + len(thresholds)
    assert float(rows[2].split(",")[1]) == pytest.approx(whole.curve()[1][1], abs=1e-6)
    whole.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicates"):
        BackgroundSweep([0.3, 0.3], 2)
    with pytest.raises(ValueError, match="non-empty"):
        BackgroundSweep([], 2)
    sweep = BackgroundSweep([0.3, 0.5], 2)
    with pytest.raises(ValueError, match=r"norm_cams must be \[C=2"):
        sweep.update(np.zeros((3, 4, 4)), [0], np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="present classes"):
        sweep.update(np.zeros((2, 4, 4)), [2], np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="target has ids outside"):
        sweep.update(np.zeros((2, 4, 4)), [0], np.full((4, 4), 3, np.uint8))
    with pytest.raises(ValueError, match="empty"):
        sweep.best()
    with pytest.raises(ValueError, match="not swept"):
        sweep.confusion_matrix(0.4)
