"""Phase-2 evaluation: model loading checks, CRF, and the Ray Data job against a direct loop."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from job_helpers import load_job
from seg_helpers import save_random_checkpoint, tiny_config, write_pseudo_dataset

from weaktr.checkpoint import CHECKPOINT_FILE, CheckpointMismatch
from weaktr.config import save_config
from weaktr.data.stream import iter_samples
from weaktr.evaluate import REPORT_NAME, evaluate_on_ray, evaluate_samples, load_segmenter

evaluate_job = load_job("evaluate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg-eval")
    manifest = write_pseudo_dataset(tmp, num_train=8, num_val=12)  # val: 12 images in 2 shards
    cfg = tiny_config(tmp, tmp / "pseudo")
    checkpoint = save_random_checkpoint(tmp / "ckpt", cfg, manifest.classes)
    return tmp, cfg, manifest, checkpoint


def _val_samples(manifest):
    return list(iter_samples(manifest.shard_paths("val")))


def test_loads_weights_and_refuses_other_classes_and_kinds(setup):
    tmp, cfg, manifest, checkpoint = setup
    model, ckpt = load_segmenter(checkpoint, classes=manifest.classes)
    assert not model.training and ckpt["classes"] == manifest.classes
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())

    with pytest.raises(CheckpointMismatch, match=r"trained on classes .* but the dataset has \['a', 'b', 'c'\]"):
        load_segmenter(checkpoint, classes=["a", "b", "c"])
    cam = save_random_checkpoint(tmp / "cam", cfg, manifest.classes, kind="cam")
    with pytest.raises(CheckpointMismatch, match="'cam' checkpoint; this needs a phase-2 segmentation"):
        load_segmenter(cam)
    cfg_other = tiny_config(tmp, tmp / "pseudo")
    cfg_other.eval.split = "val"
    other = save_random_checkpoint(tmp / "other", cfg, ["x", "y", "z"])
    with pytest.raises(CheckpointMismatch, match="trained on classes"):
        evaluate_on_ray(cfg_other, other)  # refused on the driver, before any Ray work


class _Payload:
    """Anything but tensors and plain values: weights-only unpickling must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_is_weights_only(setup, tmp_path):
    _, _, _, checkpoint = setup
    state = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)
    state["metrics"] = {"note": _Payload()}
    (tmp_path / "bad").mkdir()
    torch.save(state, tmp_path / "bad" / CHECKPOINT_FILE)
    with pytest.raises(CheckpointMismatch, match="UnpicklingError: Weights only load failed"):
        load_segmenter(tmp_path / "bad")
    (tmp_path / "bad" / CHECKPOINT_FILE).write_text('{"a": "json file"}')
    with pytest.raises(CheckpointMismatch, match="is not a weaktr checkpoint"):
        load_segmenter(tmp_path / "bad")
    whole = (checkpoint / CHECKPOINT_FILE).read_bytes()
    (tmp_path / "bad" / CHECKPOINT_FILE).write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(CheckpointMismatch, match="is not a weaktr checkpoint"):
        load_segmenter(tmp_path / "bad")


def test_crf_and_multiscale_flip_score_every_valid_pixel(setup):
    _, cfg, manifest, checkpoint = setup
    model, _ = load_segmenter(checkpoint)
    samples = _val_samples(manifest)[:3]
    valid_pixels = sum(int((s.mask != 255).sum()) for s in samples)

    cfg.eval.scales, cfg.eval.flip = [0.75, 1.0], True
    plain = evaluate_samples(model, samples, cfg.eval)
    cfg.eval.crf = True
    refined = evaluate_samples(model, samples, cfg.eval)
    assert plain.matrix.sum() == refined.matrix.sum() == valid_pixels
    assert not np.array_equal(plain.matrix, refined.matrix)  # the CRF smooths an untrained model's noisy labels
    cfg.eval.scales, cfg.eval.flip, cfg.eval.crf = [1.0], False, False


