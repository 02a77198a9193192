"""Ray Tune sweeps over config keys (``ray_jobs/tune_sweep.py``): every trial is one full phase-1 or phase-2
training run through the same ``fit`` as ``train_cam.py`` / ``train_seg.py``, with the ``tune.space`` values set.

Pattern: Ray Train V2 inside Tune, as Ray 2.60's guide "Hyperparameter Tuning with Ray Tune" describes. A trial is a
light driver function (``run_trial``) that builds its config and calls the phase's ``fit``, which starts a
``TorchTrainer`` with the trial's own workers (``train``/``seg_train``: num_workers, cpus_per_worker, use_gpu,
gpus_per_worker); ``TuneReportCallback`` forwards every epoch's report to Tune, where ASHA judges it. Why this one:
Train V2 dropped ``Tuner(trainer)``, and the driver-function form keeps the training loop exactly the one the
training jobs run. Tune reserves only the driver (no CPU: ``DRIVER_MEMORY``) and cannot see the workers' resources, so
``tune.max_concurrent_trials`` bounds how many trials run at once; the workers queue for Ray's resources as any
Ray Train run does.

Results go to ``<run.storage_path>/<run.name>/`` (a local path or a bucket's URI): Tune's experiment (one directory
per trial), each trial's Ray Train run under ``trials/``, and ``trials.csv``, ``best_config.yaml`` and
``objective.png`` (``write_results``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import typing
from typing import Any

import yaml

from weaktr import storage
from weaktr.config import Config, ConfigError, SweepConfig, from_dict, resolve_paths, save_config, to_dict, with_values

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
# The sections a phase's training reads: a swept key elsewhere would change nothing.
PHASE_SECTIONS = {"cam": ("data", "model", "train"), "seg": ("data", "seg_model", "seg_train", "eval")}
# What Tune reserves for a trial's driver function: no CPU (it waits on its Ray Train run, whose workers reserve
# their own) and, as a Ray reservation cannot be empty, the memory such a Python process takes.
DRIVER_MEMORY = 256 * 2**20
RESULT_FILES = ("trials.csv", "best_config.yaml", "objective.png")
SAVED_CONFIG = "sweep_config.yaml"  # the config a sweep started with, beside its results


# --------------------------------------------------------------------------- the search space (no Ray)


def objective(cfg: Config) -> str:
    """The metric a sweep maximizes: phase 1's per-epoch CAM mIoU (background threshold searched in the same pass),
    val_mAP when ``train.cam_eval.split`` is null (a dataset without masks); phase 2's validation mIoU."""
    if cfg.tune.phase == "seg":
        return "val_mIoU"
    from weaktr.train.cam_loop import selection_metric  # the metric phase 1 keeps its best checkpoint by

    return selection_metric(cfg)


def runner(cfg: Config):
    """The runner section (workers, resources, epochs) of the sweep's phase."""
    return cfg.train if cfg.tune.phase == "cam" else cfg.seg_train


def check_sweep(cfg: Config) -> dict[str, tuple[str, list]]:
    """The search space as ``{key: (distribution, arguments)}``, after checking every part of the ``tune`` section;
    a ConfigError names the offending key. Nothing here starts Ray: a bad sweep fails before any trial."""
    t: SweepConfig = cfg.tune
    if t.phase not in PHASE_SECTIONS:
        raise ConfigError(f"config key 'tune.phase': expected 'cam' or 'seg', got {t.phase!r}")
    if t.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"config key 'tune.scheduler': expected 'asha' or 'fifo', got {t.scheduler!r}")
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 1), ("grace_period", 1), ("reduction_factor", 2)):
        if getattr(t, key) < low:
            raise ConfigError(f"config key 'tune.{key}': must be at least {low}, got {getattr(t, key)}")
    if t.time_budget_s is not None and t.time_budget_s <= 0:
        raise ConfigError(f"config key 'tune.time_budget_s': must be positive, got {t.time_budget_s}")
    if t.scheduler == "asha" and t.grace_period > runner(cfg).epochs:
        raise ConfigError(f"config key 'tune.grace_period': {t.grace_period} is more than the "
                          f"{runner(cfg).epochs} epochs a trial runs")
    if t.phase == "seg" and t.scheduler == "asha" and cfg.seg_train.eval_every != 1:
        raise ConfigError("config key 'seg_train.eval_every': ASHA judges val_mIoU every epoch; set it to 1")
    if not t.space:
        raise ConfigError("config key 'tune.space': empty; name at least one config key to sweep")
    return {key: _check_dimension(cfg, key, spec) for key, spec in t.space.items()}


