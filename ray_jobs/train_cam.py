"""Phase 1: train the WeakTr CAM model as a Ray Train job.

    python ray_jobs/train_cam.py --config configs/synthetic.yaml [--set train.epochs=5 ...]
    ray job submit --working-dir . -- python ray_jobs/train_cam.py --config configs/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import job_arg_parser, parse_job_args  # noqa: E402
from weaktr.launch import init_ray, prepare_data, print_training_result, save_resolved_config  # noqa: E402
from weaktr.train.cam_loop import fit, selection_metric  # noqa: E402


def main(argv=None) -> int:
    _, cfg = parse_job_args(job_arg_parser("Train the phase-1 WeakTr CAM model"), argv)
    prepare_data(cfg)
    config_path = save_resolved_config(cfg)
    init_ray()
    result = fit(cfg)
    print_training_result(result, config_path, selection_metric(cfg), ("loss", "val_mAP", "cam_mIoU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
