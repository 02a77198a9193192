"""Phase 1 -> 2: pseudo-labels from a trained CAM model, as a Ray Data pipeline (weaktr.pseudo).

    python ray_jobs/make_pseudo_labels.py --config configs/synthetic.yaml --checkpoint CKPT [--sweep-bg 0.3:0.6:0.01]
        [--resume | --overwrite]
    ray job submit --working-dir . -- \
        python ray_jobs/make_pseudo_labels.py --config configs/smoke.yaml --checkpoint CKPT

--resume continues an interrupted run (finished input shards are skipped); --overwrite starts over.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr import storage  # noqa: E402
from weaktr.checkpoint import CheckpointMismatch  # noqa: E402
from weaktr.config import ConfigError, job_arg_parser, parse_job_args  # noqa: E402
from weaktr.data.shards import DataError  # noqa: E402
from weaktr.launch import PSEUDO_PATHS, check_resume, connect, prepare_data, save_resolved_config  # noqa: E402
from weaktr.pseudo import PseudoLabelError, run_pseudo_labels  # noqa: E402
from weaktr.pseudo.outputs import RUN_CONFIG  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Generate pseudo-labels (multi-scale CAMs + dense CRF) for a dataset split",
                            resumes="pseudo-label run at pseudo.out_dir")
    parser.add_argument("--checkpoint", default=None, help="phase-1 checkpoint directory (default: pseudo.checkpoint)")
    parser.add_argument("--sweep-bg", default=None, metavar="START:STOP:STEP",
                        help="also evaluate these background thresholds in the same pass, e.g. 0.30:0.60:0.01")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the outputs of an earlier run at pseudo.out_dir and start over")
    args, cfg = parse_job_args(parser, argv)
    if args.sweep_bg is not None:
        cfg.pseudo.sweep_bg = args.sweep_bg
    if args.overwrite:
        cfg.pseudo.overwrite = True
    checkpoint = args.checkpoint or cfg.pseudo.checkpoint
    if checkpoint is None:
        parser.error("no checkpoint: pass --checkpoint or set pseudo.checkpoint")
    cfg.pseudo.checkpoint = checkpoint = storage.absolute(checkpoint)
    cfg.pseudo.out_dir = out_dir = storage.absolute(cfg.pseudo.out_dir)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    try:
        started = storage.exists(storage.join(out_dir, RUN_CONFIG))  # written when a run starts, before its first shard
        if not args.overwrite:
            check_resume(args.resume, out_dir if started else None, out_dir, "pseudo-label run",
                         "pass --overwrite to start over, or choose another pseudo.out_dir")
        prepare_data(cfg)
        save_resolved_config(cfg, "pseudo_config.yaml")
        connect(cfg, PSEUDO_PATHS)
        report = run_pseudo_labels(cfg, checkpoint)
    except (ConfigError, CheckpointMismatch, PseudoLabelError, DataError, FileNotFoundError,
            storage.StorageUnavailable) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    run = report["run"]
    print(f"done: {report['num_samples']} pseudo-labels, {report['num_failures']} failures; "
          f"shards processed {run['shards_processed']}, skipped {run['shards_skipped']} ({run['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
