"""Phase-2 training: the loss, dataset checks, resume checks, and one 2-worker Ray Train run + a resumed run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from seg_helpers import save_random_checkpoint, tiny_config, write_pseudo_dataset

from weaktr.checkpoint import CheckpointMismatch, load_checkpoint
from weaktr.data.shards import DataError
from weaktr.models.build import build_segmenter as build_model
from weaktr.ops import gradient_clipping_loss
from weaktr.train.common import resume
from weaktr.train.seg_loop import fit, make_optimizer, pixel_losses, seg_run_name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-data")
    return root / "pseudo", write_pseudo_dataset(root)


def _random_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 50, 70, generator=g, requires_grad=True)  # sides not multiples of the region
    target = torch.randint(0, 4, (2, 50, 70), generator=g)
    target[:, :5] = 255  # an ignored band
    return logits, target


def test_plain_loss_is_mean_cross_entropy_and_clips_nothing(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset[0])
    cfg.seg_train.clip, cfg.seg_train.count_ignored_pixels = False, False
    logits, target = _random_batch()
    loss, stats = pixel_losses(logits, target, cfg)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)
    assert stats["clipped_fraction"] == 0
    assert stats["ce"] == pytest.approx(loss.item(), rel=1e-6)


def test_clipped_loss_matches_ops_and_reports_clipped_share(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset[0])
    cfg.seg_train.clip, cfg.seg_train.clip_start_value, cfg.seg_train.clip_patch_size = True, 10.0, 16
    cfg.seg_train.count_ignored_pixels = False  # statistics over labelled pixels only
    logits, target = _random_batch()
    loss, stats = pixel_losses(logits, target, cfg)

    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    valid = target != 255
    clipped = gradient_clipping_loss(pixel, valid, 10.0, 16)
    assert loss.item() == pytest.approx((clipped.sum() / valid.sum()).item(), rel=1e-6)
    assert loss.item() < stats["ce"]  # clipping only ever lowers the loss
    expected = ((clipped < pixel) & valid).sum().item() / valid.sum().item()
    assert 0 < stats["clipped_fraction"] == pytest.approx(expected)

    # Pixels above their region's threshold get no gradient.
    loss.backward()
    pixel_grad = logits.grad.abs().sum(1)  # [B, H, W]
    assert (pixel_grad[(clipped < pixel) & valid] == 0).all()
    assert (pixel_grad[(clipped == pixel) & valid] > 0).all()


def test_official_statistics_count_ignored_pixels_as_zero_loss(tmp_path, dataset):
    """count_ignored_pixels (the default, the official decoder.GradientClipping + engine.py): mu, the region means
    and the final mean run over every pixel, ignored ones with loss 0. Written out here region by region."""
    cfg = tiny_config(tmp_path, dataset[0])
    cfg.seg_train.clip, cfg.seg_train.clip_start_value, cfg.seg_train.clip_patch_size = True, 10.0, 16
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 64, 48, generator=g)
    target = torch.randint(0, 4, (2, 64, 48), generator=g)
    target[:, :20] = 255  # a padded band, as on crops of small images
    loss, _ = pixel_losses(logits, target, cfg)

    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")  # [2, 64, 48], 0 where ignored
    mu = pixel.mean()
    batch_mean = pixel.mean(0)  # [64, 48]
    out = pixel.clone()
    for top in range(0, 64, 16):
        for left in range(0, 48, 16):
            tau = torch.maximum(batch_mean[top : top + 16, left : left + 16].mean(), mu)
            out[:, top : top + 16, left : left + 16] = torch.minimum(pixel[:, top : top + 16, left : left + 16], tau)
    assert loss.item() == pytest.approx(out.mean().item(), rel=1e-5)
    cfg.seg_train.count_ignored_pixels = False  # over labelled pixels: a different (larger) figure here
    assert pixel_losses(logits, target, cfg)[0].item() > loss.item() * 1.2


def test_warm_up_clips_nothing_while_loss_is_high(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset[0])
    cfg.seg_train.clip, cfg.seg_train.clip_start_value = True, 0.01  # random logits: mean CE ~1.9 > 0.01
    logits, target = _random_batch()
    loss, stats = pixel_losses(logits, target, cfg)
    assert stats["clipped_fraction"] == 0
    # The plain mean over every pixel, ignored ones as 0 (count_ignored_pixels, the default).
    plain = F.cross_entropy(logits, target, ignore_index=255, reduction="none").mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_refuses_a_dataset_without_pseudo_labels(tmp_path):
    write_pseudo_dataset(tmp_path, num_train=8, num_val=8, pseudo=False)
    cfg = tiny_config(tmp_path, tmp_path / "pseudo")
    with pytest.raises(DataError, match="no pseudo-labels"):
        fit(cfg)  # refused on the driver, before any Ray worker starts


def test_resume_refuses_other_classes_and_phase_one_checkpoints(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset[0])
    classes = dataset[1].classes
    model = build_model(cfg, len(classes))
    optimizer, scheduler = make_optimizer(model, cfg, steps=5)

    def resume_from(path, into=model, opt=optimizer, sched=scheduler):
        return resume(load_checkpoint(path), into, opt, sched, kind="seg", classes=classes, steps=5)

    other = save_random_checkpoint(tmp_path / "other", cfg, ["cat", "dog", "bird"])
    with pytest.raises(CheckpointMismatch, match=r"trained on classes \['cat', 'dog', 'bird'\] but the dataset has"):
        resume_from(other)

    cam = save_random_checkpoint(tmp_path / "cam", cfg, classes, kind="cam")
    with pytest.raises(CheckpointMismatch, match="is a 'cam' checkpoint, expected 'seg'"):
        resume_from(cam)

    same = save_random_checkpoint(tmp_path / "same", cfg, classes, seed=1)
    cfg.seg_model.d_model = 32
    narrower = build_model(cfg, len(classes))
    with pytest.raises(CheckpointMismatch, match="d_model: checkpoint 64 vs config 32"):
        resume_from(same, narrower, *make_optimizer(narrower, cfg, steps=5))

    # a matching checkpoint loads: the weights are the saved ones, and the lr is the schedule's at the resumed step
    start = resume_from(same)
    assert start == 1
    saved = load_checkpoint(same)["model"]
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    fresh_optimizer, fresh_scheduler = make_optimizer(build_model(cfg, len(classes)), cfg, steps=5)
    fresh_scheduler.step_update(5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_optimizer.param_groups[0]["lr"])


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tmp_path_factory, dataset):
    cfg = tiny_config(tmp_path_factory.mktemp("seg-run"), dataset[0])
    cfg.seg_train.epochs, cfg.seg_train.eval_every = 3, 2
    cfg.seg_train.checkpoints_to_keep = 3  # Result.metrics_dataframe holds the kept checkpoints' metrics
    cfg.seg_train.clip_start_value = 10.0  # clip from the first step, so clipped_fraction is exercised
    cfg.tracking.backend, cfg.tracking.uri = "mlflow", str(tmp_path_factory.mktemp("mlflow"))
    return copy.deepcopy(cfg), fit(cfg)


def test_two_worker_training_learns_reports_clipping_and_resumes(two_worker_run, dataset):
    _, manifest = dataset
    cfg, result = copy.deepcopy(two_worker_run[0]), two_worker_run[1]

    # Rows follow the kept checkpoints, which Ray Train orders by score (val_mIoU), not by epoch.
    history = result.metrics_dataframe.sort_values("epoch").reset_index(drop=True)
    assert list(history["epoch"]) == [0, 1, 2]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert (history["clipped_fraction"] > 0).all() and (history["clipped_fraction"] < 1).all()
    assert (history["loss"] < history["ce"]).all()
    # validation every 2 epochs and at the last one
    assert math.isnan(history["val_mIoU"].iloc[0])
    assert 0 < history["val_mIoU"].iloc[1] <= 1 and 0 < history["val_mIoU"].iloc[2] <= 1

    # Tracked from rank 0 (tracking.uri: a folder, its mlflow.db): every epoch's losses, clipped share and lr.
    from test_tracking import metric_steps, mlflow_runs

    (run,) = mlflow_runs(Path(cfg.tracking.uri), cfg.run.name)
    assert run.data.params["seg_train.clip_start_value"] == "10.0"
    for metric in ("loss", "ce", "clipped_fraction", "lr"):
        assert [step for step, _ in metric_steps(Path(cfg.tracking.uri), run.info.run_id, metric)] == [0, 1, 2]
    assert [step for step, _ in metric_steps(Path(cfg.tracking.uri), run.info.run_id, "val_mIoU")] == [1, 2]

    state = load_checkpoint(result.checkpoint.path)
    assert state["kind"] == "seg" and state["epoch"] == 2 and state["classes"] == manifest.classes
    assert state["arch"]["num_classes"] == manifest.num_classes + 1

    # Resume in a new run: only the missing epoch runs, continuing the schedule and the weights.
    cfg.run.name = "seg-test-resumed"
    cfg.seg_train.epochs = 4
    cfg.seg_train.resume_from = result.checkpoint.path
    resumed = fit(cfg)
    assert list(resumed.metrics_dataframe["epoch"]) == [3]
    assert resumed.metrics["loss"] < history["loss"].iloc[0]
    assert load_checkpoint(resumed.checkpoint.path)["epoch"] == 3


def test_a_killed_worker_restarts_the_run_from_its_last_checkpoint(two_worker_run, ray_session):
    """Phase 2's side of test_train_cam.py's worker-kill test (the tolerance and why: worker_kill.py)."""
    from worker_kill import KILLED_RUN_TOLERANCE, WorkerKiller

    cfg, uninterrupted = copy.deepcopy(two_worker_run[0]), two_worker_run[1]
    cfg.run.name, cfg.seg_train.max_failures = "seg-killed", 1
    cfg.seg_train.checkpoints_to_keep = 10  # every report kept: a repeated epoch would show
    killer = WorkerKiller(Path(cfg.run.storage_path) / seg_run_name(cfg), ray_session[0])
    killer.start()
    result = fit(cfg)
    killer.join()
    assert result.error is None and killer.workers_started_after == 2
    assert sorted(result.metrics_dataframe["epoch"]) == [0, 1, 2]  # each epoch trained and checkpointed once
    for key in ("loss", "ce", "val_mIoU"):
        assert result.metrics[key] == pytest.approx(uninterrupted.metrics[key], abs=KILLED_RUN_TOLERANCE), key
