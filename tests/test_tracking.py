"""Experiment tracking (weaktr.tracking) against real local stores: MLflow's file store read back with its client,
TensorBoard's event files read back with tensorboard's EventAccumulator. (The training loops', the pseudo-label
job's and a Tune sweep's runs: test_train_cam.py, test_pipeline.py, test_sweep.py.)"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from weaktr.config import ConfigError, load_config
from weaktr.tracking import check_tracking, log_results, open_run

mlflow = pytest.importorskip("mlflow", reason="the weaktr[tracking] extra")
pytest.importorskip("tensorboard", reason="the weaktr[tracking] extra")

ROOT = Path(__file__).resolve().parents[1]


def tracked_config(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml",
                       [f"run.storage_path={tmp_path}", "run.name=exp", *overrides])


def mlflow_runs(folder: Path, experiment: str = "exp") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def metric_steps(folder: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in history)


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_run_logs_its_config_and_one_value_per_epoch_to_both_stores(tmp_path):
    cfg = tracked_config(tmp_path, "tracking.backend=[mlflow, tensorboard]")
    tracked = open_run(cfg, "phase1")
    tracked.log_params({"train": {"lr": 0.1, "epochs": 3}, "run": {"name": "exp"}})
    for epoch in range(3):
        tracked.log_metrics({"epoch": epoch, "loss": 1.0 / (epoch + 1), "cam_mIoU": float("nan"), "ok": True},
                            step=epoch)
    tracked.close()

    (run,) = mlflow_runs(tmp_path)
    assert run.info.run_name == "phase1" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.1" and run.data.params["run.name"] == "exp"
    assert metric_steps(tmp_path, run.info.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert "cam_mIoU" not in run.data.metrics and "ok" not in run.data.metrics  # NaN and bools are not numbers
    assert scalars(tmp_path / "tensorboard" / "phase1", "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]


def test_a_restarted_run_continues_its_run_and_replaces_what_the_lost_attempt_logged(tmp_path):
    """A Ray Train restart from the checkpoint of epoch 0: the same MLflow run (its parameters not logged twice),
    and TensorBoard keeps one value per step, the new attempt's."""
    cfg = tracked_config(tmp_path, "tracking.backend=[mlflow, tensorboard]")
    first = open_run(cfg, "phase1")
    first.log_params({"train": {"lr": 0.1}})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)  # the lost attempt got this far
    again = open_run(cfg, "phase1", first_step=1)
    assert again.resumed
    again.log_params({"train": {"lr": 0.1}})
    again.log_metrics({"loss": 1.5}, step=1)
    again.log_metrics({"loss": 1.0}, step=2)
    again.close()
    (run,) = mlflow_runs(tmp_path)
    assert {step for step, _ in metric_steps(tmp_path, run.info.run_id, "loss")} == {0, 1, 2}
    assert scalars(tmp_path / "tensorboard" / "phase1", "loss") == [(0, 3.0), (1, 1.5), (2, 1.0)]


def test_job_results_and_a_curve_become_one_run(tmp_path):
    cfg = tracked_config(tmp_path, "tracking.backend=mlflow", f"tracking.uri={tmp_path / 'store'}")
    report = {"cam": {"miou": 0.4, "per_class": {"dog": {"iou": 0.5, "precision": None}}}, "num_samples": 20}
    log_results(cfg, "pseudo", str(tmp_path / "out"), report, {"sweep_mIoU": [(30, 0.2), (40, 0.35), (50, None)]})
    (run,) = mlflow_runs(tmp_path / "store")
    assert run.data.metrics["cam.miou"] == 0.4 and run.data.metrics["cam.per_class.dog.iou"] == 0.5
    assert run.data.params["tracking.backend"] == "mlflow"
    assert metric_steps(tmp_path / "store", run.info.run_id, "sweep_mIoU") == [(30, 0.2), (40, 0.35)]


def test_a_tracking_server_out_of_reach_is_dropped_with_one_warning(tmp_path, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tracked_config(tmp_path, "tracking.backend=mlflow", f"tracking.uri=http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="weaktr.tracking"):
        tracked = open_run(cfg, "phase1")
        tracked.log_params({"a": 1})
        for step in range(3):
            tracked.log_metrics({"loss": 1.0}, step=step)
        tracked.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "weaktr.tracking"]
    assert len(warnings) == 1 and "mlflow dropped for run phase1, which goes on" in warnings[0], warnings


def test_tracking_settings_are_checked_naming_the_key(tmp_path):
    assert tracked_config(tmp_path).tracking.backends == []
    assert tracked_config(tmp_path, "tracking.backend=[tensorboard, mlflow]").tracking.backends == [
        "tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="config section 'tracking': backend must be none, mlflow, tensorboard"):
        tracked_config(tmp_path, "tracking.backend=wandb")
    with pytest.raises(ConfigError, match="uri names one store"):
        tracked_config(tmp_path, "tracking.backend=[mlflow, tensorboard]", "tracking.uri=/tmp/x")
    bucket = tracked_config(tmp_path, "tracking.backend=mlflow", "run.storage_path=s3://bucket/runs")
    with pytest.raises(ConfigError, match="config key 'tracking.uri': run.storage_path s3://bucket/runs is a bucket"):
        check_tracking(bucket)


def test_a_relative_sqlite_store_is_made_absolute_and_counts_as_this_machines_disk(tmp_path, monkeypatch):
    """``sqlite:///runs/mlflow.db`` is relative to each process's directory: Ray Train's rank 0 would write a store
    of its own in its own directory, on whichever node it runs; and the check that refuses local paths on a
    cluster used to pass it as a URI."""
    from weaktr import storage
    from weaktr.config import resolve_paths

    monkeypatch.chdir(tmp_path)
    cfg = tracked_config(tmp_path, "tracking.backend=mlflow", "tracking.uri=sqlite:///store/mlflow.db")
    resolve_paths(cfg)
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    tracked = open_run(cfg, "phase1")
    tracked.log_metrics({"loss": 1.0}, step=0)
    tracked.close()
    assert [run.info.run_name for run in mlflow_runs(tmp_path / "store")] == ["phase1"]
    assert (tmp_path / "store" / "mlflow.db").exists()

    assert storage.is_local(cfg.tracking.uri) and storage.is_local("file:///data/voc") and storage.is_local("runs")
    assert not storage.is_local("s3://bucket/runs") and not storage.is_local("http://mlflow:5000")
