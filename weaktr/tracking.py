"""Experiment tracking (the ``tracking`` config section): parameters and metrics of each run to MLflow and/or
TensorBoard, as the official code logs both phases to MLflow.

What is tracked, and where (``open_run``):
- a training phase (rank 0 of its Ray Train run): the resolved config as parameters, and per epoch every number
  it reports (losses, lr, CAM mIoU or val mIoU, the clipping threshold, ...), step = epoch;
- the pseudo-label job: CAM and CRF pseudo-label mIoU, per-class IoU and the background-threshold curve;
- evaluation: mIoU and per-class IoU.
MLflow: one experiment per ``run.name`` (a pipeline's stages, a sweep's trials land in one experiment), one run per
Ray Train run / job, named after it. A Ray Train run that restarts (a lost worker, ``--resume``) continues its
MLflow run (found by its tag ``weaktr.run``) and its TensorBoard folder. Default stores: the SQLite database
``{run.storage_path}/mlflow.db`` and ``{run.storage_path}/tensorboard/<run>`` (``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db``, ``tensorboard --logdir runs/tensorboard``).

The backends are optional packages (``pip install 'weaktr[tracking]'``). A backend that fails (a server out of
reach, a package missing) is dropped with one warning and the run goes on.
"""

from __future__ import annotations

import logging
import math
import numbers
import socket
import time
import urllib.parse
from typing import Any, Optional

from weaktr import storage

log = logging.getLogger(__name__)

