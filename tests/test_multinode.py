"""weaktr on a simulated multi-node cluster (``tests/sim_cluster.py``, conftest ``multinode``): a head with no CPU,
worker nodes on disks of their own, token authentication on, storage on the loopback S3 server, every job sent with
``ray job submit --working-dir .`` as a user sends it.

What one machine hides: a path that only the head's disk has, actors placed by node type, a node lost mid-run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from job_helpers import bucket_objects
from test_pseudo import _tree, pseudo_overrides, tiny_model

from weaktr import storage
from weaktr.checkpoint import save_checkpoint
from weaktr.data.shards import Manifest
from weaktr.data.synthetic import SyntheticSpec, write_synthetic
from weaktr.pseudo import run_pseudo_labels
from weaktr.config import Config, with_values

NUM_SHARDS = 8
# The actors placed by node type: CAM inference on the two `cam_node` workers (GPU nodes on a real cluster), the
# CRF on the `cpu_node` one (a cheap CPU-only node).
PLACEMENT = {"pseudo.cam_resources": {"cam_node": 1}, "pseudo.crf_resources": {"cpu_node": 1}}
# What names its own paths, so differs between two runs of the same outputs at different places.
NAMES_ITS_PATHS = {"manifest.json", "run_config.json"}


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> Manifest:
    """A small synthetic dataset on the head's disk (pytest's tmp_path: no worker node sees it)."""
    spec = SyntheticSpec(num_classes=3, num_train=2 * NUM_SHARDS, num_val=0, min_size=48, max_size=64,
                         samples_per_shard=2, seed=5)
    return write_synthetic(tmp_path_factory.mktemp("multinode-data") / "data", spec)


@pytest.fixture(scope="module")
def phase1_checkpoint(local_dataset, tmp_path_factory) -> str:
    model = tiny_model()
    path = tmp_path_factory.mktemp("multinode-ckpt") / "cam"
    save_checkpoint(path, kind="cam", model_state=model.state_dict(), arch=model.arch,
                    classes=local_dataset.classes, config={}, epoch=0)
    return str(path)  # read by the driver only, on the head


@pytest.fixture(scope="module")
def bucket_dataset(local_dataset, s3_server) -> str:
    """The same dataset in a bucket every node reaches."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="weaktr-multinode")
    storage.upload_dir(local_dataset.root, "s3://weaktr-multinode/data")
    return "s3://weaktr-multinode/data"


@pytest.fixture(scope="module")
def single_node_run(local_dataset, phase1_checkpoint, ray_session, tmp_path_factory) -> dict[str, bytes]:
    """The reference: the same pseudo-labels on the shared single-node head, every file's bytes."""
    out_dir = tmp_path_factory.mktemp("multinode-ref") / "pseudo"
    run_pseudo_labels(with_values(Config(), pseudo_overrides(local_dataset, out_dir)), phase1_checkpoint)
    return _tree(out_dir)


def pseudo_job(checkpoint: str, overrides: dict, *flags: str) -> list[str]:
    command = [sys.executable, "ray_jobs/make_pseudo_labels.py", "--checkpoint", checkpoint, *flags]
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def bucket_tree(prefix: str) -> dict[str, bytes]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    return {name.removeprefix(f"{key}/"): storage.read_bytes(f"s3://{bucket}/{name}")
            for name in bucket_objects(f"s3://{bucket}") if name.startswith(f"{key}/")}


def same_outputs(outputs: dict[str, bytes], reference: dict[str, bytes]) -> list[str]:
    """The files that are missing, extra or differ (but for those naming their own paths)."""
    names = set(outputs) | set(reference)
    return sorted(name for name in names if Path(name).name not in NAMES_ITS_PATHS
                  and outputs.get(name) != reference.get(name))


def test_local_paths_are_refused_before_any_work_on_a_cluster_of_several_nodes(
    multinode, local_dataset, phase1_checkpoint, bucket_dataset, tmp_path,
):
    """A local data.root would be read by actors on nodes that do not have it; a local run.storage_path would get
    Ray Train's checkpoints scattered over the workers' disks (Ray Train notices only at the first checkpoint)."""
    out_dir = tmp_path / "pseudo"
    proc = multinode.submit(*pseudo_job(phase1_checkpoint, pseudo_overrides(local_dataset, out_dir)))
    assert proc.returncode != 0
    assert "config key 'data.root' is a local path" in proc.stdout, proc.stdout[-3000:]
    assert "the Ray cluster has 4 nodes" in proc.stdout and "run.shared_filesystem=true" in proc.stdout
    assert not (out_dir / "stats").exists()  # nothing started

    train = multinode.submit(
        sys.executable, "ray_jobs/train_cam.py", "--config", "configs/smoke.yaml", "--set", f"data.root={bucket_dataset}",
        "--set", "data.synthetic.enabled=false", "--set", f"run.storage_path={tmp_path / 'runs'}",
    )
    assert train.returncode != 0
    assert "config key 'run.storage_path' is a local path" in train.stdout, train.stdout[-3000:]


