"""Phase-1 WeakTr CAM model and the shared timm-backbone helpers, on tiny random models."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.testing import assert_close

from weaktr.models.cam import AdaptiveAttentionFusion, CamOutput, WeakTrCAM
from weaktr.models.vit import create_backbone, resize_patch_pos_embed

TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)
NUM_CLASSES = 4


def make_model(seed=0, **kwargs):
    # reduction=1: with L = 2*2 maps the paper's r=8 leaves a single ReLU unit in the gate, which may start dead.
    torch.manual_seed(seed)
    return WeakTrCAM(NUM_CLASSES, **{**TINY, "drop_path_rate": 0.0, "reduction": 1, **kwargs})


def make_batch(B=3, H=64, W=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    labels = torch.zeros(B, NUM_CLASSES)
    for b in range(B):
        labels[b, b % NUM_CLASSES] = 1.0
        labels[b, (b + 2) % NUM_CLASSES] = 1.0
    return images, labels


# ---------------------------------------------------------------- forward and loss


@pytest.mark.parametrize("H, W", [(64, 64), (64, 96), (96, 48), (32, 16)])
def test_output_shapes_for_square_and_non_square_inputs(H, W):
    model = make_model().eval()
    images, _ = make_batch(B=2, H=H, W=W)
    out = model(images)
    assert isinstance(out, CamOutput)
    h, w = H // 16, W // 16
    for logits in (out.cls_logits, out.coarse_logits, out.fine_logits):
        assert logits.shape == (2, NUM_CLASSES)
    assert out.coarse_cam.shape == out.fine_cam.shape == (2, NUM_CLASSES, h, w)
    assert_close(out.coarse_logits, out.coarse_cam.mean((2, 3)))
    assert_close(out.fine_logits, out.fine_cam.mean((2, 3)))
    assert all(torch.isfinite(t).all() for t in out)


def test_rejects_input_not_multiple_of_patch_size():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make_model()(torch.randn(1, 3, 64, 70))


def test_fine_term_trains_only_the_fusion():
    model = make_model()
    images, labels = make_batch()
    out = model(images)
    F.multilabel_soft_margin_loss(out.fine_logits, labels).backward()
    for name, param in model.named_parameters():
        if name.startswith("aaf."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name


def test_class_and_coarse_terms_do_not_reach_the_fusion():
    model = make_model()
    images, labels = make_batch()
    out = model(images)
    loss = F.multilabel_soft_margin_loss(out.cls_logits, labels) + F.multilabel_soft_margin_loss(
        out.coarse_logits, labels
    )
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("aaf."))
    assert model.head.weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_terms_and_decrease_on_a_fixed_batch():
    model = make_model().train()
    images, labels = make_batch(B=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        out = model(images)
        loss, logs = model.loss(out, labels)
        assert logs["loss"] == pytest.approx(logs["loss_cls"] + logs["loss_coarse"] + logs["loss_fine"], rel=1e-5)
        assert logs["loss_fine"] == pytest.approx(F.multilabel_soft_margin_loss(out.fine_logits, labels).item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(logs)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["loss_fine"] < history[0]["loss_fine"]  # the fusion alone learns too


def test_loss_rejects_labels_of_wrong_shape():
    model = make_model()
    out = model(make_batch(B=2)[0])
    with pytest.raises(ValueError, match="labels"):
        model.loss(out, torch.ones(2, NUM_CLASSES + 1))


@pytest.mark.parametrize("train", [False, True])
def test_fused_and_explicit_attention_agree(train):
    fused = make_model(fused_attn=True, drop_path_rate=0.1)
    explicit = make_model(fused_attn=False, drop_path_rate=0.1)
    explicit.load_state_dict(fused.state_dict())
    images, labels = make_batch(B=2, H=64, W=96)
    results = []
    for model in (fused, explicit):
        model.train(train)
        torch.manual_seed(123)  # same drop-path draws in train mode
        out = model(images)
        loss, _ = model.loss(out, labels)
        loss.backward()
        results.append((out, loss, {n: p.grad for n, p in model.named_parameters()}))
    (out_f, loss_f, grads_f), (out_e, loss_e, grads_e) = results
    for name in CamOutput._fields:
        assert_close(getattr(out_f, name), getattr(out_e, name), msg=name)
    assert_close(loss_f, loss_e)
    assert grads_f.keys() == grads_e.keys()
    for name in grads_f:
        assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fusion_weights_follow_the_equation():
    torch.manual_seed(3)
    aaf = AdaptiveAttentionFusion(num_maps=12, head_dim=16, reduction=4, feat_reduction=8, pool="max")
    feats = torch.randn(2, 12, 9, 16)  # [B, L, T, D/Hd]
    (lin_a, lin_b), (w1, w2) = aaf.feat_score, (aaf.map_gate[0], aaf.map_gate[2])
    assert lin_a.out_features == 2 and w1.out_features == 3 and w1.bias is None and w2.bias is None
    for pool, pooled in (("max", feats.max(2).values), ("avg", feats.mean(2))):
        aaf.pool = pool
        scores = (pooled @ lin_a.weight.T + lin_a.bias) @ lin_b.weight.T + lin_b.bias  # [B, L, 1]
        want = torch.sigmoid(torch.relu(scores.squeeze(-1) @ w1.weight.T) @ w2.weight.T)
        assert_close(aaf(feats), want)
    with pytest.raises(ValueError, match="pool"):
        make_model(pool="median")


def test_forward_wiring_of_attention_maps_features_and_weights():
    """Recompute A (from each block's qkv), F (from each block's proj) and the fine CAM from hooks."""
    model = make_model(num_heads=4).eval()
    images, _ = make_batch(B=2, H=48, W=80)
    captured = {"qkv": [], "proj": []}
    hooks = [blk.attn.qkv.register_forward_hook(lambda m, i, o: captured["qkv"].append(o)) for blk in model.blocks]
    hooks += [blk.attn.proj.register_forward_hook(lambda m, i, o: captured["proj"].append(o)) for blk in model.blocks]
    hooks.append(model.aaf.register_forward_hook(lambda m, i, o: captured.update(feats=i[0], weights=o)))
    out = model(images)
    for hook in hooks:
        hook.remove()

    B, Hd, D = 2, 4, 64
    maps, feats = [], []  # in the official order: head-major, l = j*K + k
    for j in range(Hd):
        for qkv, proj in zip(captured["qkv"], captured["proj"]):
            T = qkv.shape[1]
            q, k, _ = qkv.reshape(B, T, 3, Hd, D // Hd).permute(2, 0, 3, 1, 4)
            maps.append(torch.softmax(q[:, j] @ k[:, j].transpose(1, 2) / (D // Hd) ** 0.5, dim=-1))  # A_kj
            feats.append(proj[:, :, j::Hd])  # F_kj: features d with d mod Hd == j (the official stride split)
    assert_close(captured["feats"], torch.stack(feats, 1))
    fused = sum(w[:, None, None] * a for w, a in zip(captured["weights"].unbind(1), maps)) / len(maps)  # [B, T, T]
    C, h, w = NUM_CLASSES, 3, 5
    cams = fused[:, :C, C:] * out.coarse_cam.clamp(min=0).flatten(2)  # CA_c * relu(M_c)
    want = torch.einsum("bnm,bcm->bcn", fused[:, C:, C:], cams).reshape(B, C, h, w)
    assert_close(out.fine_cam, want)


def test_encoder_reproduces_timm_vision_transformer_without_its_final_norm(tmp_path):
    """With one class token the model's encoder is exactly timm's forward_features on the same weights, minus the
    final LayerNorm: as in the official model, the heads read the last block's raw output."""
    torch.manual_seed(4)
    vit = create_backbone(**TINY)
    for param in vit.parameters():  # move off the init (LayerNorm weight 1 / bias 0 would hide mistakes)
        param.data.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model = WeakTrCAM(1, weights_path=path, **TINY).eval()
    vit.eval()
    vit.norm = torch.nn.Identity()
    images, _ = make_batch(B=2)
    tokens = vit.forward_features(images)  # [B, 1 + N, D]
    out = model(images)
    assert_close(out.cls_logits, tokens[:, :1].mean(-1))
    patches = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
    assert_close(out.coarse_cam, model.head(patches))


