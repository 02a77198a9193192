"""Phase 2: retrain a Segmenter on the pseudo-labels (gradient-clipping loss) as a Ray Train job.

    python ray_jobs/train_seg.py --config configs/synthetic.yaml [--set seg_train.epochs=5 ...]
    ray job submit --working-dir . -- python ray_jobs/train_seg.py --config configs/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import job_arg_parser, parse_job_args  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Retrain a segmentation model on pseudo-labels (phase 2)")
    _, cfg = parse_job_args(parser, argv)
    # Imported once the config is known to be good: a bad one is refused at once, not after Ray and torch load.
    from weaktr.data.shards import DataError
    from weaktr.launch import init_ray, prepare_data, print_training_result, save_resolved_config
    from weaktr.train.seg_loop import fit

    prepare_data(cfg)  # the ground-truth dataset, for validation mIoU
    config_path = save_resolved_config(cfg, "config_seg.yaml")
    init_ray()
    try:
        result = fit(cfg)
    except DataError as err:  # e.g. a dataset without pseudo-labels, refused before any worker starts
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print_training_result(result, config_path, "val_mIoU", ("loss", "clipped_fraction", "val_mIoU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
