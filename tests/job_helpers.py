"""The ray_jobs/ entry scripts as modules, so tests call their ``main`` in this process."""

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
