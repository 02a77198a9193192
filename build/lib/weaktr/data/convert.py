"""What every converter (``voc``, ``coco``, ``folder``) shares: reading source items in threads, each unreadable
one skipped with its reason instead of ending the conversion, and the summary printed at the end."""

from __future__ import annotations

import collections
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from PIL import Image
from tqdm import tqdm

from weaktr.data.shards import FAILURES_NAME, Encoded, Manifest, Sample, Skipped, encode_for_shard, write_dataset

T = TypeVar("T")
CONVERT_WORKERS = os.cpu_count() or 1  # the converters' reading threads (read_each)
RAY_BATCH = 32  # items per Ray task on a cluster: ~0.15 s of work at VOC size (BENCHMARKS.md, Conversion), ~2 MB back
MIN_RAY_TASKS = 32  # Ray tasks kept in flight however few CPUs the cluster has yet (_on_ray)


class Unusable(ValueError):
    """A source item that reads but cannot be a sample (no label, unknown class, mask of another size, ...)."""


class SourceNotShared(ValueError):
    """``--ray``: the source folder is not at its path on a node that reads it (each item there would be "missing")."""


# What reading one source item may raise: missing or unreadable files (OSError, PIL's UnidentifiedImageError), bad
# contents (ValueError, SyntaxError from some broken PNGs, PIL's decompression-bomb guard), a missing entry.
ITEM_ERRORS = (OSError, ValueError, KeyError, SyntaxError, Image.DecompressionBombError)


def read_each(
    items: Sequence[T], read: Callable[[T], Sample], source: Callable[[T], str], *, image_format: str,
    max_side: Optional[int], workers: int = 1, use_ray: bool = False, source_dirs: Sequence[str] = (),
    progress: Optional[str] = None,
) -> Iterator[Encoded | Skipped]:
    """``read(item)`` encoded for a shard (``encode_for_shard``) for every item, in order, or a ``Skipped`` naming
    ``source(item)`` and the reason it could not be read: one bad file costs one sample, never the conversion.

    ``workers`` threads read ahead (PIL decodes and zlib compresses without holding the GIL), at most 4 per
    worker waiting, so memory stays flat on COCO's 82k images. ``use_ray``: Ray tasks of ``RAY_BATCH`` items
    read instead, over every node of the connected cluster (the source files must be at the same path on all of
    them, a shared file system: a task on a node without one of ``source_dirs`` raises ``SourceNotShared`` rather
    than skip each of its items as missing); ``progress``: a progress bar with that title."""

    def attempt(item: T) -> Encoded | Skipped:
        try:
            return encode_for_shard(read(item), image_format, max_side)
        except ITEM_ERRORS as err:
            return Skipped(source(item), str(err) if isinstance(err, Unusable) else describe(err))

    with tqdm(total=len(items), desc=progress, unit="img", disable=progress is None, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        if use_ray:
            results = _on_ray(attempt, items, source_dirs)
        elif workers > 1:
            results = _in_threads(attempt, items, workers)
        else:
            results = map(attempt, items)
        for result in results:
            yield result
            bar.update()


def _in_threads(attempt: Callable[[T], Any], items: Sequence[T], workers: int) -> Iterator:
    with ThreadPoolExecutor(workers) as pool:
        waiting: collections.deque = collections.deque()
        for item in items:
            waiting.append(pool.submit(attempt, item))
            if len(waiting) >= 4 * workers:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


def _attempt_batch(attempt: Callable[[T], Any], batch: Sequence[T], source_dirs: Sequence[str]) -> list:
    for source_dir in source_dirs:
        if os.path.isdir(source_dir):
            continue
        from ray.util import get_node_ip_address  # in a Ray task

        raise SourceNotShared(
            f"{source_dir} is not on the Ray node at {get_node_ip_address()}: weaktr convert --ray reads the source "
            "on every node, so it must be on a file system mounted at the same path on all of them; or convert "
            "without --ray (threads on this machine)"
        )
    return [attempt(item) for item in batch]


def _on_ray(attempt: Callable[[T], Any], items: Sequence[T], source_dirs: Sequence[str]) -> Iterator:
    """``attempt`` over ``items`` in Ray tasks of ``RAY_BATCH``, results in order. Two tasks per CPU the cluster
    has now are in flight (counted again as nodes join), and at least ``MIN_RAY_TASKS``: the tasks waiting for a
    CPU are the demand for which an autoscaling cluster adds nodes. Results that arrive out of order wait in Ray's
    object store, never more than that many batches."""
    import ray

    attempt_ref = ray.put(attempt)  # shipped once, not with every task
    remote = ray.remote(num_cpus=1)(_attempt_batch)
    batches = (items[i:i + RAY_BATCH] for i in range(0, len(items), RAY_BATCH))
    waiting: collections.deque = collections.deque()

    def results(task) -> list:
        try:
            return ray.get(task)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, SourceNotShared):
                raise err.cause from None  # its one line, not the task's traceback
            raise

    for batch in batches:
        waiting.append(remote.remote(attempt_ref, batch, source_dirs))
        if len(waiting) >= max(MIN_RAY_TASKS, 2 * int(ray.cluster_resources().get("CPU", 0))):
            yield from results(waiting.popleft())
    while waiting:
        yield from results(waiting.popleft())


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
