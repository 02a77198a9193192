"""Shard writing/reading, manifest errors, rank splitting, exact-step loaders, failure accounting."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from weaktr.data.shards import (
    DataError,
    Failure,
    Manifest,
    ManifestError,
    Sample,
    SampleDecodeError,
    decode_sample,
    encode_sample,
    write_dataset,
    write_split,
)
from weaktr.data.stream import FailureTracker, iter_samples, make_loader, shards_for_rank, steps_per_epoch

NUM_CLASSES = 5


def random_samples(count, seed=0, prefix="s", with_mask=True):
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = rng.integers(12, 24, size=2)
        labels = sorted(set(rng.integers(0, NUM_CLASSES, size=rng.integers(1, 3)).tolist()))
        mask = rng.choice([0, 255] + [c + 1 for c in labels], size=(h, w)).astype(np.uint8) if with_mask else None
        pseudo = rng.choice([0] + [c + 1 for c in labels], size=(h, w)).astype(np.uint8) if i % 2 else None
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        yield Sample(f"{prefix}{i:04d}", image, labels, mask, pseudo)


def classification_example(sample: Sample) -> dict:
    return {"image": torch.from_numpy(sample.image[:8, :8].copy()), "labels": torch.tensor(len(sample.labels))}


def write_bad_shard(path, good, bad_key="broken"):
    """A shard with `good` valid samples and one whose jpg bytes are garbage, written by hand."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in random_samples(good, seed=3, prefix="ok"):
            writer.write(encode_sample(sample))
        writer.write({"__key__": bad_key, "jpg": b"\xff\xd8 definitely not a jpeg", "labels.json": b"[0]"})


# --------------------------------------------------------------------------- writing / reading


def test_roundtrip_png_keeps_every_field(tmp_path):
    originals = {"train": list(random_samples(11)), "val": list(random_samples(4, seed=1, prefix="v"))}
    manifest = write_dataset(tmp_path, "toy", [f"c{i}" for i in range(NUM_CLASSES)], originals, samples_per_shard=3)
    loaded = Manifest.load(tmp_path / "manifest.json")
    assert loaded.classes == manifest.classes and loaded.num_classes == NUM_CLASSES
    assert loaded.splits["train"].num_samples == 11 and sum(loaded.splits["train"].shard_sizes) == 11
    for split, expected in originals.items():
        paths = loaded.shard_paths(split)
        assert all(os.path.isabs(p) and os.path.exists(p) for p in paths)
        read = list(iter_samples(paths))
        assert [s.key for s in read] == [s.key for s in expected]
        for got, want in zip(read, expected):
            np.testing.assert_array_equal(got.image, want.image)
            np.testing.assert_array_equal(got.mask, want.mask)
            assert got.labels == want.labels
            assert (got.pseudo is None) == (want.pseudo is None)
            if want.pseudo is not None:
                np.testing.assert_array_equal(got.pseudo, want.pseudo)


def test_jpg_roundtrip_is_close(tmp_path):
    originals = [Sample("smooth", np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 40, 3)), [1])]
    info = write_split(originals, tmp_path, "train", image_format="jpg")
    (got,) = iter_samples([str(tmp_path / s) for s in info.shards])
    assert got.image.shape == originals[0].image.shape
    assert np.abs(got.image.astype(int) - originals[0].image.astype(int)).mean() < 3


def test_shards_are_bounded_by_count_and_bytes(tmp_path):
    samples = list(random_samples(30))
    info = write_split(samples, tmp_path / "by_count", "train", samples_per_shard=7)
    assert info.shard_sizes == [7, 7, 7, 7, 2]

    largest = max(sum(len(v) for k, v in encode_sample(s).items() if k != "__key__") for s in samples)
    limit = 3 * largest
    info = write_split(samples, tmp_path / "by_bytes", "train", max_shard_bytes=limit)
    assert len(info.shards) > 3 and sum(info.shard_sizes) == 30
    tar_overhead = 5 * 512 + 2 * 10240  # headers of one sample's files + end-of-archive record padding
    for shard in info.shards:
        assert os.path.getsize(tmp_path / "by_bytes" / shard) <= limit + largest + tar_overhead


def test_rewriting_a_split_removes_stale_shards(tmp_path):
    write_split(random_samples(10), tmp_path, "train", samples_per_shard=2)
    info = write_split(random_samples(3), tmp_path, "train", samples_per_shard=2)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == sorted(info.shards)


