"""PASCAL VOC 2012 (+ SBD "train_aug") to shards, and the VOC palette used for every label PNG.

Expected layout (the standard VOCdevkit/VOC2012 folder)::

    JPEGImages/{id}.jpg
    SegmentationClass/{id}.png          palette PNGs: index = class id, 255 = boundary/ignore
    ImageSets/Segmentation/{train,val}.txt
    SegmentationClassAug/{id}.png       optional, SBD-augmented masks (grayscale ids)

Image labels come from the masks (ids other than 0 and 255) or, when given, from
``cls_labels.npy`` (a pickled dict id -> 20-dim 0/1 vector, the MCTformer/WeakTr file).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from weaktr.data.convert import CONVERT_WORKERS, Unusable, read_each, write_converted
from weaktr.data.images import read_image
from weaktr.data.shards import IGNORE, MAX_SIDE, SAMPLES_PER_SHARD, Encoded, Manifest, Sample, Skipped

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette() -> list[int]:
    """The VOC colormap as a flat [r, g, b] * 256 list: bits of the id interleaved into the top
    bits of r, g, b (1 -> (128, 0, 0), 2 -> (0, 128, 0), ..., 255 -> (224, 224, 192))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [r, g, b]
    return palette


def save_palette_png(path: str | os.PathLike, label_map: np.ndarray) -> None:
    """Write a uint8 [H, W] id map (0 bg, c+1, 255 ignore) as a VOC-coloured palette PNG."""
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Image ids from a split file. Accepts plain ids ("2007_000032") and the SBD train_aug
    form ("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png")."""
    ids = []
    with open(path) as f:
        for line in f:
            if line.strip():
                first = os.path.basename(line.split()[0])
                ids.append(os.path.splitext(first)[0])
    return ids


def load_cls_labels(path: str | os.PathLike, num_classes: int = len(VOC_CLASSES)) -> dict[str, list[int]]:
    """``cls_labels.npy`` (dict id -> 0/1 vector) as id -> sorted class indices."""
    table = np.load(path, allow_pickle=True).item()
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a pickled dict id -> label vector, got {type(table).__name__}")
    labels = {}
    for key, vector in table.items():
        vector = np.asarray(vector).reshape(-1)
        if vector.size != num_classes:
            raise ValueError(f"{path}: entry {key!r} has {vector.size} values, expected {num_classes}")
        labels[str(key)] = np.flatnonzero(vector > 0).tolist()
    return labels


def read_label_png(path: str, num_classes: int) -> np.ndarray:
    """A mask PNG ("P" or "L") as uint8 ids, checked to be in 0..num_classes or 255."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: mask must be a palette or grayscale PNG, got mode {img.mode}")
        mask = np.array(img, dtype=np.uint8)
    bad = sorted(set(np.unique(mask).tolist()) - set(range(num_classes + 1)) - {IGNORE})
    if bad:
        raise ValueError(f"{path}: mask holds ids {bad}, expected 0..{num_classes} or {IGNORE}")
    return mask


def labels_from_mask(mask: np.ndarray) -> list[int]:
    """Class indices present in an id mask (ids other than 0 and 255, minus one)."""
    return [int(i) - 1 for i in np.unique(mask) if i not in (0, IGNORE)]


def _voc_samples(
    root: str, ids: Sequence[str], mask_dirs: Sequence[str], cls_labels: Optional[dict[str, list[int]]], *,
    progress: str, reading: dict,
) -> Iterator[Encoded | Skipped]:
    def read(image_id: str) -> Sample:
        image_path = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
        if not os.path.exists(image_path):
            raise Unusable(f"listed but missing: {image_path}")
        image, data = read_image(image_path)
        mask_path = next((p for d in mask_dirs if os.path.exists(p := os.path.join(d, f"{image_id}.png"))), None)
        mask = read_label_png(mask_path, len(VOC_CLASSES)) if mask_path else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise Unusable(f"mask {mask_path} is {mask.shape}, the image is {image.shape[:2]}")
        if cls_labels is not None:
            if image_id not in cls_labels:
                raise Unusable("no entry in cls_labels")
            labels = cls_labels[image_id]
        elif mask is not None:
            labels = labels_from_mask(mask)
        else:
            raise Unusable(f"no mask in {list(mask_dirs)} and no cls_labels to label it")
        if not labels:
            raise Unusable("no foreground class")
        return Sample(key=image_id, image=image, labels=labels, mask=mask, image_bytes=data)

    return read_each(ids, read, source=lambda image_id: image_id, source_dirs=[root], progress=progress, **reading)


def convert_voc(
    voc_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "val"),
    aug_list: Optional[str | os.PathLike] = None,
    aug_mask_dir: Optional[str | os.PathLike] = None,
    cls_labels: Optional[str | os.PathLike] = None,
    name: str = "voc12",
    samples_per_shard: int = SAMPLES_PER_SHARD,
    max_shard_bytes: int = 256 * 2**20,
    max_side: Optional[int] = MAX_SIDE,
    workers: int = CONVERT_WORKERS,
    use_ray: bool = False,
) -> Manifest:
    """Write ``splits`` (from ImageSets/Segmentation/{split}.txt) and, with ``aug_list``, a
    "train_aug" split whose masks come from ``aug_mask_dir`` (default SegmentationClassAug/
    when present), falling back to SegmentationClass/. ``workers``, ``use_ray``: ``read_each``."""
    started = time.perf_counter()
    root = os.fspath(voc_root)
    labels = load_cls_labels(cls_labels) if cls_labels is not None else None
    seg_dir = os.path.join(root, "SegmentationClass")
    reading = {"image_format": "jpg", "max_side": max_side, "workers": workers, "use_ray": use_ray}
    split_samples = {}
    for split in splits:
        list_path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.exists(list_path):
            raise FileNotFoundError(f"VOC split list not found: {list_path}")
        split_samples[split] = _voc_samples(root, read_id_list(list_path), [seg_dir], labels,
                                            progress=f"{name}/{split}", reading=reading)
    if aug_list is not None:
        aug_dir = os.fspath(aug_mask_dir) if aug_mask_dir is not None else os.path.join(root, "SegmentationClassAug")
        split_samples["train_aug"] = _voc_samples(root, read_id_list(aug_list), [aug_dir, seg_dir], labels,
                                                  progress=f"{name}/train_aug", reading=reading)
    return write_converted(
        out_dir, name, VOC_CLASSES, split_samples, meta={"source": "voc", "voc_root": os.path.abspath(root)},
        started=started,
        samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes, max_side=max_side,
    )


# Label maps shown over images (weaktr predict's overlays, the report's panels): half image, half class colour.
OVERLAY_ALPHA = 0.5


def colorize(labels: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """uint8 [H, W, 3] colours of a dataset-id map."""
    return np.asarray(palette, dtype=np.uint8).reshape(256, 3)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """The label colours blended over the foreground pixels of ``image``; background shows the image as is."""
    blended = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colorize(labels, palette)
    return np.where((labels > 0)[..., None], blended, image).round().astype(np.uint8)
