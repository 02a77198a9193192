"""configs/coco14.yaml runs end to end on a COCO-layout fixture converted by the real converter in the official
90-class layout: phase 1 -> pseudo-labels -> phase 2 -> evaluation, with a tiny model (--set), on CPU. Everything
else is the recipe as shipped (lr rule, CAM-mIoU selection, augmentation, the official evaluation protocol with
ensemble and CRF). configs/voc12.yaml's chain is tests/test_pipeline.py's (submitted as a Ray job)."""

from __future__ import annotations

from pathlib import Path

from recipe_fixtures import TINY_ON_CPU, check_chain, write_coco_layout

from weaktr.config import load_config
from weaktr.data.coco import coco2014_splits, convert_coco
from weaktr.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_coco14_recipe_runs_the_whole_chain_in_the_official_90_class_layout(ray_session, tmp_path):
    coco_root = write_coco_layout(tmp_path)
    convert_coco(tmp_path / "coco14", coco2014_splits(coco_root), official_ids=True, samples_per_shard=8)
    cfg = load_config(ROOT / "configs" / "coco14.yaml", [
        *TINY_ON_CPU, f"data.root={tmp_path / 'coco14'}", f"run.storage_path={tmp_path / 'runs'}",
        "train.epochs=1",  # the VOC chain (test_pipeline.py) covers two epochs and the checkpoint choice
    ])
    records = run_pipeline(cfg, log=lambda line: None)
    check_chain(records, cfg, num_train=16, num_classes=90)
