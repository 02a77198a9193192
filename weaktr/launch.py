"""What every ``ray_jobs/`` entry script does before and after its Ray work."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import ray

from weaktr import storage
from weaktr.config import Config, ConfigError, get_value, save_config
from weaktr.data.shards import MANIFEST_NAME, Manifest
from weaktr.logs import LEVEL_ENV

log = logging.getLogger(__name__)

# How long a Ray Data pipeline waits for room for the first actor of a pool (e.g. for the autoscaler).
WAIT_FOR_FIRST_ACTOR_S = 600

# The path keys each job's Ray workers and actors read or write (on any node), besides what its driver reads.
# tracking.uri: rank 0 of each phase writes there, on whichever node it runs.
PHASE1_PATHS = ("data.root", "run.storage_path", "model.weights_path", "train.resume_from", "tracking.uri")
PHASE2_PATHS = ("data.root", "run.storage_path", "seg_train.data_root", "seg_model.weights_path",
                "seg_train.resume_from", "tracking.uri")
PSEUDO_PATHS = ("data.root", "pseudo.out_dir")  # out_dir: phase 2 reads it on every node
EVAL_PATHS = ("data.root", "eval.out_dir")
PIPELINE_PATHS = tuple(dict.fromkeys(PHASE1_PATHS + PHASE2_PATHS))  # pseudo/ and eval/ live in the run directory
# Among those, the files Ray Train workers only read, as they start.
INPUT_PATHS = ("model.weights_path", "seg_model.weights_path", "train.resume_from", "seg_train.resume_from")


def prepare_data(cfg: Config) -> Manifest:
    """Make ``data.root`` absolute (workers run elsewhere; a URI stays as it is) and, when
    ``data.synthetic.enabled``, make sure the built-in synthetic dataset is there (generated on this machine, then
    uploaded when ``data.root`` is a URI)."""
    cfg.data.root = root = storage.absolute(cfg.data.root)
    manifest_path = storage.join(root, MANIFEST_NAME)
    existing = Manifest.load(manifest_path) if storage.exists(manifest_path) else None
    # Only a synthetic dataset may be (re)generated in place: never overwrite a converted one.
    if not cfg.data.synthetic.enabled or (existing is not None and "synthetic_spec" not in existing.meta):
        return existing or Manifest.load(root)
    from weaktr.data.synthetic import write_synthetic

    spec = cfg.data.synthetic.spec()
    if not storage.is_uri(root):
        return write_synthetic(root, spec)  # it reuses the shards when they were made from the same spec
    if existing is not None and existing.meta["synthetic_spec"] == dataclasses.asdict(spec):
        return existing  # uploaded whole earlier: the manifest goes up last
    staging = tempfile.mkdtemp(prefix="weaktr-synthetic-")
    manifest_file = f"{staging}.json"
    try:
        write_synthetic(staging, spec)
        os.rename(os.path.join(staging, MANIFEST_NAME), manifest_file)
        storage.upload_dir(staging, root)
        storage.put_file(manifest_file, manifest_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        Path(manifest_file).unlink(missing_ok=True)
    return Manifest.load(root)


def connect(cfg: Config, keys: Sequence[str]) -> None:
    """Join Ray (``init_ray``), then refuse, before any work, a local path among ``keys`` that a node other than
    this one would read or write (``check_paths_reach_every_node``)."""
    init_ray()
    check_paths_reach_every_node(cfg, keys)


def work_elsewhere() -> Optional[str]:
    """Why this job's tasks and actors may run on another machine than its driver (in words), or None when the
    connected Ray cluster is this one machine."""
    here = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node["Alive"]]
    if any(node["NodeID"] != here for node in alive):
        return f"the Ray cluster has {len(alive)} nodes"
    if not next((node["Resources"].get("CPU", 0) for node in alive if node["NodeID"] == here), 0):
        return "this Ray node offers no CPU, so the work runs on nodes that join later"
    return None


def check_paths_reach_every_node(cfg: Config, keys: Sequence[str]) -> None:
    """ConfigError naming the first of ``keys`` that is a local path when work may run on other nodes
    (``work_elsewhere``) and ``run.shared_filesystem`` does not say every node mounts it: each node would read or
    write a disk of its own (Ray Train fails at its first checkpoint, after a whole epoch; other readers would miss
    files). Needs a connected Ray."""
    local = [key for key in keys if get_value(cfg, key) and storage.is_local(get_value(cfg, key))]
    if not local or cfg.run.shared_filesystem or not ray.is_initialized():  # not joined yet: Ray starts locally
        return
    reason = work_elsewhere()
    if reason is not None:
        key = local[0]
        where = []
        if buckets := [k for k in local if k != "tracking.uri"]:
            where.append(f"a bucket URI (s3://bucket/...) for {', '.join(buckets)}")
        if "tracking.uri" in local:  # MLflow keeps no runs in a bucket
            where.append("an MLflow server's http:// address for tracking.uri")
        raise ConfigError(
            f"config key '{key}' is a local path ({get_value(cfg, key)}), but {reason}, each with a disk of its "
            f"own: use {' and '.join(where)}, or, if they are on a file system mounted at the same path on every "
            "node (NFS), set run.shared_filesystem=true"
        )


def check_inputs_exist(cfg: Config, keys: Sequence[str]) -> None:
    """ConfigError naming the first of ``keys`` that is an input file (``INPUT_PATHS``) with nothing at its path.
    Checked by the driver before any worker starts: otherwise every worker fails as it starts, and Ray Train starts
    the group again under ``max_failures`` (measured: a phase-1 run with a missing ``model.weights_path`` was still
    running after 12 minutes)."""
    for key in (key for key in keys if key in INPUT_PATHS):
        if (path := get_value(cfg, key)) and not storage.exists(path):
            raise ConfigError(f"config key '{key}': nothing at {path}")


class CapacityUnavailable(RuntimeError):
    """The cluster did not offer a run's workers their resources within the wait its config allows."""


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
    ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env())


