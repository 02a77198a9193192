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
from weaktr.config import Config, with_values
from weaktr.data.shards import Manifest
from weaktr.data.synthetic import SyntheticSpec, write_synthetic
from weaktr.pseudo import run_pseudo_labels

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


# The VOC pipeline of tests/test_pipeline.py, each pool placed by node type: both phases' ranks and the CAM and
# evaluation actors on the `cam_node` workers (GPU nodes on a real cluster; one unit each, so two ranks or two actors
# never share a node), the CRF on the `cpu_node` one.
PIPELINE_PLACEMENT = ["train.resources_per_worker={cam_node: 1}", "seg_train.resources_per_worker={cam_node: 1}",
                      "pseudo.cam_resources={cam_node: 1}", "pseudo.crf_resources={cpu_node: 1}",
                      "eval.actors=2", "eval.actor_resources={cam_node: 1}"]
# What differs between two runs of the same work: timings (any key naming seconds, throughputs), and the paths of
# each run's own outputs.
NOT_RESULTS = {"checkpoint", "last_checkpoint", "dataset", "report", "out_dir", "images_per_s"}


def differences(ours, reference, where: str = "") -> list[str]:
    """Where two stage records' metrics differ: numbers beyond the killed-run tolerance, anything else unequal."""
    from worker_kill import KILLED_RUN_TOLERANCE

    if isinstance(reference, dict) and isinstance(ours, dict):
        keys = {key for key in set(ours) | set(reference) if key not in NOT_RESULTS and "seconds" not in str(key)}
        return [d for key in sorted(keys, key=str)
                for d in differences(ours.get(key), reference.get(key), f"{where}.{key}")]
    if isinstance(reference, list) and isinstance(ours, list) and len(ours) == len(reference):
        return [d for i, (a, b) in enumerate(zip(ours, reference)) for d in differences(a, b, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(reference, numbers) and isinstance(ours, numbers) and not isinstance(reference, bool):
        same = ours == pytest.approx(reference, abs=KILLED_RUN_TOLERANCE, nan_ok=True)
    else:
        same = ours == reference
    return [] if same else [f"{where}: {ours!r} != {reference!r}"]


def test_the_pipeline_across_nodes_survives_a_lost_node_and_equals_a_single_node_run(
    voc_pipeline_run, multinode, bucket_dataset,
):
    """The whole pipeline job on the cluster, its dataset and run directory in the bucket. Every process of a node
    running a phase-1 rank is SIGKILLed once the first checkpoint is registered, and a node of the same type joins:
    Ray Train starts the worker group again from that checkpoint, and every stage ends where the single-node,
    uninterrupted run of the same config (conftest ``voc_pipeline_run``) did."""
    from recipe_fixtures import VOC_PIPELINE, VOC_PIPELINE_DATA

    from weaktr import pipeline

    runs = "s3://weaktr-multinode/runs"
    command = [sys.executable, "ray_jobs/pipeline.py", "--config", "configs/voc12.yaml"]
    for override in [*VOC_PIPELINE, f"run.storage_path={runs}", f"data.root={VOC_PIPELINE_DATA}", *PIPELINE_PLACEMENT]:
        command += ["--set", override]
    before = multinode.actor_ids()
    job = multinode.submit(*command, no_wait=True)
    snapshot = f"{runs}/pipe/phase1/checkpoint_manager_snapshot.json"
    wait_while_running(multinode, job, "a phase-1 checkpoint registered", lambda: storage.exists(snapshot)
                       and json.loads(storage.read_bytes(snapshot)).get("checkpoint_results"))
    lost = multinode.node_running("RayTrainWorker")
    multinode.kill_node(lost)
    multinode.add_node(num_cpus=2, resources={"cam_node": 1})
    phase1_record = pipeline.record_path(f"{runs}/pipe", "phase1")
    wait_while_running(multinode, job, "phase 1 done", lambda: storage.exists(phase1_record))
    phase1_actors = multinode.actor_ids() - before
    assert multinode.wait_for_job(job, timeout=500) == "SUCCEEDED", multinode.job_logs(job)[-4000:]

    records = {stage: pipeline.load_record(f"{runs}/pipe", stage) for stage in pipeline.STAGES}
    reference = voc_pipeline_run[2]
    assert all(records.values())  # every stage finished (a record is written last, whole)
    differ = [d for stage in pipeline.STAGES
              for d in differences(records[stage]["metrics"], reference[stage]["metrics"], stage)]
    assert not differ, "\n".join(differ)

    # Ray's state API: phase 1's ranks on two nodes, then (after the kill) on the survivor and the replacement;
    # phase 2's on two nodes; CAM and evaluation actors on cam_node workers, the CRF on the cpu_node one.
    cam_type = {node.address for node in multinode.nodes if "cam_node" in node.resources}
    phase1 = multinode.nodes_of("RayTrainWorker", among=phase1_actors)
    phase2 = multinode.nodes_of("RayTrainWorker", since=before | phase1_actors)
    assert lost.address in phase1 and len(phase1) == 3 and phase1 <= cam_type, phase1
    assert len(phase2) == 2 and phase2 <= cam_type and lost.address not in phase2, phase2
    cam, crf = multinode.nodes_of("CamStage", before), multinode.nodes_of("CrfStage", before)
    evaluation = multinode.nodes_of("SegEvalActor", before)
    assert cam and evaluation and (cam | evaluation) <= cam_type - {lost.address}, (cam, evaluation)
    assert crf == {multinode.alive_node("cpu_node").address}


def wait_while_running(cluster, job: str, what: str, done, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        status = cluster.job_status(job)
        assert status in ("PENDING", "RUNNING"), f"ended before {what}: " + cluster.job_logs(job)[-3000:]
        assert time.monotonic() < deadline, f"not {what} in {timeout} s"
        time.sleep(0.2)


def test_local_paths_are_refused_before_any_work_on_a_cluster_of_several_nodes(
    multinode, local_dataset, phase1_checkpoint, bucket_dataset, tmp_path,
):
    """A local data.root would be read by actors on nodes that do not have it; a local run.storage_path would get
    Ray Train's checkpoints scattered over the workers' disks (Ray Train notices only at the first checkpoint).
    (The jobs run as drivers on the head: the refusal is the driver's, whether submitted or not.)"""
    out_dir = tmp_path / "pseudo"
    proc = multinode.run_driver(*pseudo_job(phase1_checkpoint, pseudo_overrides(local_dataset, out_dir)))
    assert proc.returncode != 0
    assert "config key 'data.root' is a local path" in proc.stdout, proc.stdout[-3000:]
    assert "the Ray cluster has 4 nodes" in proc.stdout and "run.shared_filesystem=true" in proc.stdout
    assert not (out_dir / "stats").exists()  # nothing started

    train = multinode.run_driver(
        sys.executable, "ray_jobs/train_cam.py", "--config", "configs/smoke.yaml",
        "--set", f"data.root={bucket_dataset}",
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
    proc = multinode.run_driver(*pseudo_job(phase1_checkpoint, overrides))
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
          "--set", "data.root=s3://weaktr-multinode/smoke", "--set", "train.resources_per_worker={cam_node: 1}"]


def test_a_run_whose_workers_never_find_their_resources_ends_naming_them(multinode, bucket_dataset):
    """Ray Train waits for its workers' resources and, by default, starts again for ever: a node type that never
    comes (here a resource no node offers; on a real cluster, a lost node with no replacement) must end the job."""
    proc = multinode.submit(
        sys.executable, *PHASE1, "--set", "run.name=nowhere", "--set", "train.resources_per_worker={gpu_node: 1}",
        "--set", "train.capacity_wait_s=4", env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "2"}, timeout=300,
    )
    assert proc.returncode != 0
    assert ("error: the cluster did not offer 2 Ray Train workers their resources ({'CPU': 1, 'gpu_node': 1} each) "
            "within train.capacity_wait_s=4 s") in proc.stdout, proc.stdout[-3000:]


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
    wait_while_running(multinode, job, "a shard committed",
                       lambda: any(name.startswith("stats/") for name in bucket_tree(out_dir)), timeout=180)
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
    proc = multinode.run_driver(sys.executable, "-m", "weaktr.cli", "convert", "folder", str(images),
                                str(tmp_path / "labels.csv"), "s3://weaktr-multinode/converted", "--ray")
    assert proc.returncode != 0
    assert f"error: {images} is not on the Ray node at 127.0.0." in proc.stdout, proc.stdout[-3000:]
    assert not [name for name in bucket_objects("s3://weaktr-multinode") if name.startswith("converted/")]
