"""What every converter (``voc``, ``coco``, ``folder``) shares: reading source items in threads, each unreadable
one skipped with its reason instead of ending the conversion, and the summary printed at the end."""

from __future__ import annotations

import collections
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from PIL import Image
from tqdm import tqdm

from weaktr.data.shards import FAILURES_NAME, Manifest, Sample, Skipped, write_dataset

T = TypeVar("T")
CONVERT_WORKERS = os.cpu_count() or 1  # the converters' reading threads (read_each)


class Unusable(ValueError):
    """A source item that reads but cannot be a sample (no label, unknown class, mask of another size, ...)."""


# What reading one source item may raise: missing or unreadable files (OSError, PIL's UnidentifiedImageError), bad
# contents (ValueError, SyntaxError from some broken PNGs, PIL's decompression-bomb guard), a missing entry.
ITEM_ERRORS = (OSError, ValueError, KeyError, SyntaxError, Image.DecompressionBombError)


def read_each(
    items: Sequence[T], read: Callable[[T], Sample], source: Callable[[T], str], *, workers: int = 1,
    progress: Optional[str] = None,
) -> Iterator[Sample | Skipped]:
    """``read(item)`` for every item, in order, or a ``Skipped`` naming ``source(item)`` and the reason it could
    not be read: one bad file costs one sample, never the conversion.

    ``workers`` threads read ahead (PIL decodes and zlib compresses without holding the GIL), at most 4 per
    worker waiting, so memory stays flat on COCO's 82k images; ``progress``: a progress bar with that title."""

    def attempt(item: T) -> Sample | Skipped:
        try:
            return read(item)
        except ITEM_ERRORS as err:
            return Skipped(source(item), str(err) if isinstance(err, Unusable) else describe(err))

    with tqdm(total=len(items), desc=progress, unit="img", disable=progress is None, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        if workers <= 1:
            for item in items:
                yield attempt(item)
                bar.update()
            return
        with ThreadPoolExecutor(workers) as pool:
            waiting: collections.deque = collections.deque()
            for item in items:
                waiting.append(pool.submit(attempt, item))
                if len(waiting) >= 4 * workers:
                    yield waiting.popleft().result()
                    bar.update()
            while waiting:
                yield waiting.popleft().result()
                bar.update()


def describe(err: BaseException) -> str:
    """``Type: message``, ``without_addresses``."""
    return without_addresses(f"{type(err).__name__}: {err}")


def without_addresses(reason: str) -> str:
    """``reason`` without the object addresses PIL puts in its messages ("<_io.BytesIO object at 0x7f...>"): a
    rerun records the same reason."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", reason)


def conversion_summary(manifest: Manifest, seconds: Optional[float] = None) -> str:
    """What a converter wrote: per split the samples, shards and bytes, and what it skipped (failures.jsonl) or
    downscaled; with ``seconds``, how long it took."""
    lines = []
    for split, info in manifest.splits.items():
        size = sum(os.path.getsize(p) for p in manifest.shard_paths(split))
        skipped = manifest.meta.get("skipped", {}).get(split, 0)
        downscaled = manifest.meta.get("downscaled", {}).get(split, 0)
        lines.append(f"{manifest.name}/{split}: {info.num_samples} samples in {len(info.shards)} shards "
                     f"({size / 2**20:.1f} MiB), {skipped} skipped"
                     + (f", {downscaled} downscaled to {manifest.meta['max_side']} px" if downscaled else ""))
    if any(manifest.meta.get("skipped", {}).values()):
        lines.append(f"skipped items and reasons: {os.path.join(manifest.root, FAILURES_NAME)}")
    if seconds is not None:
        total = sum(info.num_samples for info in manifest.splits.values())
        lines.append(f"converted in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)")
    return "\n".join(lines)


def write_converted(out_dir, name: str, classes: Sequence[str], splits: dict, *, meta: dict, started: float,
                    **writer_options) -> Manifest:
    """A converter's last step: ``write_dataset``, then its summary on the console (``started``: the converter's
    ``time.perf_counter()`` at its start)."""
    manifest = write_dataset(out_dir, name, classes, splits, meta=meta, **writer_options)
    print(conversion_summary(manifest, time.perf_counter() - started))
    return manifest