def test_write_rejects_bad_keys_labels_and_duplicates(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="key"):
        write_split([Sample("a.b", image, [0])], tmp_path, "train")
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        write_split([Sample("a", image, [2])], tmp_path, "train", num_classes=2)
    with pytest.raises(ValueError, match="duplicate"):
        write_split([Sample("a", image, [0]), Sample("a", image, [1])], tmp_path, "train")
    with pytest.raises(ValueError, match="mask"):
        write_split([Sample("a", image, [0], mask=np.zeros((3, 4), np.uint8))], tmp_path, "train")


def test_decode_errors_are_sample_decode_errors():
    good = encode_sample(next(random_samples(1)))
    for broken, reason in [
        ({k: v for k, v in good.items() if k != "png"}, "no image"),
        ({k: v for k, v in good.items() if k != "labels.json"}, "no labels"),
        ({**good, "png": b"garbage"}, "cannot decode png"),
        ({**good, "labels.json": b"{oops"}, "not JSON"),
        ({**good, "labels.json": b'["cat"]'}, "class indices"),
        ({**good, "mask.png": encode_sample(Sample("x", np.zeros((3, 3, 3), np.uint8), [0]))["png"]}, "mode RGB"),
    ]:
        with pytest.raises(SampleDecodeError, match=reason):
            decode_sample(broken)


def test_ids_past_the_classes_are_decode_errors_when_the_classes_are_known(tmp_path):
    """A class index or a mask/pseudo id past the classes decodes without num_classes (nothing to check against)
    but is a counted failure with it: the training loader skips it instead of crashing in multi_hot or the loss."""
    image = np.zeros((4, 4, 3), np.uint8)
    mask = np.full((4, 4), NUM_CLASSES + 1, np.uint8)  # one past the last class's id
    for sample, reason in [
        (Sample("label", image, [NUM_CLASSES]), rf"labels \[{NUM_CLASSES}\] outside 0\.\.{NUM_CLASSES - 1}"),
        (Sample("mask", image, [0], mask=mask), rf"mask has ids \[{NUM_CLASSES + 1}\] outside 0\.\.{NUM_CLASSES}"),
        (Sample("pseudo", image, [0], pseudo=mask), "pseudo has ids"),
    ]:
        raw = encode_sample(sample)
        assert decode_sample(raw).key == sample.key
        with pytest.raises(SampleDecodeError, match=reason):
            decode_sample(raw, num_classes=NUM_CLASSES)
    ignored = np.full((4, 4), 255, np.uint8)
    assert decode_sample(encode_sample(Sample("ok", image, [NUM_CLASSES - 1], mask=ignored)), num_classes=NUM_CLASSES)

    shard = str(tmp_path / "train-000000.tar")
    write_split([*random_samples(5), Sample("past", image, [NUM_CLASSES])], tmp_path, "train")
    loader = make_loader([shard], transform=classification_example, batch_size=2, steps=3, shuffle_buffer=1,
                         num_classes=NUM_CLASSES)
    failures = [f for batch in loader for f in batch["failures"]]
    assert [f.key for f in failures] == ["past"] and "outside" in failures[0].reason


# --------------------------------------------------------------------------- manifest


def write_manifest(path, data):
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return path


def test_manifest_load_errors_name_path_and_key(tmp_path):
    missing = tmp_path / "nope" / "manifest.json"
    with pytest.raises(ManifestError, match=str(missing)):
        Manifest.load(missing)

    path = write_manifest(tmp_path / "manifest.json", "{not json")
    with pytest.raises(ManifestError, match=f"{path}.*not valid JSON"):
        Manifest.load(path)

    good = {
        "format_version": 1, "name": "x", "classes": ["a", "b"],
        "splits": {"train": {"shards": ["train-000000.tar"], "num_samples": 3, "shard_sizes": [3]}},
    }
    Manifest.load(write_manifest(path, good))  # sanity: the base case loads
    del good["splits"]["train"]["num_samples"]
    with pytest.raises(ManifestError, match=rf"{path}.*'splits\.train\.num_samples'"):
        Manifest.load(write_manifest(path, good))
    good["splits"]["train"]["num_samples"] = 4
    with pytest.raises(ManifestError, match="shard_sizes"):
        Manifest.load(write_manifest(path, good))
    good["splits"]["train"]["num_samples"] = 3
    with pytest.raises(ManifestError, match="'classes'"):
        Manifest.load(write_manifest(path, {**good, "classes": "ab"}))
    with pytest.raises(ManifestError, match="'format_version'"):
        Manifest.load(write_manifest(path, {**good, "format_version": 7}))

    write_manifest(path, good)
    manifest = Manifest.load(tmp_path)  # a directory works too
    with pytest.raises(ManifestError, match="no split 'test'.*train"):
        manifest.shard_paths("test")


