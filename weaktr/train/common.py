"""Pieces both training loops share on Ray Train: the trainer, checkpoint restore, reporting and collectives
(the Ray-free ones, autocast, unwrap, seeding and optimizer options, are in ``weaktr.runtime``)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from weaktr.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from weaktr.config import Config, from_dict, to_dict
from weaktr.data.stream import FailureTracker
from weaktr.launch import CapacityUnavailable, check_inputs_exist, check_paths_reach_every_node
from weaktr.runtime import rng_state, seed_rngs, set_rng_state, unwrap
from weaktr.tracking import TrackedRun, check_tracking, open_run

log = logging.getLogger(__name__)


def make_trainer(
    loop: Callable[[dict], None], cfg: Config, runner, *, name: str, score_attribute: str, paths: Sequence[str],
    callbacks: Sequence = (),
) -> TorchTrainer:
    """A TorchTrainer running ``loop`` on ``cfg`` with the workers, resources, failure and checkpoint settings of
    ``runner`` (``cfg.train`` or ``cfg.seg_train``), storing under ``run.storage_path``/``name`` and ranking the
    kept checkpoints by ``score_attribute`` (higher is better). ``paths``: the path keys the workers read, refused
    here if local on a cluster whose nodes do not share a disk (``launch.check_paths_reach_every_node``): Ray Train
    itself would notice only at the first checkpoint. ``callbacks``: Ray Train callbacks (a Tune trial passes the
    one that forwards each report to Tune, ``weaktr.sweep``). Input files among ``paths`` must exist
    (``launch.check_inputs_exist``)."""
    check_paths_reach_every_node(cfg, paths)  # first: on a cluster a local path is the problem, not its absence
    check_inputs_exist(cfg, paths)
    check_tracking(cfg)
    storage_path = cfg.run.storage_path
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    return TorchTrainer(
        loop,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=runner.num_workers,
            use_gpu=runner.use_gpu,
            resources_per_worker={
                "CPU": runner.cpus_per_worker, **({"GPU": runner.gpus_per_worker} if runner.use_gpu else {}),
                **runner.resources_per_worker,
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=runner.checkpoints_to_keep,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(
                max_failures=runner.max_failures, controller_failure_limit=start_retries(runner.capacity_wait_s)
            ),
            callbacks=list(callbacks),
            # Ray Train's INFO logs (a dump of every rank's report each epoch) go to its log files only;
            # the console gets the loops' one line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def start_retries(capacity_wait_s: float) -> int:
    """Ray Train waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for a worker group's resources, then starts
    it again, for ever by default: how many times again makes ``capacity_wait_s`` in all."""
    per_attempt = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
    return max(0, math.ceil(capacity_wait_s / per_attempt) - 1)


def fit_trainer(trainer: TorchTrainer, runner, section: str):
    """``trainer.fit()``; CapacityUnavailable, one line naming what it waited for, when the cluster never offered
    the workers' resources within ``{section}.capacity_wait_s``."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        return trainer.fit()
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        wanted = trainer.scaling_config.resources_per_worker
        raise CapacityUnavailable(
            f"the cluster did not offer {runner.num_workers} Ray Train workers their resources ({wanted} each) "
            f"within {section}.capacity_wait_s={runner.capacity_wait_s:g} s: add nodes that have them, or lower "
            f"{section}.num_workers / the resources asked"
        ) from None


def start_worker(loop_config: dict) -> tuple[Config, int, int, torch.device]:
    """A training worker's first lines: its config, rank, world size and device; its RNGs seeded per rank and Ray's
    INFO records kept off its console."""
    cfg: Config = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    seed_rngs(cfg.run.seed + rank)
    quiet_ray_console()
    return cfg, rank, world_size, ray.train.torch.get_device()


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


