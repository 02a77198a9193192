"""Multi-node benchmark (issue 23): the same CPUs as 1, 2 and 3 worker nodes of the simulated cluster
(``tests/sim_cluster.py``: a head with no CPU, nodes on their own loopback addresses and private disks, token
authentication, every path in a bucket on a loopback S3 server, jobs sent with ``ray job submit``).

    python bench/multinode_bench.py [--cpus 6] [--images 48]

For each layout it measures, in one invocation:
- the pseudo-label pass (``make_pseudo_labels.py``, 2 CAM and 3 CRF actors): images per second of the job's own
  run (its report's ``seconds``: Ray Data start, actors, every image);
- phase 1 (``train_cam.py`` on configs/smoke.yaml, 2 Ray Train workers): seconds of its second epoch (the first
  pays the workers' start);
and, on the last layout, the cost of a lost node: the pseudo-label job with a node SIGKILLed once its first shard is
committed and a replacement started at once, against the same job uninterrupted (wall time from submission to
the end, both). Ratios are against one node. Prints a Markdown table for BENCHMARKS.md.

Every node of a layout shares this machine's cores: what it shows is the cost of spreading the work over nodes
(a working directory per node, workers started per node, objects crossing nodes), not any speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import loopback_s3  # noqa: E402
from sim_cluster import simulated_cluster  # noqa: E402

from weaktr import storage  # noqa: E402
from weaktr.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from weaktr.data.synthetic import SyntheticSpec, write_synthetic  # noqa: E402
from weaktr.models.cam import WeakTrCAM  # noqa: E402

BUCKET = "s3://weaktr-bench"


def layouts(cpus: int) -> dict[int, list[int]]:
    """Worker nodes -> CPUs of each node, ``cpus`` in all on every layout."""
    return {n: [cpus // n + (i < cpus % n) for i in range(n)] for n in (1, 2, 3)}


def prepare(tmp: Path, images: int) -> str:
    """The dataset (in the bucket) and a phase-1 checkpoint (on the head's disk: the driver reads it)."""
    import boto3
    import torch

    boto3.client("s3").create_bucket(Bucket=BUCKET.removeprefix("s3://"))
    spec = SyntheticSpec(num_classes=3, num_train=images, num_val=0, min_size=64, max_size=96, samples_per_shard=4,
                         seed=1)
    manifest = write_synthetic(tmp / "data", spec)
    storage.upload_dir(manifest.root, f"{BUCKET}/data")
    torch.manual_seed(0)
    model = WeakTrCAM(3, img_size=64, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0, reduction=2,
                      feat_reduction=4).eval()
    save_checkpoint(tmp / "cam", kind="cam", model_state=model.state_dict(), arch=model.arch,
                    classes=manifest.classes, config={}, epoch=0)
    return str(tmp / "cam")


def pseudo_job(checkpoint: str, out: str) -> list[str]:
    sets = {"data.root": f"{BUCKET}/data", "data.synthetic.enabled": "false", "pseudo.out_dir": out,
            "pseudo.cam_actors": "2", "pseudo.crf_actors": "3", "pseudo.batch_size": "4", "pseudo.sweep_bg": "null"}
    return ["python", "ray_jobs/make_pseudo_labels.py", "--checkpoint", checkpoint,
            *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]]


def pseudo_images_per_s(cluster, checkpoint: str, out: str) -> float:
    proc = cluster.submit(*pseudo_job(checkpoint, out), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:])
    report = json.loads(storage.read_bytes(f"{out}/report.json"))
    line = next(line for line in proc.stdout.splitlines() if line.startswith("done: "))
    seconds = float(line.rsplit("(", 1)[1].split(" s)")[0])
    return report["num_samples"] / seconds


def phase1_epoch_seconds(cluster, run: str) -> float:
    proc = cluster.submit(
        "python", "ray_jobs/train_cam.py", "--config", "configs/smoke.yaml", "--set", f"run.name={run}",
        "--set", f"run.storage_path={BUCKET}/runs", "--set", f"data.root={BUCKET}/smoke", timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:])
    where = f"{BUCKET}/runs/{run}"
    metrics = [load_checkpoint(storage.join(where, name))["metrics"]
               for name in storage.list_names(where) if name.startswith("checkpoint_") and not name.endswith(".json")]
    return max(metrics, key=lambda m: m["epoch"])["epoch_seconds"]


def timed_pseudo(cluster, checkpoint: str, out: str, kill: bool) -> float:
    """Wall seconds from submission to SUCCEEDED; with ``kill``, a node with a CAM actor is SIGKILLed once the
    first shard is committed and a replacement node of the same size started."""
    started = time.monotonic()
    job = cluster.submit(*pseudo_job(checkpoint, out), no_wait=True)
    if kill:
        while not [name for name in storage.list_names(f"{out}/stats")]:
            if cluster.job_status(job) not in ("PENDING", "RUNNING"):
                raise RuntimeError(cluster.job_logs(job)[-3000:])
            time.sleep(0.2)
        victim = cluster.node_running("CamStage")
        cluster.kill_node(victim)
        cluster.add_node(num_cpus=victim.num_cpus)
    status = cluster.wait_for_job(job, timeout=900)
    if status != "SUCCEEDED":
        raise RuntimeError(cluster.job_logs(job)[-3000:])
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=6, help="CPUs of every layout, split over its worker nodes")
    parser.add_argument("--images", type=int, default=48, help="images of the pseudo-label pass")
    parser.add_argument("--logs", default=None, help="keep the nodes' logs in this folder (default: a temporary one)")
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="wtr-bench-") as tmp, loopback_s3(Path(tmp)):
        logs = Path(args.logs or tmp)
        checkpoint = prepare(Path(tmp), args.images)
        for nodes, cpus in layouts(args.cpus).items():
            workers = [dict(num_cpus=c) for c in cpus]
            with simulated_cluster(logs / f"logs-{nodes}", workers) as cluster:
                rows[nodes] = {"cpus": cpus,
                               "pseudo": pseudo_images_per_s(cluster, checkpoint, f"{BUCKET}/pseudo-{nodes}"),
                               "epoch": phase1_epoch_seconds(cluster, f"smoke-{nodes}")}
                print(f"{nodes} node(s) {cpus}: {rows[nodes]}", flush=True)
                if nodes == 3:
                    plain = timed_pseudo(cluster, checkpoint, f"{BUCKET}/plain", kill=False)
                    lost = timed_pseudo(cluster, checkpoint, f"{BUCKET}/lost", kill=True)
                    print(f"uninterrupted {plain:.1f} s, a node lost {lost:.1f} s", flush=True)

    print(f"\n{platform.node()}, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.cpus} Ray CPUs on every layout, "
          f"{args.images} images\n")
    print("| worker nodes (CPUs each) | pseudo-labels img/s | vs 1 node | phase-1 s/epoch | vs 1 node |")
    print("| --- | --- | --- | --- | --- |")
    for nodes, row in rows.items():
        print(f"| {nodes} ({'+'.join(map(str, row['cpus']))}) | {row['pseudo']:.2f} | "
              f"{row['pseudo'] / rows[1]['pseudo']:.2f}x | {row['epoch']:.1f} | "
              f"{row['epoch'] / rows[1]['epoch']:.2f}x |")
    print(f"\nA node lost (3 nodes): the pseudo-label job took {lost:.1f} s against {plain:.1f} s uninterrupted "
          f"({lost / plain:.2f}x), replacement node included.")


if __name__ == "__main__":
    main()
