"""Phase 1: train the WeakTr CAM model as a Ray Train job.

    python ray_jobs/train_cam.py --config configs/synthetic.yaml [--set train.epochs=5 ...] [--resume]
    ray job submit --working-dir . -- python ray_jobs/train_cam.py --config configs/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import job_arg_parser, parse_job_args  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Train the phase-1 WeakTr CAM model", resumes="phase-1 training run")
    args, cfg = parse_job_args(parser, argv)
    # Imported once the config is known to be good: a bad one is refused at once, not after Ray and torch load.
    from weaktr.launch import PHASE1_PATHS, run_training_job
    from weaktr.train.cam_loop import fit, selection_metric

    return run_training_job(parser, args, cfg, fit=fit, run_name=cfg.run.name, what="phase-1 training run",
                            config_name="config.yaml", score=selection_metric(cfg),
                            shown=("loss", "val_mAP", "cam_mIoU"), paths=PHASE1_PATHS)


if __name__ == "__main__":
    sys.exit(main())
