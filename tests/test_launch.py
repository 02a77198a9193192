"""How jobs find (or start) Ray: dead and stale addresses, small clusters, token authentication.

Each test runs the job or `init_ray` in a subprocess: this process is already connected to the session's head,
and the point is what a fresh job does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import RAY, ROOT, _free_port, ray_head_process
from seg_helpers import save_random_checkpoint, tiny_config, write_pseudo_dataset

from weaktr.config import save_config
from weaktr.evaluate import REPORT_NAME

INIT_RAY = (
    "import ray; from weaktr.launch import init_ray; init_ray(); "
    "print('connected', ray.get_runtime_context().gcs_address, flush=True)"
)


def _run(code_or_command, env: dict, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code_or_command] if isinstance(code_or_command, str) else code_or_command
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_jobs_runtime_env_carries_the_drivers_ray_train_settings_unless_the_submission_sets_them(monkeypatch):
    """Ray Train reads its settings (RAY_TRAIN_*) in the process that calls fit; in a Tune sweep that is a trial's
    actor, which has its node's environment: the driver's settings reach it through the job's runtime env. What a
    `ray job submit --runtime-env-json` sets is the job's own, and Ray refuses a variable given twice."""
    from weaktr.launch import job_runtime_env

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "7")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("WEAKTR_LOG_LEVEL", "DEBUG")
    added = job_runtime_env()
    assert added["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "7"
    assert added["env_vars"]["WEAKTR_LOG_LEVEL"] == "DEBUG"
    assert added["worker_process_setup_hook"] == "weaktr.logs.configure_worker"

    submitted = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}, "worker_process_setup_hook": "mine.hook"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": submitted}))
    added = job_runtime_env()
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in added["env_vars"] and "worker_process_setup_hook" not in added
    assert added["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "7"


def test_a_dead_ray_address_fails_fast_naming_it():
    dead = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    proc = _run(INIT_RAY, {**os.environ, "RAY_ADDRESS": dead}, timeout=60)
    assert proc.returncode != 0
    assert f"RAY_ADDRESS={dead} does not answer" in proc.stderr
    assert time.monotonic() - started < 30


# Run in a fresh job process: start a local Ray as the jobs do, then ask its GCS (the port every Ray client and
# worker talks to) for the cluster id without a token, with a wrong one and with the cluster's own.
EXPOSURE_PROBE = """
import json, os, socket
import grpc, ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from weaktr.launch import init_ray

init_ray()
gcs = ray.get_runtime_context().gcs_address

def ask_gcs(token):
    with grpc.insecure_channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10,
                              metadata=[("authorization", f"Bearer {token}")] if token else [])
            return "answered"
        except grpc.RpcError as err:
            return err.code().name

def listens(host, port):
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False

token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
dashboard_port = int(ray._private.worker.get_dashboard_url().rsplit(":", 1)[1])
node_ip = gcs.rsplit(":", 1)[0]
print(json.dumps({
    "gcs": gcs, "node_ip": node_ip,
    "no token": ask_gcs(None), "wrong token": ask_gcs("not-the-token"), "token": ask_gcs(token),
    "dashboard on loopback": listens("127.0.0.1", dashboard_port),
    "dashboard on the node's address": listens(node_ip, dashboard_port),
}))
"""


@pytest.mark.ray  # starts a local Ray in a subprocess
def test_a_job_run_directly_past_a_dead_heads_address_file_starts_a_local_ray_that_answers_only_its_token(tmp_path):
    """What a job run directly finds and opens, on a machine where a killed ``ray start --head`` left
    ``<Ray temp dir>/ray_current_cluster`` naming a dead head (a plain ``ray.init()`` would join it and never return),
    as a user without a token yet (a fresh HOME).

    The job removes the file and starts a local Ray. Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to
    every interface whatever the node address (``_node_ip_address="127.0.0.1"`` was tried: no change), so what
    guards them is the token authentication a local Ray turns on by itself (the token in ``~/.ray/auth_token``, made
    on first use). The dashboard and job server, which run any code sent to them, listen on loopback only."""
    home = tmp_path / "home"
    home.mkdir()
    # Ray's temp dir is $RAY_TMPDIR/ray; short, because Ray's unix sockets live under it.
    temp = tempfile.mkdtemp(prefix="wtr-exp-", dir="/tmp")
    try:
        (Path(temp) / "ray").mkdir()
        dead = f"127.0.0.1:{_free_port()}"
        (Path(temp) / "ray" / "ray_current_cluster").write_text(dead)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        proc = _run(EXPOSURE_PROBE, env | {"HOME": str(home), "RAY_TMPDIR": temp}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"named the Ray head {dead}, which does not answer" in proc.stderr
        # Removed: Ray's state API and Ray Train's placement-group cleaner would otherwise still read it.
        assert not (Path(temp) / "ray" / "ray_current_cluster").exists()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["gcs"] != dead
    assert (home / ".ray" / "auth_token").exists()
    assert (seen["no token"], seen["wrong token"], seen["token"]) == ("UNAUTHENTICATED", "UNAUTHENTICATED", "answered")
    assert seen["dashboard on loopback"]
    if seen["node_ip"] not in ("127.0.0.1", "localhost"):
        assert not seen["dashboard on the node's address"]


def test_the_test_session_leaves_rays_default_address_file_alone(ray_head):
    # The shared head runs in its own temp dir: a user's plain `ray.init()` after the tests must not find it.
    default_file = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    recorded = default_file.read_text().strip() if default_file.exists() else ""
    assert recorded != ray_head[0]


def test_evaluate_on_a_two_cpu_cluster_with_two_actors(tmp_path):
    # eval.actors=2 took both CPUs and the shard-decoding task waited for one forever.
    manifest = write_pseudo_dataset(tmp_path, num_train=8, num_val=8)
    cfg = tiny_config(tmp_path, tmp_path / "pseudo")
    cfg.eval.actors, cfg.eval.out_dir = 2, str(tmp_path / "report")
    checkpoint = save_random_checkpoint(tmp_path / "ckpt", cfg, manifest.classes)
    save_config(cfg, tmp_path / "eval.yaml")
    with ray_head_process(2) as (address, _, env):
        proc = _run(
            [sys.executable, "ray_jobs/evaluate.py", "--config", str(tmp_path / "eval.yaml"),
             "--checkpoint", str(checkpoint)],
            {**env, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1"}, timeout=240,
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / REPORT_NAME).read_text())
    assert report["num_images"] == 8
    # One progress bar of its own; Ray Data's progress blocks and execution logs stay in its log file.
    console = proc.stdout + proc.stderr
    assert "evaluating val: 100%" in console
    assert "Total Progress" not in console and "Starting execution of Dataset" not in console


def test_readme_cluster_flow_with_token_authentication(tmp_path):
    # After any local `ray.init()` Ray keeps a token in ~/.ray/auth_token, and a later `ray start --head` turns
    # token authentication on; `ray job submit` then needs RAY_AUTH_MODE=token too (the README's flow sets it).
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    token = _run([RAY, "get-auth-token", "--generate"], env, timeout=60)
    assert token.returncode == 0 and (home / ".ray" / "auth_token").exists(), token.stderr
    with ray_head_process(1, env=env) as (_, dashboard, head_env):
        # Without the token a client is refused: authentication is really on.
        refused = _run([RAY, "job", "list", "--address", dashboard], {**head_env, "RAY_AUTH_MODE": "disabled"}, 60)
        assert refused.returncode != 0
        job = "import ray, weaktr; ray.init(); print('job saw', ray.cluster_resources()['CPU'])"
        command = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
                   sys.executable, "-c", job]
        deadline = time.monotonic() + 180
        while True:  # the job agent comes up a little after the dashboard
            proc = _run(command, head_env, timeout=300)
            if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "job saw 1.0" in proc.stdout and "succeeded" in proc.stdout
