"""Pieces both training loops share on Ray Train: the trainer, checkpoint restore, reporting and collectives
(the Ray-free ones, autocast, unwrap, seeding and optimizer options, are in ``weaktr.runtime``)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from weaktr.checkpoint import load_checkpoint
from weaktr.data.shards import FailureTracker

log = logging.getLogger(__name__)


def make_trainer(
    loop: Callable[[dict], None],
    loop_config: dict,
    *,
    name: str,
    storage_path: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: int,
    max_failures: int,
    checkpoints_to_keep: int,
    score_attribute: Optional[str] = None,
) -> TorchTrainer:
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).expanduser().resolve()) if "://" not in storage_path else storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=checkpoints_to_keep,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's INFO logs (a dump of every rank's report each epoch) go to its log files only;
            # the console gets the loops' one line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def quiet_ray_console() -> None:
    """Keep Ray's INFO records off this training worker's console (they still reach its log files).

    ``LoggingConfig(log_level="WARNING")`` (``make_trainer``) covers the ``ray.train`` loggers, but Ray Train's
    per-report dump ("Reporting training result N: TrainingReport(...)", every rank, every epoch) comes from a
    logger named after its source file, which that filter does not match."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "console":
            handler.addFilter(_not_ray_info)


def _not_ray_info(record: logging.LogRecord) -> bool:
    from_ray = record.name.startswith("ray.") or f"{os.sep}ray{os.sep}" in record.name
    return record.levelno >= logging.WARNING or not from_ray


def restore(resume_from: Optional[str]) -> Optional[dict]:
    """The checkpoint to continue from: Ray Train's own (a restarted run or worker) or ``resume_from``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory)
    if resume_from:
        return load_checkpoint(resume_from)
    return None


def report(
    metrics: dict, save: Callable[[Path], None], *, epochs: int, shown: Sequence[str], started: float
) -> None:
    """Report an epoch's metrics from every rank; rank 0 attaches a checkpoint written by ``save`` and prints
    the epoch's console line (``epoch_line``; ``started``: the epoch's ``time.perf_counter()`` start)."""
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as directory:
            save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        log.info(epoch_line(metrics, epochs, shown, time.perf_counter() - started))
    else:
        ray.train.report(metrics)


def epoch_line(metrics: dict, epochs: int, shown: Sequence[str], epoch_seconds: float) -> str:
    """One line per epoch for the console: ``epoch 3/28 | loss 0.4123 | val_mAP 0.8412 | 780 img/s | 19 s/epoch
    | ~8.2 min left`` (Ray Train's own per-report dumps stay in its log files: ``make_trainer``)."""
    done = metrics["epoch"] + 1
    values = " | ".join(f"{name} {_number(metrics[name])}" for name in shown)
    left = epoch_seconds * (epochs - done)
    left_text = f"~{left / 60:.1f} min left" if left >= 60 else f"~{left:.0f} s left"
    return (
        f"epoch {done}/{epochs} | {values} | {metrics['images_per_s']:.0f} img/s | {epoch_seconds:.3g} s/epoch | "
        f"{left_text}"
    )


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"  # NaN: not measured this epoch


def all_gather(obj):
    """Every rank's ``obj`` as a list (a one-element list outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def check_failures_across_ranks(failures: FailureTracker) -> FailureTracker:
    """Merge every rank's decode-failure counts and raise if the run as a whole is over its
    limit: one bad shard on one rank is judged against all the data, not that rank's share."""
    merged = FailureTracker(failures.max_failure_fraction)
    for rank_failures in all_gather(failures):
        merged.merge(rank_failures)
    merged.check()
    return merged