def job_runtime_env() -> dict:
    """What a job's driver adds to the job's runtime environment, for every worker and actor it starts on any node:

    - the log level (``WEAKTR_LOG_LEVEL``) and ``weaktr.logs.configure_worker``, the setup hook that applies it;
    - the driver's Ray Train settings (``RAY_TRAIN_*``). Ray Train hands them from the process that calls ``fit`` to
      its controller, but in a Tune sweep that process is a trial's actor, which has its node's environment rather
      than the driver's: a sweep's trials would ignore e.g. ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` set where
      the sweep was started.

    Under ``ray job submit`` Ray merges this with the job's own runtime environment and refuses a field or variable
    set twice, so whatever that one sets (``--runtime-env-json``) is left to it."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    wanted = {LEVEL_ENV: os.environ.get(LEVEL_ENV, "INFO")}
    wanted |= {name: value for name, value in os.environ.items() if name.startswith("RAY_TRAIN_")}
    added: dict = {}
    if env_vars := {name: value for name, value in wanted.items() if name not in (submitted.get("env_vars") or {})}:
        added["env_vars"] = env_vars
    if "worker_process_setup_hook" not in submitted:
        added["worker_process_setup_hook"] = "weaktr.logs.configure_worker"
    return added


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
    log.warning("%s named the Ray head %s, which does not answer (stopped or killed); removed it (a plain "
                "ray.init() would wait on it forever).", address_file, recorded)
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


def actor_pool(setting: str, size: int, num_cpus: float, num_gpus: float = 0.0, resources: Optional[dict] = None):
    """A Ray Data actor pool of 1 to ``size`` actors of ``num_cpus`` CPUs, ``num_gpus`` GPUs and custom
    ``resources`` each (give the map the same); ``setting`` is the config key that asked for ``size``.

    A fixed pool of ``size`` actors that the cluster cannot hold beside the pipeline's read tasks
    waits for resources forever (``eval.actors: 2`` on a 2-CPU machine did). This pool starts with
    one actor and grows as resources free up or the autoscaler adds nodes; asking for more than the
    cluster has now is said on the console, and a pool of which not even one actor fits fails after
    ``WAIT_FOR_FIRST_ACTOR_S`` instead of waiting forever."""
    import ray.data

    if size < 1:
        raise ValueError(f"{setting} must be >= 1, got {size}")
    have = ray.cluster_resources()
    need = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    fit = min((have.get(name, 0.0) // amount for name, amount in need.items() if amount), default=size)
    if fit < size:
        asked = ", ".join(f"{size * amount:g} {name}" for name, amount in need.items() if amount)
        there = ", ".join(f"{have.get(name, 0.0):g} {name}" for name, amount in need.items() if amount)
        log.warning("%s=%d asks for %s; the cluster has %s now, so the pool starts with 1 actor and grows to %d "
                    "as resources allow", setting, size, asked, there, size)
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
                     shown: Sequence[str], paths: Sequence[str]) -> int:
    """The body of ``train_cam.py`` and ``train_seg.py``: refuse or continue the Ray Train run ``run_name``
    (``check_resume``), prepare the data, write the resolved config as ``config_name``, join Ray (``connect``: the
    path keys ``paths`` must reach every node), ``fit(cfg)`` and print the result. A config, data or storage problem
    is one line and exit code 2."""
    from weaktr.data.shards import DataError

    try:
        check_resume(args.resume, *training_run(cfg.run.storage_path, run_name), what, "set another run.name")
        prepare_data(cfg)
        config_path = save_resolved_config(cfg, config_name)
        connect(cfg, paths)
        result = fit(cfg)
    except (ConfigError, DataError, storage.StorageUnavailable, CapacityUnavailable) as err:  # e.g. no pseudo-labels
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
