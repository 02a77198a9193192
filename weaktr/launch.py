"""What every ``ray_jobs/`` entry script does before and after its Ray work."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from weaktr.config import Config, save_config
from weaktr.data.shards import Manifest


def prepare_data(cfg: Config) -> Manifest:
    """Resolve ``data.root`` to an absolute path (workers run elsewhere) and, when
    ``data.synthetic.enabled``, make sure the built-in synthetic dataset is there."""
    root = Path(cfg.data.root).expanduser().resolve()
    cfg.data.root = str(root)
    manifest_path = root / "manifest.json"
    # Only a synthetic dataset may be (re)generated in place: never overwrite a converted one.
    is_other_dataset = manifest_path.exists() and "synthetic_spec" not in Manifest.load(manifest_path).meta
    if cfg.data.synthetic.enabled and not is_other_dataset:
        from weaktr.data.synthetic import SyntheticSpec, write_synthetic

        s = cfg.data.synthetic
        # write_synthetic reuses the shards when they were made from the same spec.
        spec = SyntheticSpec(
            num_classes=s.num_classes, num_train=s.num_train, num_val=s.num_val,
            min_size=s.min_size, max_size=s.max_size, max_objects=s.max_objects,
            min_visible_fraction=s.min_visible_fraction, seed=s.seed,
        )
        return write_synthetic(root, spec)
    return Manifest.load(manifest_path)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by ``ray job submit``), else start a local Ray."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def run_dir(cfg: Config) -> Path:
    if "://" in cfg.run.storage_path:
        raise ValueError("run.storage_path is a URI; local run outputs need a local path")
    path = Path(cfg.run.storage_path).expanduser().resolve() / cfg.run.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_resolved_config(cfg: Config, filename: str = "config.yaml") -> Path:
    """Write the resolved config beside the run's outputs (checkpoints embed it too)."""
    cfg.run.storage_path = str(Path(cfg.run.storage_path).expanduser().resolve())
    path = run_dir(cfg) / filename
    save_config(cfg, path)
    return path
