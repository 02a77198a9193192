"""WebDataset shards + a JSON manifest: the on-disk format, encoding and decoding samples, and writing datasets.

A dataset is a directory holding ``manifest.json`` and tar shards. Inside a shard a sample is
``{key}.jpg|png`` (RGB), ``{key}.labels.json`` (sorted foreground class indices),
``{key}.mask.png`` (optional ground truth, "L" PNG: 0 background, c+1 for class c, 255 ignore)
and ``{key}.pseudo.png`` (optional pseudo-label, same encoding). Reading and rank-aware streaming for DDP are in
``weaktr.data.stream``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from weaktr import storage
from weaktr.data.images import load_rgb
from weaktr.storage import TMP_SUFFIX

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"  # beside the manifest: one {"split", "source", "reason"} per skipped item
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
LABEL_MAPS = ("mask", "pseudo")  # optional per-pixel maps a sample may carry
IGNORE = 255  # the label maps' "not labelled" id
# The converters store no image longer than this (``downscale``): VOC and COCO images (at most 500 and 640 px) are
# kept as they are, while a phone photo's 4032 x 3024 would give the pseudo-label pass's CAMs 47k patch tokens,
# an attention matrix of ~9 GB per head at scale 1.0.
MAX_SIDE = 1024
SAMPLES_PER_SHARD = 500  # the converters' shards: ~50 MB of VOC JPEGs, 21 shards for VOC's train_aug


class DataError(RuntimeError):
    """The data cannot be used: too many broken samples, too few shards, bad manifest..."""


class ManifestError(DataError):
    """A manifest that is missing or malformed."""


class SampleDecodeError(DataError):
    """One sample's bytes cannot be turned into a :class:`Sample`."""


class Failure(NamedTuple):
    """One sample (or whole shard, key "") that could not be read."""

    url: str
    key: str
    reason: str


@dataclass
class Sample:
    key: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    labels: list[int]  # sorted foreground class indices 0..C-1
    mask: Optional[np.ndarray] = None  # uint8 [H, W]: 0 bg, c+1, 255 ignore
    pseudo: Optional[np.ndarray] = None  # uint8 [H, W], same encoding as mask
    # The original encoded file (jpg/png). When set, writers store these bytes as-is instead of
    # re-encoding `image`: converters keep VOC/COCO JPEGs bit-exact and skip a slow re-encode.
    image_bytes: Optional[bytes] = field(default=None, repr=False)


class Skipped(NamedTuple):
    """A source item a converter could not turn into a sample; ``write_dataset`` lists it in failures.jsonl."""

    source: str  # what the user would look for: a file name, an image or annotation id
    reason: str


class Encoded(NamedTuple):
    """A sample as a shard stores it (``encode_for_shard``): what the converters' readers hand the writer, since a
    decoded image is several times its JPEG (500 x 375: 562 KB decoded, tens of KB as JPEG) on the way back
    from a Ray task."""

    key: str
    labels: list[int]
    record: dict  # encode_sample's {"__key__", "jpg"|"png", "labels.json", ...}
    downscaled: bool  # stored smaller than its source (``downscale``)


# --------------------------------------------------------------------------- manifest


@dataclass
class SplitInfo:
    shards: list[str]  # file names relative to the manifest's directory
    num_samples: int
    shard_sizes: list[int]  # samples per shard, same order as `shards`


