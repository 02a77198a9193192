"""bench/ablation.py's own pieces (the pipeline it runs per seed is tested in test_pipeline.py): the CAM readout rows
on a tiny random phase-1 checkpoint, and the table over seeds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from weaktr.checkpoint import save_checkpoint
from weaktr.config import load_config
from weaktr.data.synthetic import SyntheticSpec, write_synthetic
from weaktr.models.cam import WeakTrCAM

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_cam_readouts_score_every_readout_at_the_fixed_and_the_best_threshold(tmp_path):
    manifest = write_synthetic(tmp_path / "data", SyntheticSpec(num_classes=3, num_train=6, num_val=0, min_size=48,
                                                                max_size=64))
    torch.manual_seed(0)
    model = WeakTrCAM(3, img_size=64, embed_dim=32, depth=2, num_heads=2, reduction=1, feat_reduction=2)
    with torch.no_grad():  # saturated gates: AAF weights near 0 or 1, far from the equal-weight fusion
        model.aaf.map_gate[2].weight.normal_(0, 30)
    save_checkpoint(tmp_path / "cam", kind="cam", model_state=model.state_dict(), arch=model.arch,
                    classes=manifest.classes, config={}, epoch=0)
    records = {"data": {"outputs": {"manifest": str(tmp_path / "data" / "manifest.json")}},
               "phase1": {"outputs": {"checkpoint": str(tmp_path / "cam")}}}
    cfg = load_config(None, ["pseudo.scales=[1.0]", "pseudo.batch_size=4"])
    rows = ablation.cam_readouts(cfg, records, samples=6, fixed=0.43)

    weights = rows.pop("aaf_weights")
    assert list(rows) == [name for name, *_ in ablation.READOUTS]
    # The AAF as phase 1 started (rebuilt from run.seed 0, as this model was built) against the one saturated above.
    assert len(weights["trained"]) == len(weights["initial"]) == 4
    assert all(0.4 < w < 0.6 for w in weights["initial"])  # sigmoid gates near 1/2 at initialization
    assert max(abs(a - b) for a, b in zip(weights["trained"], weights["initial"])) > 1e-3
    for name, row in rows.items():
        assert 0 < row["fixed"] <= row["best"] <= 1, name  # the sweep includes the fixed threshold
        assert row["best_t"] in ablation.SWEEP or row["best_t"] == 0.43
    # Equal weights and AAF weights fuse differently; the readouts without refinement differ from G.
    g = "fine CAM G, AAF (the paper's CAM)"
    assert rows["fine CAM G, equal-weight fusion"] != rows[g]
    assert rows["CA * M, no PA refinement"] != rows[g]


def test_table_has_mean_spread_and_every_seed():
    cfg = load_config(None, ["pseudo.bg_threshold=null", "pseudo.patch_attn_refine=false", "seg_train.clip=false"])
    readouts = {name: {"fixed": 0.2, "best": 0.3, "best_t": 0.1} for name, *_ in ablation.READOUTS}
    per_seed = {
        seed: {"readouts": readouts, "cam_labels": 0.50 + 0.02 * seed, "crf_labels": 0.6, "ce_miou": 0.62,
               "clip_miou": 0.4}
        for seed in (0, 1, 2)
    }
    rows = ablation.table_rows(cfg, per_seed, fixed=0.43)
    text = ablation.markdown(rows, [0, 1, 2], samples=400)
    cam = next(line for line in text.splitlines() if line.startswith("| CAM labels"))
    assert "(CA * M, no PA refinement, phase 1's t)" in cam and "train, all" in cam
    std = np.std([50, 52, 54], ddof=1)
    assert f"52.00 ± {std:.2f}" in cam and "50.00 / 52.00 / 54.00" in cam
    assert "| coarse CAM M, t = 0.43 | train, first 400 images | 20.00 ± 0.00 |" in text
    assert text.count("\n") == len(rows) + 1
    with pytest.raises(KeyError):  # a seed without the other phase-2 arm cannot make a table
        ablation.table_rows(cfg, {0: {k: v for k, v in per_seed[0].items() if k != "clip_miou"}}, fixed=0.43)
