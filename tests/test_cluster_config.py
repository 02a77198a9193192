"""cluster.yaml passes Ray's own cluster-config validation (the JSON schema `ray up` applies) and opens no port to
the internet beyond SSH (Ray's default AWS security group: SSH in, everything within the cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises on a schema error
    assert set(config["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}
    with pytest.raises(Exception, match="max_workerz"):  # the validation does catch a typo
        validate_config({**config, "max_workerz": 3})


def test_cluster_yaml_opens_no_port_beyond_ssh():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in rules)
    # The dashboard / job server listens on the head's loopback (reached through `ray dashboard`'s SSH tunnel).
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in yaml.safe_dump(config)


def test_every_node_gets_the_same_ray_and_the_checkout_without_venv_data_or_runs():
    """A node the autoscaler sets up later must install the head's Ray (Ray refuses a node of another version), and
    `file_mounts: .` must not copy the venv (~6 GB), datasets or run outputs to every node."""
    import ray

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert all("-c constraints.txt" in command for command in config["setup_commands"] if "pip install" in command)
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("ray==")]
    assert pins == [f"ray=={ray.__version__}"]
    assert config["rsync_filter"] == [".gitignore"]
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert {".venv", "/data/", "/runs/", "/outputs/"} <= ignored
    assert "**/.git" in config["rsync_exclude"]


def test_the_cpu_node_type_offers_the_resource_the_recipes_aim_the_crf_with():
    from weaktr.config import load_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    offered = config["available_node_types"]["cpu_worker"]["resources"]
    for recipe in ("voc12.yaml", "coco14.yaml"):
        assert "crf_resources: {cpu_node: 1}" in (ROOT / "configs" / recipe).read_text()
        cfg = load_config(ROOT / "configs" / recipe, ["pseudo.crf_resources={cpu_node: 1}"])
        assert set(cfg.pseudo.crf_resources) <= set(offered)