def test_a_shard_no_node_can_read_is_never_committed(multinode, local_dataset, phase1_checkpoint, s3_server):
    """The dataset only on the head's disk, declared shared (run.shared_filesystem=true) though it is not: the
    shards read on other nodes cannot be opened there. Before, each became a failure row, the driver committed the
    shard with 0 samples and the job SUCCEEDED with a shard gone, which --resume then skipped for ever."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="weaktr-unshared")
    out_dir = "s3://weaktr-unshared/pseudo"
    overrides = pseudo_overrides(local_dataset, out_dir) | {"run.shared_filesystem": True}
    proc = multinode.submit(*pseudo_job(phase1_checkpoint, overrides))
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "could not be read and were not committed" in proc.stdout, proc.stdout[-3000:]
    assert "cannot be read on the node at 127.0.0." in proc.stdout
    sizes = dict(zip(local_dataset.splits["train"].shards, local_dataset.splits["train"].shard_sizes))
    committed = {name.removeprefix("stats/").removesuffix(".json"): json.loads(data)
                 for name, data in bucket_tree(out_dir).items() if name.startswith("stats/")}
    assert len(committed) < NUM_SHARDS
    for shard, stats in committed.items():  # what was committed is whole
        assert stats["num_samples"] + len(stats["failures"]) == sizes[shard]


# Phase 1 on the bucket, each rank on its own `cam_node` worker (one unit each: two ranks cannot share a node).
PHASE1 = ["ray_jobs/train_cam.py", "--config", "configs/smoke.yaml", "--set", "run.storage_path=s3://weaktr-multinode/runs",
          "--set", "data.root=s3://weaktr-multinode/smoke", "--set", "train.resources_per_worker={cam_node: 1}",
          "--set", "train.max_failures=1", "--set", "train.checkpoints_to_keep=10"]


def checkpoint_metrics(run: str) -> list[dict]:
    """Every checkpoint's metrics of the Ray Train run ``run`` in the bucket, by epoch."""
    from weaktr.checkpoint import load_checkpoint

    where = f"s3://weaktr-multinode/runs/{run}"
    metrics = [load_checkpoint(storage.join(where, name))["metrics"]
               for name in storage.list_names(where) if name.startswith("checkpoint_") and not name.endswith(".json")]
    return sorted(metrics, key=lambda m: m["epoch"])


@pytest.fixture(scope="module")
def phase1_on_two_nodes(multinode, bucket_dataset) -> list[dict]:
    """Phase 1 on the simulated cluster, its synthetic dataset generated into the bucket by the job itself."""
    before = multinode.actor_ids()
    proc = multinode.submit(sys.executable, *PHASE1, "--set", "run.name=apart")
    assert proc.returncode == 0, proc.stdout[-3000:]
    ranks_on = multinode.nodes_of("RayTrainWorker", before)
    assert len(ranks_on) == 2 and all(address.startswith("127.0.0.") for address in ranks_on), ranks_on
    return checkpoint_metrics("apart")


def test_phase1_ranks_on_two_nodes_learn(phase1_on_two_nodes):
    assert [m["epoch"] for m in phase1_on_two_nodes] == [0, 1]
    assert phase1_on_two_nodes[-1]["loss"] < phase1_on_two_nodes[0]["loss"]
    assert all(m["rank_overlap_keys"] == 0 for m in phase1_on_two_nodes)


def test_phase1_survives_losing_a_node_after_its_first_checkpoint(multinode, phase1_on_two_nodes):
    """Every process of a node running a rank SIGKILLed once the first checkpoint is registered; a replacement node
    joins; Ray Train restarts the worker group from that checkpoint and the run ends where the uninterrupted one
    did, every epoch checkpointed once."""
    from worker_kill import KILLED_RUN_TOLERANCE

    job = multinode.submit(sys.executable, *PHASE1, "--set", "run.name=lost", no_wait=True)
    snapshot = "s3://weaktr-multinode/runs/lost/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not (storage.exists(snapshot) and json.loads(storage.read_bytes(snapshot)).get("checkpoint_results")):
        assert multinode.job_status(job) in ("PENDING", "RUNNING"), multinode.job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was registered in time"
        time.sleep(0.2)
    multinode.kill_node(multinode.node_running("RayTrainWorker"))
    multinode.add_node(num_cpus=2, resources={"cam_node": 1})
    assert multinode.wait_for_job(job, timeout=400) == "SUCCEEDED", multinode.job_logs(job)[-4000:]
    lost = checkpoint_metrics("lost")
    assert [m["epoch"] for m in lost] == [0, 1]
    for key in ("loss", "val_mAP", "cam_mIoU"):
        assert lost[-1][key] == pytest.approx(phase1_on_two_nodes[-1][key], abs=KILLED_RUN_TOLERANCE), key


