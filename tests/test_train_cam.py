"""Phase-1 training as real Ray Train runs on the shared local Ray head (Gloo DDP on CPU)."""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import pytest

from weaktr.checkpoint import load_checkpoint
from weaktr.config import load_config
from weaktr.data.shards import Manifest
from weaktr.launch import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(tmp_path: Path, name: str, *overrides: str):
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
         "train.checkpoints_to_keep=10", *overrides],
    )
    prepare_data(cfg)
    return cfg


def add_corrupt_samples(shard: str, count: int) -> None:
    """Rewrite a shard with samples whose image bytes are not an image at its front, where a
    rank meets them before its epoch's step budget runs out."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i in range(count):
            for name, data in ((f"corrupt{i:03d}.png", b"not a png at all"), (f"corrupt{i:03d}.labels.json", b"[0]")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def epoch_metrics(result) -> list[dict]:
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])


@pytest.mark.parametrize("key", ["model.weights_path", "train.resume_from"])
def test_a_missing_input_file_is_refused_before_any_worker_starts(tmp_path, key):
    """Every worker would fail as it starts, and Ray Train would start them again (no Ray here: the refusal comes
    first)."""
    from weaktr.config import ConfigError
    from weaktr.train.cam_loop import fit

    cfg = smoke_config(tmp_path, "missing", f"{key}=nowhere/backbone.pth")
    with pytest.raises(ConfigError) as err:
        fit(cfg)
    assert str(err.value) == f"config key '{key}': nothing at {Path.cwd() / 'nowhere/backbone.pth'}"


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    from weaktr.train.cam_loop import fit

    tmp_path = tmp_path_factory.mktemp("cam")
    cfg = smoke_config(tmp_path, "first", "train.epochs=3", "tracking.backend=[mlflow, tensorboard]")
    manifest = Manifest.load(Path(cfg.data.root) / "manifest.json")
    # One undecodable sample among 128: under the 1% limit, so skipped and counted.
    add_corrupt_samples(manifest.shard_paths("train")[0], 1)
    return cfg, fit(cfg)


def test_two_worker_run_learns_on_disjoint_data(first_run):
    cfg, result = first_run
    assert result.error is None
    history = epoch_metrics(result)
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    # Every rank streamed a disjoint set of shards in every epoch.
    assert all(m["rank_overlap_keys"] == 0 for m in history)
    assert sum(m["samples_failed"] for m in history) >= 1


def test_cam_miou_is_measured_every_epoch_and_picks_the_best_checkpoint(first_run):
    from weaktr.metrics import parse_sweep

    cfg, result = first_run
    history = epoch_metrics(result)
    thresholds = parse_sweep(cfg.train.cam_eval.sweep)
    for m in history:
        assert 0 < m["cam_mIoU"] <= 1 and m["cam_bg_threshold"] in thresholds, m
    # Ray Train ranks the kept checkpoints by CAM mIoU (the official checkpoint_best_mIoU.pth), not by val_mAP.
    best = result.get_best_checkpoint("cam_mIoU", "max")
    assert load_checkpoint(best.path)["metrics"]["cam_mIoU"] == max(m["cam_mIoU"] for m in history)


def test_checkpoint_holds_weights_config_and_classes(first_run):
    cfg, result = first_run
    ckpt = load_checkpoint(result.checkpoint.path)
    manifest = Manifest.load(Path(cfg.data.root) / "manifest.json")
    assert ckpt["kind"] == "cam" and ckpt["classes"] == manifest.classes
    assert ckpt["epoch"] == 2 and ckpt["config"]["train"]["epochs"] == 3
    assert ckpt["version"] and ckpt["optimizer"] is not None


def test_rank_0_tracks_the_config_and_every_epoch(first_run):
    """tracking.backend [mlflow, tensorboard]: one MLflow run in the default store (run.storage_path/mlflow.db)
    holding the config as parameters and one value per epoch of every loss, lr and the CAM mIoU; the same curves in
    TensorBoard's event files (both read back with their own readers: test_tracking.py)."""
    from test_tracking import metric_steps, mlflow_runs, scalars

    cfg, result = first_run
    store = Path(cfg.run.storage_path)
    (run,) = mlflow_runs(store, "first")
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["data.root"] == cfg.data.root
    for metric in ("loss", "loss_cls", "loss_coarse", "loss_fine", "lr", "cam_mIoU", "val_mAP"):
        steps = metric_steps(store, run.info.run_id, metric)
        assert [step for step, _ in steps] == [0, 1, 2], metric
    assert metric_steps(store, run.info.run_id, "loss")[-1][1] == pytest.approx(result.metrics["loss"])
    assert [step for step, _ in scalars(store / "tensorboard" / "first", "loss_fine")] == [0, 1, 2]