@dataclass
class Manifest:
    name: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    root: str = "."  # directory holding manifest.json; not stored in the file
    meta: dict = field(default_factory=dict)  # free-form provenance (e.g. the synthetic spec)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read ``path`` (a manifest.json, or the dataset directory holding one; local or a URI, ``weaktr.storage``)."""
        path = storage.absolute(path)
        if storage.is_dir(path):
            path = storage.join(path, MANIFEST_NAME)
        try:
            data = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            raise ManifestError(f"manifest not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise ManifestError(f"{path}: not valid JSON ({exn})") from exn
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: Any, path: str) -> "Manifest":
        def need(mapping: Any, key: str, kind: type | tuple, where: str) -> Any:
            if not isinstance(mapping, dict) or key not in mapping:
                raise ManifestError(f"{path}: missing key '{where}{key}'")
            value = mapping[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ManifestError(f"{path}: key '{where}{key}' has type {type(value).__name__}")
            return value

        version = need(data, "format_version", int, "")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{path}: key 'format_version' is {version}, this code reads {FORMAT_VERSION}")
        classes = need(data, "classes", list, "")
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ManifestError(f"{path}: key 'classes' must be a non-empty list of names")
        splits = {}
        for split, info in need(data, "splits", dict, "").items():
            where = f"splits.{split}."
            shards = need(info, "shards", list, where)
            sizes = need(info, "shard_sizes", list, where)
            num_samples = need(info, "num_samples", int, where)
            if len(sizes) != len(shards) or sum(sizes) != num_samples:
                raise ManifestError(
                    f"{path}: key '{where}shard_sizes' ({len(sizes)} shards summing to {sum(sizes)}) does not "
                    f"match '{where}shards' ({len(shards)}) and '{where}num_samples' ({num_samples})"
                )
            splits[split] = SplitInfo(list(shards), num_samples, list(sizes))
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ManifestError(f"{path}: key 'meta' has type {type(meta).__name__}")
        return cls(need(data, "name", str, ""), list(classes), splits, storage.parent(path), meta)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "splits": {
                split: {"shards": info.shards, "num_samples": info.num_samples, "shard_sizes": info.shard_sizes}
                for split, info in self.splits.items()
            },
            "meta": self.meta,
        }

    def save(self, path: Optional[str | os.PathLike] = None) -> str:
        """Write whole (``storage.write_bytes``): readers never see a half-written manifest."""
        path = os.fspath(path) if path is not None else storage.join(self.root, MANIFEST_NAME)
        storage.write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ManifestError(f"dataset '{self.name}' at {self.root} has no split '{split}' (has {sorted(self.splits)})")
        return self.splits[split]

    def shard_paths(self, split: str) -> list[str]:
        root = storage.absolute(self.root)
        return [storage.join(root, shard) for shard in self.split(split).shards]


