"""WebDataset shards + a JSON manifest: writing, reading, and rank-aware streaming for DDP.

A dataset is a directory holding ``manifest.json`` and tar shards. Inside a shard a sample is
``{key}.jpg|png`` (RGB), ``{key}.labels.json`` (sorted foreground class indices),
``{key}.mask.png`` (optional ground truth, "L" PNG: 0 background, c+1 for class c, 255 ignore)
and ``{key}.pseudo.png`` (optional pseudo-label, same encoding).

Streaming for DDP (``make_loader``): each epoch the shard list is shuffled with a seed derived
from (seed, epoch) and dealt out to the ranks (disjoint); each rank then deals its shards to its
DataLoader workers (``webdataset.split_by_worker``), shuffles the raw (still encoded) samples
in a buffer, decodes them as they leave it and yields
exactly ``steps`` batches, repeating its shards if they run short, so every rank runs the same
number of steps and DDP's collectives never wait on a rank that ran out of data.

Samples that fail to decode are skipped, not fatal: each yielded sample carries the failures
seen since the previous one (DataLoader workers are separate processes, so the failures must
travel with the data), ``collate_samples`` merges them per batch, and a ``FailureTracker`` in
the training loop raises ``DataError`` once more than ``max_failure_fraction`` of samples fail.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
LABEL_MAPS = ("mask", "pseudo")  # optional per-pixel maps a sample may carry
# Training streams repeat their shards endlessly: this many undecodable samples in a row means
# nothing in them decodes (at the 1% failure limit, a run of even 5 is unlikely).
MAX_CONSECUTIVE_FAILURES = 1000
# Ray Train shows the last 500 characters of a worker's traceback: error messages stay below.
MAX_ERROR_CHARS = 400


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
        """Read ``path`` (a manifest.json, or the dataset directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise ManifestError(f"manifest not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exn:
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
        return cls(need(data, "name", str, ""), list(classes), splits, os.path.dirname(os.path.abspath(path)), meta)

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
        """Write atomically (temp file + rename): readers never see a half-written manifest."""
        path = os.fspath(path) if path is not None else os.path.join(self.root, MANIFEST_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ManifestError(f"dataset '{self.name}' at {self.root} has no split '{split}' (has {sorted(self.splits)})")
        return self.splits[split]

    def shard_paths(self, split: str) -> list[str]:
        return [os.path.join(os.path.abspath(self.root), shard) for shard in self.split(split).shards]


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


def decode_sample(raw: dict, label_maps: Sequence[str] = LABEL_MAPS) -> Sample:
    """A webdataset dict of bytes back to a :class:`Sample`; ``SampleDecodeError`` if it is broken.

    Only the ``label_maps`` named (of ``mask``, ``pseudo``) are decoded; phase 1 needs none."""
    key = raw.get("__key__", "?")
    where = f"sample {key!r} in {raw.get('__url__', '?')}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise SampleDecodeError(f"{where}: no image (expected one of {IMAGE_EXTENSIONS}, has {sorted(raw)})")
    if "labels.json" not in raw:
        raise SampleDecodeError(f"{where}: no labels.json")
    try:
        with Image.open(io.BytesIO(raw[image_ext])) as img:
            image = np.array(img.convert("RGB"))  # writable, unlike np.asarray
    except Exception as exn:  # PIL raises several types for bad bytes
        raise SampleDecodeError(f"{where}: cannot decode {image_ext}: {exn}") from exn
    try:
        labels = json.loads(raw["labels.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise SampleDecodeError(f"{where}: labels.json is not JSON: {exn}") from exn
    if not isinstance(labels, list) or not all(isinstance(c, int) and c >= 0 for c in labels):
        raise SampleDecodeError(f"{where}: labels.json must be a list of class indices, got {labels!r}")
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
        setattr(sample, name, label_map)
    return sample


# --------------------------------------------------------------------------- writing


def write_split(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    split: str,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    image_format: str = "png",
    num_classes: Optional[int] = None,
) -> SplitInfo:
    """Stream ``samples`` into ``{out_dir}/{split}-NNNNNN.tar`` shards.

    A shard closes when it holds ``samples_per_shard`` samples or its payload reaches
    ``max_shard_bytes`` (so a shard exceeds that by at most one sample plus tar headers).
    Old shards of the same split are removed first. ``num_classes`` validates the labels.
    """
    out_dir = os.fspath(out_dir)
    if not split or any(ch in split for ch in "./\\%"):
        raise ValueError(f"split name {split!r} must be non-empty without '.', '/', '\\' or '%'")
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f"{split}-*.tar")):
        os.remove(stale)
    pattern = os.path.join(out_dir.replace("%", "%%"), f"{split}-%06d.tar")
    counts: dict[str, int] = {}  # shard path -> samples, in writing order
    seen_keys: set[str] = set()
    # encoder=False: values are already bytes; fixed mtime makes re-runs byte-identical.
    writer = wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=max_shard_bytes, verbose=0, encoder=False, mtime=0
    )
    try:
        for sample in samples:
            if sample.key in seen_keys:
                raise ValueError(f"split '{split}': duplicate sample key {sample.key!r}")
            seen_keys.add(sample.key)
            if num_classes is not None and any(not 0 <= c < num_classes for c in sample.labels):
                raise ValueError(f"sample {sample.key}: labels {sample.labels} outside 0..{num_classes - 1}")
            writer.write(encode_sample(sample, image_format))
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    finally:
        last = writer.fname
        writer.close()
    if last not in counts:  # ShardWriter opens its first shard eagerly; drop it if nothing went in
        os.remove(last)
    return SplitInfo([os.path.basename(p) for p in counts], sum(counts.values()), list(counts.values()))


def write_dataset(
    out_dir: str | os.PathLike,
    name: str,
    classes: Sequence[str],
    splits: dict[str, Iterable[Sample]],
    *,
    meta: Optional[dict] = None,
    **writer_options: Any,
) -> Manifest:
    """Write every split's shards, then ``manifest.json`` last (atomically): a dataset directory
    either has a manifest describing complete shards or none at all."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the old manifest would describe shards we are about to replace
    infos = {}
    for split, samples in splits.items():
        infos[split] = write_split(samples, out_dir, split, num_classes=len(classes), **writer_options)
        log.info("wrote %s/%s: %d samples in %d shards", name, split, infos[split].num_samples, len(infos[split].shards))
    manifest = Manifest(name, list(classes), infos, os.path.abspath(out_dir), dict(meta or {}))
    manifest.save()
    return manifest


# --------------------------------------------------------------------------- reading


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _check_local_shards_exist(shards: Sequence[str]) -> None:
    # A missing shard is a setup error, not a broken sample: fail at once instead of counting it.
    missing = [url for url in shards if "://" not in url and not os.path.exists(url)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) do not exist, first: {missing[0]}")


def _records(urls: Sequence[str], on_failure: Callable[[Failure], None]) -> Iterator[dict]:
    """The raw webdataset records (dicts of bytes) of ``urls`` in order; an unreadable shard is
    reported to ``on_failure`` and the stream goes on with the next one."""
    known = set(urls)

    def shard_error(exn: Exception) -> bool:
        # webdataset appends the shard url to the exception's args; find it for the report.
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in known), "?")
        on_failure(Failure(url, "", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"))
        return True

    return wds.tarfile_samples(({"url": url} for url in urls), handler=shard_error)


def _decoded_samples(
    records: Iterable[dict], on_failure: Callable[[Failure], None], label_maps: Sequence[str] = LABEL_MAPS
) -> Iterator[Sample]:
    """Decode ``records``, reporting the broken ones to ``on_failure`` and skipping them."""
    for raw in records:
        try:
            yield decode_sample(raw, label_maps)
        except SampleDecodeError as exn:
            on_failure(Failure(raw.get("__url__", "?"), raw.get("__key__", "?"), str(exn)))


def iter_samples(shards: Sequence[str], tracker: Optional["FailureTracker"] = None) -> Iterator[Sample]:
    """Every decodable sample of ``shards`` in order (no shuffling, no splitting): for inference
    and evaluation. Broken samples are logged and skipped; at the end ``tracker`` (default: one
    with the 1% limit) raises ``DataError`` if too many failed."""
    tracker = tracker if tracker is not None else FailureTracker()
    _check_local_shards_exist(shards)

    def report(failure: Failure) -> None:
        log.warning("skipping unreadable sample %r in %s: %s", failure.key, failure.url, failure.reason)
        tracker.add(0, [failure])

    for sample in _decoded_samples(_records(list(shards), report), report):
        tracker.add(1, [])
        yield sample
    tracker.check(final=True)


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int, epoch: int, seed: int) -> list[str]:
    """This rank's shards for ``epoch``: the list shuffled with a (seed, epoch) seed (the same on
    every rank), then dealt round-robin, so ranks are disjoint and together cover every shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if len(shards) < world_size:
        raise DataError(
            f"{len(shards)} shard(s) cannot be split over {world_size} ranks: write the dataset with more, "
            f"smaller shards (samples_per_shard) or use fewer workers"
        )
    order = list(shards)
    random.Random(_derived_seed(seed, epoch)).shuffle(order)
    return order[rank::world_size]


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch: one pass over the split in total (at least one step)."""
    return max(1, num_samples // (world_size * batch_size))


class _RankStream(IterableDataset):
    """One rank's endless stream of transformed samples (runs inside each DataLoader worker).

    Raw records (bytes) go through the shuffle buffer and are decoded after it: decoded before,
    the samples still buffered when the epoch's steps run out would be decoded for nothing (a
    third of the decoding when a rank's epoch is twice the buffer), and the buffer would hold
    decoded images instead of compressed bytes.
    """

    def __init__(self, urls, transform, *, seed: int, epoch: int, rank: int, shuffle_buffer: int, label_maps):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer = shuffle_buffer
        self.label_maps = tuple(label_maps)

    def _worker_id(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id

    def _worker_records(self) -> Iterator[dict]:
        """Repeat this worker's shards forever, noting unreadable shards in ``self._pending``."""
        for repeat in itertools.count():
            order = list(self.urls)
            random.Random(_derived_seed(self.seed, self.epoch, self.rank, repeat)).shuffle(order)
            urls = list(wds.split_by_worker(order))  # same order in every worker -> disjoint slices
            if not urls:
                return
            read = 0
            for raw in _records(urls, self._pending.append):
                read += 1
                yield raw
            if read == 0:  # without this check a rank of unreadable shards would spin forever
                raise DataError(f"no decodable sample in shards {urls} ({self._failure_reasons()})")

    def _transformed(self, records: Iterator[dict]) -> Iterator[dict]:
        # A failure rides into the batch with the next good example; the training loop's
        # FailureTracker judges failures against the samples used. Not wds.map: it would add a
        # "__key__" entry to every example.
        for sample in _decoded_samples(records, self._sample_failed, self.label_maps):
            self._consecutive_failures = 0
            example = dict(self.transform(sample))
            example["key"] = sample.key
            example["failures"] = list(self._pending)
            self._pending.clear()
            yield example

    def _sample_failed(self, failure: Failure) -> None:
        self._pending.append(failure)
        self._consecutive_failures += 1
        # A stream whose samples all fail would never yield a batch, so the training loop's
        # failure check would never run: stop it here.
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise DataError(
                f"no decodable sample in the last {self._consecutive_failures} read from shards "
                f"{sorted(self.urls)} ({self._failure_reasons()})"
            )

    def _failure_reasons(self) -> str:
        return "; ".join(f.reason for f in self._pending[:3])

    def __iter__(self):
        self._pending: list[Failure] = []  # per DataLoader worker: each has its own copy of self
        self._consecutive_failures = 0
        stages: list = [self._worker_records]
        if self.shuffle_buffer > 1:
            rng = random.Random(_derived_seed(self.seed, self.epoch, self.rank, self._worker_id(), 1))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(self._transformed)
        return iter(wds.DataPipeline(*stages))


def collate_samples(examples: list[dict]) -> dict:
    """Stack tensor fields; ``key`` becomes a list and ``failures`` one merged list."""
    batch: dict[str, Any] = {
        "key": [example["key"] for example in examples],
        "failures": [failure for example in examples for failure in example["failures"]],
    }
    for name in examples[0]:
        if name not in batch:
            batch[name] = default_collate([example[name] for example in examples])
    return batch


class StepLoader:
    """Iterating yields exactly ``steps`` batches (``len()`` is ``steps``)."""

    def __init__(self, loader: DataLoader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        try:
            for step in range(self.steps):
                try:
                    yield next(batches)
                except StopIteration:
                    raise DataError(f"data stream ended after {step} of {self.steps} batches") from None
        finally:
            del batches  # shuts the worker processes down; the stream itself is endless


def make_loader(
    shards: Sequence[str],
    *,
    transform: Callable[[Sample], dict],
    batch_size: int,
    steps: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    collate: Callable[[list[dict]], Any] = collate_samples,
    pin_memory: bool = False,
    label_maps: Sequence[str] = LABEL_MAPS,
) -> StepLoader:
    """Exactly ``steps`` batches of ``transform(sample)`` dicts from this rank's shards.

    ``transform`` maps a :class:`Sample` to a dict of tensors; each example also gets ``key``
    and ``failures``, and the default collate stacks the tensors and merges the failures.
    Use the same (seed, epoch) on every rank. ``label_maps`` names the per-pixel maps to decode
    (phase 1 needs none).
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size ({batch_size}) and steps ({steps}) must be >= 1")
    _check_local_shards_exist(shards)
    mine = shards_for_rank(shards, rank, world_size, epoch, seed)
    # A worker without a shard would end at once; more workers than shards buys nothing.
    num_workers = min(num_workers, len(mine))
    stream = _RankStream(
        mine, transform, seed=seed, epoch=epoch, rank=rank, shuffle_buffer=shuffle_buffer, label_maps=label_maps
    )
    loader = DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory
    )
    return StepLoader(loader, steps)


class FailureTracker:
    """Counts good and failed samples; ``DataError`` (naming the shards) above the allowed fraction.

    Feed it every batch (``update``): it checks once ``min_samples`` samples were seen;
    ``check()`` (at epoch end) checks whatever the count.
    """

    def __init__(self, max_failure_fraction: float = 0.01, min_samples: int = 200, keep: int = 1000):
        self.max_failure_fraction = max_failure_fraction
        self.min_samples = min_samples
        self.keep = keep  # failures remembered for the error message (bounded memory)
        self.seen = 0  # good + failed
        self.failed = 0
        self.failures: list[Failure] = []

    def update(self, batch: dict) -> None:
        self.add(len(batch["key"]), batch["failures"])

    def add(self, num_ok: int, failures: Sequence[Failure]) -> None:
        self.seen += num_ok + len(failures)
        self.failed += len(failures)
        self.failures.extend(failures[: max(0, self.keep - len(self.failures))])
        self.check(final=False)

    def merge(self, other: "FailureTracker") -> "FailureTracker":
        """Add another tracker's counts (e.g. another rank's), for a check over the whole run."""
        self.seen += other.seen
        self.failed += other.failed
        self.failures.extend(other.failures[: max(0, self.keep - len(self.failures))])
        return self

    @property
    def fraction(self) -> float:
        return self.failed / self.seen if self.seen else 0.0

    def check(self, final: bool = True) -> None:
        """Raise if too many failed; ``final=False`` waits until ``min_samples`` were seen."""
        if self.seen == 0 or (not final and self.seen < self.min_samples):
            return
        if self.fraction > self.max_failure_fraction:
            for failure in self.failures:  # the full list goes to the log; the error stays short
                log.error("unreadable sample %r in %s: %s", failure.key, failure.url, failure.reason)
            raise DataError(self.summary())

    def summary(self) -> str:
        """One short line, most important first: counts, then the shards, then one example.

        Short because Ray Train keeps only the first and last 500 characters of a worker's
        traceback: a longer message loses its middle, where the counts and shard names were."""
        shards = sorted({f.url for f in self.failures})
        folders = {os.path.dirname(url) for url in shards}
        names = [os.path.basename(url) for url in shards] if len(folders) == 1 else shards
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where = f" in {_clip(folders.pop(), 120)}" if len(folders) == 1 else ""
        first = self.failures[0]
        return _clip(
            f"{self.failed} of {self.seen} samples failed to decode ({self.fraction:.1%} > "
            f"{self.max_failure_fraction:.1%} allowed), in {len(shards)} shard(s): {listed}{where}. "
            f"First: [{first.key}] {_clip(first.reason, 100)}",
            MAX_ERROR_CHARS,
        )


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping its end when it is a path (the file name)."""
    if len(text) <= limit:
        return text
    if os.sep in text and " " not in text:
        return "..." + text[-(limit - 3):]
    return text[: limit - 3] + "..."
