"""What every ``ray_jobs/`` entry script does before and after its Ray work."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

import ray

from weaktr import storage
from weaktr.config import Config, ConfigError, save_config
from weaktr.data.shards import Manifest

# How long a Ray Data pipeline waits for room for the first actor of a pool (e.g. for the autoscaler).
WAIT_FOR_FIRST_ACTOR_S = 600


def prepare_data(cfg: Config) -> Manifest:
    """Make ``data.root`` absolute (workers run elsewhere; a URI stays as it is) and, when
    ``data.synthetic.enabled``, make sure the built-in synthetic dataset is there."""
    cfg.data.root = root = storage.absolute(cfg.data.root)
    if cfg.data.synthetic.enabled and storage.is_uri(root):
        raise ConfigError(
            f"data.synthetic.enabled writes the synthetic dataset on this machine, but data.root is a URI ({root}): "
            "generate it at a local path, or set data.synthetic.enabled=false for a dataset already at the URI"
        )
    manifest_path = Path(root) / "manifest.json"
    # Only a synthetic dataset may be (re)generated in place: never overwrite a converted one.
    if cfg.data.synthetic.enabled and not (
        manifest_path.exists() and "synthetic_spec" not in Manifest.load(manifest_path).meta
    ):
        from weaktr.data.synthetic import write_synthetic

        # write_synthetic reuses the shards when they were made from the same spec.
        return write_synthetic(root, cfg.data.synthetic.spec())
    return Manifest.load(root)


class RayUnavailable(RuntimeError):
    """The Ray cluster a job was pointed at does not answer."""


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by ``ray job submit``), else the one ``ray start``
    recorded on this machine, else start a local Ray. Never waits on a head that is gone.

    ``ray start`` writes its address to ``ray_current_cluster`` in Ray's temporary directory and
    a plain ``ray.init()`` joins that address; after the head is killed (not ``ray stop``-ped) the
    file stays, and ``ray.init()`` waits on the dead address forever, deaf to Ctrl-C."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        if not _answers(address):
            raise RayUnavailable(
                f"RAY_ADDRESS={address} does not answer: is the Ray head running (`ray status --address "
                f"{address}`)? Unset RAY_ADDRESS to run on a local Ray instead."
            )
    elif remove_stale_address_file():
        address = "local"  # a fresh local Ray; None would join the recorded address
    ray.init(address=address, log_to_driver=True)


def remove_stale_address_file() -> bool:
    """Remove the address ``ray start`` recorded on this machine when that head no longer answers; True if so.

    Removed, not just skipped: a plain ``ray.init()`` would wait on it forever, Ray's state API reads it too, and
    Ray Train's placement-group cleaner (which frees the CPUs of a run whose controller was killed, e.g. a trial
    Tune stopped) then times out on the dead head, leaking those CPUs for the rest of the job."""
    from ray._common.utils import get_ray_address_file  # where `ray start` records its address

    address_file = get_ray_address_file(None)
    recorded = Path(address_file).read_text().strip() if os.path.exists(address_file) else ""
    if not recorded or _answers(recorded):
        return False
    Path(address_file).unlink(missing_ok=True)
    print(
        f"weaktr: {address_file} named the Ray head {recorded}, which does not answer (stopped or killed); "
        "removed it (a plain ray.init() would wait on it forever).", file=sys.stderr, flush=True,
    )
    return True


def _answers(address: str, timeout: float = 5.0) -> bool:
    """Whether something listens at a ``host:port`` Ray address (other forms are left to Ray)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def run_dir(cfg: Config) -> str:
    """The run's directory, ``{run.storage_path}/{run.name}`` (a local path, made if missing, or a URI)."""
    path = storage.join(storage.absolute(cfg.run.storage_path), cfg.run.name)
    storage.make_dirs(path)
    return path


def check_resume(resume: bool, found: Optional[str], expected: str, what: str, otherwise: str) -> None:
    """The rule every job follows: work already done under the run's name is continued only when asked
    (``--resume``), so a rerun never silently continues a run made with another config, and ``--resume`` with
    nothing to continue is a mistake too. ``found``: where the earlier work is, None if there is none;
    ``expected``: where it would be; ``otherwise``: the way to start afresh instead. ConfigError if broken."""
    if found is not None and not resume:
        raise ConfigError(f"{what} already exists at {found}: pass --resume to continue it, or {otherwise}")
    if found is None and resume:
        raise ConfigError(f"--resume: no {what} to continue at {expected}")


def training_run(storage_path: str, name: str) -> tuple[Optional[str], str]:
    """(where Ray Train's run ``name`` keeps checkpoints, if it has any; where it would) under ``storage_path``
    (a local path or a URI Ray Train takes, such as ``s3://``)."""
    where = storage.join(storage.absolute(storage_path), name)
    found = any(entry.startswith("checkpoint_") for entry in storage.list_names(where))
    return (where if found else None), where