def test_manifest_save_is_atomic_and_roundtrips(tmp_path):
    manifest = write_dataset(tmp_path, "toy", ["a", "b", "c", "d", "e"], {"train": random_samples(3)}, meta={"k": 1})
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    loaded = Manifest.load(tmp_path)
    assert loaded.to_dict() == manifest.to_dict() and loaded.meta == {"k": 1, "skipped": {"train": 0}}


# --------------------------------------------------------------------------- rank splitting


def test_shards_for_rank_is_disjoint_covering_and_reshuffled_per_epoch():
    shards = [f"shard-{i}.tar" for i in range(11)]
    per_epoch = []
    for epoch in range(3):
        parts = [shards_for_rank(shards, rank, 3, epoch, seed=5) for rank in range(3)]
        flat = [s for part in parts for s in part]
        assert sorted(flat) == sorted(shards) and len(set(flat)) == len(flat)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [shards_for_rank(shards, rank, 3, epoch, seed=5) for rank in range(3)]  # same on every call
        per_epoch.append(parts)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert shards_for_rank(shards, 0, 3, 0, seed=6) != per_epoch[0][0]


def test_shards_for_rank_needs_a_shard_per_rank():
    with pytest.raises(DataError, match="2 shard.*4 ranks"):
        shards_for_rank(["a", "b"], 0, 4, 0, 0)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 2, 8) == 6
    assert steps_per_epoch(3, 4, 8) == 1


# --------------------------------------------------------------------------- loaders


@pytest.fixture
def unequal_shards(tmp_path):
    # 23 samples at 5 per shard: sizes 5, 5, 5, 5, 3, so ranks get unequal sample counts.
    info = write_split(random_samples(23), tmp_path, "train", samples_per_shard=5)
    assert len(set(info.shard_sizes)) > 1
    return [str(tmp_path / s) for s in info.shards], info


@pytest.mark.parametrize("num_workers", [0, 2])
def test_make_loader_gives_exactly_steps_batches_on_every_rank(unequal_shards, num_workers):
    shards, info = unequal_shards
    world_size, batch_size = 2, 4
    steps = 5  # more than the smaller rank holds (at least 8 samples < 5 * 4): it must repeat
    keys_by_rank = []
    for rank in range(world_size):
        loader = make_loader(
            shards, transform=classification_example, batch_size=batch_size, steps=steps, rank=rank,
            world_size=world_size, epoch=1, seed=0, num_workers=num_workers, shuffle_buffer=8,
        )
        batches = list(loader)
        assert len(batches) == steps == len(loader)
        assert all(b["image"].shape == (batch_size, 8, 8, 3) and len(b["key"]) == batch_size for b in batches)
        assert all(b["failures"] == [] for b in batches)
        keys_by_rank.append({k for b in batches for k in b["key"]})
        own = {s.key for s in iter_samples(shards_for_rank(shards, rank, world_size, 1, 0))}
        assert keys_by_rank[-1] <= own
    assert not keys_by_rank[0] & keys_by_rank[1]


def test_one_epoch_without_repeats_sees_distinct_samples(unequal_shards):
    shards, info = unequal_shards
    steps = steps_per_epoch(info.num_samples, 2, 4)  # 2 steps of 4: every rank holds >= 8 samples
    all_keys = []
    for rank in range(2):
        loader = make_loader(shards, transform=classification_example, batch_size=4, steps=steps, rank=rank,
                             world_size=2, epoch=0, seed=0, shuffle_buffer=4)
        all_keys += [k for batch in loader for k in batch["key"]]
    assert len(all_keys) == 2 * steps * 4 and len(set(all_keys)) == len(all_keys)


