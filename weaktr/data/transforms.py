"""Image transforms for both phases; the one place that knows the ImageNet mean/std.

Phase 1 (classification) wraps timm's DeiT-style ``create_transform``. Phase 2 (segmentation)
transforms image and mask together: random rescale, crop (padding the image with 0 and the mask
with 255, i.e. ignored), flip. Both training transforms stop at uint8; the loops normalize whole
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

from weaktr.data.shards import Sample

IGNORE_INDEX = 255
_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], ImageNet-normalized."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch.from_numpy warns on those
        image = image.copy()
    return _normalized(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))  # [3, H, W]


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (on any device) -> float32, ImageNet-normalized as :func:`normalize_image` does.

    Training loaders (both phases) ship uint8 batches and the loops normalize them on their device: a quarter of
    the bytes between loader processes, and the per-pixel float work off the CPU cores that decode.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    return _normalized(images)  # [B, 3, H, W]


def _normalized(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the images' device."""
    mean, std = _mean_std_on(images.device)
    return (images.float().div_(255) - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied to a GPU once, not in every training step.
    return _MEAN.to(device), _STD.to(device)


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: [3, H, W] or [B, 3, H, W] -> uint8 [H, W, 3] / [B, H, W, 3]."""
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W], got {tuple(tensor.shape)}")
    image = tensor.detach().float().cpu() * _STD + _MEAN
    image = (image * 255).round().clamp_(0, 255).to(torch.uint8)
    return image.movedim(-3, -1).numpy()


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
    img_size: int, *, crop_pct: float = 1.0, crop_mode: str = "center", interpolation: str = "bicubic"
):
    """timm's resize-short-side + center crop (``crop_mode="squash"`` keeps the whole image but
    distorts it: on the synthetic demo it scored 0.77 val mAP against the center crop's 0.80)."""
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )
    return _PilTransform(transform)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SegTrainTransform:
    """Joint image + mask augmentation for phase 2.

    Random rescale by ``s ~ U(scale_range)`` (of ``base_size`` for the short side when given,
    else of the image itself), pad to at least ``crop_size`` (image 0, mask 255), random crop,
    horizontal flip. Returns (image uint8 [3, h, w], mask int64 [h, w]); the loop normalizes whole batches on
    its device (:func:`normalize_batch`).
    Randomness comes from Python's ``random`` (seeded per DataLoader worker by PyTorch).
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[int] = None,
        hflip_prob: float = 0.5,
    ):
        self.crop_h, self.crop_w = _pair(crop_size)
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.scale_range = scale_range
        self.base_size = base_size
        self.hflip_prob = hflip_prob

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
        height, width = mask.shape
        scale = random.uniform(*self.scale_range)
        if self.base_size is not None:
            scale *= self.base_size / min(height, width)
        size_w, size_h = max(1, round(width * scale)), max(1, round(height * scale))  # the rescaled image
        # Crop window in the rescaled image padded (bottom/right) to at least the crop size.
        top = random.randint(0, max(size_h, self.crop_h) - self.crop_h)
        left = random.randint(0, max(size_w, self.crop_w) - self.crop_w)
        # Rescale only what the window shows of the image (PIL's resize box): the same pixels as rescaling
        # the whole image and cropping, without rescaling up to 4x the crop's area for nothing.
        shown_h, shown_w = min(size_h, top + self.crop_h) - top, min(size_w, left + self.crop_w) - left
        step_y, step_x = height / size_h, width / size_w  # source pixels per rescaled pixel
        box = (left * step_x, top * step_y, (left + shown_w) * step_x, (top + shown_h) * step_y)
        out_image = np.zeros((self.crop_h, self.crop_w, 3), dtype=np.uint8)  # padding: 0 / ignored
        out_mask = np.full((self.crop_h, self.crop_w), IGNORE_INDEX, dtype=np.uint8)
        out_image[:shown_h, :shown_w] = Image.fromarray(image).resize((shown_w, shown_h), Image.BILINEAR, box=box)
        out_mask[:shown_h, :shown_w] = Image.fromarray(mask).resize((shown_w, shown_h), Image.NEAREST, box=box)
        if random.random() < self.hflip_prob:
            out_image, out_mask = out_image[:, ::-1], out_mask[:, ::-1]
        image_chw = torch.from_numpy(np.ascontiguousarray(out_image.transpose(2, 0, 1)))  # uint8 [3, h, w]
        return image_chw, torch.from_numpy(out_mask.astype(np.int64))  # [h, w]


def seg_eval_transform(image: np.ndarray, mask: Optional[np.ndarray] = None):
    """Normalize only (evaluation runs on whole images): image -> float [3, H, W]; with a mask,
    returns (image, mask int64 [H, W])."""
    tensor = normalize_image(image)
    if mask is None:
        return tensor
    return tensor, torch.from_numpy(np.asarray(mask).astype(np.int64))


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
