"""Evaluate a phase-2 checkpoint: sliding window, multi-scale + flip, optional dense CRF, mIoU per class.

    python ray_jobs/evaluate.py --config configs/synthetic.yaml --checkpoint runs/.../checkpoint_000009
        [--set eval.scales=[0.75,1.0,1.25] --set eval.crf=true --set eval.actors=8 --set eval.gpus_per_actor=0.5]

Runs as a Ray Data actor pool over the split's samples; writes eval_report.json (eval.out_dir, else the
checkpoint's directory) and prints the per-class table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.checkpoint import CheckpointMismatch  # noqa: E402
from weaktr.config import ConfigError, job_arg_parser, parse_job_args  # noqa: E402
from weaktr.data.shards import DataError  # noqa: E402
from weaktr.evaluate import class_names, evaluate_on_ray, report_dir, write_report  # noqa: E402
from weaktr.launch import EVAL_PATHS, connect, prepare_data  # noqa: E402
from weaktr.metrics import ConfusionMatrix  # noqa: E402
from weaktr.storage import StorageUnavailable  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Evaluate a phase-2 segmentation checkpoint (mIoU on a split with ground truth)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: eval.checkpoint)")
    args, cfg = parse_job_args(parser, argv)
    checkpoint = args.checkpoint or cfg.eval.checkpoint
    if not checkpoint:
        parser.error("no checkpoint: pass --checkpoint or set eval.checkpoint")

    try:
        manifest = prepare_data(cfg)
        connect(cfg, EVAL_PATHS)
        report = evaluate_on_ray(cfg, checkpoint)
        path = write_report(report, report_dir(cfg, checkpoint))
    except (CheckpointMismatch, ConfigError, DataError, FileNotFoundError, StorageUnavailable) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    confusion = ConfusionMatrix.from_matrix(report["confusion_matrix"])
    print(f"{report['num_images']} images of {manifest.name}/{cfg.eval.split} in {report['seconds']:.1f} s")
    print(confusion.table(class_names(manifest)))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
