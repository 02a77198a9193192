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
