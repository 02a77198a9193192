"""Phase 2: retrain a Segmenter on the pseudo-labels (gradient-clipping loss) as a Ray Train job.

    python ray_jobs/train_seg.py --config configs/synthetic.yaml [--set seg_train.epochs=5 ...] [--resume]
    ray job submit --working-dir . -- python ray_jobs/train_seg.py --config configs/smoke.yaml

Validation mIoU is measured on the ground-truth dataset at data.root; the run is named {run.name}-seg.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import job_arg_parser, parse_job_args  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Retrain a segmentation model on pseudo-labels (phase 2)", resumes="phase-2 training run")
    args, cfg = parse_job_args(parser, argv)
    from weaktr.launch import PHASE2_PATHS, run_training_job  # after the config check, as in train_cam.py
    from weaktr.train.seg_loop import fit, seg_run_name

    return run_training_job(parser, args, cfg, fit=fit, run_name=seg_run_name(cfg), what="phase-2 training run",
                            config_name="config_seg.yaml", score="val_mIoU",
                            shown=("loss", "clipped_fraction", "val_mIoU"), paths=PHASE2_PATHS)


if __name__ == "__main__":
    sys.exit(main())
