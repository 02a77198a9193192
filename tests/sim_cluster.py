"""A multi-node Ray cluster simulated on this machine, for the tests and ``bench/``: what only happens across
machines (Ray Train ranks on different nodes, actors writing where the driver cannot see, a whole node lost, nodes
joining a token-authenticated head) shows up here as it would on a real cluster.

- The head offers no CPU for work (the usual production head: it runs the drivers, the Ray Train controller and
  the job server); the work runs on worker nodes.
- Every worker node has its own address on loopback (127.0.0.2, 127.0.0.3, ...; the head has the machine's): Ray
  Train groups ranks by node address, so nodes sharing one would look like one node.
- Every worker node has its own disk: it runs in a mount namespace of its own with a private tmpfs over /tmp
  (``unshare -m``), so it sees none of the head's temporary files (pytest's ``tmp_path`` included) and its own
  copy of a job's working directory, as a machine of a real cluster does; the checkout and its venv stand for the
  node image, and stay visible where they are even under /tmp. This needs root (the sandbox and CI run as root).
- Token authentication is on in every process (as ``cluster.yaml`` starts Ray), through ``RAY_AUTH_MODE=token``
  and ``RAY_AUTH_TOKEN`` in each one's environment: ``ray start --address`` does not turn it on by itself.
- Nodes are declared dead after about 5 s (Ray's default is 15-20 s), so that a lost node is noticed quickly.

It ends only the processes it started (each node is one process group), never other Ray instances here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from conftest import RAY, ROOT, _free_ports, _wait_for_job_agent, ray_head_process

# How quickly the head's GCS declares a silent node dead: a health check every second, dead after 5 missed.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
NODE_START_TIMEOUT_S = 120


@dataclass
class SimNode:
    """One worker node: its loopback address, its process group (the ``unshare`` wrapper leads it) and its log."""

    address: str
    process: subprocess.Popen
    log: Path
    num_cpus: int
    resources: dict
    node_id: Optional[str] = None  # Ray's id, once it has registered

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class SimCluster:
    """See the module docstring. Use ``simulated_cluster()``; ``add_node`` / ``kill_node`` while it runs."""

    def __init__(self, gcs_address: str, dashboard: str, env: dict, log_dir: Path):
        self.gcs_address, self.dashboard, self.env, self.log_dir = gcs_address, dashboard, env, log_dir
        self.nodes: list[SimNode] = []

    def add_node(self, num_cpus: int, resources: Optional[dict] = None) -> SimNode:
        """Start a worker node with ``num_cpus`` CPUs (and custom ``resources``, standing in for a node type) on
        the next loopback address; returns once the head lists it alive."""
        address = f"127.0.0.{len(self.nodes) + 2}"
        log = self.log_dir / f"node-{address}.log"
        # Every port named: Ray's port lock files live in /tmp, which this node does not share with the others.
        flags = ("node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
                 "dashboard-agent-grpc-port", "dashboard-agent-listen-port")
        ports = [f"--{flag}={free}" for flag, free in zip(flags, _free_ports(len(flags)))]
        start = [RAY, "start", f"--address={self.gcs_address}", "--block", f"--num-cpus={num_cpus}",
                 f"--resources={json.dumps(resources or {})}", f"--node-ip-address={address}",
                 "--temp-dir=/tmp/ray-node", "--disable-usage-stats", *ports]
        private_tmp = " && ".join(_private_tmp_commands()) + ' && exec "$0" "$@"'
        with open(log, "w") as out:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", private_tmp, *start],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            )
        node = SimNode(address, process, log, num_cpus, resources or {})
        self.nodes.append(node)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while node.node_id is None:
            if not node.alive or time.monotonic() > deadline:
                raise RuntimeError(f"worker node {address} did not join the head; see {log}")
            node.node_id = next((n["node_id"] for n in self.state("nodes")
                                 if n["node_ip"] == address and n["state"] == "ALIVE"), None)
            time.sleep(0.5)
        return node

    def alive_node(self, resource: str) -> SimNode:
        """A live worker node that offers ``resource``."""
        return next(node for node in self.nodes if node.alive and resource in node.resources)

    def node_running(self, class_name: str) -> SimNode:
        """The worker node of a live actor of ``class_name`` (``nodes_of`` names the class so too)."""
        node_ids = {actor["node_id"] for actor in self.state("actors") if actor["state"] == "ALIVE"
                    and (actor["class_name"] == class_name or f"({class_name})" in actor["class_name"])}
        return next(node for node in self.nodes if node.alive and node.node_id in node_ids)

    def kill_node(self, node: SimNode) -> None:
        """SIGKILL every process of ``node`` at once, as when a machine is lost (no drain, nothing flushed)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def state(self, resource: str) -> list[dict]:
        """Ray's state API (``nodes``, ``actors``, ``tasks``, ...) as the dashboard serves it, with the token."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{resource}?limit=10000",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def actor_ids(self) -> set[str]:
        return {actor["actor_id"] for actor in self.state("actors")}

    def nodes_of(self, class_name: str, since: set[str] = frozenset(), among: Optional[set[str]] = None) -> set[str]:
        """The addresses of the nodes on which actors of ``class_name`` are, or were last (a restarted actor keeps its
        id and moves), but for the actors ``since`` (``actor_ids`` before a job) and, given ``among``, only those
        actors; Ray Data's actors count by the class they wrap ("MapWorker(MapBatches(CamStage))" for CamStage)."""
        ips = {n["node_id"]: n["node_ip"] for n in self.state("nodes")}
        return {ips.get(actor["node_id"], actor["node_id"]) for actor in self.state("actors")
                if actor["actor_id"] not in since and (among is None or actor["actor_id"] in among)
                and (actor["class_name"] == class_name or f"({class_name})" in actor["class_name"])}

    def submit(self, *job: str, timeout: float = 600, no_wait: bool = False,
               env_vars: Optional[dict] = None) -> subprocess.CompletedProcess | str:
        """``ray job submit --working-dir .`` of ``job`` (e.g. "python", "ray_jobs/x.py", ...), as a user sends
        it, ``env_vars`` in its runtime environment. Waits for the end and returns the CLI's output, or with
        ``no_wait`` returns the submission id."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        command = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT), *runtime_env,
                   *(["--no-wait"] if no_wait else []), "--", *job]
        proc = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if not no_wait:
            return proc
        if proc.returncode != 0:
            raise RuntimeError(f"job submission failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return next(line.split("'")[1] for line in proc.stdout.splitlines() if "submitted successfully" in line)

    def run_driver(self, *job: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``job`` run as a driver on this machine (the head's) attached to the cluster, as a user on the head
        runs a job script, its stderr in stdout as ``ray job submit`` shows a job's; quicker than a submission
        (no working-directory upload, no job supervisor) for jobs whose point is how they end, not where the
        working directory is unpacked."""
        env = {**self.env, "RAY_ADDRESS": self.gcs_address}
        return subprocess.run(job, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)

    @functools.cached_property
    def _jobs(self):
        """One client: making one asks the job server for its version first, and tests poll a job several times a
        second."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})

    def job_status(self, submission_id: str) -> str:
        return str(self._jobs.get_job_status(submission_id).value)

    def job_logs(self, submission_id: str) -> str:
        return self._jobs.get_job_logs(submission_id)

    def wait_for_job(self, submission_id: str, timeout: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED); TimeoutError naming it after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (status := self.job_status(submission_id)) in ("PENDING", "RUNNING"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {status} after {timeout} s: "
                                   f"{self.job_logs(submission_id)[-3000:]}")
            time.sleep(1)
        return status

    def close(self) -> None:
        for node in self.nodes:
            if node.alive:
                self.kill_node(node)


def _private_tmp_commands() -> list[str]:
    """Shell commands, run in a node's own mount namespace, that lay an empty tmpfs over /tmp but for the checkout and
    its venv (the node image), which stay at their paths when they live under /tmp (a CI clone may)."""
    keep = [path for path in (str(ROOT), sys.prefix) if path.startswith("/tmp/")]
    keep = [path for path in keep if not any(path.startswith(f"{other}/") for other in keep)]  # nested: covered
    commands = ["mount --bind /tmp /mnt"] if keep else []  # the shared /tmp, still reachable through /mnt
    commands.append("mount -t tmpfs tmpfs /tmp")
    for path in keep:
        original = shlex.quote("/mnt/" + path.removeprefix("/tmp/"))
        commands.append(f"mkdir -p {shlex.quote(path)} && mount --bind {original} {shlex.quote(path)}")
    return commands


def cluster_env(env: Optional[dict] = None) -> dict:
    """The environment of every process of a simulated cluster: this one's, ``env``, token authentication on with a
    fresh token, quick node death, one BLAS thread per process."""
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "OMP_NUM_THREADS": "1", **FAST_NODE_DEATH}
    env.pop("RAY_ADDRESS", None)
    # `python` in a job's command is this venv's, as on a node image with weaktr installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def simulated_cluster(log_dir: Path, workers: list[dict], env: Optional[dict] = None):
    """A head with no CPU and one worker node per entry of ``workers`` (``SimCluster.add_node`` keyword arguments),
    every process with token authentication on; yields the ``SimCluster``. ``env``: more variables for every
    process (e.g. the loopback S3 server's, which conftest's ``s3_server`` puts in os.environ)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with ray_head_process(0, env=cluster_env(env), log_dir=log_dir) as (gcs_address, dashboard, env):
        cluster = SimCluster(gcs_address, dashboard, env, log_dir)
        try:
            for worker in workers:
                cluster.add_node(**worker)
            _wait_for_job_agent(dashboard, token=env["RAY_AUTH_TOKEN"])
            yield cluster
        finally:
            cluster.close()
