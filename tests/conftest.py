"""Shared fixtures. One real Ray head (``ray start --head``) serves the whole test session:
the Train/Data tests connect to it with ``ray.init`` and the job tests submit to its job server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

# The test cluster listens on loopback only. Ray 2.60 turns token auth on whenever a token
# file exists in ~/.ray, which other local Ray use can create or replace mid-session; pin the
# mode for the head, this process and every job/CLI subprocess so they always agree.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller looks at its workers every 2 s by default, so each run of a test waits up to 2 s to be
# started, for each report and to be seen finished (a 2-worker, 2-epoch fit of nothing: 17.8-21.9 s at 2 s,
# 12.3-17.1 s at 0.25 s); and it starts a preemption-watcher actor per run (a process of its own), for the spot
# instances no test has. Every head, node and driver of the session inherits both; launch.job_runtime_env carries
# them into Tune's trials.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked (ports picked one at a time can
    repeat, and a head given one port for two of its servers fails to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def ray_head_process(num_cpus: int, env: dict | None = None, log_dir: Path | None = None, port: int | None = None,
                     extra_args: tuple[str, ...] = ()):
    """A real ``ray start --head`` on loopback (``port``: its GCS port, default a free one; ``extra_args`` for
    ``ray start``); yields (gcs_address, dashboard_url, env).

    Its temporary directory is a fresh one, not Ray's default /tmp/ray: a head writes its address
    to ``<temp dir>/ray_current_cluster``, and a later plain ``ray.init()`` (the user's demo) would
    join the killed test head through that file. ``--block`` keeps the head in one process group
    that teardown ends, so only this head goes away (``ray stop`` would end every Ray here)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    # Short, because Ray's unix sockets live under it (a 107-character limit on the path).
    temp_dir = tempfile.mkdtemp(prefix="wtr-ray-", dir="/tmp")
    # Every port free-picked: the defaults (e.g. the job agent's 52365) clash with any other Ray
    # on the machine, and a head whose agent cannot bind answers "No available agent" forever.
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")
    picked = _free_ports(len(flags) + 2)
    port, dashboard_port = port or picked[0], picked[1]
    log = open(Path(log_dir or temp_dir) / "head.log", "w")
    agent_ports = [f"--{flag}={free}" for flag, free in zip(flags, picked[2:])]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={port}", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats", *agent_ports, *extra_args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(dashboard, head)
        _wait_for_node(dashboard, head)
        yield address, dashboard, env
    finally:
        # A throwaway test cluster needs no graceful drain (which takes up to a minute).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (``loopback_s3``) for the session; yields its endpoint URL. The shared Ray head
    starts after it (``ray_head``), so its workers inherit its environment too."""
    with loopback_s3(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@contextlib.contextmanager
def loopback_s3(log_dir: Path):
    """A real S3-compatible server (moto's server mode, in a process of its own) on loopback; yields its endpoint URL.

    Set up as a cloud user would be: credentials, region and ``AWS_ENDPOINT_URL`` (an S3-compatible endpoint such as
    MinIO's) in this process's environment, where pyarrow (``weaktr.storage``, Ray Train's checkpoint storage) and
    every process started later find them."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start; see {log.name}") from None
                time.sleep(0.2)
        os.environ.update(AWS_ACCESS_KEY_ID="weaktr-test", AWS_SECRET_ACCESS_KEY="weaktr-test",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        server.kill()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the loopback S3 server; yields its ``s3://`` URI."""
    import boto3

    name = "weaktr-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_head(s3_server, tmp_path_factory):
    """The session's shared 4-CPU Ray head; yields (gcs_address, dashboard_url)."""
    from weaktr.launch import remove_stale_address_file

    remove_stale_address_file()  # else Ray Train's placement-group cleaner, inside this head, reads a dead address
    with ray_head_process(4, log_dir=tmp_path_factory.mktemp("ray")) as (address, dashboard, _):
        _wait_for_job_agent(dashboard)
        try:
            yield address, dashboard
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _wait_for_job_agent(url: str, timeout: float = 180, token: str | None = None) -> None:
    """The job server answers before its agent can run jobs ("No available agent to submit
    job, please try again later"): submit a no-op job until one is accepted and finishes. ``token``: the head's
    auth token, when it has token authentication on."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            job_id = client.submit_job(entrypoint="true")
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            raise TimeoutError("the Ray head's job agent did not run a no-op job")
        time.sleep(1)


def _wait_for_node(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    """The dashboard answers before the head's raylet has registered its node, and a driver that connects then
    looks for a node it cannot find (a CI run failed so: "Failed to get node info ... Timed out while waiting for
    GCS"): wait until the state API lists an alive node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}; see {head.args} log")
        try:
            with urllib.request.urlopen(f"{url}/api/v0/nodes", timeout=5) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
            if any(node.get("state") == "ALIVE" for node in nodes):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # token authentication on: a test of that head waits in its own way
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head's node did not register within {timeout} s")


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    """The job server is the last thing a head brings up; once it answers, the head is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}; see {head.args} log")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # answering, if only to ask for Ray's auth token
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray head did not come up within {timeout} s")


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This test process connected to the shared Ray head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head[0], runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray_head


def pytest_collection_modifyitems(items):
    """The `ray` marker on every test that needs a Ray head (the shared one, through its fixtures, or one of its own
    through ray_head_process), so `pytest -m "not ray"` runs the fast, Ray-free part of the suite."""
    for item in items:
        code = getattr(getattr(item, "function", None), "__code__", None)
        starts_a_head = code is not None and "ray_head_process" in code.co_names
        fixtures = getattr(item, "fixturenames", ())
        if "ray_session" in fixtures or "multinode" in fixtures or starts_a_head:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def voc_pipeline_run(ray_session, tmp_path_factory):
    """The VOC recipe's whole pipeline (recipe_fixtures.VOC_PIPELINE) submitted as a Ray job to the session's head,
    as the README does it on a cluster, its dataset and run directory in a bucket (a cluster without a shared file
    system). Returns (cfg, the console, each stage's record, (fate, damage, manifest) of the dataset)."""
    from recipe_fixtures import VOC_PIPELINE, VOC_PIPELINE_DATA, write_voc_pipeline_data

    from weaktr import pipeline, storage
    from weaktr.config import load_config

    _, dashboard = ray_session
    data = write_voc_pipeline_data(tmp_path_factory.mktemp("pipeline"))
    overrides = [*VOC_PIPELINE, "run.storage_path=s3://weaktr-pipeline/runs", f"data.root={VOC_PIPELINE_DATA}"]
    command = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--", sys.executable,
               "ray_jobs/pipeline.py", "--config", "configs/voc12.yaml"]
    for override in overrides:
        command += ["--set", override]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(ROOT / "configs" / "voc12.yaml", overrides)
    directory = storage.join(cfg.run.storage_path, cfg.run.name)
    records = {stage: pipeline.load_record(directory, stage) for stage in pipeline.STAGES}
    return cfg, proc.stdout, records, data


@pytest.fixture(scope="module")
def multinode(s3_server, tmp_path_factory):
    """A simulated multi-node cluster for a test module (its idle nodes would slow every later test)
    (``tests/sim_cluster.py``): a head with no CPU and three worker nodes of 2 CPUs on private disks, two of them
    offering ``cam_node`` (standing in for GPU nodes) and one ``cpu_node`` (a CPU-only node type for the CRF), as
    ``cluster.yaml``'s node types do. Yields the ``SimCluster``; a test that kills a node adds its replacement."""
    from sim_cluster import simulated_cluster

    workers = [dict(num_cpus=2, resources={"cam_node": 1}), dict(num_cpus=2, resources={"cam_node": 1}),
               dict(num_cpus=2, resources={"cpu_node": 2})]
    with simulated_cluster(tmp_path_factory.mktemp("multinode"), workers) as cluster:
        yield cluster
