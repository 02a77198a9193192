"""cluster.yaml's scaling on Ray's fake multi-node provider (tests/fake_cluster.yaml): the autoscaler of a head with
no CPU for work starts real worker nodes on this machine for the actors a pseudo-label job asks for, by node type,
and removes them once idle."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, _free_port, _wait_for_job_agent, ray_head_process
from sim_cluster import SimCluster, cluster_env
from test_multinode import bucket_tree, pseudo_job
from test_pseudo import pseudo_overrides, tiny_model

from weaktr import storage
from weaktr.checkpoint import save_checkpoint
from weaktr.data.synthetic import SyntheticSpec, write_synthetic

FAKE_CLUSTER = Path(__file__).with_name("fake_cluster.yaml")
NUM_SHARDS = 4


def _worker_types(config: dict) -> dict[str, dict]:
    return {name: node_type for name, node_type in config["available_node_types"].items()
            if name != config["head_node_type"]}


def test_fake_cluster_has_cluster_yamls_worker_types():
    fake = yaml.safe_load(FAKE_CLUSTER.read_text())
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert fake["available_node_types"][fake["head_node_type"]]["resources"] == {"CPU": 0}
    fake_workers, real_workers = _worker_types(fake), _worker_types(real)
    assert set(fake_workers) == set(real_workers)
    for name, node_type in real_workers.items():
        assert (fake_workers[name].get("min_workers", 0), fake_workers[name]["max_workers"]) == (
            node_type.get("min_workers", 0), node_type.get("max_workers", 0)), name
    assert fake_workers["cpu_worker"]["resources"]["cpu_node"] > 0
    assert "cpu_node" in real_workers["cpu_worker"]["resources"]


def _worker_nodes(cluster: SimCluster) -> dict[str, dict]:
    """The fake provider's worker nodes by id, as Ray's state API has them (a removed node stays, DEAD)."""
    return {node["node_id"]: node for node in cluster.state("nodes") if not node["is_head_node"]}


def _node_type(node: dict) -> str:
    return next(name for name in ("cam_node", "cpu_node") if name in node["resources_total"])


@pytest.mark.ray
def test_queued_actors_start_worker_nodes_of_their_type_and_idle_ones_are_removed(s3_server, tmp_path):
    import boto3

    spec = SyntheticSpec(num_classes=3, num_train=2 * NUM_SHARDS, num_val=0, min_size=48, max_size=64,
                         samples_per_shard=2, seed=7)
    dataset = write_synthetic(tmp_path / "data", spec)
    boto3.client("s3").create_bucket(Bucket="weaktr-autoscale")
    storage.upload_dir(dataset.root, "s3://weaktr-autoscale/data")
    model = tiny_model()
    checkpoint = tmp_path / "cam"  # read by the driver only, on the head
    save_checkpoint(checkpoint, kind="cam", model_state=model.state_dict(), arch=model.arch,
                    classes=dataset.classes, config={}, epoch=0)

    port = _free_port()
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_file = tmp_path / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = cluster_env({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})  # token auth, as cluster.yaml
    with ray_head_process(0, env=env, log_dir=tmp_path, port=port,
                          extra_args=(f"--autoscaling-config={config_file}",)) as (gcs_address, dashboard, env):
        cluster = SimCluster(gcs_address, dashboard, env, tmp_path)  # its client side: the nodes are the provider's
        _wait_for_job_agent(dashboard, token=env["RAY_AUTH_TOKEN"])
        assert _worker_nodes(cluster) == {}  # min_workers 0: nothing before there is work
        out_dir = "s3://weaktr-autoscale/pseudo"
        overrides = pseudo_overrides(dataset, out_dir) | {
            "data.root": "s3://weaktr-autoscale/data", "pseudo.cam_resources": {"cam_node": 1},
            "pseudo.crf_resources": {"cpu_node": 1}}
        proc = cluster.submit(*pseudo_job(str(checkpoint), overrides), timeout=400)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert sum(name.startswith("stats/") for name in bucket_tree(out_dir)) == NUM_SHARDS

        started = _worker_nodes(cluster)
        assert sorted(_node_type(node) for node in started.values()) == ["cam_node", "cpu_node"], started
        # By node id: the provider's nodes all have this machine's address.
        type_of = {node_id: _node_type(node) for node_id, node in started.items()}
        ran_on = {stage: {type_of[actor["node_id"]] for actor in cluster.state("actors")
                          if f"({stage})" in actor["class_name"]} for stage in ("CamStage", "CrfStage")}
        assert ran_on == {"CamStage": {"cam_node"}, "CrfStage": {"cpu_node"}}

        deadline = time.monotonic() + 120  # idle_timeout_minutes 0.1, then the autoscaler's next round
        while any(node["state"] == "ALIVE" for node in _worker_nodes(cluster).values()):
            assert time.monotonic() < deadline, "idle worker nodes were not removed"
            time.sleep(1)
