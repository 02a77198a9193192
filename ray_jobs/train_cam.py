"""Phase 1: train the WeakTr CAM model as a Ray Train job.

    python ray_jobs/train_cam.py --config configs/synthetic.yaml [--set train.epochs=5 ...]
    ray job submit --working-dir . -- python ray_jobs/train_cam.py --config configs/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import ConfigError, job_arg_parser, parse_job_args  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Train the phase-1 WeakTr CAM model", resumes="phase-1 training run")
    args, cfg = parse_job_args(parser, argv)
    # Imported once the config is known to be good: a bad one is refused at once, not after Ray and torch load.
    from weaktr.data.shards import DataError
    from weaktr.launch import check_resume, init_ray, prepare_data, print_training_result, save_resolved_config, \
        training_run
    from weaktr.train.cam_loop import fit, selection_metric

    try:
        check_resume(args.resume, *training_run(cfg.run.storage_path, cfg.run.name), "phase-1 training run",
                     "set another run.name")
        prepare_data(cfg)
        config_path = save_resolved_config(cfg)
        init_ray()
        result = fit(cfg)
    except (ConfigError, DataError) as err:  # e.g. a CAM-mIoU split the dataset lacks, refused before training
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print_training_result(result, config_path, selection_metric(cfg), ("loss", "val_mAP", "cam_mIoU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
