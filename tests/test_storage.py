"""Cloud storage (weaktr.storage) against a real S3-compatible server on loopback (moto's server mode, ``s3_server``
in conftest): the storage functions, and a dataset, a checkpoint and a converted dataset in a bucket. The whole
method with every path in a bucket (the jobs' command lines, their Ray workers included) is test_recipes.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from job_helpers import bucket_objects

from weaktr import storage
from weaktr.checkpoint import load_checkpoint, save_checkpoint
from weaktr.data.shards import DataError, Manifest
from weaktr.data.stream import FailureTracker, iter_samples
from weaktr.data.synthetic import SyntheticSpec, write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_storage_writes_reads_lists_and_removes_objects(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "a", "b.json")
    assert uri == f"{s3_bucket}/a/b.json" and storage.parent(uri) == f"{s3_bucket}/a"
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    storage.write_bytes(uri, b'{"x": 1}')
    assert storage.read_bytes(uri) == b'{"x": 1}' and storage.exists(uri) and storage.is_dir(f"{s3_bucket}/a")
    assert storage.list_names(f"{s3_bucket}/a") == ["b.json"] and storage.list_names(f"{s3_bucket}/none") == []

    local = tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    storage.put_file(local, f"{s3_bucket}/a/big.bin")
    assert not local.exists()  # moved, not copied
    copy = storage.local_copy(f"{s3_bucket}/a/big.bin", suffix=".bin")
    assert Path(copy).read_bytes() == bytes(range(256)) * 4096 and copy.endswith(".bin")

    storage.remove(f"{s3_bucket}/a")
    assert bucket_objects(s3_bucket) == []
    storage.remove(f"{s3_bucket}/a")  # nothing there is fine


def test_a_dataset_and_a_checkpoint_in_a_bucket_read_as_local_ones(s3_bucket, tmp_path):
    spec = SyntheticSpec(num_classes=3, num_train=12, num_val=0, min_size=32, max_size=40, samples_per_shard=4, seed=1)
    local = write_synthetic(tmp_path / "data", spec)
    storage.upload_dir(tmp_path / "data", f"{s3_bucket}/data")
    remote = Manifest.load(f"{s3_bucket}/data")
    assert remote.root == f"{s3_bucket}/data" and remote.splits == local.splits
    assert remote.shard_paths("train")[0] == f"{s3_bucket}/data/{local.splits['train'].shards[0]}"
    read = [(s.key, s.labels, s.image.tobytes()) for s in iter_samples(remote.shard_paths("train"))]
    assert read == [(s.key, s.labels, s.image.tobytes()) for s in iter_samples(local.shard_paths("train"))]

    # A shard cut short in the bucket is one failure, named by its URI; a missing one stops the read at once.
    shards = remote.shard_paths("train")
    whole = storage.read_bytes(shards[1])
    storage.write_bytes(shards[1], whole[: len(whole) // 2])
    tracker = FailureTracker(max_failure_fraction=1.0)
    kept = list(iter_samples(shards, tracker))
    shard_failures = [f for f in tracker.failures if f.key == ""]
    assert len(shard_failures) == 1 and shard_failures[0].url == shards[1], tracker.failures
    assert 8 <= len(kept) < 12
    with pytest.raises(DataError, match="do not exist"):
        next(iter_samples([*shards, f"{s3_bucket}/data/train-999999.tar"]))

    import torch

    save_checkpoint(tmp_path / "ckpt", kind="cam", model_state={"w": torch.arange(3.0)}, arch={}, classes=["a"],
                    config={}, epoch=4)
    storage.upload_dir(tmp_path / "ckpt", f"{s3_bucket}/ckpt")
    assert load_checkpoint(f"{s3_bucket}/ckpt")["epoch"] == 4
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(f"{s3_bucket}/nothing")

    # Backbone weights for a cluster without internet (model.weights_path), as the hub ships them.
    import safetensors.torch

    from weaktr.models.vit import create_backbone

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
    source = create_backbone(**tiny)
    safetensors.torch.save_file(source.state_dict(), tmp_path / "deit.safetensors")
    storage.put_file(tmp_path / "deit.safetensors", f"{s3_bucket}/weights/deit.safetensors")
    loaded = create_backbone(weights_path=f"{s3_bucket}/weights/deit.safetensors", **tiny)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_bucket_that_cannot_be_used_stops_a_job_with_one_line_naming_it(s3_server, tmp_path, capsys, monkeypatch):
    """A bucket that does not exist (a typo, or no permission) or an object store that does not answer ends the
    job before Ray starts, with one line naming the URI and the store's reason, not a traceback."""
    from job_helpers import load_job

    smoke = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
             "--set", f"data.root={tmp_path / 'data'}"]
    assert load_job("train_cam").main([*smoke, "--set", "run.storage_path=s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "error: s3://no-such-bucket/runs/smoke-cam/config.yaml: " in err and "NO_SUCH_BUCKET" in err
    assert "Traceback" not in err
    # The pipeline and a sweep keep their run directory there: the same one line.
    tune = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "tune_fusion.yaml"),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "data.synthetic.num_train=8",
            "--set", "data.synthetic.num_val=4"]
    for job, args in (("pipeline", smoke), ("tune_sweep", tune)):
        assert load_job(job).main([*args, "--set", "run.storage_path=s3://no-such-bucket/runs"]) == 2
        err = capsys.readouterr().err
        assert "error: s3://no-such-bucket/runs/" in err and "NO_SUCH_BUCKET" in err and "Traceback" not in err, err

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(storage.StorageUnavailable, match="s3://weaktr/runs: .*connect"):
        storage.list_names("s3://weaktr/runs")