# --------------------------------------------------------------------------- encoding


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_format_of(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise ValueError("image_bytes is neither JPEG nor PNG")


def encode_sample(sample: Sample, image_format: str = "png", jpeg_quality: int = 95) -> dict:
    """A :class:`Sample` as a webdataset dict of bytes (``__key__``, ``png|jpg``, ``labels.json``, ...)."""
    if not sample.key or any(ch in sample.key for ch in "./\\"):
        raise ValueError(f"sample key {sample.key!r} must be non-empty without '.', '/' or '\\'")
    image = np.asarray(sample.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {sample.key}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    raw: dict[str, Any] = {"__key__": sample.key}
    if sample.image_bytes is not None:
        raw[_image_format_of(sample.image_bytes)] = sample.image_bytes
    elif image_format == "png":
        raw["png"] = _png_bytes(image, "RGB")
    elif image_format == "jpg":
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=jpeg_quality)
        raw["jpg"] = buffer.getvalue()
    else:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    raw["labels.json"] = json.dumps(sorted({int(c) for c in sample.labels})).encode()
    for name, label_map in (("mask", sample.mask), ("pseudo", sample.pseudo)):
        if label_map is None:
            continue
        label_map = np.asarray(label_map)
        if label_map.dtype != np.uint8 or label_map.shape != image.shape[:2]:
            raise ValueError(
                f"sample {sample.key}: {name} must be uint8 {image.shape[:2]}, got {label_map.dtype} {label_map.shape}"
            )
        raw[f"{name}.png"] = _png_bytes(label_map, "L")
    return raw


def _decode_label_map(data: bytes, what: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P"):
            raise SampleDecodeError(f"{what} must be an 'L' or 'P' PNG, got mode {img.mode}")
        return np.array(img, dtype=np.uint8)  # for "P" the palette indices are the ids


def decode_sample(raw: dict, label_maps: Sequence[str] = LABEL_MAPS, num_classes: Optional[int] = None) -> Sample:
    """A webdataset dict of bytes back to a :class:`Sample`; ``SampleDecodeError`` if it is broken.

    Only the ``label_maps`` named (of ``mask``, ``pseudo``) are decoded; phase 1 needs none. With ``num_classes``,
    a class index outside 0..C-1 or a map id outside 0..C and 255 is broken too (it would index past the
    model's classes: a crash in training, not a counted failure)."""
    key = raw.get("__key__", "?")
    where = f"sample {key!r} in {raw.get('__url__', '?')}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise SampleDecodeError(f"{where}: no image (expected one of {IMAGE_EXTENSIONS}, has {sorted(raw)})")
    if "labels.json" not in raw:
        raise SampleDecodeError(f"{where}: no labels.json")
    try:
        image = load_rgb(raw[image_ext])
    except Exception as exn:  # PIL raises several types for bad bytes
        raise SampleDecodeError(f"{where}: cannot decode {image_ext}: {exn}") from exn
    try:
        labels = json.loads(raw["labels.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise SampleDecodeError(f"{where}: labels.json is not JSON: {exn}") from exn
    if not isinstance(labels, list) or not all(isinstance(c, int) and c >= 0 for c in labels):
        raise SampleDecodeError(f"{where}: labels.json must be a list of class indices, got {labels!r}")
    if num_classes is not None and any(c >= num_classes for c in labels):
        raise SampleDecodeError(f"{where}: labels {sorted(labels)} outside 0..{num_classes - 1}")
    sample = Sample(key, image, sorted(labels))
    for name in label_maps:
        if f"{name}.png" not in raw:
            continue
        try:
            label_map = _decode_label_map(raw[f"{name}.png"], name)
        except SampleDecodeError as exn:
            raise SampleDecodeError(f"{where}: {exn}") from exn
        except Exception as exn:
            raise SampleDecodeError(f"{where}: cannot decode {name}.png: {exn}") from exn
        if label_map.shape != image.shape[:2]:
            raise SampleDecodeError(f"{where}: {name} is {label_map.shape}, image is {image.shape[:2]}")
        if num_classes is not None:
            bad = np.unique(label_map[(label_map > num_classes) & (label_map != IGNORE)])
            if bad.size:
                raise SampleDecodeError(f"{where}: {name} has ids {bad[:10].tolist()} outside 0..{num_classes} "
                                        f"and {IGNORE}")
        setattr(sample, name, label_map)
    return sample


# --------------------------------------------------------------------------- writing


def write_split(
    samples: Iterable[Sample | Encoded | Skipped],
    out_dir: str | os.PathLike,
    split: str,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    image_format: str = "png",
    num_classes: Optional[int] = None,
    skipped: Optional[list[Skipped]] = None,
) -> SplitInfo:
    """Stream ``samples`` into ``{out_dir}/{split}-NNNNNN.tar`` shards; ``Skipped`` items go to ``skipped``.
    A ``Sample`` is encoded here as ``image_format``; an ``Encoded`` one is written as it is.

    A shard closes when it holds ``samples_per_shard`` samples or its payload reaches
    ``max_shard_bytes`` (so a shard exceeds that by at most one sample plus tar headers).
    Old shards of the same split are removed first. ``num_classes`` validates the labels.
    Shards are written under ``.tmp`` names and renamed once the split is complete: an interrupted
    conversion leaves no file that looks like a finished shard.
    """
    out_dir = os.fspath(out_dir)
    if not split or any(ch in split for ch in "./\\%"):
        raise ValueError(f"split name {split!r} must be non-empty without '.', '/', '\\' or '%'")
    os.makedirs(out_dir, exist_ok=True)
    for suffix in (".tar", ".tar" + TMP_SUFFIX):
        for stale in glob.glob(os.path.join(glob.escape(out_dir), f"{split}-*{suffix}")):
            os.remove(stale)
    pattern = os.path.join(out_dir.replace("%", "%%"), f"{split}-%06d.tar{TMP_SUFFIX}")
    counts: dict[str, int] = {}  # shard path -> samples, in writing order
    seen_keys: set[str] = set()
    # encoder=False: values are already bytes; fixed mtime makes re-runs byte-identical.
    writer = wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=max_shard_bytes, verbose=0, encoder=False, mtime=0
    )
    try:
        for sample in samples:
            if isinstance(sample, Skipped):
                if skipped is None:
                    raise ValueError(f"split '{split}': {sample.source}: {sample.reason}")
                skipped.append(sample)
                continue
            if sample.key in seen_keys:
                raise ValueError(f"split '{split}': duplicate sample key {sample.key!r}")
            seen_keys.add(sample.key)
            if num_classes is not None and any(not 0 <= c < num_classes for c in sample.labels):
                raise ValueError(f"sample {sample.key}: labels {sample.labels} outside 0..{num_classes - 1}")
            encoded = sample if isinstance(sample, Encoded) else encode_for_shard(sample, image_format)
            writer.write(encoded.record)
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    finally:
        last = writer.fname
        writer.close()
    if last not in counts:  # ShardWriter opens its first shard eagerly; drop it if nothing went in
        os.remove(last)
    for tmp in counts:
        os.replace(tmp, tmp.removesuffix(TMP_SUFFIX))
    names = [os.path.basename(tmp.removesuffix(TMP_SUFFIX)) for tmp in counts]
    return SplitInfo(names, sum(counts.values()), list(counts.values()))


def downscale(sample: Sample, max_side: int) -> Sample:
    """``sample`` with its longer side at most ``max_side`` (aspect kept; the label maps with nearest-neighbour,
    so no id is invented), or ``sample`` itself when it already fits."""
    height, width = sample.image.shape[:2]
    if max(height, width) <= max_side:
        return sample
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL's (width, height)

    def resized(array: Optional[np.ndarray], resample) -> Optional[np.ndarray]:
        return None if array is None else np.asarray(Image.fromarray(array).resize(size, resample))

    return replace(
        sample, image=resized(sample.image, Image.Resampling.LANCZOS), image_bytes=None,
        mask=resized(sample.mask, Image.Resampling.NEAREST), pseudo=resized(sample.pseudo, Image.Resampling.NEAREST),
    )


def encode_for_shard(sample: Sample, image_format: str = "png", max_side: Optional[int] = None) -> Encoded:
    """``sample`` downscaled to ``max_side`` (``downscale``; None keeps it) and encoded (``encode_sample``)."""
    stored = downscale(sample, max_side) if max_side is not None else sample
    return Encoded(stored.key, list(stored.labels), encode_sample(stored, image_format), stored is not sample)


def _encoded(samples: Iterable[Sample | Encoded | Skipped], image_format: str, max_side: Optional[int],
             downscaled: list[str]) -> Iterator[Encoded | Skipped]:
    """Every ``Sample`` of ``samples`` encoded; the keys of those stored smaller go to ``downscaled``."""
    for item in samples:
        if isinstance(item, Sample):
            item = encode_for_shard(item, image_format, max_side)
        if isinstance(item, Encoded) and item.downscaled:
            downscaled.append(item.key)
        yield item


def write_dataset(
    out_dir: str | os.PathLike,
    name: str,
    classes: Sequence[str],
    splits: dict[str, Iterable[Sample]],
    *,
    meta: Optional[dict] = None,
    image_format: str = "png",
    max_side: Optional[int] = None,
    **writer_options: Any,
) -> Manifest:
    """Write every split's shards, then ``manifest.json`` last (atomically): a dataset directory
    either has a manifest describing complete shards or none at all. Items a converter could not read
    (``Skipped``) are listed in ``failures.jsonl`` and counted per split in the manifest's ``meta.skipped``.
    Images longer than ``max_side`` are stored downscaled (``downscale``), counted in ``meta.downscaled``;
    samples the caller already encoded (``Encoded``, e.g. in its reading threads) must have used the same
    ``max_side``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the old manifest would describe shards we are about to replace
    infos, failures, skipped_counts, downscaled_counts = {}, [], {}, {}
    for split, samples in splits.items():
        skipped: list[Skipped] = []
        downscaled: list[str] = []
        infos[split] = write_split(_encoded(samples, image_format, max_side, downscaled), out_dir, split,
                                   num_classes=len(classes), skipped=skipped, **writer_options)
        failures += [{"split": split, "source": s.source, "reason": s.reason} for s in skipped]
        skipped_counts[split] = len(skipped)
        downscaled_counts[split] = len(downscaled)
        log.debug("wrote %s/%s: %d samples in %d shards, %d skipped", name, split, infos[split].num_samples,
                 len(infos[split].shards), len(skipped))
    storage.write_bytes(os.path.join(out_dir, FAILURES_NAME), "".join(json.dumps(f) + "\n" for f in failures).encode())
    meta = dict(meta or {}) | {"skipped": skipped_counts}
    if max_side is not None:
        meta |= {"max_side": max_side, "downscaled": downscaled_counts}
    manifest = Manifest(name, list(classes), infos, os.path.abspath(out_dir), meta)
    manifest.save()
    return manifest