_MLFLOW_BATCH = 100  # params / metrics per log_batch call (MLflow's limits: 100 params, 1000 metrics)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers_of(metrics: dict) -> dict[str, float]:
    """The finite numbers of a (flattened) metrics dict; bools, strings, NaN and lists are left out."""
    return {key: float(value) for key, value in flatten(metrics).items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


class TrackedRun:
    """One run in each backend of ``tracking``; every call is safe: a failing backend is dropped with a warning."""

    def __init__(self, tracking, experiment: str, name: str, key: str, default_dir: str, first_step: int = 0):
        self.name = name
        self._mlflow = self._tensorboard = None
        if "mlflow" in tracking.backends:
            self._guard("mlflow", lambda: self._open_mlflow(tracking.uri, experiment, name, key, default_dir))
        if "tensorboard" in tracking.backends:
            self._guard("tensorboard", lambda: self._open_tensorboard(tracking.uri, name, default_dir, first_step))

    @property
    def resumed(self) -> bool:
        """Whether the MLflow run existed already (its parameters are logged)."""
        return self._mlflow is not None and self._mlflow[2]

    def log_params(self, params: dict) -> None:
        flat = {key: "" if value is None else str(value)[:6000] for key, value in flatten(params).items()}
        if self._mlflow is not None and not self.resumed:
            from mlflow.entities import Param

            self._mlflow_batches("params", [Param(key, value) for key, value in sorted(flat.items())])
        if self._tensorboard is not None:
            text = "\n".join(f"    {key}: {value}" for key, value in sorted(flat.items()))
            self._guard("tensorboard", lambda: self._tensorboard.add_text("config", text, 0))

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = numbers_of(metrics)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self._mlflow_batches("metrics", [Metric(key, value, stamp, step) for key, value in sorted(values.items())])
        if self._tensorboard is not None:
            writer = self._tensorboard
            self._guard("tensorboard", lambda: ([writer.add_scalar(key, value, step) for key, value in values.items()],
                                                writer.flush()))

    def close(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            client, run_id, _ = self._mlflow
            self._guard("mlflow", lambda: client.set_terminated(run_id, status))
        if self._tensorboard is not None:
            self._guard("tensorboard", self._tensorboard.close)

    # ---------------------------------------------------------------------------------------------------------

    def _mlflow_batches(self, kind: str, items: list) -> None:
        """MLflow's log_batch of ``kind`` (params, metrics) in the chunks its limits allow."""
        client, run_id, _ = self._mlflow
        self._guard("mlflow", lambda: [client.log_batch(run_id, **{kind: items[i : i + _MLFLOW_BATCH]})
                                       for i in range(0, len(items), _MLFLOW_BATCH)])

    def _guard(self, backend: str, call) -> Any:
        """call(); on any error, drop ``backend`` for the rest of the run (no later call reaches it) and say so."""
        try:
            return call()
        except Exception as err:  # a tracking server or store is never worth a training run
            log.warning("tracking: %s dropped for run %s, which goes on: %s", backend, self.name,
                        (str(err).splitlines() or [type(err).__name__])[0])
            setattr(self, f"_{backend}", None)
            return None

    def _open_mlflow(self, uri: Optional[str], experiment: str, name: str, key: str, default_dir: str) -> None:
        from mlflow.tracking import MlflowClient

        if uri and uri.startswith(("http://", "https://")):
            # A server out of reach fails here in seconds, not after MLflow's retries (minutes).
            address = urllib.parse.urlsplit(uri)
            port = address.port or (443 if address.scheme == "https" else 80)
            socket.create_connection((address.hostname, port), timeout=5).close()

        tracking_uri = mlflow_uri(uri, default_dir)
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:  # a local store keeps artifacts beside it (MLflow's default is relative to the worker's directory)
            local = tracking_uri.startswith(storage.SQLITE)
            artifacts = storage.join(tracking_uri.removeprefix(storage.SQLITE).rsplit("/", 1)[0], "mlartifacts")
            experiment_id = client.create_experiment(experiment, artifact_location=artifacts if local else None)
        runs = client.search_runs([experiment_id], filter_string=f"tags.`weaktr.run` = '{key}'", max_results=1)
        if runs:
            run_id, resumed = runs[0].info.run_id, True
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=name, tags={"weaktr.run": key}).info.run_id
            resumed = False
        self._mlflow = (client, run_id, resumed)

    def _open_tensorboard(self, uri: Optional[str], name: str, default_dir: str, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a restarted run drops what the lost attempt logged from its first step on.
        self._tensorboard = SummaryWriter(storage.join(uri or storage.join(default_dir, "tensorboard"), name),
                                          purge_step=first_step or None)


def mlflow_uri(uri: Optional[str], default_dir: str) -> str:
    """The MLflow tracking URI of ``tracking.uri``: a URI as it is (sqlite:///..., http://...); a folder (default:
    ``default_dir``) holds an SQLite store, ``<folder>/mlflow.db`` (MLflow 3 refuses its plain file store by
    default)."""
    if uri is not None and storage.is_uri(uri):
        return uri
    folder = storage.absolute(uri or default_dir)
    storage.make_dirs(folder)
    return storage.SQLITE + storage.join(folder, "mlflow.db")


def check_tracking(cfg) -> None:
    """Before any work: the stores' default place, ``run.storage_path``, must be a local folder (MLflow's tracking
    store and TensorBoard's writer take no bucket), else ``tracking.uri`` must say where. ConfigError otherwise."""
    from weaktr.config import ConfigError

    if cfg.tracking.backends and cfg.tracking.uri is None and "://" in cfg.run.storage_path:
        raise ConfigError(f"config key 'tracking.uri': run.storage_path {cfg.run.storage_path} is a bucket, where "
                          "MLflow and TensorBoard cannot keep their runs; set tracking.uri (a folder, sqlite:///..., "
                          "or a server's http:// address)")


def open_run(cfg, name: str, first_step: int = 0, key: Optional[str] = None) -> Optional[TrackedRun]:
    """The tracked run ``name`` of ``cfg`` (None with ``tracking.backend: none``): MLflow experiment ``run.name``,
    stores under ``run.storage_path`` unless ``tracking.uri`` says otherwise. ``key`` identifies the run across
    restarts (default: its Ray Train directory, ``run.storage_path``/``name``); ``first_step`` is where a restarted
    run takes up again."""
    if not cfg.tracking.backends:
        return None
    key = key or storage.join(cfg.run.storage_path, name)
    return TrackedRun(cfg.tracking, cfg.run.name, name, key, cfg.run.storage_path, first_step)


def log_results(cfg, name: str, key: str, results: dict, curves: Optional[dict[str, list]] = None) -> None:
    """A job's results as one tracked run (nothing with ``tracking.backend: none``): the config as parameters,
    the numbers of ``results`` (nested dicts flattened: ``crf.per_class.dog.iou``) at step 0, and each curve
    ``{metric: [(step, value), ...]}`` point by point."""
    tracked = open_run(cfg, name, key=key)
    if tracked is None:
        return
    from weaktr.config import to_dict

    tracked.log_params(to_dict(cfg))
    tracked.log_metrics(results, step=0)
    for metric, points in (curves or {}).items():
        for step, value in points:
            if value is not None:
                tracked.log_metrics({metric: value}, step=step)
    tracked.close()