def _check_dimension(cfg: Config, key: str, spec: Any) -> tuple[str, list]:
    where = f"tune.space.{key}"
    section = key.split(".")[0]
    if section not in PHASE_SECTIONS[cfg.tune.phase]:
        raise ConfigError(f"config key '{where}': a '{cfg.tune.phase}' sweep trains with the sections "
                          f"{list(PHASE_SECTIONS[cfg.tune.phase])}; '{key}' is not in them")
    kind = _field_type(key)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"config key '{where}': expected one distribution, e.g. {{choice: [a, b]}}, got {spec!r}")
    ((name, args),) = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"config key '{where}': unknown distribution {name!r} (one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"config key '{where}': {name} takes a non-empty list, got {args!r}")
    if name in ("choice", "grid"):
        for value in args:
            _check_value(cfg, key, value, where)
        return name, args
    sizes = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}
    args = [_number(a) for a in args]  # YAML 1.1 reads 3e-4 (no dot) as a string
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != sizes[name] or not numbers:
        bounds = "[low, high, q]" if name == "quniform" else "[low, high]"
        raise ConfigError(f"config key '{where}': {name} takes {bounds} as numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"config key '{where}': {name} needs low < high, got [{low}, {high}]")
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"config key '{where}': loguniform needs low > 0, got {low}")
    if name == "quniform" and args[2] <= 0:
        raise ConfigError(f"config key '{where}': quniform needs q > 0, got {args[2]}")
    if name == "randint":
        if kind not in (int, float) or not all(isinstance(a, int) for a in args):
            raise ConfigError(f"config key '{where}': randint draws integers for an int or float key, "
                              f"got bounds {args!r} for a {kind.__name__} key")
        values = [low, high - 1]  # high is excluded
    else:
        if kind is not float:
            raise ConfigError(f"config key '{where}': {name} draws floats but '{key}' is {kind.__name__}; "
                              f"use choice, grid or randint")
        values = [float(low), float(high)]
    for value in values:
        _check_value(cfg, key, value, where)
    return name, args


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _field_type(key: str) -> type:
    """The type of the config field at a dotted ``key`` (ConfigError unless it names a single setting)."""
    cls: Any = Config
    parts = key.split(".")
    for part in parts:
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"config key 'tune.space.{key}': unknown config key '{key}'")
        cls = typing.get_type_hints(cls)[part]
        optional = [a for a in typing.get_args(cls) if a is not type(None)]
        if type(None) in typing.get_args(cls) and len(optional) == 1:
            cls = optional[0]
    if dataclasses.is_dataclass(cls) or cls in (dict, list) or typing.get_origin(cls) in (list, tuple):
        raise ConfigError(f"config key 'tune.space.{key}': '{key}' is a section or a list, not a single setting")
    return cls


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    try:
        with_values(cfg, {key: value})
    except ConfigError as err:
        raise ConfigError(f"config key '{where}': value {value!r}: {err}") from None


# --------------------------------------------------------------------------- running it on Ray Tune


def tune_space(dimensions: dict[str, tuple[str, list]]) -> dict:
    """Ray Tune's ``param_space``: one flat entry per dotted key."""
    from ray import tune

    make = {
        "choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a), "quniform": lambda a: tune.quniform(*a),
    }
    return {key: make[name](args) for key, (name, args) in dimensions.items()}


