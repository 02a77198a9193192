"""A lost node where the suite does not reach it (issue 23, items 3c and 3d, and a lost head), on the simulated
cluster (``tests/sim_cluster.py``: a head with no CPU, worker nodes on their own loopback addresses and private disks,
token authentication, every path in a bucket on a loopback S3 server, jobs sent with ``ray job submit``).

    python bench/multinode_faults.py [--logs DIR]

Each case runs the job uninterrupted, then again with every process of one node SIGKILLed after the run's first
registered checkpoint, and compares the two (training metrics to 1e-5, as the suite's worker-kill tests do):
- phase 2 (``train_seg.py``, 2 ranks on the two ``cam_node`` workers): a rank's node lost, a replacement joins;
- a Tune sweep (``tune_sweep.py``, 2 phase-1 trials one at a time, 2 ranks each): the first trial's rank's node
  lost, a replacement joins; every trial's objective against the uninterrupted sweep's;
- the head lost (phase 1, ``train_cam.py``): the whole cluster goes (the worker nodes follow their head); what the
  ``ray job submit`` client printed, then ``--resume`` on a new cluster.
Prints each case's outcome and its wall time against the uninterrupted run (from submission to the end).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RAY, loopback_s3  # noqa: E402
from seg_helpers import tiny_config, write_pseudo_dataset  # noqa: E402
from sim_cluster import simulated_cluster  # noqa: E402
from worker_kill import KILLED_RUN_TOLERANCE  # noqa: E402

from weaktr import storage  # noqa: E402
from weaktr.checkpoint import load_checkpoint  # noqa: E402
from weaktr.config import load_config, save_config  # noqa: E402
from weaktr.data.synthetic import write_synthetic  # noqa: E402

BUCKET = "s3://weaktr-faults"
WORKERS = [dict(num_cpus=2, resources={"cam_node": 1}), dict(num_cpus=2, resources={"cam_node": 1}),
           dict(num_cpus=2, resources={"cpu_node": 2})]


def prepare(tmp: Path) -> tuple[str, str, str]:
    """Config files (on the head's disk: the driver reads them) for phase 2, a sweep and phase 1, every path in the
    bucket and each rank on its own `cam_node` worker."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET.removeprefix("s3://"))
    pseudo = write_pseudo_dataset(tmp / "seg-data", num_train=32, num_val=8)
    storage.upload_dir(pseudo.root, f"{BUCKET}/seg-data")
    seg = tiny_config(tmp, Path("unused"))
    seg.run.storage_path, seg.data.root = f"{BUCKET}/runs", f"{BUCKET}/seg-data"
    seg.seg_train.data_root, seg.seg_train.checkpoints_to_keep = f"{BUCKET}/seg-data", 10
    seg.seg_train.resources_per_worker = {"cam_node": 1}
    save_config(seg, tmp / "seg.yaml")

    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    manifest = write_synthetic(tmp / "smoke", smoke.data.synthetic.spec())
    storage.upload_dir(manifest.root, f"{BUCKET}/smoke")
    phase1 = [f"run.storage_path={BUCKET}/runs", f"data.root={BUCKET}/smoke", "data.synthetic.enabled=false",
              "train.resources_per_worker={cam_node: 1}", "train.checkpoints_to_keep=10"]
    save_config(load_config(ROOT / "configs" / "smoke.yaml", [*phase1, "train.epochs=3"]), tmp / "cam.yaml")
    sweep = load_config(ROOT / "configs" / "smoke.yaml", [
        *phase1, "run.name=sweep", "tune.phase=cam", "tune.num_samples=1", "tune.max_concurrent_trials=1",
        "tune.grace_period=2", "tune.space={train.lr: {grid: [0.001, 0.002]}}"])
    save_config(sweep, tmp / "sweep.yaml")
    return str(tmp / "seg.yaml"), str(tmp / "sweep.yaml"), str(tmp / "cam.yaml")


def registered(run_dir: str) -> bool:
    """Whether Ray Train's run at ``run_dir`` has registered a checkpoint."""
    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    return storage.exists(snapshot) and bool(json.loads(storage.read_bytes(snapshot)).get("checkpoint_results"))


def run_checkpoints(run_dir: str) -> tuple[list[dict], list[int]]:
    """The Ray Train run at ``run_dir``: its registered checkpoints' metrics by epoch, and the epochs of checkpoint
    folders it never registered (a worker group lost after uploading one, before the report reached the controller:
    nothing reads them, as weaktr takes checkpoints from Ray Train's result)."""
    snapshot = json.loads(storage.read_bytes(f"{run_dir}/checkpoint_manager_snapshot.json"))
    registered_names = {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
    folders = [name for name in storage.list_names(run_dir)
               if name.startswith("checkpoint_") and not name.endswith(".json")]
    metrics = {name: load_checkpoint(storage.join(run_dir, name))["metrics"] for name in folders}
    kept = sorted((metrics[name] for name in folders if name in registered_names), key=lambda m: m["epoch"])
    return kept, sorted(metrics[name]["epoch"] for name in folders if name not in registered_names)


def checkpoints_line(run_dir: str) -> str:
    kept, unregistered = run_checkpoints(run_dir)
    extra = f", and an unregistered upload of epoch {unregistered} from the lost group" if unregistered else ""
    return f"epochs registered {[m['epoch'] for m in kept]}{extra}"


def run_job(cluster, job: list[str], kill_when=None) -> float:
    """Wall seconds from submission to SUCCEEDED; with ``kill_when`` (a function of nothing), the node of a Ray
    Train rank is SIGKILLed once it holds, and a replacement node of the same type joins."""
    started = time.monotonic()
    submission = cluster.submit(*job, no_wait=True)
    if kill_when is not None:
        while not kill_when():
            if cluster.job_status(submission) not in ("PENDING", "RUNNING"):
                raise RuntimeError(cluster.job_logs(submission)[-3000:])
            time.sleep(0.2)
        victim = cluster.node_running("RayTrainWorker")
        cluster.kill_node(victim)
        cluster.add_node(num_cpus=victim.num_cpus, resources=victim.resources)
    status = cluster.wait_for_job(submission, timeout=900)
    if status != "SUCCEEDED":
        raise RuntimeError(cluster.job_logs(submission)[-4000:])
    return time.monotonic() - started


def compare(ours: dict, reference: dict, keys) -> str:
    worst = max(abs(ours[k] - reference[k]) for k in keys)
    return f"largest difference {worst:.2g} ({'within' if worst <= KILLED_RUN_TOLERANCE else 'BEYOND'} 1e-5)"


def phase2_case(cluster, config: str) -> str:
    job = ["python", "ray_jobs/train_seg.py", "--config", config]
    plain = run_job(cluster, [*job, "--set", "run.name=seg-plain"])
    lost = run_job(cluster, [*job, "--set", "run.name=seg-lost"],
                   kill_when=lambda: registered(f"{BUCKET}/runs/seg-lost-seg"))
    lost_run, plain_run = f"{BUCKET}/runs/seg-lost-seg", f"{BUCKET}/runs/seg-plain-seg"
    a, b = run_checkpoints(lost_run)[0], run_checkpoints(plain_run)[0]
    return (f"phase 2, a rank's node lost after the first checkpoint: {checkpoints_line(lost_run)}, "
            f"{compare(a[-1], b[-1], ('loss', 'ce', 'val_mIoU'))}; {lost:.1f} s against {plain:.1f} s "
            f"({lost / plain:.2f}x)")


def sweep_case(cluster, config: str) -> str:
    def trials(name: str) -> dict[str, dict]:
        import csv
        import io

        rows = csv.DictReader(io.StringIO(storage.read_bytes(f"{BUCKET}/runs/{name}/trials.csv").decode()))
        return {row["train.lr"]: row for row in rows}

    def first_trial_registered(name: str) -> bool:
        where = f"{BUCKET}/runs/{name}/trials"
        names = sorted(n for n in storage.list_names(where) if n.endswith("_00000")) if storage.exists(where) else []
        return bool(names) and registered(f"{where}/{names[0]}")

    job = ["python", "ray_jobs/tune_sweep.py", "--config", config]
    plain = run_job(cluster, [*job, "--set", "run.name=sweep-plain"])
    lost = run_job(cluster, [*job, "--set", "run.name=sweep-lost"],
                   kill_when=lambda: first_trial_registered("sweep-lost"))
    a, b = trials("sweep-lost"), trials("sweep-plain")
    same = {lr: (a[lr]["status"], a[lr]["epochs_run"]) == (b[lr]["status"], b[lr]["epochs_run"]) for lr in b}
    worst = max(abs(float(a[lr]["cam_mIoU"]) - float(b[lr]["cam_mIoU"])) for lr in b)
    return (f"Tune sweep (2 trials), the first trial's rank's node lost after its first checkpoint: trials "
            f"{sorted(a)} with the same status and epochs {all(same.values())}, largest cam_mIoU difference "
            f"{worst:.2g}; {lost:.1f} s against {plain:.1f} s ({lost / plain:.2f}x)")


def head_case(logs: Path, config: str) -> str:
    job = ["python", "ray_jobs/train_cam.py", "--config", config]
    with simulated_cluster(logs / "head-plain", WORKERS) as cluster:
        plain = run_job(cluster, [*job, "--set", "run.name=cam-plain"])
    started = time.monotonic()
    with simulated_cluster(logs / "head-lost", WORKERS) as cluster:
        client = subprocess.Popen(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT), "--", *job,
             "--set", "run.name=cam-lost"], env=cluster.env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        while not registered(f"{BUCKET}/runs/cam-lost"):
            if client.poll() is not None:
                raise RuntimeError(client.stdout.read()[-3000:])
            time.sleep(0.2)
    # Leaving the block SIGKILLed the head and every node (a worker node outlives its head only until it gives up
    # reconnecting): what did the user's client say?
    try:
        said, _ = client.communicate(timeout=300)
        client_end = f"exit {client.returncode}"
    except subprocess.TimeoutExpired:
        client.kill()
        said, client_end = client.communicate()[0], "still waiting after 300 s (killed)"
    last_lines = " / ".join(line for line in said.strip().splitlines()[-3:])
    with simulated_cluster(logs / "head-resumed", WORKERS) as cluster:
        run_job(cluster, [*job, "--set", "run.name=cam-lost", "--resume"])
    lost = time.monotonic() - started
    a, b = run_checkpoints(f"{BUCKET}/runs/cam-lost")[0], run_checkpoints(f"{BUCKET}/runs/cam-plain")[0]
    return (f"phase 1, the head lost after the first checkpoint: the client {client_end}, its last lines: "
            f"{last_lines!r}; --resume on a new cluster: {checkpoints_line(f'{BUCKET}/runs/cam-lost')}, "
            f"{compare(a[-1], b[-1], ('loss', 'val_mAP', 'cam_mIoU'))}; {lost:.1f} s with the new cluster's start "
            f"against {plain:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default=None, help="keep the nodes' logs in this folder (default: a temporary one)")
    parser.add_argument("--cases", default="phase2,sweep,head", help="which cases to run, comma-separated")
    args = parser.parse_args()
    cases = args.cases.split(",")

    lines = []
    with tempfile.TemporaryDirectory(prefix="wtr-faults-") as tmp, loopback_s3(Path(tmp)):
        logs = Path(args.logs or tmp)
        seg, sweep, cam = prepare(Path(tmp))
        if "phase2" in cases or "sweep" in cases:
            with simulated_cluster(logs / "nodes", WORKERS) as cluster:
                for name, case, config in (("phase2", phase2_case, seg), ("sweep", sweep_case, sweep)):
                    if name in cases:
                        lines.append(case(cluster, config))
                        print(lines[-1], flush=True)
        if "head" in cases:
            lines.append(head_case(logs, cam))
            print(lines[-1], flush=True)

    print(f"\n{platform.node()}, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 3 worker nodes of 2 CPUs\n")
    for line in lines:
        print(f"- {line}")


if __name__ == "__main__":
    main()