def test_ray_job_matches_a_direct_loop(ray_session, setup, tmp_path, capsys):
    _, cfg, manifest, checkpoint = setup
    cfg.eval.scales, cfg.eval.flip = [0.75, 1.0], True
    cfg.eval.out_dir = str(tmp_path / "report")
    config_file = tmp_path / "eval.yaml"
    save_config(cfg, config_file)

    assert evaluate_job.main(["--config", str(config_file), "--checkpoint", str(checkpoint)]) == 0
    report = json.loads((tmp_path / "report" / REPORT_NAME).read_text())
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "hstripes" in printed

    model, _ = load_segmenter(checkpoint)
    direct = evaluate_samples(model, _val_samples(manifest), cfg.eval)
    assert report["num_images"] == manifest.splits["val"].num_samples
    assert np.array_equal(np.array(report["confusion_matrix"]), direct.matrix)
    assert report["miou"] == pytest.approx(direct.miou())
    assert set(report["per_class"]) == {"background", *manifest.classes}
    assert report["settings"]["scales"] == [0.75, 1.0] and report["settings"]["flip"] is True


def test_one_pass_scores_without_and_with_the_crf_as_two_separate_runs(ray_session, setup, tmp_path):
    from weaktr.evaluate import evaluate_variants_on_ray

    _, cfg, manifest, checkpoint = setup
    cfg = copy.deepcopy(cfg)
    cfg.tracking.backend, cfg.tracking.uri = "tensorboard", str(tmp_path / "tensorboard")
    plain, refined = evaluate_variants_on_ray(cfg, checkpoint, [False, True])
    model, _ = load_segmenter(checkpoint)
    for report, crf in ((plain, False), (refined, True)):
        cfg.eval.crf = crf
        direct = evaluate_samples(model, _val_samples(manifest), cfg.eval)
        assert np.array_equal(np.array(report["confusion_matrix"]), direct.matrix)
        assert (report["settings"]["crf"] is not None) == crf
    cfg.eval.crf = False
    assert plain["confusion_matrix"] != refined["confusion_matrix"]  # the CRF changed some labels
    # Tracked as one run (TensorBoard here; test_tracking.py reads MLflow too): both mIoUs and the per-class table.
    from test_tracking import scalars

    for name, report in (("eval", plain), ("eval_crf", refined)):
        assert scalars(tmp_path / "tensorboard" / "eval", f"{name}.miou") == [(0, pytest.approx(report["miou"]))]
    assert scalars(tmp_path / "tensorboard" / "eval", "eval.per_class.background.iou")


def test_a_sample_that_fails_to_decode_is_skipped_counted_and_named(ray_session, setup, tmp_path, caplog):
    """The actors decode what the readers send as stored (a record crosses to an actor's node as its encoded bytes,
    not its pixels), so a broken image surfaces in an actor: it is skipped and counted over the whole split against
    data.max_failure_fraction, and beyond it the run stops naming the shard."""
    import copy
    import io
    import shutil
    import tarfile

    from weaktr.data.shards import DataError, Manifest
    from weaktr.data.stream import FailureTracker
    from weaktr.evaluate import _read_shard, evaluate_variants_on_ray

    _, cfg, manifest, checkpoint = setup
    root = tmp_path / "damaged"
    shutil.copytree(manifest.root, root)
    damaged = Manifest.load(root)
    shard = damaged.shard_paths("val")[0]
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    broken = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.startswith(f"{broken}.") and member.name.endswith(".png") and "mask" not in member.name:
                data = b"not an image"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    last = members[-1][0].name.split(".")[0]
    stored = sum(len(data) for member, data in members if member.name.split(".")[0] == last)
    rows = _read_shard({"shard": shard})
    assert len(rows) == damaged.splits["val"].shard_sizes[0] and not any(row["failure"] for row in rows)
    assert len(rows[-1]["record"]) < stored + 1024  # the stored bytes and their names, no decoded pixels

    cfg = copy.deepcopy(cfg)
    cfg.data.root, cfg.data.max_failure_fraction = str(root), 0.5
    report = evaluate_variants_on_ray(cfg, checkpoint, [False])[0]
    readable = list(iter_samples(damaged.shard_paths("val"), FailureTracker(1.0)))
    model, _ = load_segmenter(checkpoint)
    assert report["num_images"] == len(readable) == damaged.splits["val"].num_samples - 1
    assert report["num_skipped"] == 1
    assert np.array_equal(np.array(report["confusion_matrix"]), evaluate_samples(model, readable, cfg.eval).matrix)
    assert any(broken in message and shard in message for message in caplog.messages)

    cfg.data.max_failure_fraction = 0.01
    with pytest.raises(DataError, match=r"1 of 12 samples failed to decode .* in 1 shard\(s\)"):
        evaluate_variants_on_ray(cfg, checkpoint, [False])