def run_trial(params: dict, base: dict, trials_dir: str) -> None:
    """One Tune trial: the phase's own ``fit`` on ``base`` with the trial's ``params``, its Ray Train run under
    ``trials_dir`` named after the trial (a resumed sweep restarts an unfinished trial from that run's last
    checkpoint), each epoch's report forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from weaktr.train import cam_loop, seg_loop

    cfg = with_values(from_dict(base), params)
    cfg.run.storage_path = trials_dir
    fit = cam_loop.fit if cfg.tune.phase == "cam" else seg_loop.fit
    fit(cfg, name=ray.tune.get_context().get_trial_id(), callbacks=[TuneReportCallback()])


def sweep_dir(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def sweep_started(cfg: Config) -> bool:
    """Whether Tune has saved an experiment for this sweep (one that ``--resume`` continues)."""
    from ray import tune

    return tune.Tuner.can_restore(sweep_dir(cfg))


def prepare_sweep(cfg: Config, resume: bool) -> str:
    """Check the sweep (``check_sweep``), make its paths absolute, and check that ``resume`` matches what is on
    disk: a new sweep must not land on an existing one, a resumed one must exist and have the config it started
    with. Returns where that config is kept (``SAVED_CONFIG``); ConfigError otherwise, before Ray starts."""
    check_sweep(cfg)
    resolve_paths(cfg)  # Tune runs each trial in its own working directory
    saved = storage.join(sweep_dir(cfg), SAVED_CONFIG)
    if resume:
        if not sweep_started(cfg):
            raise ConfigError(f"--resume: no sweep to continue at {sweep_dir(cfg)}")
        changed = saved_config_differences(cfg, saved) if storage.exists(saved) else []
        if changed:
            raise ConfigError(f"--resume: the config differs from the one the sweep started with ({saved}) at "
                              f"{', '.join(changed[:5])}")
    elif sweep_started(cfg):
        raise ConfigError(f"a sweep named {cfg.run.name!r} already exists at {sweep_dir(cfg)}: pass --resume to "
                          f"continue it, or set another run.name")
    return saved


def run_sweep(cfg: Config, resume: bool = False):
    """Run (or with ``resume``, continue) the sweep on the connected Ray cluster; returns Tune's ``ResultGrid``.

    ``cfg``'s paths must be absolute (``launch.prepare_data`` and the job do that): trials run in other processes
    and other directories."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    directory = sweep_dir(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), trials_dir=storage.join(directory, "trials")),
        {"CPU": 0, "memory": DRIVER_MEMORY},
    )
    if resume:
        # Finished trials are kept as they are; unfinished and failed ones start again and their Ray Train runs
        # continue from their last checkpoints.
        tuner = tune.Tuner.restore(directory, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epochs_done", max_t=runner(cfg).epochs, grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(check_sweep(cfg)),
        tune_config=tune.TuneConfig(
            metric=objective(cfg), mode="max", scheduler=scheduler, num_samples=t.num_samples,
            # Tune's default searcher, given here for its seed (the same draws for the same run.seed); with a
            # searcher given, TuneConfig's max_concurrent_trials is ignored, so the searcher takes it.
            search_alg=BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=t.max_concurrent_trials),
            time_budget_s=t.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path, verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train restarts its workers itself
        ),
    )
    return tuner.fit()


# --------------------------------------------------------------------------- results


