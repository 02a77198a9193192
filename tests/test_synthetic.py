"""The built-in synthetic dataset: determinism, mask/label consistency, boundary band, sizes,
colour not being a shortcut, and idempotent writing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from weaktr.data.shards import Manifest
from weaktr.data.stream import iter_samples
from weaktr.data.synthetic import CLASS_NAMES, IGNORE, SyntheticSpec, generate_sample, iter_synthetic, write_synthetic

SPEC = SyntheticSpec(num_classes=6, num_train=40, num_val=10, min_size=64, max_size=112, seed=3, samples_per_shard=8)


@pytest.fixture(scope="module")
def samples():
    return list(iter_synthetic(SPEC, 0, 240))


def test_deterministic_given_seed():
    a = generate_sample(np.random.default_rng(7), SPEC, 7)
    b = generate_sample(np.random.default_rng(7), SPEC, 7)
    c = generate_sample(np.random.default_rng(8), SPEC, 7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.labels == b.labels and a.key == b.key
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_masks_agree_with_labels(samples):
    for sample in samples:
        ids = set(np.unique(sample.mask).tolist())
        assert sample.labels, sample.key
        assert ids - {0, IGNORE} == {c + 1 for c in sample.labels}
        assert all(0 <= c < SPEC.num_classes for c in sample.labels)
        assert sample.mask.dtype == np.uint8 and sample.mask.shape == sample.image.shape[:2]
        # No label for an object too small to see: each class covers its minimum share outside the band.
        for c in sample.labels:
            assert (sample.mask == c + 1).mean() >= SPEC.min_visible_fraction, (sample.key, c)
    counts = np.bincount([c for s in samples for c in s.labels], minlength=SPEC.num_classes)
    assert (counts > 0).all()
    assert any(len(s.labels) > 1 for s in samples) and any(len(s.labels) == 1 for s in samples)


def test_boundary_band_separates_regions_and_is_thin(samples):
    for sample in samples[:60]:
        mask = sample.mask.astype(int)
        # Any two 4-neighbours with different labels must have the band between them.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            differ = (a != b) & (a != IGNORE) & (b != IGNORE)
            assert not differ.any(), sample.key
        band = mask == IGNORE
        assert band.any()
        # Thin: every band pixel has a labelled pixel within 2 px (Chebyshev).
        labelled = np.pad(~band, 2)
        near = np.zeros_like(band)
        for dy in range(5):
            for dx in range(5):
                near |= labelled[dy : dy + band.shape[0], dx : dx + band.shape[1]]
        assert near[band].all(), sample.key
        assert band.mean() < 0.2


def test_images_are_non_square_and_varied_in_size(samples):
    shapes = {s.image.shape[:2] for s in samples}
    assert all(SPEC.min_size <= h <= SPEC.max_size and SPEC.min_size <= w <= SPEC.max_size for h, w in shapes)
    assert sum(h != w for h, w in shapes) > len(shapes) // 2
    assert len(shapes) > 20


def test_mean_colour_does_not_identify_the_class(samples):
    """Colours are drawn per object, so a nearest-class-mean-colour classifier is near chance."""
    features, classes = [], []
    for sample in samples:
        for c in sample.labels:
            features.append(sample.image[sample.mask == c + 1].mean(axis=0))
            classes.append(c)
    features, classes = np.array(features), np.array(classes)
    half = len(classes) // 2
    centroids = np.stack([features[:half][classes[:half] == c].mean(axis=0) for c in range(SPEC.num_classes)])
    distances = np.linalg.norm(features[half:, None] - centroids[None], axis=2)  # [n, C]
    accuracy = (distances.argmin(axis=1) == classes[half:]).mean()
    assert accuracy < 0.4, accuracy  # chance is 1/6
    within_class_spread = np.mean([features[classes == c].std(axis=0).mean() for c in range(SPEC.num_classes)])
    assert within_class_spread > 25


def test_textures_differ_between_classes(samples):
    """What does identify a class is its texture: horizontal vs vertical stripes have their
    intensity variation along different axes."""
    ratios = {0: [], 1: []}
    for sample in samples:
        for c in (0, 1):
            region = sample.mask == c + 1
            if c in sample.labels and region.sum() > 400:
                grey = sample.image.astype(float).mean(axis=2)
                vertical = np.abs(np.diff(grey, axis=0))[region[1:] & region[:-1]].mean()
                horizontal = np.abs(np.diff(grey, axis=1))[region[:, 1:] & region[:, :-1]].mean()
                ratios[c].append(vertical / horizontal)
    assert CLASS_NAMES[0] == "hstripes" and CLASS_NAMES[1] == "vstripes"
    assert np.median(ratios[0]) > 1.5 and np.median(ratios[1]) < 1 / 1.5


def test_write_synthetic_is_idempotent_and_regenerates_on_change(tmp_path):
    manifest = write_synthetic(tmp_path, SPEC)
    assert manifest.classes == list(CLASS_NAMES[: SPEC.num_classes])
    assert manifest.splits["train"].num_samples == 40 and manifest.splits["val"].num_samples == 10
    assert len(manifest.shard_paths("train")) == 5
    train_keys = {s.key for s in iter_samples(manifest.shard_paths("train"))}
    val_keys = {s.key for s in iter_samples(manifest.shard_paths("val"))}
    assert len(train_keys) == 40 and not train_keys & val_keys

    mtimes = {p: os.stat(p).st_mtime_ns for p in manifest.shard_paths("train")}
    again = write_synthetic(tmp_path, SPEC)
    assert again.to_dict() == manifest.to_dict()
    assert {p: os.stat(p).st_mtime_ns for p in again.shard_paths("train")} == mtimes

    changed = SyntheticSpec(**{**SPEC.__dict__, "num_train": 24})
    regenerated = write_synthetic(tmp_path, changed)
    assert regenerated.splits["train"].num_samples == 24
    assert Manifest.load(tmp_path).meta["synthetic_spec"]["num_train"] == 24


def test_spec_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="min_size"):
        SyntheticSpec(min_size=200, max_size=100)
