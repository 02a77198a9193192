"""The whole method in one run: data -> phase 1 -> pseudo-labels -> phase 2 -> evaluation -> report.

Everything a run makes lives in its run directory, ``{run.storage_path}/{run.name}`` (a local path or a bucket's
URI, ``weaktr.storage``):

    config.yaml            the resolved config
    stages/<stage>.json    what each finished stage made (paths) and measured (metrics, seconds)
    phase1/, phase2/       the two Ray Train runs (checkpoints)
    pseudo/                the pseudo-label dataset (shards + report.json, overlays, the background sweep)
    eval/, eval_crf/       evaluation reports of the retrained model, without and with the dense CRF
    report.html, report.json

A resumed run (the job's ``--resume``; ``run_pipeline`` always resumes) skips every stage whose record exists and
whose outputs are still there. ``from_stage`` reruns that stage and all after it; a stage whose outputs were removed
reruns, and so does everything after it. A stage rerun because of that starts over (its old outputs are cleared:
they came from other inputs); a stage that was only interrupted resumes (Ray Train continues its run, the pseudo-
label job skips finished shards). The dataset itself (``data.root``) is shared by runs and never cleared.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

from weaktr import storage
from weaktr.config import Config, ConfigError
from weaktr.data.shards import MANIFEST_NAME, DataError

STAGES = ("data", "phase1", "pseudo", "phase2", "eval", "report")


class PipelineError(RuntimeError):
    """A stage cannot run (e.g. an earlier stage's outputs are unusable)."""


@dataclass
class StageResult:
    """What a stage made: ``outputs`` (paths that must exist for the stage to count as done) and ``metrics``."""

    outputs: dict
    metrics: dict


def stage_config(cfg: Config, directory: str) -> Config:
    """``cfg`` with the stage outputs pointed into the run directory (the user's copy stays as it was)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.storage_path = directory  # the Ray Train runs: <run dir>/phase1, <run dir>/phase2
    cfg.pseudo.out_dir = cfg.seg_train.data_root = storage.join(directory, "pseudo")
    return cfg


# ----------------------------------------------------------------------------------------------- the stages


def run_data(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.launch import prepare_data

    manifest = prepare_data(cfg)
    return StageResult(
        outputs={"manifest": storage.join(manifest.root, MANIFEST_NAME)},
        metrics={"name": manifest.name, "classes": list(manifest.classes),
                 "splits": {name: split.num_samples for name, split in manifest.splits.items()},
                 "skipped": sum(manifest.meta.get("skipped", {}).values())},
    )


def run_phase1(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.train import cam_loop

    result = cam_loop.fit(cfg, name="phase1")
    return _training_result(result, cam_loop.selection_metric(cfg))


def run_pseudo(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.pseudo import run_pseudo_labels

    report = run_pseudo_labels(cfg, records["phase1"]["outputs"]["checkpoint"])
    out = cfg.pseudo.out_dir
    outputs = {"dataset": storage.join(out, MANIFEST_NAME), "report": storage.join(out, "report.json")}
    return StageResult(outputs=outputs, metrics=report)


def run_phase2(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.train import seg_loop

    result = seg_loop.fit(cfg, name="phase2")
    return _training_result(result, "val_mIoU")


def run_eval(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.evaluate import evaluate_variants_on_ray, write_report

    # One inference pass scored twice: the retrained model as it is, and refined by the dense CRF.
    reports = evaluate_variants_on_ray(cfg, records["phase2"]["outputs"]["checkpoint"], [False, True])
    outputs, metrics = {}, {}
    for name, report in zip(("eval", "eval_crf"), reports):
        outputs[name] = write_report(report, storage.join(directory, name))
        metrics[name] = report
    return StageResult(outputs=outputs, metrics=metrics)


def run_report(cfg: Config, directory: str, records: dict) -> StageResult:
    from weaktr.report import write_html_report

    html, data = write_html_report(cfg, directory, records)
    return StageResult(outputs={"html": html, "json": data}, metrics={})


def _training_result(result, score: str) -> StageResult:
    """The best checkpoint by ``score`` and the run's per-epoch history (kept in every checkpoint)."""
    from weaktr.checkpoint import load_checkpoint
    from weaktr.launch import best_checkpoint, checkpoint_uri

    if result.checkpoint is None:
        raise PipelineError(f"training ended without a checkpoint ({result.error})")
    last = checkpoint_uri(result.checkpoint)
    history = load_checkpoint(last).get("history", [])
    best_metrics = max(history, key=lambda m: m[score] if m[score] == m[score] else float("-inf"), default={})
    return StageResult(
        outputs={"checkpoint": best_checkpoint(result, score), "last_checkpoint": last},
        metrics={"history": history, "best": best_metrics, "score": score},
    )


RUNNERS: dict[str, Callable[[Config, str, dict], StageResult]] = {
    "data": run_data, "phase1": run_phase1, "pseudo": run_pseudo, "phase2": run_phase2, "eval": run_eval,
    "report": run_report,
}
# What a stage that starts over clears first (paths under the run directory); the data stage clears nothing.
STAGE_DIRS = {"phase1": ("phase1",), "pseudo": ("pseudo",), "phase2": ("phase2",), "eval": ("eval", "eval_crf"),
              "report": ("report.html", "report.json", "samples.png")}


# ----------------------------------------------------------------------------------------------- orchestration


def record_path(directory: str, stage: str) -> str:
    return storage.join(directory, "stages", f"{stage}.json")


def load_record(directory: str, stage: str) -> Optional[dict]:
    """The stage's record, or None when there is none (or an unreadable one: the stage runs again)."""
    try:
        return json.loads(storage.read_bytes(record_path(directory, stage)))
    except (FileNotFoundError, ValueError):
        return None


def missing_outputs(record: dict) -> list[str]:
    return [path for path in record["outputs"].values() if not storage.exists(path)]


def run_pipeline(cfg: Config, from_stage: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns {stage: record}. Needs a connected Ray (``launch.init_ray``)."""
    from weaktr.launch import save_resolved_config

    if from_stage is not None and from_stage not in STAGES:
        raise PipelineError(f"unknown stage {from_stage!r}; the stages are {', '.join(STAGES)}")
    directory = storage.parent(save_resolved_config(cfg))
    stage_cfg = stage_config(cfg, directory)

    records: dict[str, dict] = {}
    start_over = False  # once a stage reruns, every later stage starts over
    for stage in STAGES:
        record = load_record(directory, stage)
        reason = None
        if stage == from_stage:
            reason = "--from"
        elif record is None:
            reason = "not done yet"
        elif start_over:
            reason = "an earlier stage ran again"
        elif missing := missing_outputs(record):
            reason = f"its output {missing[0]} is gone"
        if reason is None:
            log(f"[{stage}] done earlier ({record['finished']}), skipped")
            records[stage] = record | {"status": "skipped"}
            continue

        storage.remove(record_path(directory, stage))
        if start_over or stage == from_stage:
            for name in STAGE_DIRS.get(stage, ()):
                storage.remove(storage.join(directory, name))
        log(f"[{stage}] running ({reason})")
        started = time.perf_counter()
        result = RUNNERS[stage](stage_cfg, directory, records)
        record = {
            "stage": stage, "outputs": result.outputs, "metrics": result.metrics,
            "seconds": round(time.perf_counter() - started, 1),
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        # Written last and whole (storage.write_bytes): a record exists only for a stage that finished.
        storage.write_bytes(record_path(directory, stage), json.dumps(record, indent=1).encode())
        records[stage] = record | {"status": "ran"}
        log(f"[{stage}] finished in {record['seconds']:.0f} s")
        start_over = True
    return records


def main(argv=None, prog: Optional[str] = None) -> int:
    """``ray_jobs/pipeline.py`` and ``weaktr pipeline``: run or resume the pipeline, print the stage table."""
    from weaktr.config import job_arg_parser, parse_job_args
    from weaktr.launch import PIPELINE_PATHS, CapacityUnavailable, check_resume, connect, run_dir, save_resolved_config

    parser = job_arg_parser("Run the whole WeakTr pipeline: data, phase 1, pseudo-labels, phase 2, evaluation, "
                            "report.", resumes="pipeline run (finished stages are skipped)")
    if prog:
        parser.prog = prog
    parser.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                        help="rerun this stage and every later one (of a run that exists)")
    args, cfg = parse_job_args(parser, argv)
    try:  # --from on a run that exists asks to redo part of it, which continues it as --resume does
        directory = run_dir(cfg)
        exists = any(storage.exists(record_path(directory, stage)) for stage in STAGES)
        check_resume(args.resume or (exists and args.from_stage is not None), directory if exists else None,
                     directory, "pipeline run",
                     "--from STAGE to redo a stage and those after it, or set another run.name")
        save_resolved_config(cfg)  # (run_pipeline writes it too) here first: a bucket that fails, before Ray starts
        connect(cfg, PIPELINE_PATHS)
        started = time.perf_counter()
        records = run_pipeline(cfg, args.from_stage)
    except (ConfigError, DataError, storage.StorageUnavailable, CapacityUnavailable) as err:  # e.g. no such bucket
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print()
    from weaktr.report import summary_table  # matplotlib: only once there is something to show

    print(summary_table(records))
    print(f"pipeline: {(time.perf_counter() - started) / 60:.1f} min in this invocation")
    print(f"report: {records['report']['outputs']['html']}")
    return 0