def test_a_run_whose_workers_never_find_their_resources_ends_naming_them(multinode, bucket_dataset):
    """Ray Train waits for its workers' resources and, by default, starts again for ever: a node type that never
    comes (here a resource no node offers; on a real cluster, a lost node with no replacement) must end the job."""
    proc = multinode.submit(
        sys.executable, *PHASE1, "--set", "run.name=nowhere", "--set", "train.resources_per_worker={gpu_node: 1}",
        "--set", "train.capacity_wait_s=8", env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "4"}, timeout=300,
    )
    assert proc.returncode != 0
    assert ("error: the cluster did not offer 2 Ray Train workers their resources ({'CPU': 1, 'gpu_node': 1} each) "
            "within train.capacity_wait_s=8 s") in proc.stdout, proc.stdout[-3000:]


def test_pseudo_labels_across_nodes_survive_a_lost_node_and_equal_a_single_node_run(
    multinode, bucket_dataset, local_dataset, phase1_checkpoint, single_node_run,
):
    """The pseudo-label job on the cluster, each pool on its node type, its data and outputs in the bucket. Every
    process of the node running the CAM actor is SIGKILLed once some shards are committed, and a node of the same
    type joins: the job finishes with every shard exactly once, byte for byte what one node made uninterrupted."""
    out_dir = "s3://weaktr-multinode/pseudo"
    overrides = pseudo_overrides(local_dataset, out_dir) | PLACEMENT | {"data.root": bucket_dataset}
    before = multinode.actor_ids()
    job = multinode.submit(*pseudo_job(phase1_checkpoint, overrides), no_wait=True)
    deadline = time.monotonic() + 180
    while not any(name.startswith("stats/") for name in bucket_tree(out_dir)):
        assert multinode.job_status(job) in ("PENDING", "RUNNING"), multinode.job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.2)
    lost = multinode.node_running("CamStage")
    multinode.kill_node(lost)
    done_at_kill = sum(name.startswith("stats/") for name in bucket_tree(out_dir))
    assert done_at_kill < NUM_SHARDS, "the kill should land mid-run"
    multinode.add_node(num_cpus=2, resources={"cam_node": 1})
    status = multinode.wait_for_job(job, timeout=300)
    assert status == "SUCCEEDED", multinode.job_logs(job)[-4000:]
    assert same_outputs(bucket_tree(out_dir), single_node_run) == []
    # Ray's state API: the CAM actor that ran on the lost node (an actor keeps its id when Ray restarts it) went on
    # on another cam_node worker, the replacement or the other one; the CRF ran on the cpu_node worker only.
    cam_nodes, crf_nodes = multinode.nodes_of("CamStage", before), multinode.nodes_of("CrfStage", before)
    cam_type = {node.address for node in multinode.nodes if "cam_node" in node.resources}
    assert cam_nodes and lost.address not in cam_nodes and cam_nodes <= cam_type, (cam_nodes, crf_nodes)
    assert crf_nodes == {multinode.alive_node("cpu_node").address}


def test_convert_with_ray_refuses_a_source_folder_the_reading_nodes_do_not_have(multinode, bucket_dataset, tmp_path):
    """The images on the head's disk only: every item read on a worker node used to be skipped as "missing", so the
    conversion ended with a dataset short of every image read elsewhere."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (24, 20), (40, 90, 200)).save(images / f"{name}.png")
    (tmp_path / "labels.csv").write_text("a.png,cat\nb.png,dog\nc.png,cat\n")
    proc = multinode.submit(sys.executable, "-m", "weaktr.cli", "convert", "folder", str(images),
                            str(tmp_path / "labels.csv"), "s3://weaktr-multinode/converted", "--ray")
    assert proc.returncode != 0
    assert f"error: {images} is not on the Ray node at 127.0.0." in proc.stdout, proc.stdout[-3000:]
    assert not [name for name in bucket_objects("s3://weaktr-multinode") if name.startswith("converted/")]
