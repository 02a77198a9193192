"""The whole pipeline (weaktr.pipeline): configs/voc12.yaml (tiny model, CPU) on a VOC-layout fixture that holds
what a real folder of photos holds (unreadable files, masks that do not fit, 1x1, grayscale, CMYK, 16-bit, EXIF-rotated
and oversized images) and shards damaged after conversion, every stage for real as a Ray job on the shared head with
the dataset and the run directory in a bucket of the loopback S3 server (a cluster without a shared file system),
then reruns that skip, and a removed stage output that reruns that stage and everything after it. The skip/rerun
rules alone are also checked with stage bodies that only record their calls (the orchestration is what those tests
exercise)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from recipe_fixtures import check_chain

from weaktr import pipeline, storage
from weaktr.config import load_config
from weaktr.data.shards import FAILURES_NAME
from weaktr.data.stream import FailureTracker, iter_samples
from weaktr.data.voc import VOC_CLASSES
from weaktr.pipeline import STAGES, StageResult, run_pipeline


@pytest.fixture(scope="module")
def full_run(voc_pipeline_run):
    """The VOC recipe's whole pipeline as a Ray job on the shared head (conftest ``voc_pipeline_run``)."""
    return voc_pipeline_run


def run_dir(cfg) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def readable_train_aug(manifest) -> list[str]:
    """The keys of the train_aug samples that decode with ids inside VOC's classes (after damage_shards)."""
    return [s.key for s in iter_samples(manifest.shard_paths("train_aug"), FailureTracker(1.0), len(VOC_CLASSES))]


def test_the_pipeline_job_runs_every_stage_with_a_readable_console(full_run):
    _, console, records, _ = full_run
    assert "succeeded" in console
    for stage in STAGES:
        assert f"[{stage}] running (not done yet)" in console and records[stage] is not None
    assert "report: " in console and "eval    ran" in console  # the closing stage table
    # One line per epoch, not Ray Train's per-rank report dumps (those stay in its log files).
    assert "epoch 1/2 | loss " in console and "epoch 2/2 | loss " in console
    assert "Reporting training result" not in console and "TrainingReport(" not in console
    # An actor's INFO message, at the job's level through Ray's worker setup hook (no handler, no level before).
    assert re.search(r"\(\S*CamStage\S* pid=\d+.*INFO weaktr\.pseudo\.stages: CAM actor ready on cpu", console)


def test_the_voc12_recipe_runs_the_whole_chain(full_run):
    cfg, _, records, _ = full_run
    assert cfg.data.train_split == "train_aug"  # phase 1 on train_aug, phase 2 on its pseudo-labels: no "no split"
    check_chain(records, cfg, num_train=len(readable_train_aug(full_run[3][2])), num_classes=20)
    chosen = records["phase1"]["metrics"]["best"]["cam_bg_threshold"]
    assert records["pseudo"]["metrics"]["bg_threshold"] == pytest.approx(chosen)


def test_hostile_input_is_processed_or_skipped_with_its_reason_and_every_stage_counts_it(full_run):
    cfg, console, records, (fate, damage, manifest) = full_run
    # Conversion: each unreadable item skipped with its reason, every readable oddity kept, the big one downscaled.
    failures = [json.loads(line) for line in (Path(manifest.root) / FAILURES_NAME).read_text().splitlines()]
    assert sorted(f["source"] for f in failures) == sorted(k for k, what in fate.items() if what == "skipped")
    assert all(f["reason"] and " at 0x" not in f["reason"] for f in failures)
    assert manifest.meta["skipped"]["train_aug"] == 6 and manifest.meta["downscaled"] == {
        "train": 0, "val": 0, "train_aug": 1}
    kept = {k for k, what in fate.items() if what == "kept"}
    readable = readable_train_aug(manifest)
    assert kept - set(readable) <= set(damage)  # every kept oddity reached training, unless the damage took it
    # Phase 1 counted the damaged samples it met, and went on.
    assert records["phase1"]["metrics"]["history"][-1]["samples_failed"] > 0
    # Pseudo-labels: one per readable sample, and every damaged one recorded with its reason.
    pseudo = records["pseudo"]["metrics"]
    assert pseudo["num_samples"] == len(readable)
    out = storage.parent(records["pseudo"]["outputs"]["report"])
    assert out == "s3://weaktr-pipeline/runs/pipe/pseudo"
    recorded = [json.loads(line) for line in storage.read_bytes(storage.join(out, FAILURES_NAME)).splitlines()]
    past, unlabelled = list(damage)[:2]
    reasons = {f["key"]: f["reason"] for f in recorded}
    assert "outside 0..19" in reasons[past] and "no labels.json" in reasons[unlabelled]
    assert any("unreadable shard" in f["reason"] for f in recorded) and pseudo["num_failures"] == len(recorded)
    # Evaluation scored every val image, the 1x1 and the EXIF-rotated photo included.
    assert records["eval"]["metrics"]["eval"]["num_images"] == manifest.splits["val"].num_samples == 6
    assert records["eval"]["metrics"]["eval"]["num_skipped"] == 0
    # The closing table says what each stage skipped.
    assert "6 skipped" in console and "broken-sample reads skipped" in console
    assert f"({len(readable)} images, {len(recorded)} skipped)" in console


