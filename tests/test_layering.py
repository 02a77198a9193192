"""The layering rule (ARCHITECTURE.md): the equations, models, data readers, evaluation, the CLI and the importer load
no Ray at all; Ray comes in with the training loops, the pipelines and ray_jobs/. Each module is imported in a fresh
interpreter, so nothing another test imported can hide a violation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_FREE = ["weaktr.ops", "weaktr.runtime", "weaktr.metrics", "weaktr.crf", "weaktr.config", "weaktr.models",
            "weaktr.models.build", "weaktr.models.inference", "weaktr.data", "weaktr.data.stream", "weaktr.data.voc",
            "weaktr.data.coco", "weaktr.evaluate", "weaktr.cli", "weaktr.official", "weaktr.pseudo", "weaktr.storage",
            "weaktr.pretrain"]


def test_library_modules_import_without_ray():
    probe = (
        "import importlib, json, sys\n"
        f"for name in {RAY_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_probe_sees_ray_where_it_is_imported():  # a training loop brings Ray Train in
    probe = "import sys, weaktr.train.cam_loop; print('ray.train' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-3000:]
