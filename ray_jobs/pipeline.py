"""The whole pipeline as one job: data -> phase 1 -> pseudo-labels -> phase 2 -> evaluation -> report.

    python ray_jobs/pipeline.py --config configs/synthetic.yaml [--from pseudo] [--set key=value ...]
    ray job submit --working-dir . -- python ray_jobs/pipeline.py --config configs/voc12.yaml

Writes everything into {run.storage_path}/{run.name}; finished stages are skipped on a rerun (weaktr/pipeline.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