def resume(state: dict, model: torch.nn.Module, optimizer, scheduler, *, kind: str, classes: Sequence[str],
           steps: int) -> int:
    """Load a checkpoint's model and optimizer state into this run; returns the epoch to start from.

    Refuses (CheckpointMismatch) a checkpoint of the other phase, of other classes or of another architecture.
    The scheduler keeps this run's settings rather than loading the saved ones: the learning rate is a function
    of the step alone, so it is stepped to the resumed step; resuming with more epochs stretches the schedule over
    the new length instead of silently keeping the old one."""
    check_compatible(state, kind=kind, classes=classes, arch=model.arch, source="resume checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start_epoch = state["epoch"] + 1
    scheduler.step_update(start_epoch * steps)
    return start_epoch


def start_training(model: torch.nn.Module, optimizer, scheduler, cfg: Config, runner, *, kind: str,
                   classes: Sequence[str], steps: int):
    """Continue from Ray Train's checkpoint or ``runner.resume_from`` when there is one (``resume``), then wrap the
    model for DDP (and ``torch.compile`` it around DDP, as torch recommends; ``unwrap`` still reaches the plain
    model). Returns (model, first epoch, every earlier epoch's metrics, this run's decode-failure tracker, the
    run's tracked run on rank 0 with a ``tracking`` backend, else None)."""
    state = restore(runner.resume_from)
    history = list(state.get("history", [])) if state is not None else []
    start_epoch = 0 if state is None else resume(
        state, model, optimizer, scheduler, kind=kind, classes=classes, steps=steps
    )
    if history and start_epoch >= runner.epochs:
        # Nothing left to train (a finished run started again): report its last epoch once more, without a
        # checkpoint, for whoever follows the reports. A Tune sweep killed after an epoch's checkpoint but before
        # Tune recorded that epoch resumes its trial here, and would otherwise never see how the trial ended.
        ray.train.report(history[-1])
    model = ray.train.torch.prepare_model(model)
    if runner.compile:
        model = torch.compile(model)
    ctx = ray.train.get_context()
    saved_rngs = state.get("rng_states") if state is not None else None
    if saved_rngs and len(saved_rngs) == ctx.get_world_size():
        # Each rank takes up its draws (augmentations, data-loader seeds, dropout) where the checkpoint left
        # them: a restarted run trains on what the uninterrupted one would have, not on another seed's draws.
        set_rng_state(saved_rngs[ctx.get_world_rank()])
    # Checked per rank only once a rank has read plenty of samples; at epoch end, over all ranks.
    failures = FailureTracker(cfg.data.max_failure_fraction, min_samples=1000)
    if history and "samples_seen" in history[-1] and ctx.get_world_rank() == 0:
        # The run's counts up to the checkpoint (every rank's, merged) go on from rank 0's tracker: a restarted run
        # reports, and judges its limit on, what the uninterrupted one would (it used to count from zero again).
        failures.seen, failures.failed = history[-1]["samples_seen"], history[-1]["samples_failed"]
    tracked = None
    if ctx.get_world_rank() == 0 and start_epoch < runner.epochs:
        tracked = open_run(cfg, ctx.get_experiment_name(), first_step=start_epoch)
        if tracked is not None:
            tracked.log_params(to_dict(cfg))
    return model, start_epoch, history, failures, tracked


def epoch_metrics(epoch: int, losses: dict[str, float], *, steps: int, world_size: int, batch_size: int,
                  elapsed: float, optimizer, failures: FailureTracker, device: torch.device) -> dict:
    """What every epoch reports: the epoch (0-based) and the epochs done (what Tune's ASHA counts), ``losses``
    (this rank's per-step sums) as means over all ranks' steps (every rank runs ``steps``), the lr, images/s over
    all ranks (``batch_size`` per rank and step), the run's samples read and those that failed to decode, and the
    epoch's seconds."""
    totals = all_reduce_sum([*losses.values(), steps * batch_size], device)
    means = {name: total / (steps * world_size) for name, total in zip(losses, totals)}
    return {"epoch": epoch, "epochs_done": epoch + 1, **means, "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": totals[-1] / elapsed, "samples_seen": failures.seen, "samples_failed": failures.failed,
            "epoch_seconds": elapsed}


def report_epoch(
    metrics: dict, *, kind: str, model: torch.nn.Module, optimizer, scheduler, classes: Sequence[str], cfg: Config,
    history: Sequence[dict], epochs: int, shown: Sequence[str], started: float, tracked: Optional[TrackedRun],
) -> None:
    """Report an epoch's metrics from every rank; rank 0 attaches a checkpoint (the plain model's weights, the
    optimizer and scheduler, every rank's RNG states, the resolved config, this epoch's ``metrics`` and every
    epoch's ``history``), prints the epoch's console line (``epoch_line``; ``started``: the epoch's
    ``time.perf_counter()`` start) and logs the metrics to its ``tracked`` run, closing it after the last epoch."""
    rng_states = all_gather(rng_state())  # every rank's, before any draw of the next epoch
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                directory, kind=kind, model_state=unwrap(model).state_dict(), arch=unwrap(model).arch,
                classes=classes, config=to_dict(cfg), epoch=metrics["epoch"], optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(), metrics=metrics, history=history, rng_states=rng_states,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        log.info(epoch_line(metrics, epochs, shown, time.perf_counter() - started))
        if tracked is not None:
            tracked.log_metrics(metrics, step=metrics["epoch"])
            if metrics["epochs_done"] == epochs:
                tracked.close()
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
