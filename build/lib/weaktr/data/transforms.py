"""Image transforms for both phases, and the normalization of their output (each model's own ``normalization``).

Phase 1 (classification) wraps timm's DeiT-style ``create_transform``. Phase 2 (segmentation)
transforms image and mask together as the official Segmenter pipeline (mmseg) does: random rescale, crop (retried
while one class fills more than ``cat_max_ratio`` of it), flip, photometric distortion, padding the image with the
mean colour and the mask with 255 (ignored). Both training transforms stop at uint8; the loops normalize whole
batches on their device (:func:`normalize_batch`). Evaluation and inference normalize per image
(:func:`normalize_image`, :func:`cam_eval_transform`).
"""

from __future__ import annotations

import functools
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing

from weaktr.data.shards import IGNORE as IGNORE_INDEX, Sample

# (mean, std) per RGB channel of inputs in 0..1: each model's is its ``normalization`` attribute
# (``models.vit.input_normalization``: its backbone's, or ImageNet's).
Normalization = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET: Normalization = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
# mmseg pads after normalizing, with 0: the mean colour in pixels (ImageNet's, the official Segmenter's DeiT).
MEAN_COLOUR = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)  # (124, 116, 104)


def normalize_image(image: np.ndarray, normalization: Normalization) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], (x / 255 - mean) / std."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch.from_numpy warns on those
        image = image.copy()
    return _normalized(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), normalization)  # [3, H, W]


