"""Phase 2: retrain a Segmenter on the pseudo-labels (gradient-clipping loss) as a Ray Train job.

    python ray_jobs/train_seg.py --config configs/synthetic.yaml [--set seg_train.epochs=5 ...]
    ray job submit --working-dir . -- python ray_jobs/train_seg.py --config configs/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import ConfigError, job_arg_parser, parse_job_args  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Retrain a segmentation model on pseudo-labels (phase 2)", resumes="phase-2 training run")
    args, cfg = parse_job_args(parser, argv)
    # Imported once the config is known to be good: a bad one is refused at once, not after Ray and torch load.
    from weaktr.data.shards import DataError
    from weaktr.launch import check_resume, init_ray, prepare_data, print_training_result, save_resolved_config, \
        training_run
    from weaktr.train.seg_loop import fit, seg_run_name

    try:
        check_resume(args.resume, *training_run(cfg.run.storage_path, seg_run_name(cfg)), "phase-2 training run",
                     "set another run.name")
        prepare_data(cfg)  # the ground-truth dataset, for validation mIoU
        config_path = save_resolved_config(cfg, "config_seg.yaml")
        init_ray()
        result = fit(cfg)
    except (ConfigError, DataError) as err:  # e.g. a dataset without pseudo-labels, refused before any worker starts
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print_training_result(result, config_path, "val_mIoU", ("loss", "clipped_fraction", "val_mIoU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