def test_shuffle_buffer_changes_order_but_is_seeded(unequal_shards):
    shards, _ = unequal_shards

    def keys(seed, buffer):
        loader = make_loader(shards, transform=classification_example, batch_size=4, steps=4, seed=seed,
                             shuffle_buffer=buffer)
        return [k for batch in loader for k in batch["key"]]

    assert keys(0, 16) == keys(0, 16)
    assert keys(0, 16) != keys(0, 1)


def test_missing_shard_is_an_error(tmp_path):
    with pytest.raises(DataError, match="do not exist"):
        make_loader([str(tmp_path / "nope.tar")], transform=classification_example, batch_size=1, steps=1)


# --------------------------------------------------------------------------- failures


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    write_bad_shard(shard, good=9)
    tracker = FailureTracker(max_failure_fraction=0.5)
    keys = [s.key for s in iter_samples([str(shard)], tracker)]
    assert len(keys) == 9 and "broken" not in keys
    assert (tracker.seen, tracker.failed) == (10, 1)
    assert tracker.failures[0].key == "broken" and tracker.failures[0].url == str(shard)

    # In the DDP loader the failure travels with the next sample into the batch.
    loader = make_loader([str(shard)], transform=classification_example, batch_size=3, steps=4, shuffle_buffer=1)
    batches = list(loader)
    failures = [f for b in batches for f in b["failures"]]
    assert failures and {f.key for f in failures} == {"broken"} and failures[0].url == str(shard)
    assert all("broken" not in b["key"] for b in batches)


def test_failure_tracker_raises_naming_the_shard_above_the_limit(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    write_bad_shard(shard, good=19)  # 1 of 20 = 5% > 1%
    with pytest.raises(DataError, match=f"1 of 20 samples.*{shard.name} in {tmp_path}"):
        list(iter_samples([str(shard)]))

    tracker = FailureTracker(max_failure_fraction=0.01, min_samples=50)
    loader = make_loader([str(shard)], transform=classification_example, batch_size=5, steps=40, shuffle_buffer=1)
    with pytest.raises(DataError, match=shard.name):
        for batch in loader:
            tracker.update(batch)
    assert tracker.seen >= 50


def test_failure_message_stays_short_and_leads_with_counts_and_shards():
    # Ray Train keeps only the first and last 500 characters of a worker's traceback, so a long
    # message lost its counts; with deep paths and many shards the message must stay short.
    folder = "/data/" + "/".join(["a-very-long-directory-name"] * 12)
    failures = [Failure(f"{folder}/train-{i:06d}.tar", f"key{i}", "cannot identify image file " + "x" * 300)
                for i in range(7)]
    tracker = FailureTracker(max_failure_fraction=0.01)
    tracker.add(50, failures)
    with pytest.raises(DataError) as excinfo:
        tracker.check()
    message = str(excinfo.value)
    assert len(message) <= 400
    assert message.startswith("7 of 57 samples failed to decode (12.3% > 1.0% allowed), in 7 shard(s): ")
    assert "train-000000.tar, train-000001.tar, train-000002.tar and 4 more" in message
    assert "[key0] cannot identify image file" in message


def test_failure_tracker_thresholds():
    failure = [Failure("shard-a.tar", "k", "bad bytes")]
    tracker = FailureTracker(max_failure_fraction=0.01, min_samples=100)
    tracker.add(10, failure)  # 1 of 11 failed, but too few samples to judge yet
    with pytest.raises(DataError, match="shard-a.tar"):
        tracker.check()  # epoch end judges whatever was seen

    tracker = FailureTracker(max_failure_fraction=0.01, min_samples=100)
    tracker.add(999, failure)  # 0.1%: fine
    tracker.check()
    assert tracker.fraction == pytest.approx(1 / 1000)


def test_truncated_shard_is_a_failure_not_a_crash(tmp_path):
    info = write_split(random_samples(6), tmp_path, "train", samples_per_shard=6)
    path = tmp_path / info.shards[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    tracker = FailureTracker(max_failure_fraction=1.0)
    read = list(iter_samples([str(path)], tracker))
    assert 0 < len(read) < 6
    assert tracker.failed >= 1 and any(f.url == str(path) for f in tracker.failures)


def test_all_broken_rank_raises_instead_of_hanging(tmp_path):
    shard = tmp_path / "bad.tar"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        writer.write({"__key__": "x", "png": b"nope", "labels.json": b"[0]"})
    loader = make_loader([str(shard)], transform=classification_example, batch_size=2, steps=3)
    with pytest.raises(DataError, match="no decodable sample"):
        list(loader)
