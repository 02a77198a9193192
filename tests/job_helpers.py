"""The ray_jobs/ entry scripts as modules, so tests call their ``main`` in this process; what a test bucket holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str):
    path = ROOT / "ray_jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ray_jobs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bucket_objects(bucket: str) -> list[str]:
    """The keys of every object in ``bucket`` (``s3://name``) on the loopback S3 server (conftest ``s3_server``)."""
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    return sorted(entry["Key"] for entry in listing.get("Contents", []))