def test_a_killed_worker_restarts_the_run_from_its_last_checkpoint(first_run, ray_session):
    """One Ray Train worker process SIGKILLed once the first checkpoint is registered (a preempted node):
    FailureConfig restarts the worker group, which continues from the last checkpoint and finishes where the
    uninterrupted run did. A restart from scratch would finish there too, which is why every epoch must have been
    registered exactly once."""
    from worker_kill import KILLED_RUN_TOLERANCE, WorkerKiller

    from weaktr.train.cam_loop import fit

    base_cfg, uninterrupted = first_run
    cfg = copy.deepcopy(base_cfg)
    cfg.run.name, cfg.train.max_failures = "killed", 1
    killer = WorkerKiller(Path(cfg.run.storage_path) / cfg.run.name, ray_session[0])
    killer.start()
    result = fit(cfg)
    killer.join()
    assert result.error is None and killer.workers_started_after == 2  # both ranks started again
    assert [m["epoch"] for m in epoch_metrics(result)] == [0, 1, 2]  # each epoch trained and checkpointed once
    for key in ("loss", "val_mAP", "cam_mIoU"):
        assert result.metrics[key] == pytest.approx(uninterrupted.metrics[key], abs=KILLED_RUN_TOLERANCE), key
    # The restarted group's rank 0 went on with the same tracked runs: one MLflow run, one TensorBoard value a step.
    from test_tracking import metric_steps, mlflow_runs, scalars

    store = Path(cfg.run.storage_path)
    (run,) = mlflow_runs(store, "killed")
    assert {step for step, _ in metric_steps(store, run.info.run_id, "loss")} == {0, 1, 2}
    assert [step for step, _ in scalars(store / "tensorboard" / "killed", "loss")] == [0, 1, 2]


def test_resume_continues_from_the_checkpoint(first_run):
    """What a resumed run does first (train.resume_from, or Ray Train restoring a worker): the checkpoint's weights,
    the next epoch, and the lr the schedule has there; a phase-2 checkpoint is refused. (A resumed Ray Train run end
    to end: test_seg_loop.py, through the same common.resume.)"""
    import torch

    from weaktr.checkpoint import CheckpointMismatch
    from weaktr.models.build import build_cam_model
    from weaktr.train.cam_loop import make_optimizer
    from weaktr.train.common import resume

    cfg, result = first_run
    state = load_checkpoint(result.checkpoint.path)
    classes = state["classes"]
    cfg = copy.deepcopy(cfg)
    cfg.train.epochs = 4  # a longer run than the checkpoint's: the schedule stretches over it
    model = build_cam_model(cfg, len(classes))
    optimizer, scheduler = make_optimizer(model, cfg, steps=4)
    assert resume(state, model, optimizer, scheduler, kind="cam", classes=classes, steps=4) == 3
    assert all(torch.equal(value, state["model"][name]) for name, value in model.state_dict().items())
    fresh_optimizer, fresh_scheduler = make_optimizer(build_cam_model(cfg, len(classes)), cfg, steps=4)
    fresh_scheduler.step_update(3 * 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_optimizer.param_groups[0]["lr"])
    with pytest.raises(CheckpointMismatch, match="is a 'cam' checkpoint, expected 'seg'"):
        resume(state, model, optimizer, scheduler, kind="seg", classes=classes, steps=4)


def test_too_many_corrupt_samples_stop_the_run_naming_the_shard(ray_session, tmp_path):
    from ray.train import TrainingFailedError

    from weaktr.train.cam_loop import fit

    cfg = smoke_config(tmp_path, "corrupt", "train.epochs=1", "train.max_failures=0")
    shard = Manifest.load(Path(cfg.data.root) / "manifest.json").shard_paths("train")[1]
    add_corrupt_samples(shard, 64)  # half of what one rank streams
    with pytest.raises(TrainingFailedError) as excinfo:
        fit(cfg)
    message = str(excinfo.value)
    assert "failed to decode" in message and Path(shard).name in message
