"""`weaktr pretrain` (weaktr.pretrain): the formula-drawn pretraining data, mimetic initialization, the weights it
writes and how the models load them, and the check that the command still makes the weights kept in the repo."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from weaktr.config import load_config, with_values
from weaktr.data.synthetic import CLASS_NAMES, SyntheticSpec, iter_synthetic
from weaktr.models.build import build_cam_model, build_segmenter
from weaktr.models.vit import create_backbone
from weaktr.pretrain import FormulaSpec, check_pretrained, formula_classes, formula_dataset, mimetic_init, pretrain

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# The tiny settings of these tests: 64 images, two epochs of 16.
TINY = ["pretrain.num_images=64", "pretrain.epochs=2", "pretrain.batch_size=16", "pretrain.num_classes=8"]


def tiny_config(tmp_path, *overrides):
    return load_config(ROOT / "configs" / "synthetic.yaml", [*TINY, f"pretrain.out={tmp_path / 'pre'}", *overrides])


def test_formula_images_are_seeded_labelled_by_their_masks_and_not_the_benchmarks():
    spec = FormulaSpec(num_classes=8, num_images=12, min_size=64, max_size=96, seed=24)
    first, again = formula_dataset(spec), formula_dataset(spec)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(first, again))
    other = formula_dataset(FormulaSpec(num_classes=8, num_images=12, min_size=64, max_size=96, seed=25))
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    for sample in first:  # labels are exactly the classes visible in the mask (ids c + 1, 255 the outline band)
        ids = set(np.unique(sample.mask).tolist()) - {0, 255}
        assert sorted(c + 1 for c in sample.labels) == sorted(ids) and sample.labels
    # Same backgrounds and shapes as the benchmark, other textures: no formula image is a benchmark image.
    benchmark = list(iter_synthetic(SyntheticSpec(num_classes=len(CLASS_NAMES)), 0, 12))
    assert not any(np.array_equal(a.image, b.image) for a in first for b in benchmark if a.image.shape == b.image.shape)
    classes = formula_classes(32, spec.seed)
    assert len(set(classes)) == 32 and all(len(g.angles) >= 2 for g in classes)  # one grating would be stripes


def test_mimetic_init_makes_tokens_attend_to_similar_tokens():
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch8_224", img_size=64, embed_dim=64, depth=2, num_heads=2)
    tokens = torch.nn.functional.layer_norm(torch.randn(1, 50, 64), (64,))  # [1, T, D], as norm1 hands them on

    def self_share(model):
        attn = model.blocks[0].attn
        q, k, _ = attn.qkv(tokens).reshape(1, 50, 3, 2, 32).permute(2, 0, 3, 1, 4)  # [1, Hd, T, hd] each
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [1, Hd, T, T]
        return probs.diagonal(dim1=-2, dim2=-1).mean().item()

    before = self_share(vit)
    mimetic_init(vit)
    assert before < 2 / 50 and self_share(vit) > 5 * before


def test_pretrain_writes_weights_both_models_load_and_check_finds_them(tmp_path):
    cfg = tiny_config(tmp_path)
    record = pretrain(cfg)
    assert record["steps"] == 2 * 4 and len(record["history"]) == 2 and len(record["first_losses"]) == 8
    assert all(np.isfinite(h["loss"]) for h in record["history"])
    weights = tmp_path / "pre" / "backbone.pth"
    saved = torch.load(weights, weights_only=True)
    assert saved["head.weight"].shape == (8, 64)  # the classifier of the 8 formula classes, dropped at loading

    # Loaded as users load DeiT: model.weights_path (phase 1) and seg_model.weights_path (phase 2 encoder).
    pretrained = with_values(cfg, {"model.weights_path": str(weights), "seg_model.weights_path": str(weights),
                                   "seg_train.init_encoder_from_phase1": False})
    cam, segmenter = build_cam_model(pretrained, 6), build_segmenter(pretrained, 6)
    assert_close(cam.blocks[1].attn.qkv.weight, saved["blocks.1.attn.qkv.weight"])
    assert_close(cam.cls_tokens[0, 3], saved["cls_token"][0, 0])
    assert_close(segmenter.encoder.patch_embed.proj.weight, saved["patch_embed.proj.weight"])

    assert "reproduce the recorded losses" in check_pretrained(cfg)
    with pytest.raises(ValueError, match="lr 0.001 here 0.002"):
        check_pretrained(with_values(cfg, {"pretrain.lr": 2e-3}))
    recorded = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    recorded["first_losses"][3] *= 1.001  # as if the code now made other weights from step 4 on
    (tmp_path / "pre" / "pretrain.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="step 4 of 10 has loss .* no longer makes"):
        check_pretrained(cfg)


def test_the_command_pretrains_and_refuses_a_bad_setting_in_one_line(tmp_path):
    command = [sys.executable, "-m", "weaktr.cli", "pretrain", "--config", str(ROOT / "configs" / "synthetic.yaml"),
               *[arg for o in [*TINY, f"pretrain.out={tmp_path / 'pre'}"] for arg in ("--set", o)]]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"-> {tmp_path / 'pre'}/backbone.pth" in proc.stdout
    bad = subprocess.run([*command, "--set", "pretrain.objective=pixels"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "pretrain.objective" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_demo_loads_the_weights_kept_in_the_repo_and_the_command_still_makes_them():
    """configs/synthetic.yaml's backbone weights (pretrained/, made by `weaktr pretrain --config
    configs/synthetic.yaml`): both models load them, and the command's first steps reproduce their record."""
    cfg = load_config(ROOT / "configs" / "synthetic.yaml")
    cfg = with_values(cfg, {"pretrain.out": str(ROOT / cfg.pretrain.out),
                            "model.weights_path": str(ROOT / cfg.model.weights_path),
                            "seg_model.weights_path": str(ROOT / cfg.seg_model.weights_path)})
    saved = torch.load(cfg.model.weights_path, weights_only=True)
    cam, segmenter = build_cam_model(cfg, 6), build_segmenter(cfg, 6)
    assert_close(cam.blocks[0].mlp.fc1.weight, saved["blocks.0.mlp.fc1.weight"])
    assert_close(segmenter.encoder.blocks[1].attn.proj.weight, saved["blocks.1.attn.proj.weight"])
    assert "reproduce the recorded losses" in check_pretrained(cfg)