def test_arch_rebuilds_the_same_model():
    model = make_model(reduction=2, feat_reduction=4, pool="avg")
    assert model.arch["num_classes"] == NUM_CLASSES and "weights_path" not in model.arch
    rebuilt = WeakTrCAM(**model.arch)
    rebuilt.load_state_dict(model.state_dict())  # strict: same parameter names and shapes
    images, _ = make_batch(B=1)
    assert_close(rebuilt.eval()(images).fine_cam, model.eval()(images).fine_cam)


def test_no_weight_decay_names_token_and_position_parameters():
    model = make_model()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()
    groups = param_groups_weight_decay(model, weight_decay=0.03, no_weight_decay_list=model.no_weight_decay())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {id(names[n]) for n in ("cls_tokens", "cls_pos_embed", "patch_pos_embed")} <= no_decay
    assert id(model.head.weight) not in no_decay


def test_phase1_optimizer_decays_every_parameter_as_the_official_or_exempts_on_request():
    from weaktr.config import Config
    from weaktr.train.cam_loop import make_optimizer

    model, cfg = make_model(), Config()
    optimizer, _ = make_optimizer(model, cfg, steps=10)  # decay_all: the official main.py's model.parameters()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.train.weight_decay]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    cfg.train.decay_all = False
    optimizer, _ = make_optimizer(model, cfg, steps=10)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.cls_tokens) in no_decay and id(model.head.weight) not in no_decay