def save_resolved_config(cfg: Config, filename: str = "config.yaml") -> str:
    """Write the resolved config beside the run's outputs (checkpoints embed it too); returns where."""
    cfg.run.storage_path = storage.absolute(cfg.run.storage_path)
    path = storage.join(run_dir(cfg), filename)
    save_config(cfg, path)
    return path


def actor_pool(setting: str, size: int, num_cpus: float, num_gpus: float = 0.0):
    """A Ray Data actor pool of 1 to ``size`` actors; ``setting`` is the config key that asked for ``size``.

    A fixed pool of ``size`` actors that the cluster cannot hold beside the pipeline's read tasks
    waits for resources forever (``eval.actors: 2`` on a 2-CPU machine did). This pool starts with
    one actor and grows as resources free up or the autoscaler adds nodes; asking for more than the
    cluster has now is said on the console, and a pool of which not even one actor fits fails after
    ``WAIT_FOR_FIRST_ACTOR_S`` instead of waiting forever."""
    import ray.data

    if size < 1:
        raise ValueError(f"{setting} must be >= 1, got {size}")
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    fit = min(cpus // num_cpus if num_cpus else size, gpus // num_gpus if num_gpus else size)
    if fit < size:
        asked = f"{size * num_cpus:g} CPUs" + (f" and {size * num_gpus:g} GPUs" if num_gpus else "")
        print(
            f"weaktr: {setting}={size} asks for {asked}; the cluster has {cpus:g} CPUs and {gpus:g} GPUs now, so "
            f"the pool starts with 1 actor and grows to {size} as resources allow", file=sys.stderr, flush=True,
        )
    if fit < 1:
        ray.data.DataContext.get_current().wait_for_min_actors_s = WAIT_FOR_FIRST_ACTOR_S
    return ray.data.ActorPoolStrategy(min_size=1, max_size=size)


def quiet_ray_data() -> None:
    """Keep Ray Data's own console output (a progress block every few seconds, execution-plan logs) off the
    console: the pipelines show one progress bar of their own (``progress``). Ray Data still writes its logs to
    the session's ``ray-data.log``."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)


def progress(total: int, what: str):
    """A progress bar over ``total`` items (a line every 30 s when the console is not a terminal, e.g. a
    ``ray job submit`` log)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="img", mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)


def run_training_job(parser, args, cfg: Config, *, fit, run_name: str, what: str, config_name: str, score: str,
                     shown: Sequence[str]) -> int:
    """The body of ``train_cam.py`` and ``train_seg.py``: refuse or continue the Ray Train run ``run_name``
    (``check_resume``), prepare the data, write the resolved config as ``config_name``, join Ray, ``fit(cfg)`` and
    print the result. A config, data or storage problem is one line and exit code 2."""
    from weaktr.data.shards import DataError

    try:
        check_resume(args.resume, *training_run(cfg.run.storage_path, run_name), what, "set another run.name")
        prepare_data(cfg)
        config_path = save_resolved_config(cfg, config_name)
        init_ray()
        result = fit(cfg)
    except (ConfigError, DataError, storage.StorageUnavailable) as err:  # e.g. no pseudo-labels, an unknown bucket
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print_training_result(result, config_path, score, shown)
    return 0


def print_training_result(result, config_path: str, score: str, shown: Sequence[str]) -> None:
    """The end of a training job's console: the config it ran, the last epoch's figures (``shown``) and the best
    checkpoint by ``score`` (Ray Train's ``Result``)."""
    metrics = result.metrics or {}
    print(f"config: {config_path}")
    figures = " ".join(f"{key} {metrics.get(key, float('nan')):.4f}" for key in shown)
    print(f"final epoch {metrics.get('epoch')}: {figures}")
    print(f"best checkpoint (by {score}): {best_checkpoint(result, score)}")


def best_checkpoint(result, score: str) -> Optional[str]:
    """The path or URI of a Ray Train ``Result``'s best checkpoint by ``score`` (its last one when none was scored;
    None when it has none)."""
    best = result.get_best_checkpoint(score, "max") if result.best_checkpoints else result.checkpoint
    return checkpoint_uri(best) if best else None


def checkpoint_uri(checkpoint) -> str:
    """A Ray Train ``Checkpoint``'s local path or URI (Ray's own path has no scheme for a bucket)."""
    return storage.uri_of(checkpoint.filesystem, checkpoint.path)


def put_model(model) -> list:
    """A model's arch and weights in Ray's object store, for actor pools (``take_model`` in each actor): the driver
    loads and checks a checkpoint once, and actors on any node get it without reading the checkpoint's storage.
    Wrapped in a list so that Ray Data hands the reference to actor constructors unresolved."""
    return [ray.put({"arch": model.arch, "model": model.state_dict()})]


def take_model(kind: str, model_ref: list, device):
    """The model ``put_model`` shared, rebuilt in this actor on ``device``, in eval mode."""
    from weaktr.models.build import rebuild

    state = ray.get(model_ref[0])
    return rebuild(kind, state["arch"], state["model"]).to(device)
