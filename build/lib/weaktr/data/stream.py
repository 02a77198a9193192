"""Reading shards: in order for inference and evaluation (``iter_samples``), and rank-aware streaming for DDP.

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

import itertools
import logging
import os
import random
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from weaktr import storage
from weaktr.data.shards import LABEL_MAPS, DataError, Failure, Sample, SampleDecodeError, decode_sample

log = logging.getLogger(__name__)

# Training streams repeat their shards endlessly: this many undecodable samples in a row means
# nothing in them decodes (at the 1% failure limit, a run of even 5 is unlikely).
MAX_CONSECUTIVE_FAILURES = 1000
# Ray Train shows the last 500 characters of a worker's traceback: error messages stay below.
MAX_ERROR_CHARS = 400


# --------------------------------------------------------------------------- reading


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def check_shards_exist(shards: Sequence[str]) -> None:
    # A missing shard is a setup error, not a broken sample: fail at once instead of counting it.
    missing = [url for url in shards if not storage.exists(url)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) do not exist, first: {missing[0]}")


def read_records(
    urls: Sequence[str], on_failure: Callable[[Failure], None], keep_going: bool = True
) -> Iterator[dict]:
    """The raw webdataset records (dicts of bytes) of ``urls`` (local paths or URIs, ``weaktr.storage``) in order.
    An unreadable shard (missing, cut short) is reported once to ``on_failure`` with its url; then the stream goes
    on with the next shard (``keep_going``) or ends."""
    current = [""]  # the shard being read: shards are opened one at a time, as the tar reader asks for the next
    last: list[Failure] = []  # the failure reported last

    def handler(exn: Exception) -> bool:
        message = str(exn.args[0] if exn.args else exn).split(" @ <")[0]
        failure = Failure(current[0], "", f"{type(exn).__name__}: {message}")
        # webdataset hands a broken shard's error to the handler twice in a row (from the tar reader, then again
        # from the shard loop): counted twice, one cut shard looked like two broken samples.
        if last != [failure]:
            on_failure(failure)
        last[:] = [failure]
        return keep_going

    def opened() -> Iterator[dict]:
        for url in urls:
            current[0] = url
            try:
                stream = storage.open_input(url)
            except Exception as exn:  # noqa: BLE001 - whatever the store raises, the shard is unreadable
                if handler(exn):
                    continue
                return
            with stream:  # closed once the tar reader asks for the next shard
                yield {"url": url, "stream": stream}

    files = tar_file_expander(opened(), handler=handler)
    return group_by_keys(files, handler=handler)


def _decoded_samples(
    records: Iterable[dict], on_failure: Callable[[Failure], None], label_maps: Sequence[str] = LABEL_MAPS,
    num_classes: Optional[int] = None,
) -> Iterator[Sample]:
    """Decode ``records`` (``decode_sample``), reporting the broken ones to ``on_failure`` and skipping them."""
    for raw in records:
        try:
            yield decode_sample(raw, label_maps, num_classes)
        except SampleDecodeError as exn:
            on_failure(Failure(raw.get("__url__", "?"), raw.get("__key__", "?"), str(exn)))


def iter_samples(
    shards: Sequence[str], tracker: Optional["FailureTracker"] = None, num_classes: Optional[int] = None
) -> Iterator[Sample]:
    """Every decodable sample of ``shards`` in order (no shuffling, no splitting): for inference
    and evaluation. Broken samples (with ``num_classes``, also those with ids past the classes) are logged and
    skipped; at the end ``tracker`` (default: one with the 1% limit) raises ``DataError`` if too many failed."""
    tracker = tracker if tracker is not None else FailureTracker()
    check_shards_exist(shards)

    def report(failure: Failure) -> None:
        log.warning("skipping unreadable sample %r in %s: %s", failure.key, failure.url, failure.reason)
        tracker.add(0, [failure])

    for sample in _decoded_samples(read_records(list(shards), report), report, num_classes=num_classes):
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

    def __init__(self, urls, transform, *, seed: int, epoch: int, rank: int, shuffle_buffer: int, label_maps,
                 num_classes: Optional[int]):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer = shuffle_buffer
        self.label_maps = tuple(label_maps)
        self.num_classes = num_classes

    def _worker_id(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id

    def _worker_records(self) -> Iterator[dict]:
        """Repeat this worker's shards forever, noting unreadable shards in ``self._pending``: each once, though
        filling the shuffle buffer may read a small dataset's shards many times over (counted every time, one
        cut shard among three made 64% of a test's reads look broken)."""
        broken: set[str] = set()

        def shard_failed(failure: Failure) -> None:
            if failure.url not in broken:
                broken.add(failure.url)
                self._pending.append(failure)

        for repeat in itertools.count():
            order = list(self.urls)
            random.Random(_derived_seed(self.seed, self.epoch, self.rank, repeat)).shuffle(order)
            urls = list(wds.split_by_worker(order))  # same order in every worker -> disjoint slices
            if not urls:
                return
            read = 0
            for raw in read_records(urls, shard_failed):
                read += 1
                yield raw
            if read == 0:  # without this check a rank of unreadable shards would spin forever
                raise DataError(f"no decodable sample in shards {urls} ({self._failure_reasons()})")

    def _transformed(self, records: Iterator[dict]) -> Iterator[dict]:
        # A failure rides into the batch with the next good example; the training loop's
        # FailureTracker judges failures against the samples used. Not wds.map: it would add a
        # "__key__" entry to every example.
        for sample in _decoded_samples(records, self._sample_failed, self.label_maps, self.num_classes):
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
    pin_memory: bool = False,
    label_maps: Sequence[str] = LABEL_MAPS,
    num_classes: Optional[int] = None,
) -> StepLoader:
    """Exactly ``steps`` batches of ``transform(sample)`` dicts from this rank's shards.

    ``transform`` maps a :class:`Sample` to a dict of tensors; each example also gets ``key``
    and ``failures``; ``collate_samples`` stacks the tensors and merges the failures.
    Use the same (seed, epoch) on every rank. ``label_maps`` names the per-pixel maps to decode
    (phase 1 needs none); with ``num_classes`` a sample with ids past the classes is a counted failure rather
    than a crash in the loss. ``pin_memory`` (training on a GPU) lets the loops' non-blocking copies overlap.
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size ({batch_size}) and steps ({steps}) must be >= 1")
    check_shards_exist(shards)
    mine = shards_for_rank(shards, rank, world_size, epoch, seed)
    # A worker without a shard would end at once; more workers than shards buys nothing.
    num_workers = min(num_workers, len(mine))
    stream = _RankStream(
        mine, transform, seed=seed, epoch=epoch, rank=rank, shuffle_buffer=shuffle_buffer, label_maps=label_maps,
        num_classes=num_classes,
    )
    loader = DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples, pin_memory=pin_memory
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
