"""COCO 2014 instance annotations to shards (semantic masks from the instances, or the official class_labels PNGs).

Expected layout::

    train2014/COCO_train2014_*.jpg   val2014/COCO_val2014_*.jpg
    annotations/instances_{train,val}2014.json
    voc_format/class_labels/*.png    (optional: the official data preparation's semantic masks)

The 80 categories are mapped to class indices 0..79 in sorted category-id order (or, with ``official_ids``, the
official 90-class layout). Each instance's mask is pycocotools' (``COCO.annToMask``: polygons, uncompressed RLE
for crowds, compressed RLE), and an image's instances are painted as the official data preparation
(``data/parse_coco.py``) paints them: in the order the annotation file lists them, the first instance to cover a
pixel keeping it. With ``class_labels`` the masks are read from those PNGs instead. Images without annotations
have no image-level label and are left out.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from weaktr.data.convert import CONVERT_WORKERS, Unusable, read_each, write_converted
from weaktr.data.images import read_image
from weaktr.data.shards import IGNORE, MAX_SIDE, SAMPLES_PER_SHARD, Encoded, Manifest, Sample, Skipped

log = logging.getLogger(__name__)


def coco2014_splits(root: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """The standard COCO 2014 split -> (image dir, instances JSON) under ``root``."""
    root = os.fspath(root)
    return {
        split: (os.path.join(root, f"{split}2014"), os.path.join(root, "annotations", f"instances_{split}2014.json"))
        for split in ("train", "val")
    }


# The official WeakTr layout: one class per category id 1..90, the ten ids COCO 2014 never uses included
# (evaluation.py `categories_coco`), so class index = id - 1 and segmentation class = id.
COCO_UNUSED_IDS = {12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror",
                   68: "window", 69: "desk", 71: "door", 83: "blender"}
COCO_CLASSES = (  # the 80 used categories, in id order
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def official_coco_classes() -> list[str]:
    """The 90 class names of the official layout (category ids 1..90)."""
    used = iter(COCO_CLASSES)
    return [COCO_UNUSED_IDS[i] if i in COCO_UNUSED_IDS else next(used) for i in range(1, 91)]


def category_table(
    coco: dict, path: str = "annotations", official_ids: bool = False
) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> class index, and the class names: sorted id order (80 classes for COCO 2014), or with
    ``official_ids`` the official WeakTr layout (index = id - 1, the 90 names of ``official_coco_classes``)."""
    if "categories" not in coco or not coco["categories"]:
        raise ValueError(f"{path}: no 'categories'")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    if not official_ids:
        return {c["id"]: i for i, c in enumerate(categories)}, [c["name"] for c in categories]
    names = official_coco_classes()
    for c in categories:
        if not 1 <= c["id"] <= 90 or names[c["id"] - 1] != c["name"]:
            raise ValueError(f"{path}: category {c['id']} {c['name']!r} is not COCO 2014's (official_ids layout)")
    return {c["id"]: c["id"] - 1 for c in categories}, names


