"""Importing checkpoints of the official WeakTr code: state dicts in the official layout are built here, key by
key from the layout the official models.py / AAF.py / segm code write (no official code in the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weaktr.checkpoint import CheckpointMismatch
from weaktr.cli import main as cli_main
from weaktr.config import load_config
from weaktr.data.coco import official_coco_classes
from weaktr.evaluate import load_segmenter
from weaktr.models.inference import multiscale_cams
from weaktr.pseudo import load_cam_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c", "d"]
TINY = ["model.img_size=64", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.reduction=2",
        "model.feat_reduction=4", "model.pretrained=false"]
TINY_SEG = ["seg_model.img_size=64", "seg_model.embed_dim=64", "seg_model.depth=2", "seg_model.num_heads=2",
            "seg_model.d_model=64", "seg_model.pretrained=false"]


def official_cam_state(num_classes: int, seed: int = 0, D: int = 64, depth: int = 2, heads: int = 2,
                       grid: int = 4) -> dict[str, torch.Tensor]:
    """Random weights in the official phase-1 layout (deit_small_WeakTr_patch16_224 at a tiny size)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    maps, head_dim = depth * heads, D // heads
    state = {"cls_token": rand(1, num_classes, D), "pos_embed": rand(1, num_classes + grid * grid, D),
             "patch_embed.proj.weight": rand(D, 3, 16, 16), "patch_embed.proj.bias": rand(D)}
    for i in range(depth):
        state |= {f"blocks.{i}.norm1.weight": 1 + rand(D), f"blocks.{i}.norm1.bias": rand(D),
                  f"blocks.{i}.attn.qkv.weight": rand(3 * D, D), f"blocks.{i}.attn.qkv.bias": rand(3 * D),
                  f"blocks.{i}.attn.proj.weight": rand(D, D), f"blocks.{i}.attn.proj.bias": rand(D),
                  f"blocks.{i}.norm2.weight": 1 + rand(D), f"blocks.{i}.norm2.bias": rand(D),
                  f"blocks.{i}.mlp.fc1.weight": rand(4 * D, D), f"blocks.{i}.mlp.fc1.bias": rand(4 * D),
                  f"blocks.{i}.mlp.fc2.weight": rand(D, 4 * D), f"blocks.{i}.mlp.fc2.bias": rand(D)}
    state |= {"norm.weight": 1 + rand(D), "norm.bias": rand(D),
              "head.weight": rand(num_classes, D, 3, 3), "head.bias": rand(num_classes),
              "adaptive_attention_fusion.attn_head_ffn.0.weight": rand(maps // 2, maps),  # reduction 2
              "adaptive_attention_fusion.attn_head_ffn.2.weight": rand(maps, maps // 2),
              "adaptive_attention_fusion.attn_feat_ffn.0.weight": rand(head_dim // 4, head_dim),  # feat_reduction 4
              "adaptive_attention_fusion.attn_feat_ffn.0.bias": rand(head_dim // 4),
              "adaptive_attention_fusion.attn_feat_ffn.1.weight": rand(1, head_dim // 4),
              "adaptive_attention_fusion.attn_feat_ffn.1.bias": rand(1)}
    return state


def official_seg_state(num_classes: int, seed: int = 0, D: int = 64, depth: int = 2, grid: int = 4) -> dict:
    """Random weights in the official Segmenter layout (encoder ViT + mask-transformer decoder, 2 blocks)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    def block(prefix):
        return {f"{prefix}.norm1.weight": 1 + rand(D), f"{prefix}.norm1.bias": rand(D),
                f"{prefix}.attn.qkv.weight": rand(3 * D, D), f"{prefix}.attn.qkv.bias": rand(3 * D),
                f"{prefix}.attn.proj.weight": rand(D, D), f"{prefix}.attn.proj.bias": rand(D),
                f"{prefix}.norm2.weight": 1 + rand(D), f"{prefix}.norm2.bias": rand(D),
                f"{prefix}.mlp.fc1.weight": rand(4 * D, D), f"{prefix}.mlp.fc1.bias": rand(4 * D),
                f"{prefix}.mlp.fc2.weight": rand(D, 4 * D), f"{prefix}.mlp.fc2.bias": rand(D)}

    state = {"encoder.cls_token": rand(1, 1, D), "encoder.pos_embed": rand(1, 1 + grid * grid, D),
             "encoder.patch_embed.proj.weight": rand(D, 3, 16, 16), "encoder.patch_embed.proj.bias": rand(D),
             "encoder.norm.weight": 1 + rand(D), "encoder.norm.bias": rand(D),
             "encoder.head.weight": rand(1000, D), "encoder.head.bias": rand(1000)}
    for i in range(depth):
        state |= block(f"encoder.blocks.{i}") | block(f"decoder.blocks.{i}")
    state |= {"decoder.cls_emb": rand(1, num_classes, D), "decoder.proj_dec.weight": rand(D, D),
              "decoder.proj_dec.bias": rand(D), "decoder.proj_patch": rand(D, D), "decoder.proj_classes": rand(D, D),
              "decoder.decoder_norm.weight": 1 + rand(D), "decoder.decoder_norm.bias": rand(D),
              "decoder.mask_norm.weight": 1 + rand(num_classes), "decoder.mask_norm.bias": rand(num_classes)}
    return state


def save_official(path: Path, state: dict, ddp: bool = False) -> Path:
    torch.save({"model": {("module." if ddp else "") + k: v for k, v in state.items()}, "epoch": 41}, path)
    return path


def test_phase1_import_puts_every_official_tensor_in_its_place(tmp_path):
    state = official_cam_state(len(CLASSES))
    src = save_official(tmp_path / "checkpoint_best_mIoU.pth", state, ddp=True)
    out = tmp_path / "imported"
    assert cli_main(["import-official", "cam", str(src), str(out), "--config", str(ROOT / "configs/voc12.yaml"),
                     "--classes", str(write_names(tmp_path, CLASSES)), *sum((["--set", s] for s in TINY), [])]) == 0

    model, payload = load_cam_model(out, CLASSES)  # what make_pseudo_labels.py does with --checkpoint
    assert payload["kind"] == "cam" and payload["classes"] == CLASSES
    weights = model.state_dict()
    C = len(CLASSES)
    assert torch.equal(weights["cls_tokens"], state["cls_token"])
    assert torch.equal(weights["cls_pos_embed"], state["pos_embed"][:, :C])
    assert torch.equal(weights["patch_pos_embed"], state["pos_embed"][:, C:])
    assert torch.equal(weights["head.weight"], state["head.weight"])
    assert torch.equal(weights["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(weights["aaf.map_gate.0.weight"], state["adaptive_attention_fusion.attn_head_ffn.0.weight"])
    assert torch.equal(weights["aaf.feat_score.1.bias"], state["adaptive_attention_fusion.attn_feat_ffn.1.bias"])
    assert not any(key.startswith("norm.") for key in weights)  # the official heads never read the final norm

    # The imported model runs at non-square, non-native sizes (pos-embed resampled as the official does).
    image = np.random.default_rng(0).integers(0, 256, size=(80, 120, 3), dtype=np.uint8)
    cams = multiscale_cams(model, [image], [1.0, 1.5], True, 16)[0]
    assert cams.shape == (C, 80, 120) and torch.isfinite(cams).all()


def test_phase1_import_refuses_a_checkpoint_that_does_not_fit_naming_the_key(tmp_path):
    cfg = load_config(ROOT / "configs/voc12.yaml", TINY)
    from weaktr.official import import_official

    src = save_official(tmp_path / "five.pth", official_cam_state(5))
    with pytest.raises(CheckpointMismatch, match=r"cls_tokens is \(1, 5, 64\) in the checkpoint but \(1, 4, 64\)"):
        import_official("cam", src, tmp_path / "out", cfg, CLASSES)
    state = official_cam_state(len(CLASSES))
    del state["head.bias"]
    with pytest.raises(CheckpointMismatch, match="no weights for head.bias"):
        import_official("cam", save_official(tmp_path / "missing.pth", state), tmp_path / "out", cfg, CLASSES)
    state = official_cam_state(len(CLASSES)) | {"dist_token": torch.zeros(1, 1, 64)}
    with pytest.raises(CheckpointMismatch, match="no parameter dist_token"):
        import_official("cam", save_official(tmp_path / "extra.pth", state), tmp_path / "out", cfg, CLASSES)
    torch.save({"model": [1, 2]}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointMismatch, match="not an official WeakTr checkpoint"):
        import_official("cam", tmp_path / "junk.pth", tmp_path / "out", cfg, CLASSES)


def test_coco_imports_keep_all_90_class_tokens(tmp_path):
    classes = official_coco_classes()
    src = save_official(tmp_path / "coco.pth", official_cam_state(90))
    out = tmp_path / "coco"
    assert cli_main(["import-official", "cam", str(src), str(out), "--config", str(ROOT / "configs/coco14.yaml"),
                     "--classes", "coco", *sum((["--set", s] for s in TINY), [])]) == 0
    model, _ = load_cam_model(out, classes)
    assert model.cls_tokens.shape == (1, 90, 64) and classes[11] == "street sign"


def test_phase2_import_gives_a_segmenter_with_the_official_norms_and_ensemble(tmp_path):
    state = official_seg_state(len(CLASSES) + 1)
    src = save_official(tmp_path / "checkpoint.pth", state)
    out = tmp_path / "seg"
    assert cli_main(["import-official", "seg", str(src), str(out), "--config", str(ROOT / "configs/voc12.yaml"),
                     "--classes", str(write_names(tmp_path, CLASSES)), *sum((["--set", s] for s in TINY_SEG), [])]) == 0
    model, ckpt = load_segmenter(out, classes=CLASSES)  # what evaluate.py and weaktr predict do
    weights = model.state_dict()
    for key, value in state.items():
        if not key.startswith("encoder.head"):
            assert torch.equal(weights[key], value), key
    # The official Segmenter's LayerNorms (encoder and decoder) use eps 1e-5 (voc12.yaml encoder_norm_eps).
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    x = torch.randn(1, 3, 64, 96)
    both = model(x, both=True)
    assert both.shape == (1, 2 * (len(CLASSES) + 1), 64, 96)
    torch.testing.assert_close(both[:, len(CLASSES) + 1:], model(x))
    assert ckpt["config"]["eval"]["ensemble_weight"] == 0.8  # evaluate.py then ensembles as the official


def test_import_without_classes_reads_the_configs_dataset_or_says_what_to_pass(tmp_path, capsys):
    src = save_official(tmp_path / "c.pth", official_cam_state(len(CLASSES)))
    code = cli_main(["import-official", "cam", str(src), str(tmp_path / "o"), "--config",
                     str(ROOT / "configs/voc12.yaml"), "--set", f"data.root={tmp_path / 'nowhere'}", *sum(
                         (["--set", s] for s in TINY), [])])
    assert code == 2 and "pass --classes voc|coco|FILE" in capsys.readouterr().err


def write_names(directory: Path, names) -> Path:
    path = directory / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def official_segmenter_logits(state: dict, x: torch.Tensor, num_heads: int = 2, ensemble: bool = False):
    """The official Segmenter forward written out with torch ops from an official state dict (native grid):
    ViT encoder with LayerNorm eps 1e-5, mask-transformer decoder (d_model // 64 heads, as segm/model/factory.py),
    bilinear upsampling; with ``ensemble`` the (masks before the last decoder block, final masks) pair of
    MultiMaskTransformer."""
    F = torch.nn.functional

    def block(t, p, num_heads=num_heads):
        B, N, D = t.shape
        h = F.layer_norm(t, (D,), state[f"{p}.norm1.weight"], state[f"{p}.norm1.bias"], eps=1e-5)
        q, k, v = F.linear(h, state[f"{p}.attn.qkv.weight"], state[f"{p}.attn.qkv.bias"]).reshape(
            B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // num_heads) ** -0.5).softmax(-1)
        t = t + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), state[f"{p}.attn.proj.weight"],
                         state[f"{p}.attn.proj.bias"])
        h = F.layer_norm(t, (D,), state[f"{p}.norm2.weight"], state[f"{p}.norm2.bias"], eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, state[f"{p}.mlp.fc1.weight"], state[f"{p}.mlp.fc1.bias"])),
                     state[f"{p}.mlp.fc2.weight"], state[f"{p}.mlp.fc2.bias"])
        return t + h

    B, _, H, W = x.shape
    t = F.conv2d(x, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"], stride=16)
    t = torch.cat([state["encoder.cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = state["encoder.pos_embed"]
    n0 = int((pos.shape[1] - 1) ** 0.5)
    if (H // 16, W // 16) != (n0, n0):  # segm/model/utils.py resize_pos_embed: bilinear from the stored grid
        grid = pos[:, 1:].reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H // 16, W // 16), mode="bilinear")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, (H // 16) * (W // 16), -1)], 1)
    t = t + pos
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    for i in range(depth):
        t = block(t, f"encoder.blocks.{i}")
    t = F.layer_norm(t, (t.shape[-1],), state["encoder.norm.weight"], state["encoder.norm.bias"], eps=1e-5)[:, 1:]
    n = state["decoder.cls_emb"].shape[1]
    t = F.linear(t, state["decoder.proj_dec.weight"], state["decoder.proj_dec.bias"])
    t = torch.cat([t, state["decoder.cls_emb"].expand(B, -1, -1)], 1)

    def masks(t):
        t = F.layer_norm(t, (t.shape[-1],), state["decoder.decoder_norm.weight"], state["decoder.decoder_norm.bias"])
        patches = F.normalize(t[:, :-n] @ state["decoder.proj_patch"], dim=-1)
        classes = F.normalize(t[:, -n:] @ state["decoder.proj_classes"], dim=-1)
        m = F.layer_norm(patches @ classes.transpose(1, 2), (n,), state["decoder.mask_norm.weight"],
                         state["decoder.mask_norm.bias"])
        m = m.transpose(1, 2).reshape(B, n, H // 16, W // 16)
        return F.interpolate(m, size=(H, W), mode="bilinear")

    decoder_heads = max(t.shape[-1] // 64, 1)
    t = block(t, "decoder.blocks.0", decoder_heads)
    first = masks(t)
    final = masks(block(t, "decoder.blocks.1", decoder_heads))
    return (first, final) if ensemble else final


@pytest.mark.parametrize("size", [(64, 64), (80, 112)])  # the native grid, and non-square, non-native
def test_imported_segmenter_gives_the_official_logits(tmp_path, size):
    from weaktr.official import import_official

    classes = CLASSES
    state = official_seg_state(len(classes) + 1, seed=5)
    cfg = load_config(ROOT / "configs/voc12.yaml", TINY_SEG)
    out = import_official("seg", save_official(tmp_path / "s.pth", state), tmp_path / "seg", cfg, classes)
    model, _ = load_segmenter(out, classes=classes)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_segmenter_logits(state, x), rtol=1e-5, atol=1e-5)
        first, final = official_segmenter_logits(state, x, ensemble=True)
        torch.testing.assert_close(model(x, both=True), torch.cat([first, final], 1), rtol=1e-5, atol=1e-5)


def official_weaktr_forward(state: dict, x: torch.Tensor, num_classes: int, heads: int = 2):
    """The official WeakTr forward (models.py WeakTr.forward, vision_transformer.py Block/Attention, AAF.py with max
    pooling) written out with torch ops from an official state dict, in eval mode. Returns (class-token logits,
    coarse logits, fine logits, fine CAM)."""
    F = torch.nn.functional
    C, (B, _, H, W) = num_classes, x.shape
    D = state["cls_token"].shape[-1]
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    t = torch.cat([state["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)  # [B, C + N, D]
    pos = state["pos_embed"]
    n0 = int((pos.shape[1] - C) ** 0.5)
    if (H // 16, W // 16) != (n0, n0):  # interpolate_pos_encoding: bicubic, scale factors (n + 0.1) / n0
        grid = pos[:, C:].reshape(1, n0, n0, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((H // 16 + 0.1) / n0, (W // 16 + 0.1) / n0), mode="bicubic")
        pos = torch.cat([pos[:, :C], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], 1)
    t = t + pos
    weights, feats = [], []
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = F.layer_norm(t, (D,), state[f"{p}.norm1.weight"], state[f"{p}.norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, state[f"{p}.attn.qkv.weight"], state[f"{p}.attn.qkv.bias"]).reshape(
            B, t.shape[1], 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)  # [B, heads, N', N']
        o = F.linear((attn @ v).transpose(1, 2).reshape(B, -1, D), state[f"{p}.attn.proj.weight"],
                     state[f"{p}.attn.proj.bias"])
        t = t + o
        h = F.layer_norm(t, (D,), state[f"{p}.norm2.weight"], state[f"{p}.norm2.bias"], eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(h, state[f"{p}.mlp.fc1.weight"], state[f"{p}.mlp.fc1.bias"])),
                         state[f"{p}.mlp.fc2.weight"], state[f"{p}.mlp.fc2.bias"])
        weights.append(attn)
        feats.append(o)
    h0, w0 = H // 16, W // 16
    x_patch = t[:, C:].reshape(B, h0, w0, D).permute(0, 3, 1, 2)
    coarse = F.conv2d(x_patch, state["head.weight"], state["head.bias"], padding=1)  # [B, C, h, w]
    k_, n = depth, t.shape[1]
    maps = torch.stack(weights).permute(1, 2, 0, 3, 4).reshape(B, heads * k_, n, n)  # head-major
    fe = torch.stack(feats).view(k_, B, n, -1, heads).permute(1, 4, 0, 2, 3).reshape(B, heads * k_, n, -1)
    pooled = fe.amax(2)  # AdaptiveMaxPool2d over the tokens: [B, L, D / heads]
    aaf = "adaptive_attention_fusion."
    score = F.linear(F.linear(pooled, state[aaf + "attn_feat_ffn.0.weight"], state[aaf + "attn_feat_ffn.0.bias"]),
                     state[aaf + "attn_feat_ffn.1.weight"], state[aaf + "attn_feat_ffn.1.bias"])[..., 0]  # [B, L]
    gate = torch.sigmoid(F.linear(F.relu(F.linear(score, state[aaf + "attn_head_ffn.0.weight"])),
                                  state[aaf + "attn_head_ffn.2.weight"]))  # [B, L]
    fused = (maps * gate[:, :, None, None]).mean(1)  # [B, N', N']
    cams = fused[:, :C, C:].reshape(B, C, h0, w0) * F.relu(coarse)
    fine = (fused[:, None, C:, C:] @ cams.reshape(B, C, -1, 1)).reshape(B, C, h0, w0)
    return t[:, :C].mean(-1), coarse.mean((2, 3)), fine.mean((2, 3)), fine


@pytest.mark.parametrize("img_size, size", [(64, (64, 64)), (64, (80, 128)), (224, (224, 224)), (224, (320, 480))])
def test_imported_cam_model_gives_the_official_logits_and_cams(tmp_path, img_size, size):
    """At the checkpoint's native grid and at non-square, non-native sizes (the official resamples its position
    embedding bicubically with scale factors (n + 0.1) / n0; weaktr must land on the same grid values)."""
    from weaktr.official import import_official

    state = official_cam_state(len(CLASSES), seed=7, grid=img_size // 16)
    cfg = load_config(ROOT / "configs/voc12.yaml", [*TINY, f"model.img_size={img_size}"])
    out = import_official("cam", save_official(tmp_path / "c.pth", state), tmp_path / "cam", cfg, CLASSES)
    model, _ = load_cam_model(out, CLASSES)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = model(x)
        cls, coarse, fine, fine_cam = official_weaktr_forward(state, x, len(CLASSES))
    for mine, theirs in ((got.cls_logits, cls), (got.coarse_logits, coarse), (got.fine_logits, fine),
                         (got.fine_cam, fine_cam)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