def normalize_batch(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """uint8 [B, 3, H, W] (on any device) -> float32, normalized as :func:`normalize_image` does.

    Training loaders (both phases) ship uint8 batches and the loops normalize them on their device: a quarter of
    the bytes between loader processes, and the per-pixel float work off the CPU cores that decode.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    return _normalized(images, normalization)  # [B, 3, H, W]


def _normalized(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the images' device."""
    mean, std = _mean_std_on(images.device, tuple(map(tuple, normalization)))
    return (images.float().div_(255) - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std_on(device: torch.device, normalization: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied to a GPU once, not in every training step.
    mean, std = normalization
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def multi_hot(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class indices -> float [C] with ones at ``labels``."""
    target = torch.zeros(num_classes)
    if len(labels):
        index = torch.as_tensor(list(labels), dtype=torch.long)
        if index.min() < 0 or index.max() >= num_classes:
            raise ValueError(f"labels {list(labels)} outside 0..{num_classes - 1}")
        target[index] = 1.0
    return target


def _to_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")


class _PilTransform:
    """A torchvision/timm transform that also accepts uint8 [H, W, 3] arrays."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(_to_pil(image))

    def __repr__(self) -> str:
        return repr(self.transform)


def cam_train_transform(
    img_size: int,
    *,
    scale_min: float = 0.08,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    auto_augment: Optional[str] = None,
    interpolation: str = "bicubic",
):
    """DeiT-style training transform (timm): random resized crop, flip, colour jitter (off when
    ``auto_augment`` is set, as in timm), optional RandAugment string (e.g. "rand-m9-mstd0.5-inc1").
    PIL image or uint8 array -> uint8 [3, S, S]: like timm's prefetcher, the training loop normalizes
    whole batches on its device (:func:`normalize_batch`) and then applies random erasing
    (:func:`batch_random_erasing`), which works on normalized values."""
    if auto_augment and auto_augment.startswith("rand") and "mmax" not in auto_augment:
        # timm's increasing posterize keeps 4 - int(4 * m / 10) bits, 0 at magnitude 10 (m9 + noise reaches it),
        # which Pillow >= 12 rejects mid-epoch; capping the magnitude at 9 keeps at least 1 bit.
        auto_augment += "-mmax9"
    transform = create_transform(
        img_size, is_training=True, scale=(scale_min, 1.0), ratio=ratio, hflip=hflip,
        color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation, normalize=False,
    )
    return _PilTransform(transform)


def batch_random_erasing(probability: float, mode: str = "pixel", device: torch.device | str = "cpu"):
    """timm's random erasing (DeiT's ``re_prob``) for normalized batches [B, 3, H, W] on ``device``, each image
    erased independently with ``probability``; None when the probability is 0."""
    if probability <= 0:
        return None
    return RandomErasing(probability, mode=mode, device=device)


def cam_eval_transform(
    img_size: int, normalization: Normalization, *, crop_pct: float = 1.0, crop_mode: str = "center",
    interpolation: str = "bicubic",
):
    """timm's resize-short-side + center crop (``crop_mode="squash"`` keeps the whole image but
    distorts it: on the synthetic demo it scored 0.77 val mAP against the center crop's 0.80)."""
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
        mean=normalization[0], std=normalization[1],
    )
    return _PilTransform(transform)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SegTrainTransform:
    """Joint image + mask augmentation for phase 2 (the official Segmenter's mmseg pipeline, `pascal_voc.py`).

    Random rescale by ``s ~ U(scale_range)`` (of ``base_size`` for the short side when given, else of the image
    itself); a random ``crop_size`` window, redrawn up to 10 times while one class covers ``cat_max_ratio`` or more
    of its labelled pixels (mmseg ``RandomCrop``; 1.0: never); horizontal flip; with ``photometric``, mmseg's
    ``PhotoMetricDistortion`` on the image; padding (bottom/right) to the crop size with the mean colour (mask
    255). Returns (image uint8 [3, h, w], mask int64 [h, w]); the loop normalizes whole batches on its device
    (:func:`normalize_batch`). Randomness comes from Python's ``random`` (seeded per DataLoader worker by PyTorch).
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[int] = None,
        hflip_prob: float = 0.5,
        cat_max_ratio: float = 1.0,
        photometric: bool = False,
    ):
        self.crop_h, self.crop_w = _pair(crop_size)
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.scale_range = scale_range
        self.base_size = base_size
        self.hflip_prob = hflip_prob
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
        height, width = mask.shape
        scale = random.uniform(*self.scale_range)
        if self.base_size is not None:
            scale *= self.base_size / min(height, width)
        size_w, size_h = max(1, round(width * scale)), max(1, round(height * scale))  # the rescaled image
        step_y, step_x = height / size_h, width / size_w  # source pixels per rescaled pixel
        for _ in range(10 if self.cat_max_ratio < 1 else 1):
            # Crop window in the rescaled image padded (bottom/right) to at least the crop size.
            top = random.randint(0, max(size_h, self.crop_h) - self.crop_h)
            left = random.randint(0, max(size_w, self.crop_w) - self.crop_w)
            # Rescale only what the window shows of the image (PIL's resize box): the same pixels as rescaling
            # the whole image and cropping, without rescaling up to 4x the crop's area for nothing.
            shown_h, shown_w = min(size_h, top + self.crop_h) - top, min(size_w, left + self.crop_w) - left
            box = (left * step_x, top * step_y, (left + shown_w) * step_x, (top + shown_h) * step_y)
            shown_mask = np.asarray(Image.fromarray(mask).resize((shown_w, shown_h), Image.NEAREST, box=box))
            if self.cat_max_ratio >= 1 or _dominant_share(shown_mask) < self.cat_max_ratio:
                break
        shown_image = np.asarray(Image.fromarray(image).resize((shown_w, shown_h), Image.BILINEAR, box=box))
        if random.random() < self.hflip_prob:  # the crop's shown part; the padding stays at the bottom/right
            shown_image, shown_mask = shown_image[:, ::-1], shown_mask[:, ::-1]
        if self.photometric:
            shown_image = photometric_distortion(shown_image)
        out_image = np.empty((self.crop_h, self.crop_w, 3), dtype=np.uint8)
        out_image[:] = MEAN_COLOUR
        out_mask = np.full((self.crop_h, self.crop_w), IGNORE_INDEX, dtype=np.uint8)
        out_image[:shown_h, :shown_w] = shown_image
        out_mask[:shown_h, :shown_w] = shown_mask
        image_chw = torch.from_numpy(np.ascontiguousarray(out_image.transpose(2, 0, 1)))  # uint8 [3, h, w]
        return image_chw, torch.from_numpy(out_mask.astype(np.int64))  # [h, w]


def _dominant_share(mask: np.ndarray) -> float:
    """Share of the labelled (non-255) pixels taken by the commonest class; 1.0 with fewer than two classes
    (mmseg ``RandomCrop`` keeps a crop only when ``len(cnt) > 1 and max(cnt) / sum(cnt) < cat_max_ratio``)."""
    counts = np.bincount(mask.reshape(-1), minlength=256)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return float(counts.max() / counts.sum()) if counts.size > 1 else 1.0


def photometric_distortion(
    image: np.ndarray, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on a uint8 [H, W, 3] image: each step with probability 1/2 -- brightness
    + U(-32, 32); contrast x U(0.5, 1.5) (before or after the colour steps, at random); saturation x U(0.5, 1.5);
    hue + randint(-18, 18) in OpenCV's 180-step hue circle. Every step clips to [0, 255] and rounds down to uint8,
    as mmseg does. Hue and saturation go through PIL's HSV (hue in 256 steps; the shift is scaled to it)."""

    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if random.randint(0, 1):
        image = convert(image, beta=random.uniform(-brightness_delta, brightness_delta))
    contrast_first = random.randint(0, 1)  # mmseg's `mode`
    if contrast_first and random.randint(0, 1):
        image = convert(image, alpha=random.uniform(*contrast_range))
    if random.randint(0, 1):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        hsv[..., 1] = convert(hsv[..., 1], alpha=random.uniform(*saturation_range))
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if random.randint(0, 1):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        shift = round(random.randint(-hue_delta, hue_delta) * 256 / 180)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first and random.randint(0, 1):
        image = convert(image, alpha=random.uniform(*contrast_range))
    return image


class CamExample:
    """``make_loader`` transform for phase 1: Sample -> {"image": [3, S, S], "target": multi-hot [C]} (the image as
    the image transform gives it: uint8 from :func:`cam_train_transform`, float from :func:`cam_eval_transform`).
    A class rather than a closure so it pickles into spawned DataLoader workers."""

    def __init__(self, image_transform, num_classes: int):
        self.image_transform, self.num_classes = image_transform, num_classes

    def __call__(self, sample: Sample) -> dict:
        return {"image": self.image_transform(sample.image), "target": multi_hot(sample.labels, self.num_classes)}


class SegExample:
    """``make_loader`` transform for phase 2: Sample -> {"image": uint8 [3, h, w], "mask": int64 [h, w]},
    training on ``sample.pseudo`` (default) or ``sample.mask``."""

    def __init__(self, joint_transform, target: str = "pseudo"):
        if target not in ("pseudo", "mask"):
            raise ValueError(f"target must be 'pseudo' or 'mask', got {target!r}")
        self.joint_transform, self.target = joint_transform, target

    def __call__(self, sample: Sample) -> dict:
        label_map = getattr(sample, self.target)
        if label_map is None:
            raise ValueError(f"sample {sample.key!r} has no {self.target} label map (was it generated?)")
        image, mask = self.joint_transform(sample.image, label_map)
        return {"image": image, "mask": mask}
