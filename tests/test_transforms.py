"""Phase-1 and phase-2 transforms and the normalization helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from weaktr.data.shards import Sample
from weaktr.data.transforms import (
    IGNORE_INDEX,
    IMAGENET,
    MEAN_COLOUR,
    CamExample,
    SegExample,
    SegTrainTransform,
    batch_random_erasing,
    cam_eval_transform,
    cam_train_transform,
    multi_hot,
    normalize_batch,
    normalize_image,
    photometric_distortion,
)

COLOURS = np.array([[10, 20, 30], [250, 30, 30], [30, 250, 30], [30, 30, 250]], np.uint8)


def striped_pair(h=50, w=70):
    """An image whose colour encodes its mask: vertical bands of ids 0..3."""
    mask = (np.arange(w)[None, :].repeat(h, 0) * 4 // w).astype(np.uint8)  # [h, w]
    return COLOURS[mask], mask


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """normalize_image undone: [3, H, W] or [B, 3, H, W] -> uint8 [H, W, 3] / [B, H, W, 3] (to read colours back)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return ((tensor * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def test_normalize_denormalize_roundtrip():
    image = np.random.default_rng(0).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    tensor = normalize_image(image, IMAGENET)
    assert tensor.shape == (3, 9, 13) and tensor.dtype == torch.float32
    expected_red = (image[..., 0] / 255 - IMAGENET_DEFAULT_MEAN[0]) / IMAGENET_DEFAULT_STD[0]
    np.testing.assert_allclose(tensor[0].numpy(), expected_red, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(denormalize(tensor), image)
    np.testing.assert_array_equal(denormalize(torch.stack([tensor, tensor])), np.stack([image, image]))
    with pytest.raises(ValueError, match="uint8"):
        normalize_image(image.astype(np.float32), IMAGENET)


def test_multi_hot():
    target = multi_hot([0, 3], 5)
    assert target.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert multi_hot([], 3).sum() == 0
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        multi_hot([5], 5)


@pytest.mark.parametrize("options", [{}, {"auto_augment": "rand-m9-mstd0.5-inc1"}])
def test_cam_train_transform_accepts_numpy_and_pil(options):
    transform = cam_train_transform(32, scale_min=0.3, **options)
    image = np.random.default_rng(0).integers(0, 256, size=(40, 57, 3), dtype=np.uint8)
    for source in (image, Image.fromarray(image)):
        out = transform(source)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8  # normalized on the device, per batch
    outs = torch.stack([transform(image) for _ in range(4)])
    assert not torch.allclose(outs[0], outs[1])  # random crops differ


def test_cam_eval_transform_is_deterministic_resize_and_center_crop():
    image, _ = striped_pair(48, 96)
    transform = cam_eval_transform(32, IMAGENET)
    out = transform(image)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, transform(Image.fromarray(image)))
    # Short side 48 -> 32 and a centre crop of the 64-wide result keeps bands 1 and 2 only.
    colours = denormalize(out)[16, [1, -2]]
    np.testing.assert_allclose(colours, COLOURS[[1, 2]], atol=12)


def test_seg_train_transform_keeps_image_and_mask_aligned():
    random.seed(0)
    image, mask = striped_pair()
    transform = SegTrainTransform(crop_size=(40, 48), scale_range=(0.7, 1.6))
    for _ in range(10):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 40, 48) and out_image.dtype == torch.uint8
        assert out_mask.shape == (40, 48) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
        pixels = out_image.permute(1, 2, 0).numpy().astype(int)  # [h, w, 3]
        # Away from band edges (where bilinear image and nearest mask may blend) colours must match.
        ids = np.pad(out_mask.numpy(), ((0, 0), (2, 2)), mode="edge")
        interior = (ids[:, 2:-2] != IGNORE_INDEX) & np.all([ids[:, 2 + d : ids.shape[1] - 2 + d] == ids[:, 2:-2]
                                                             for d in (-2, -1, 1, 2)], axis=0)
        assert interior.mean() > 0.5
        expected = COLOURS[out_mask.numpy()[interior]].astype(int)
        assert (np.abs(pixels[interior] - expected).max(axis=1) < 40).all()


def test_seg_train_transform_pads_small_images():
    random.seed(1)
    image, mask = striped_pair(20, 24)
    out_image, out_mask = SegTrainTransform(crop_size=64, scale_range=(1.0, 1.0), hflip_prob=0.0)(image, mask)
    assert out_image.shape == (3, 64, 64)
    assert (out_mask[20:, :] == IGNORE_INDEX).all() and (out_mask[:, 24:] == IGNORE_INDEX).all()
    assert (out_mask[:20, :24] != IGNORE_INDEX).all()
    # Image padding is the mean colour (mmseg pads the normalized image with 0).
    assert (out_image[:, 20:, 24:] == torch.tensor(MEAN_COLOUR).view(3, 1, 1)).all()


def test_seg_train_transform_base_size_sets_the_short_side():
    random.seed(2)
    image, mask = striped_pair(50, 100)
    transform = SegTrainTransform(crop_size=400, scale_range=(2.0, 2.0), base_size=100, hflip_prob=0.0)
    _, out_mask = transform(image, mask)
    labelled = (out_mask != IGNORE_INDEX).nonzero()
    assert labelled[:, 0].max() + 1 == 200  # short side 50 -> 100 * 2
    with pytest.raises(ValueError, match="differ in size"):
        transform(image, mask[:10])


def test_loader_examples():
    image, mask = striped_pair()
    sample = Sample("k", image, [0, 2], mask=mask)
    cam = CamExample(cam_eval_transform(32, IMAGENET), num_classes=4)(sample)
    assert cam["image"].shape == (3, 32, 32) and cam["target"].tolist() == [1.0, 0.0, 1.0, 0.0]
    seg = SegExample(SegTrainTransform(32), target="mask")(sample)
    assert seg["image"].shape == (3, 32, 32) and seg["mask"].shape == (32, 32)
    # Phase-2 loaders ship uint8; normalize_batch on the loop's device gives normalize_image's floats.
    batch = torch.stack([seg["image"], seg["image"].flip(-1)])  # uint8 [2, 3, 32, 32]
    expected = torch.stack([normalize_image(np.asarray(im.permute(1, 2, 0)), IMAGENET) for im in batch])
    torch.testing.assert_close(normalize_batch(batch, IMAGENET), expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(expected, IMAGENET)
    with pytest.raises(ValueError, match="no pseudo label map"):
        SegExample(SegTrainTransform(32))(sample)


def test_rand_augment_at_full_magnitude_survives_current_pillow():
    # m10: timm's increasing posterize would keep 0 bits, which Pillow >= 12 rejects (voc12.yaml's DeiT recipe
    # m9 + noise reaches it mid-epoch); three ops per image pick posterize in most of 60 images.
    transform = cam_train_transform(32, auto_augment="rand-m10-n3-mstd0-inc1")
    rng = np.random.default_rng(0)
    for _ in range(60):
        out = transform(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def _seg_train_reference(transform: SegTrainTransform, image: np.ndarray, mask: np.ndarray):
    """The mmseg pipeline written directly: rescale the whole image, crop (the whole of a smaller image), flip,
    pad bottom/right with the mean colour and 255 (same random draws)."""
    height, width = mask.shape
    scale = random.uniform(*transform.scale_range)
    if transform.base_size is not None:
        scale *= transform.base_size / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    top = random.randint(0, max(image.shape[0] - transform.crop_h, 0))
    left = random.randint(0, max(image.shape[1] - transform.crop_w, 0))
    image = image[top : top + transform.crop_h, left : left + transform.crop_w]
    mask = mask[top : top + transform.crop_h, left : left + transform.crop_w]
    if random.random() < transform.hflip_prob:
        image, mask = image[:, ::-1], mask[:, ::-1]
    pad_h, pad_w = transform.crop_h - image.shape[0], transform.crop_w - image.shape[1]
    image = np.stack([np.pad(image[..., c], ((0, pad_h), (0, pad_w)), constant_values=MEAN_COLOUR[c])
                      for c in range(3)], axis=-1)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, mask


@pytest.mark.parametrize("base_size, scale_range", [(None, (0.5, 2.0)), (52, (0.5, 2.0)), (None, (0.2, 0.4))])
def test_seg_train_transform_equals_rescale_then_crop(base_size, scale_range):
    # The transform rescales only the crop window; the result must be the whole-image version's.
    rng = np.random.default_rng(0)
    transform = SegTrainTransform(crop_size=(40, 48), scale_range=scale_range, base_size=base_size)
    for trial in range(12):
        h, w = rng.integers(30, 90, size=2)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 4, size=(h, w), dtype=np.uint8)
        random.seed(trial)
        out_image, out_mask = transform(image, mask)
        random.seed(trial)
        ref_image, ref_mask = _seg_train_reference(transform, image, mask)
        # Float rounding of the box may move a nearest-neighbour sample across a tie to the next source
        # row/column (a row of 48 pixels is 2.5% of the crop); the rest must be identical.
        assert (out_mask.numpy() != ref_mask).mean() < 0.03
        # PIL's fixed-point resampling may round pixels differently for a box than for the whole image.
        diff = np.abs(out_image.permute(1, 2, 0).numpy().astype(int) - ref_image.astype(int))
        assert diff.max() <= 1


def test_seg_train_crop_retries_while_one_class_dominates():
    # A 100 x 100 mask, class 1 on the left 70 columns, class 2 on the right 30; 50-px-wide crops. A crop is
    # "balanced" (no class >= 75 % of it) for about a third of the offsets; mmseg redraws up to 10 times.
    mask = np.ones((100, 100), dtype=np.uint8)
    mask[:, 70:] = 2
    image = np.zeros((100, 100, 3), dtype=np.uint8)

    def balanced_share(transform) -> float:
        random.seed(0)
        shares = [float((transform(image, mask)[1] == 2).float().mean()) for _ in range(200)]
        return float(np.mean([0.25 < share < 0.75 for share in shares]))

    common = dict(crop_size=(100, 50), scale_range=(1.0, 1.0), hflip_prob=0.0)
    assert balanced_share(SegTrainTransform(**common)) < 0.5
    assert balanced_share(SegTrainTransform(**common, cat_max_ratio=0.75)) > 0.9


def test_photometric_distortion_changes_colours_not_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    random.seed(3)
    outputs = [photometric_distortion(image) for _ in range(20)]
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outputs)
    assert sum(not np.array_equal(out, image) for out in outputs) >= 15  # 1 - 1/32 of draws change something
    means = [out.mean() - image.mean() for out in outputs]
    assert min(means) < -3 and max(means) > 3  # both darker and brighter images


def test_batch_random_erasing_erases_normalized_images_independently():
    assert batch_random_erasing(0.0) is None
    images = normalize_batch(torch.full((6, 3, 32, 32), 128, dtype=torch.uint8), IMAGENET)  # flat grey [6, 3, 32, 32]
    torch.manual_seed(0)
    erased = batch_random_erasing(1.0)(images.clone())
    changed = (erased != images).flatten(1).any(1)  # [6]
    assert erased.shape == images.shape and changed.all()
    # Pixel mode fills a rectangle with fresh normal noise: part of each image, different per image.
    fraction = (erased != images).float().mean((1, 2, 3))
    assert ((fraction > 0) & (fraction < 1)).all() and fraction.unique().numel() > 1


def test_device_normalization_matches_timms_cpu_normalization():
    # Training batches are normalized by normalize_batch, evaluation images by timm's transform: the same numbers.
    from timm.data import create_transform

    image = np.random.default_rng(4).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    as_uint8 = create_transform(
        32, is_training=False, crop_pct=1.0, crop_mode="center", interpolation="bicubic", normalize=False
    )(Image.fromarray(image))
    assert as_uint8.dtype == torch.uint8
    torch.testing.assert_close(normalize_batch(as_uint8[None], IMAGENET)[0], cam_eval_transform(32, IMAGENET)(image))