def trial_rows(cfg: Config, results) -> list[dict]:
    """One row per trial of a ``ResultGrid``: the swept values, the best objective over its epochs (and the CAM
    background threshold of that epoch in phase 1), the epochs it ran and how it ended: completed, stopped early
    (by ASHA), unfinished (the sweep was interrupted: ``--resume`` continues it) or the error."""
    metric, epochs = objective(cfg), runner(cfg).epochs
    rows = []
    for result in results:
        history = result.metrics_dataframe
        trial_dir = result.path.rstrip("/").rsplit("/", 1)[-1]  # Tune's trial directory (a local path or a URI's)
        row: dict[str, Any] = {"trial": (result.metrics or {}).get("trial_id") or trial_dir}
        row |= {key: result.config.get(key) for key in cfg.tune.space}
        best = None
        if history is not None and metric in history and history[metric].notna().any():
            best = history.loc[history[metric].idxmax()]
        row[metric] = float(best[metric]) if best is not None else math.nan
        row["best_epoch"] = int(best["epochs_done"]) if best is not None else None
        if metric == "cam_mIoU":
            row["cam_bg_threshold"] = float(best["cam_bg_threshold"]) if best is not None else math.nan
        done = int(history["epochs_done"].max()) if history is not None and "epochs_done" in history else 0
        row["epochs_run"] = done
        if result.error is not None:
            row["status"] = f"error: {str(result.error).strip().splitlines()[-1][:120]}"
        elif not (result.metrics or {}).get("done", False):  # Tune marks a trial's last result when it ends
            row["status"] = "unfinished"  # the sweep ended first (e.g. interrupted): --resume continues it
        elif done >= epochs:
            row["status"] = "completed"
        else:
            row["status"] = "stopped early"
        rows.append(row)
    return sorted(rows, key=lambda r: -r[metric] if r[metric] == r[metric] else math.inf)


def write_results(cfg: Config, rows: list[dict]) -> dict[str, str]:
    """``trials.csv``, ``best_config.yaml`` (the best trial's full config under the run name ``<run.name>-best``,
    for ``train_cam.py`` / ``train_seg.py`` as it is) and ``objective.png`` in the sweep's directory."""
    directory = sweep_dir(cfg)
    paths = {name: storage.join(directory, name) for name in RESULT_FILES}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(paths["trials.csv"], table.getvalue().encode())
    metric = objective(cfg)
    best = rows[0]
    if best[metric] == best[metric]:  # not NaN: some trial was scored
        best_cfg = with_values(cfg, {key: best[key] for key in cfg.tune.space})
        best_cfg.run.name = f"{cfg.run.name}-best"
        save_config(best_cfg, paths["best_config.yaml"])
    else:
        paths.pop("best_config.yaml")
    plot_objective(cfg, rows, paths["objective.png"])
    return paths


def plot_objective(cfg: Config, rows: list[dict], path: str) -> None:
    """The objective of every trial against each swept key, one panel per key; trials stopped early hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    metric, keys = objective(cfg), list(cfg.tune.space)
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        (name, _), = cfg.tune.space[key].items()
        values = [row[key] for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:  # categorical: one position per distinct value
            labels = sorted({str(v) for v in values})
            positions = [labels.index(str(v)) for v in values]
            axis.set_xticks(range(len(labels)), labels)
        for row, x in zip(rows, values if numeric else positions):
            completed = row["status"] == "completed"
            axis.scatter([x], [row[metric]], color="C0", facecolors="C0" if completed else "none")
        if name == "loguniform":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())  # labels on the decades only: no overlapping ticks
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{cfg.run.name}: {metric} per trial (hollow: stopped early)")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(path, image.getvalue())


def summary_table(rows: list[dict]) -> str:
    """The trials as a Markdown table, best first."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return str(value)


def saved_config_differences(cfg: Config, saved_path: str) -> list[str]:
    """The dotted keys whose values differ between ``cfg`` and the config a sweep started with."""
    saved = yaml.safe_load(storage.read_bytes(saved_path))
    return _differences(to_dict(cfg), saved, "")


def _differences(new: Any, old: Any, prefix: str) -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        keys = sorted(set(new) | set(old))
        return [d for k in keys for d in _differences(new.get(k), old.get(k), f"{prefix}{k}.")]
    return [] if new == old else [prefix.rstrip(".")]
