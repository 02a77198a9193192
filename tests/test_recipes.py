"""configs/coco14.yaml runs end to end on a COCO-layout fixture converted by the real converter in the official
90-class layout: phase 1 -> pseudo-labels -> phase 2 -> evaluation, with a tiny model (--set), on CPU. Everything
else is the recipe as shipped (lr rule, CAM-mIoU selection, augmentation, the official evaluation protocol with
ensemble and CRF). The chain runs as a cluster without a shared file system runs it: the single jobs' command lines
with every path in a bucket, on the loopback S3 server (conftest ``s3_server``; the Ray workers read and write it
too). configs/voc12.yaml's chain is tests/test_pipeline.py's (the pipeline job, submitted as a Ray job)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from job_helpers import bucket_objects, load_job
from recipe_fixtures import TINY_ON_CPU, write_coco_layout

from weaktr import storage
from weaktr.checkpoint import load_checkpoint
from weaktr.cli import main as weaktr_cli
from weaktr.data.shards import Manifest
from weaktr.data.stream import iter_samples

ROOT = Path(__file__).resolve().parents[1]


def best_checkpoint(console: str) -> str:
    return re.search(r"best checkpoint \(by \S+\): (\S+)", console).group(1)


def test_coco14_recipe_runs_the_whole_chain_in_a_bucket_in_the_official_90_class_layout(
    s3_bucket, ray_session, tmp_path, capsys
):
    bucket = s3_bucket
    local_defaults = [Path("runs/coco14"), Path("outputs/coco14-pseudo")]  # the config's paths, relative to here
    existed = [path.exists() for path in local_defaults]
    coco_root = write_coco_layout(tmp_path)
    assert weaktr_cli(["convert", "coco", str(coco_root), f"{bucket}/coco14", "--official-ids",
                       "--samples-per-shard", "8"]) == 0
    assert f"uploaded to {bucket}/coco14" in capsys.readouterr().out
    dataset = Manifest.load(f"{bucket}/coco14")
    assert dataset.num_classes == 90 and dataset.splits["train"].num_samples == 16
    overrides = [*TINY_ON_CPU, f"data.root={bucket}/coco14", f"run.storage_path={bucket}/runs",
                 f"pseudo.out_dir={bucket}/pseudo",
                 "train.epochs=1"]  # the VOC chain (test_pipeline.py) covers two epochs and the checkpoint choice
    args = ["--config", str(ROOT / "configs" / "coco14.yaml")]
    for override in overrides:
        args += ["--set", override]

    assert load_job("train_cam").main(args) == 0
    console = capsys.readouterr().out
    cam = best_checkpoint(console)
    assert cam.startswith(f"{bucket}/runs/coco14/checkpoint_"), console
    phase1 = load_checkpoint(cam)
    assert len(phase1["history"]) == 1 and 0 < phase1["metrics"]["cam_mIoU"] <= 1
    assert len(phase1["classes"]) == 90

    pseudo = load_job("make_pseudo_labels")
    assert pseudo.main([*args, "--checkpoint", cam]) == 0
    assert "done: 16 pseudo-labels, 0 failures" in capsys.readouterr().out
    labels = Manifest.load(f"{bucket}/pseudo")
    assert all(s.pseudo is not None and s.pseudo.shape == s.image.shape[:2]
               for s in iter_samples(labels.shard_paths("train")))
    report = json.loads(storage.read_bytes(f"{bucket}/pseudo/report.json"))
    assert report["num_samples"] == 16 and len(report["crf"]["per_class"]) == 91
    # A finished run in the bucket is refused without --resume, naming its URI; resumed, nothing is redone.
    assert pseudo.main([*args, "--checkpoint", cam]) == 2
    assert f"already exists at {bucket}/pseudo" in capsys.readouterr().err
    assert pseudo.main([*args, "--checkpoint", cam, "--resume"]) == 0
    assert "processed 0 shards, skipped 2 finished shards" in capsys.readouterr().err  # the job's log line

    assert load_job("train_seg").main(args) == 0
    seg = best_checkpoint(capsys.readouterr().out)
    assert seg.startswith(f"{bucket}/runs/coco14-seg/checkpoint_") and len(load_checkpoint(seg)["history"]) == 1

    assert load_job("evaluate").main([*args, "--checkpoint", seg]) == 0
    assert f"report: {seg}/" in capsys.readouterr().out
    evaluation = json.loads(storage.read_bytes(f"{seg}/eval_report.json"))
    assert 0 <= evaluation["miou"] <= 1 and len(evaluation["per_class"]) == 91
    assert evaluation["settings"]["ensemble_weight"] == 0.8 and len(evaluation["settings"]["scales"]) == 6

    # Everything is in the bucket, whole (no temporary names); nothing went to the config's local default paths.
    names = bucket_objects(bucket)
    assert {"runs/coco14/config.yaml", "runs/coco14/config_seg.yaml", "runs/coco14/pseudo_config.yaml",
            "pseudo/run_config.json", "pseudo/manifest.json", "coco14/failures.jsonl"} <= set(names)
    assert not any(name.endswith(storage.TMP_SUFFIX) for name in names)
    assert [path.exists() for path in local_defaults] == existed
