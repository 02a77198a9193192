"""Shared fixtures. One real Ray head (``ray start --head``) serves the whole test session:
the Train/Data tests connect to it with ``ray.init`` and the job tests submit to its job server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """Start a real local Ray head once; yields (gcs_address, dashboard_url)."""
    port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [RAY, "start", "--head", "--num-cpus=4", f"--port={port}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True,
    )
    address = f"127.0.0.1:{port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield address, dashboard
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This test process connected to the shared Ray head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head[0], runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray_head