def test_class_tokens_start_from_the_backbone_class_token(tmp_path):
    torch.manual_seed(5)
    vit = create_backbone(**TINY)
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)
    model = WeakTrCAM(NUM_CLASSES, weights_path=path, **TINY)
    assert_close(model.cls_tokens, vit.cls_token.expand(1, NUM_CLASSES, -1))
    assert_close(model.cls_pos_embed, vit.pos_embed[:, :1].expand(1, NUM_CLASSES, -1))
    assert_close(model.patch_pos_embed, vit.pos_embed[:, 1:])
    assert_close(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


# ---------------------------------------------------------------- positional embedding


def test_model_positions_resized_only_for_other_grids():
    model = make_model()
    assert torch.equal(model._patch_pos_embed((4, 4)), model.patch_pos_embed)
    assert model._patch_pos_embed((4, 6)).shape == (1, 24, 64)


def test_position_gradients_keep_their_parameters_layout():
    # DDP copies (and warns about) a gradient whose strides differ from its parameter's; added after the token
    # concatenation, the class positions' gradient was a view into the [1, T, D] one.
    model = make_model().train()
    images, labels = make_batch(B=2)
    model.loss(model(images), labels)[0].backward()
    for param in (model.cls_pos_embed, model.patch_pos_embed, model.cls_tokens):
        assert param.grad.stride() == param.stride()


@pytest.mark.parametrize("old, new", [((4, 4), (4, 6)), ((3, 5), (6, 2)), ((14, 14), (31, 23)), ((4, 6), (4, 6))])
def test_resize_patch_pos_embed_keeps_row_and_column_structure(old, new):
    # A map that varies only along rows must still vary only along rows after resizing (and vice versa):
    # catches a swapped (rows, cols) reshape, which a shape check alone would miss for non-square grids.
    D = 3
    rows = torch.linspace(-1, 1, old[0]).view(old[0], 1, 1).expand(old[0], old[1], D)
    cols = torch.linspace(-1, 1, old[1]).view(1, old[1], 1).expand(old[0], old[1], D)
    for grid_map, axis in ((rows, 1), (cols, 0)):
        resized = resize_patch_pos_embed(grid_map.reshape(1, -1, D), old, new)
        assert resized.shape == (1, new[0] * new[1], D)
        resized = resized.reshape(*new, D)
        first = resized.select(axis, 0).unsqueeze(axis)
        assert_close(resized, first.expand_as(resized))


def test_resize_patch_pos_embed_is_the_official_bicubic_interpolation():
    # The official interpolate_pos_encoding passes scale factors (n + 0.1) / n0, not the output size: PyTorch then
    # samples at (i + 0.5) / factor - 0.5, slightly off the size-based positions.
    pos = torch.randn(1, 3 * 5, 8)
    resized = resize_patch_pos_embed(pos, (3, 5), (7, 4))
    grid = pos.reshape(1, 3, 5, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(7.1 / 3, 4.1 / 5), mode="bicubic", align_corners=False)
    assert_close(resized, want.permute(0, 2, 3, 1).reshape(1, 28, 8))
    by_size = F.interpolate(grid, size=(7, 4), mode="bicubic", align_corners=False)
    assert not torch.allclose(resized, by_size.permute(0, 2, 3, 1).reshape(1, 28, 8), atol=1e-4)


def test_resize_patch_pos_embed_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        resize_patch_pos_embed(torch.randn(1, 15, 8), (4, 4), (5, 5))


# ---------------------------------------------------------------- backbone weights


def test_create_backbone_overrides_architecture():
    vit = create_backbone(**TINY)
    assert vit.embed_dim == 64 and len(vit.blocks) == 2 and vit.blocks[0].attn.num_heads == 2
    assert vit.num_classes == 0 and tuple(vit.patch_embed.grid_size) == (4, 4)


@pytest.mark.parametrize("nesting", ["plain", "model", "state_dict", "ddp", "safetensors"])
def test_create_backbone_loads_local_weights(tmp_path, nesting):
    torch.manual_seed(7)
    source = create_backbone(**TINY)
    state = dict(source.state_dict())
    state["head.weight"] = torch.randn(10, 64)  # an ImageNet classifier, as in DeiT releases
    state["head.bias"] = torch.randn(10)
    if nesting == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    elif nesting not in ("plain", "safetensors"):
        state = {nesting: state}
    path = tmp_path / ("weights.safetensors" if nesting == "safetensors" else "weights.pth")
    if nesting == "safetensors":  # how the hub ships timm weights: a cluster without internet copies that file
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)

    torch.manual_seed(8)  # different random init: equality below comes from the file
    loaded = create_backbone(weights_path=path, **TINY)
    want = source.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_create_backbone_resamples_positions_for_another_image_size(tmp_path):
    torch.manual_seed(9)
    source = create_backbone(**TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(weights_path=path, **{**TINY, "img_size": 96})
    assert loaded.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(loaded.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_create_backbone_rejects_bad_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        create_backbone(weights_path=tmp_path / "missing.pth", **TINY)
    path = tmp_path / "other.pth"
    torch.save(create_backbone(**{**TINY, "depth": 1}).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        create_backbone(weights_path=path, **TINY)
    with pytest.raises(ValueError, match="either"):
        create_backbone(pretrained=True, weights_path=path, **TINY)


def test_pretrained_weights_out_of_reach_name_both_ways_to_get_them(tmp_path):
    """No hub and no cache (HF_HUB_OFFLINE, as on a cluster without internet, says so at once instead of after
    ~50 s of retries): one error naming the hub and weights_path."""
    code = ("from weaktr.models.vit import create_backbone; "
            "create_backbone('deit_small_patch16_224', pretrained=True, img_size=64)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("weaktr.models.vit.WeightsUnavailable: timm's pretrained weights for "
                           "'deit_small_patch16_224' could not be loaded"), last
    assert "Hugging Face hub" in last and "weights_path" in last and ".safetensors" in last


def test_phase1_checkpoints_from_before_the_official_layout_are_refused():
    from weaktr.checkpoint import CheckpointMismatch, check_compatible

    model = make_model()
    ckpt = {"kind": "cam", "version": "0.1.0", "classes": ["a"], "arch": model.arch}
    with pytest.raises(CheckpointMismatch, match="weaktr 0.1.0, whose phase-1 model applied the backbone's final"):
        check_compatible(ckpt, kind="cam", classes=["a"])
    check_compatible(ckpt | {"version": "0.2.0"}, kind="cam", classes=["a"])
    check_compatible(ckpt | {"kind": "seg"}, kind="seg", classes=["a"])  # phase 2 is unchanged


# The backbones documented in the configs (phase 1 and phase 2), with the input normalization their weights expect.
BACKBONES = {
    "deit_small_patch16_224": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the paper's DeiT-S (ImageNet)
    "vit_small_patch16_224.augreg_in21k_ft_in1k": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # ViT-S, ImageNet-21k
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_each_documented_backbone_trains_in_both_models_with_its_own_normalization(backbone):
    """Tiny (random weights) versions of each backbone: a forward and backward pass through both phases' models,
    their inputs normalized as the backbone's pretrained weights expect (not a hard-coded ImageNet mean), or with
    ImageNet's when the config says so."""
    from weaktr.data.transforms import IMAGENET, normalize_batch
    from weaktr.models.segmenter import Segmenter

    grey = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    for model in (WeakTrCAM(NUM_CLASSES, backbone=backbone, **TINY),
                  Segmenter(NUM_CLASSES + 1, backbone=backbone, d_model=64, **TINY)):
        assert model.normalization == BACKBONES[backbone], type(model).__name__
        images = normalize_batch(grey, model.normalization)  # [2, 3, 64, 64]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in BACKBONES[backbone])
        torch.testing.assert_close(images, ((128 / 255 - mean) / std).expand_as(images))
        out = model(images)
        loss = (out.cls_logits.sum() + out.coarse_logits.sum()) if isinstance(model, WeakTrCAM) else out.sum()
        loss.backward()
        patch_embed = model.patch_embed if isinstance(model, WeakTrCAM) else model.encoder.patch_embed
        assert patch_embed.proj.weight.grad.abs().sum() > 0, type(model).__name__  # through the whole backbone
    assert WeakTrCAM(NUM_CLASSES, backbone=backbone, normalization="imagenet", **TINY).normalization == IMAGENET


def test_checkpoints_from_before_the_normalization_setting_keep_imagenets(tmp_path):
    """A checkpoint whose arch does not record ``normalization`` was trained on ImageNet-normalized inputs: it
    loads so, whatever its backbone's own normalization."""
    from weaktr.checkpoint import load_checkpoint, save_checkpoint
    from weaktr.data.transforms import IMAGENET
    from weaktr.models.build import rebuild

    model = WeakTrCAM(NUM_CLASSES, backbone="vit_small_patch16_224.augreg_in21k_ft_in1k", **TINY)
    arch = {k: v for k, v in model.arch.items() if k != "normalization"}  # as written before it existed
    save_checkpoint(tmp_path, kind="cam", model_state=model.state_dict(), arch=arch, classes=list("abcd"),
                    config={}, epoch=0)
    payload = load_checkpoint(tmp_path)
    assert payload["arch"]["normalization"] == "imagenet"
    assert rebuild("cam", payload["arch"], payload["model"]).normalization == IMAGENET


def test_phase1_refuses_an_eva_backbone_naming_phase_2():
    with pytest.raises(ValueError, match="phase 1 needs a VisionTransformer.*phase-2 backbone"):
        WeakTrCAM(NUM_CLASSES, backbone="eva02_small_patch14_224", **TINY)