def test_the_report_has_every_section(full_run):
    cfg, _, records, _ = full_run
    report = json.loads(storage.read_bytes(storage.join(run_dir(cfg), "report.json")))
    assert [row["split"] for row in report["miou"]] == ["train_aug", "train_aug", "val", "val"]
    assert all(0 <= row["miou"] <= 1 for row in report["miou"])
    assert set(report["miou"][0]["per_class"]) == {"background", *VOC_CLASSES}
    assert [m["epoch"] for m in report["curves"]["phase1"]] == [0, 1]
    assert report["bg_sweep"]["curve"] and report["stages"]["eval"]["headline"].startswith("val mIoU")

    page = storage.read_bytes(storage.join(run_dir(cfg), "report.html")).decode()
    for title in ("Stages", "mIoU at each stage", "Phase 1: CAM training", "Phase 2: retraining",
                  "Background threshold", "Samples", "Config"):
        assert title in page
    figures = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(figures) == 4 and all(base64.b64decode(f)[:4] == b"\x89PNG" for f in figures)
    # The grid, also on its own.
    assert storage.read_bytes(storage.join(run_dir(cfg), "samples.png")) == base64.b64decode(figures[-1])
    # The retrained model's figure in the table is the evaluation's.
    assert f"{100 * records['eval']['metrics']['eval']['miou']:.2f}" in page


def test_a_rerun_skips_finished_stages_and_a_removed_output_reruns_what_follows(full_run):
    cfg, _, records, _ = full_run
    again = run_pipeline(cfg)
    assert [again[s]["status"] for s in STAGES] == ["skipped"] * len(STAGES)

    phase1_checkpoint = records["phase1"]["outputs"]["checkpoint"]
    storage.remove(storage.join(run_dir(cfg), "pseudo"))
    rerun = run_pipeline(cfg)
    assert [rerun[s]["status"] for s in STAGES] == ["skipped", "skipped", "ran", "ran", "ran", "ran"]
    assert rerun["phase1"]["outputs"]["checkpoint"] == phase1_checkpoint
    # Phase 2 started over on the new pseudo-labels rather than continuing the finished run.
    assert [m["epoch"] for m in rerun["phase2"]["metrics"]["history"]] == [0]
    assert storage.exists(storage.join(run_dir(cfg), "pseudo", "manifest.json"))
    assert storage.exists(storage.join(run_dir(cfg), "report.html"))


# ------------------------------------------------------------------------------ the rules, with recording stages


@pytest.fixture(params=["local", "bucket"])
def recording_stages(request, monkeypatch, tmp_path):
    """Stage bodies that write one file each and record their order, in a run directory on disk or in a bucket of
    the loopback S3 server (the stage records, the outputs' checks and the clearing of a stage's outputs go
    through weaktr.storage either way)."""
    calls = []

    def runner(stage):
        def run(cfg, directory, records):
            calls.append(stage)
            out = storage.join(directory, f"{stage}.out")
            storage.write_bytes(out, str(len(calls)).encode())
            return StageResult(outputs={"file": out}, metrics={})
        return run

    monkeypatch.setattr(pipeline, "RUNNERS", {stage: runner(stage) for stage in STAGES})
    monkeypatch.setattr(pipeline, "STAGE_DIRS", {stage: (f"{stage}.out",) for stage in STAGES})
    runs = str(tmp_path) if request.param == "local" else f"{request.getfixturevalue('s3_bucket')}/runs"
    cfg = load_config(None, ["run.name=rules", f"run.storage_path={runs}"])
    return cfg, calls, storage.join(runs, "rules")


def test_from_reruns_that_stage_and_every_later_one(recording_stages):
    cfg, calls, _ = recording_stages
    run_pipeline(cfg, log=lambda _: None)
    assert calls == list(STAGES)
    calls.clear()
    run_pipeline(cfg, from_stage="phase2", log=lambda _: None)
    assert calls == ["phase2", "eval", "report"]


def test_a_removed_output_reruns_its_stage_and_every_later_one(recording_stages):
    cfg, calls, run_dir = recording_stages
    run_pipeline(cfg, log=lambda _: None)
    storage.remove(storage.join(run_dir, "phase2.out"))
    calls.clear()
    records = run_pipeline(cfg, log=lambda _: None)
    assert calls == ["phase2", "eval", "report"] and records["phase1"]["status"] == "skipped"
    assert storage.read_bytes(storage.join(run_dir, "report.out")) == b"3"  # rewritten by the rerun


def test_an_interrupted_stage_reruns_without_touching_earlier_ones(recording_stages, monkeypatch):
    cfg, calls, run_dir = recording_stages
    recording = pipeline.RUNNERS
    failing = dict(recording)

    def interrupted(cfg, directory, records):
        raise KeyboardInterrupt

    failing["pseudo"] = interrupted
    monkeypatch.setattr(pipeline, "RUNNERS", failing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, log=lambda _: None)
    assert calls == ["data", "phase1"] and not storage.exists(pipeline.record_path(run_dir, "pseudo"))
    monkeypatch.setattr(pipeline, "RUNNERS", recording)
    calls.clear()
    run_pipeline(cfg, log=lambda _: None)
    assert calls == ["pseudo", "phase2", "eval", "report"]


def test_unknown_from_stage_is_refused(recording_stages):
    cfg, _, _ = recording_stages
    with pytest.raises(pipeline.PipelineError, match="unknown stage 'cam'"):
        run_pipeline(cfg, from_stage="cam")


def test_cli_hands_its_arguments_to_the_pipeline(capsys):
    from weaktr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--help"])
    assert exit_info.value.code == 0
    assert "usage: weaktr pipeline" in capsys.readouterr().out