def instance_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """One instance's boolean [H, W] mask as pycocotools draws it (``COCO.annToMask``). ``Unusable`` if it cannot be
    that image's: an RLE of another size, or uncompressed run lengths that do not add up to the image (pycocotools
    would read past them)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]; fewer than 3 points cover nothing
        polygons = [[float(v) for v in polygon] for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        if list(segmentation["size"]) != [height, width]:
            raise Unusable(f"RLE of size {segmentation['size']}, image is {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed (COCO's crowds)
            if sum(counts) != height * width:
                raise Unusable(f"RLE covers {sum(counts)} pixels, image has {height * width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def rasterize(annotations: list[dict], height: int, width: int, category_index: dict[int, int]) -> np.ndarray:
    """Semantic id mask uint8 [H, W] (0 background, c+1 class c) from one image's instances, as the official data
    preparation paints them: in the order given (the annotation file's), the first instance to cover a pixel
    keeping it."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        region = instance_mask(ann["segmentation"], height, width) & (mask == 0)
        mask[region] = category_index[ann["category_id"]] + 1
    return mask


def class_labels_png(class_labels: str, file_name: str) -> str:
    """Where the official data preparation put an image's mask: ``<class_labels>/<id>.png`` for
    ``COCO_train2014_<id>.jpg`` (it keeps the name's last part), else ``<class_labels>/<image name>.png``."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    official = os.path.join(class_labels, stem.split("_")[-1] + ".png")
    return official if os.path.exists(official) else os.path.join(class_labels, stem + ".png")


def class_labels_lookup(category_index: dict[int, int]) -> np.ndarray:
    """Pixel value of an official class_labels PNG -> semantic id (class + 1; 0 and 255 kept), -1 for an id that
    is no category: the identity in the official 90-class layout (class c + 1 is category id c + 1)."""
    lookup = np.full(256, -1, dtype=np.int16)
    lookup[0], lookup[IGNORE] = 0, IGNORE
    for category_id, index in category_index.items():
        lookup[category_id] = index + 1
    return lookup


def read_class_labels(path: str, height: int, width: int, lookup: np.ndarray) -> np.ndarray:
    """An official class_labels PNG (0 background, a category id per object pixel, 255 ignore) as a semantic id
    mask through ``class_labels_lookup``. ``Unusable`` if missing, of another size or holding an unknown id."""
    if not os.path.exists(path):
        raise Unusable(f"no class_labels mask: {path}")
    with Image.open(path) as png:
        ids = np.array(png)
    if ids.shape != (height, width):
        raise Unusable(f"class_labels mask {path} is {ids.shape}, the image {(height, width)}")
    mask = lookup[ids]
    if (mask < 0).any():
        raise Unusable(f"class_labels mask {path} holds category ids {sorted(np.unique(ids[mask < 0]).tolist())}, "
                       "not in 'categories'")
    return mask.astype(np.uint8)


def _load_annotations(annotation_path: str) -> dict:
    with open(annotation_path) as f:
        coco = json.load(f)
    for key in ("images", "categories"):
        if key not in coco:
            raise ValueError(f"{annotation_path}: missing key '{key}'")
    return coco


def _coco_samples(
    image_dir: str, annotation_path: str, classes: list[str], with_masks: bool, loaded: dict, official_ids: bool,
    *, class_labels: Optional[str], progress: str, reading: dict,
) -> Iterator[Encoded | Skipped]:
    """One split's samples; its JSON is loaded only when the split is written (one at a time)."""
    coco = loaded.pop(annotation_path, None) or _load_annotations(annotation_path)
    category_index, names = category_table(coco, annotation_path, official_ids)
    lookup = class_labels_lookup(category_index)  # once per split, not per image
    if names != classes:
        raise ValueError(f"{annotation_path}: categories differ from the first split's")
    image_ids = {info["id"] for info in coco["images"]}
    by_image = defaultdict(list)
    for ann in coco.get("annotations", []):
        if ann.get("image_id") not in image_ids:
            yield Skipped(f"annotation {ann.get('id')}", f"image_id {ann.get('image_id')} is not in 'images'")
            continue
        by_image[ann["image_id"]].append(ann)

    # An item carries its own annotations: a Ray task is sent its batch's, not the split's whole index.
    def read(item: tuple[dict, list[dict]]) -> Sample:
        info, annotations = item
        unknown = sorted({a["category_id"] for a in annotations} - set(category_index))
        if unknown:  # the image's mask would be missing those objects: not a sample to train or score on
            raise Unusable(f"annotations with category ids {unknown}, not in 'categories'")
        path = os.path.join(image_dir, info["file_name"])
        if not os.path.exists(path):
            raise Unusable(f"listed in {annotation_path} but missing: {path}")
        image, data = read_image(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise Unusable(f"image is {image.shape[:2]}, annotations say {(info['height'], info['width'])}")
        labels = sorted({category_index[a["category_id"]] for a in annotations})
        height, width = info["height"], info["width"]
        if not with_masks:
            mask = None
        elif class_labels is not None:
            mask = read_class_labels(class_labels_png(class_labels, info["file_name"]), height, width, lookup)
        else:
            mask = rasterize(annotations, height, width, category_index)
        key = os.path.splitext(os.path.basename(info["file_name"]))[0].replace(".", "_")
        return Sample(key=key, image=image, labels=labels, mask=mask, image_bytes=data)

    images = sorted(coco["images"], key=lambda i: i["id"])
    annotated = [(info, by_image[info["id"]]) for info in images if by_image.get(info["id"])]
    del coco, by_image  # the items hold what is still needed
    yield from read_each(annotated, read, source=lambda item: item[0].get("file_name", f"image {item[0].get('id')}"),
                         source_dirs=[image_dir, *([class_labels] if class_labels else [])], progress=progress,
                         **reading)
    unannotated = len(images) - len(annotated)  # COCO's images without objects: nothing to learn from, no failure
    if unannotated:
        log.info("%s: left out %d images without annotations", annotation_path, unannotated)


def convert_coco(
    out_dir: str | os.PathLike,
    splits: dict[str, tuple[str, str]],
    *,
    name: str = "coco14",
    with_masks: bool = True,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    max_shard_bytes: int = 256 * 2**20,
    official_ids: bool = False,
    max_side: Optional[int] = MAX_SIDE,
    workers: int = CONVERT_WORKERS,
    use_ray: bool = False,
    class_labels: Optional[str] = None,
) -> Manifest:
    """Write each split ``name -> (image_dir, instances_json)`` (see :func:`coco2014_splits`). Classes are the
    annotations' categories in id order (80), or with ``official_ids`` the official WeakTr layout of 90 classes,
    one per category id (``category_table``): what official COCO checkpoints (90 class tokens, 91 segmentation
    classes) need. ``class_labels``: a folder of the official data preparation's semantic masks
    (``voc_format/class_labels``), read instead of painting the instances (``read_class_labels``).
    ``workers``, ``use_ray``: ``read_each``."""
    started = time.perf_counter()
    if not splits:
        raise ValueError("no COCO splits given")
    for split, (image_dir, annotation_path) in splits.items():
        for path in (image_dir, annotation_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"COCO split '{split}': not found: {path}")
    if class_labels is not None and not os.path.isdir(class_labels):
        raise FileNotFoundError(f"class_labels: not found: {class_labels}")
    # The class list must be known before writing: take it from the first split's JSON and keep
    # that JSON for its split, so no more than one split's annotations are in memory at a time.
    first_annotations = next(iter(splits.values()))[1]
    loaded = {first_annotations: _load_annotations(first_annotations)}
    _, classes = category_table(loaded[first_annotations], first_annotations, official_ids)
    reading = {"image_format": "jpg", "max_side": max_side, "workers": workers, "use_ray": use_ray}
    split_samples = {
        split: _coco_samples(image_dir, annotation_path, classes, with_masks, loaded, official_ids,
                             class_labels=class_labels, progress=f"{name}/{split}", reading=reading)
        for split, (image_dir, annotation_path) in splits.items()
    }
    return write_converted(
        out_dir, name, classes, split_samples, meta={"source": "coco"}, started=started,
        samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes, max_side=max_side,
    )
