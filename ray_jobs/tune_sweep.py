"""Sweep config keys with Ray Tune: each trial a full phase-1 or phase-2 training run (``tune`` section).

    python ray_jobs/tune_sweep.py --config configs/tune_fusion.yaml [--set tune.num_samples=8 ...] [--resume]
    ray job submit --working-dir . -- python ray_jobs/tune_sweep.py --config configs/tune_clip.yaml

Writes ``<run.storage_path>/<run.name>/``: trials.csv, best_config.yaml (for train_cam.py / train_seg.py as it is),
objective.png and Tune's experiment; ``--resume`` continues an interrupted sweep without rerunning finished trials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from weaktr.config import ConfigError, job_arg_parser, parse_job_args, save_config  # noqa: E402
from weaktr.data.shards import DataError  # noqa: E402
from weaktr.launch import PHASE1_PATHS, PHASE2_PATHS, connect, prepare_data  # noqa: E402
from weaktr.storage import StorageUnavailable  # noqa: E402
from weaktr.sweep import prepare_sweep, run_sweep, summary_table, trial_rows, write_results  # noqa: E402


def main(argv=None) -> int:
    parser = job_arg_parser("Sweep config keys with Ray Tune (the config's tune section)",
                            resumes="sweep (finished trials are not rerun)")
    args, cfg = parse_job_args(parser, argv)
    try:
        saved = prepare_sweep(cfg, resume=args.resume)  # a bad search space fails here, before Ray or any trial
        prepare_data(cfg)
        save_config(cfg, saved)
        connect(cfg, PHASE1_PATHS if cfg.tune.phase == "cam" else PHASE2_PATHS)
    except (ConfigError, DataError, StorageUnavailable) as err:  # e.g. a bucket that does not exist
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    results = run_sweep(cfg, resume=args.resume)
    rows = trial_rows(cfg, results)
    paths = write_results(cfg, rows)
    print(f"\n{len(rows)} trials, best first:\n{summary_table(rows)}\n")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
