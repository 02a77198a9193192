"""Phase-2 Segmenter and its dense inference helpers, on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weaktr.models.inference import predict_probs, sliding_window_logits
from weaktr.models.segmenter import Segmenter

NUM_CLASSES = 4
TINY = dict(embed_dim=64, depth=2, num_heads=2, d_model=64, img_size=64)


def tiny_segmenter(**overrides) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(NUM_CLASSES, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def model() -> Segmenter:
    return tiny_segmenter().eval()


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 48)])
def test_logits_have_input_resolution(model, size):
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(logits).all()


def test_rejects_sizes_that_are_not_patch_multiples(model):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_gradient_reaches_encoder_and_decoder():
    model = tiny_segmenter().train()
    logits = model(torch.randn(2, 3, 64, 96))
    target = torch.randint(0, NUM_CLASSES, (2, 64, 96))
    F.cross_entropy(logits, target).backward()
    for name in [
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.pos_embed",
        "decoder.proj_dec.weight",
        "decoder.cls_emb",
        "decoder.blocks.1.mlp.fc2.weight",
        "decoder.proj_patch",
        "decoder.proj_classes",
    ]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_fused_and_explicit_attention_agree(model):
    explicit = tiny_segmenter(fused_attn=False).eval()
    explicit.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(explicit(x), model(x), atol=1e-4, rtol=1e-4)


def test_arch_rebuilds_the_same_architecture(model):
    rebuilt = Segmenter(**model.arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.arch["num_classes"] == NUM_CLASSES and model.arch["d_model"] == TINY["d_model"]


def test_encoder_starts_from_a_phase1_checkpoint(tmp_path):
    """seg_model.weights_path = a weaktr phase-1 checkpoint (seg_train.init_encoder_from_phase1): the patch
    embedding and blocks are phase 1's, the class token and its position the mean of its C class tokens', the final
    norm (phase 1 has none) stays at its initialization; a mismatched width is refused."""
    from weaktr.checkpoint import save_checkpoint
    from weaktr.models.cam import WeakTrCAM

    torch.manual_seed(1)
    cam = WeakTrCAM(3, embed_dim=64, depth=2, num_heads=2, img_size=64)
    save_checkpoint(tmp_path / "cam", kind="cam", model_state=cam.state_dict(), arch=cam.arch,
                    classes=["a", "b", "c"], config={}, epoch=0)
    seg = tiny_segmenter(weights_path=tmp_path / "cam")
    encoder = seg.encoder.state_dict()
    for name, value in cam.state_dict().items():
        if name.startswith(("patch_embed.", "blocks.")):
            torch.testing.assert_close(encoder[name], value, msg=name)
    torch.testing.assert_close(encoder["cls_token"], cam.cls_tokens.detach().mean(1, keepdim=True))
    torch.testing.assert_close(encoder["pos_embed"][:, 1:], cam.patch_pos_embed.detach())
    assert torch.equal(encoder["norm.weight"], torch.ones(64)) and torch.equal(encoder["norm.bias"], torch.zeros(64))
    assert seg(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES, 64, 64)
    with pytest.raises((ValueError, RuntimeError)):
        tiny_segmenter(weights_path=tmp_path / "cam", embed_dim=32, d_model=32)


def test_init_from_phase1_excludes_other_weights_and_needs_a_recorded_checkpoint(tmp_path):
    from weaktr.config import ConfigError, load_config
    from weaktr.data.shards import DataError, Manifest
    from weaktr.train.seg_loop import phase1_checkpoint

    with pytest.raises(ConfigError, match="seg_train.init_encoder_from_phase1"):
        load_config(None, ["seg_train.init_encoder_from_phase1=true", "seg_model.weights_path=/w.pth"])
    unrecorded = Manifest("d", ["a"], {}, str(tmp_path), {})
    with pytest.raises(DataError, match="name no phase-1 checkpoint"):
        phase1_checkpoint(unrecorded)
    (tmp_path / "ckpt").mkdir()
    recorded = Manifest("d", ["a"], {}, str(tmp_path), {"pseudo_labels": {"checkpoint": str(tmp_path / "ckpt")}})
    assert phase1_checkpoint(recorded) == str(tmp_path / "ckpt")


def test_decoder_width_and_heads_follow_arguments():
    model = tiny_segmenter(d_model=128, decoder_heads=4, decoder_depth=3)
    assert model.decoder.proj_dec.weight.shape == (128, TINY["embed_dim"])
    assert len(model.decoder.blocks) == 3 and model.decoder.blocks[0].attn.num_heads == 4
    default = tiny_segmenter(d_model=None)  # decoder as wide as the encoder, d_model // 64 heads
    assert default.decoder.cls_emb.shape == (1, NUM_CLASSES, TINY["embed_dim"])
    assert default.decoder.blocks[0].attn.num_heads == 1
    with pytest.raises(ValueError, match="divisible"):
        tiny_segmenter(d_model=64, decoder_heads=3)


def test_param_groups_cover_every_parameter_once(model):
    groups = model.param_groups(weight_decay=0.05)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()
    for name in ["encoder.pos_embed", "encoder.cls_token", "decoder.cls_emb", "decoder.mask_norm.weight"]:
        assert id(names[name]) in no_decay, name
    for name in ["decoder.proj_patch", "decoder.proj_dec.weight", "encoder.blocks.0.attn.qkv.weight"]:
        assert id(names[name]) not in no_decay, name
    # The official encoder trains at 0.1x the decoder's lr: the groups carry it for timm's schedulers.
    scaled = model.param_groups(weight_decay=0.05, encoder_lr_scale=0.1)
    scale_of = {id(p): g["lr_scale"] for g in scaled for p in g["params"]}
    assert all(scale_of[id(p)] == (0.1 if n.startswith("encoder.") else 1.0) for n, p in names.items())


def test_encoder_lr_follows_the_official_poly_schedule(tmp_path):
    """seg_loop.make_optimizer: decoder lr (lr - min_lr)(1 - t/T)^0.9 + min_lr, the encoder 0.1x of it."""
    from seg_helpers import tiny_config

    from weaktr.train.seg_loop import make_optimizer

    cfg = tiny_config(tmp_path, tmp_path)
    cfg.seg_train.opt, cfg.seg_train.lr, cfg.seg_train.min_lr, cfg.seg_train.epochs = "sgd", 1e-2, 1e-4, 1
    model = tiny_segmenter()
    optimizer, scheduler = make_optimizer(model, cfg, steps=10)
    for step in (0, 4, 9):
        scheduler.step_update(step)
        decoder_lr = (1e-2 - 1e-4) * (1 - step / 10) ** 0.9 + 1e-4
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(decoder_lr * group["lr_scale"]), step
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.1, 1.0]


# Dense inference ------------------------------------------------------------------------------------------------


def test_sliding_window_with_one_window_is_a_direct_forward(model):
    x = torch.randn(2, 3, 64, 96)
    padded_forward = model(F.pad(x, (0, 0, 0, 32)))[..., :64, :]  # the image padded at the bottom to 96 x 96
    torch.testing.assert_close(sliding_window_logits(model, x, window=96, stride=64), padded_forward)
    torch.testing.assert_close(sliding_window_logits(model, x[..., :64], window=64, stride=32), model(x[..., :64]))


def test_sliding_window_stitches_non_overlapping_tiles(model):
    x = torch.randn(1, 3, 128, 192)
    tiles = [[model(x[..., r : r + 64, c : c + 64]) for c in range(0, 192, 64)] for r in range(0, 128, 64)]
    stitched = torch.cat([torch.cat(row, dim=-1) for row in tiles], dim=-2)
    out = sliding_window_logits(model, x, window=64, stride=64, num_classes=NUM_CLASSES, max_batch=4)
    torch.testing.assert_close(out, stitched, atol=1e-5, rtol=1e-5)


def test_sliding_window_averages_overlaps(model):
    # 50 x 100: the height is padded up to the window; columns get windows at 0, 32 and 36 (flush with the edge).
    x = torch.randn(2, 3, 50, 100)
    padded = F.pad(x, (0, 0, 0, 14))  # [2, 3, 64, 100]
    total = torch.zeros(2, NUM_CLASSES, 64, 100)
    count = torch.zeros(64, 100)
    for left in (0, 32, 36):
        total[..., left : left + 64] += model(padded[..., left : left + 64])
        count[:, left : left + 64] += 1
    expected = (total / count)[..., :50, :]
    out = sliding_window_logits(model, x, window=64, stride=32)
    assert out.shape == (2, NUM_CLASSES, 50, 100)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_checks_its_arguments(model):
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(model, torch.randn(1, 3, 64, 64), window=64, stride=96)
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_logits(model, torch.randn(1, 3, 64, 64), window=64, stride=64, num_classes=NUM_CLASSES + 1)


def test_predict_probs_is_a_probability_map(model):
    image = torch.randn(3, 70, 90)  # sides not multiples of the patch size
    probs = predict_probs(model, image, scales=(1.0, 0.75, 1.25), flip=True, window=64, stride=32)
    assert probs.shape == (NUM_CLASSES, 70, 90)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(70, 90))


def test_predict_probs_without_augmentation_is_the_window_softmax(model):
    image = torch.randn(3, 70, 90)
    probs = predict_probs(model, image, scales=(1.0,), flip=False, window=64, stride=32)
    torch.testing.assert_close(probs, sliding_window_logits(model, image[None], 64, 32)[0].softmax(0))


def test_flip_averaging_makes_the_prediction_flip_equivariant(model):
    image = torch.randn(3, 64, 64)  # one unpadded window: flipping the image flips everything
    probs = predict_probs(model, image, flip=True, window=64, stride=64)
    flipped = predict_probs(model, image.flip(-1), flip=True, window=64, stride=64)
    torch.testing.assert_close(flipped, probs.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(predict_probs(model, image, flip=False, window=64, stride=64), probs)


def _official_probs(model, image, scales, short_side, window, stride, weight=None):
    """The official segm/eval protocol step by step: per scale, short side short_side x r, upsample to the window
    if smaller, image + mirror through the sliding window, logits resized to the original size, flipped back, then
    softmax; averaged over scales and flips (weight: 0.8 x first-block softmax + final softmax, normalized)."""
    H, W = image.shape[-2:]
    total = 0
    for r in scales:
        k = short_side * r / min(H, W)
        h, w = round(H * k), round(W * k)
        if min(h, w) < window:
            h, w = int(h * window / min(h, w)), int(w * window / min(h, w))
        x = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)
        for flipped in (False, True):
            view = x.flip(-1) if flipped else x
            call = (lambda t: model(t, both=True)) if weight is not None else model
            logits = F.interpolate(sliding_window_logits(call, view, window, stride), size=(H, W), mode="bilinear")
            logits = logits.flip(-1) if flipped else logits
            if weight is None:
                total = total + logits[0].softmax(0)
            else:
                first, final = logits[0].chunk(2)
                total = total + (weight * first.softmax(0) + final.softmax(0)) / (1 + weight)
    return total / (2 * len(scales))


@pytest.mark.parametrize("weight", [None, 0.8])
def test_predict_probs_follows_the_official_evaluation_protocol(model, weight):
    image = torch.randn(3, 50, 75)  # short side 50: scale 0.5 of short_side 96 is below the 64 window
    probs = predict_probs(model, image, scales=(0.5, 1.0, 1.5), flip=True, window=64, stride=48, short_side=96,
                          ensemble_weight=weight)
    expected = _official_probs(model, image, (0.5, 1.0, 1.5), 96, 64, 48, weight)
    assert probs.shape == (NUM_CLASSES, 50, 75)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 75))


def test_both_returns_the_first_blocks_masks_and_the_final_ones(model):
    x = torch.randn(2, 3, 64, 48)
    both = model(x, both=True)
    assert both.shape == (2, 2 * NUM_CLASSES, 64, 48)
    torch.testing.assert_close(both[:, NUM_CLASSES:], model(x))
    assert not torch.allclose(both[:, :NUM_CLASSES], both[:, NUM_CLASSES:])


# Learning -------------------------------------------------------------------------------------------------------


def test_overfits_a_tiny_batch():
    """Each class is a solid colour block; the model must learn to label the blocks."""
    torch.manual_seed(0)
    masks = torch.zeros(2, 64, 96, dtype=torch.long)
    masks[0, :32, :48], masks[0, 32:, 48:] = 1, 2
    masks[1, 16:48, 16:80], masks[1, :16, :] = 3, 1
    colours = torch.randn(NUM_CLASSES, 3)
    images = colours[masks].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 64, 96)  # [2, 3, 64, 96]

    model = tiny_segmenter(drop_path_rate=0.0, dropout=0.0).train()
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay=0.0), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # mask_norm keeps logits at unit scale until its gain grows, so the loss falls fast but not to ~0 in 30 steps.
    assert losses[-1] < 0.4 * losses[0], losses
    accuracy = (model.eval()(images).argmax(1) == masks).float().mean()
    assert accuracy > 0.9


# The phase-2 backbone variants (configs/backbones/, layered over a recipe) and the inputs their weights expect.
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
VARIANTS = {
    "vit_s_21k.yaml": ("VisionTransformer", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    "dinov2_s.yaml": ("VisionTransformer", IMAGENET),
    "eva02_s.yaml": ("Eva", CLIP),
}
TINY_OVERRIDES = ["seg_model.pretrained=false", "seg_model.embed_dim=32", "seg_model.depth=2",
                  "seg_model.num_heads=2", "seg_model.d_model=32", "seg_model.img_size=64"]


def variant_config(name: str):
    from pathlib import Path

    from weaktr.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    return load_config([configs / "voc12.yaml", configs / "backbones" / name], TINY_OVERRIDES)


def test_every_backbone_variant_is_tested():
    from pathlib import Path

    shipped = {p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "backbones").glob("*.yaml")}
    assert shipped == set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_backbone_variant_trains_at_16_px_patches_with_its_own_normalization(variant):
    """A tiny (random weights) build of each documented phase-2 backbone from its config: the backbone's own
    normalization, 16-px patches, a forward and backward pass at a non-square size, fused and explicit attention
    alike, and a rebuild from its checkpoint arch giving the same logits."""
    from weaktr.models.build import build_segmenter, rebuild

    kind, normalization = VARIANTS[variant]
    cfg = variant_config(variant)
    model = build_segmenter(cfg, NUM_CLASSES - 1)
    assert type(model.encoder).__name__ == kind and model.normalization == normalization
    assert model.patch_size == (16, 16)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 80)  # a 3 x 5 grid; the stored positions are 4 x 4
    logits = model(images)
    assert logits.shape == (2, NUM_CLASSES, 48, 80)
    logits.square().mean().backward()
    first = [model.encoder.patch_embed.proj.weight, *model.encoder.blocks[0].attn.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first)  # through the whole encoder

    model.eval()
    explicit_model = rebuild("seg", model.arch | {"fused_attn": False}, model.state_dict())
    attention = [m for m in explicit_model.encoder.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == 2 and not any(m.fused_attn for m in attention)  # the switch reached every block
    with torch.no_grad():
        torch.testing.assert_close(explicit_model(images), model(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant, layout", [("dinov2_s.yaml", "timm"), ("eva02_s.yaml", "timm"),
                                             ("eva02_s.yaml", "EVA-02 MIM release")])
def test_14_px_weights_load_into_the_16_px_encoder_as_the_official_code_loads_them(variant, layout, tmp_path):
    """DINOv2's and EVA-02's released weights have 14-px patch embeddings: a local weights file of that layout
    (a tiny one, random) loads into the 16-px encoder, its patch embedding resampled and every other tensor as it is,
    the final norm included (timm's Eva keeps it as fc_norm; the EVA-02 MIM release as norm, beside its mask
    token)."""
    import safetensors.torch
    import timm

    from weaktr.models.build import build_segmenter
    from weaktr.models.segmenter import final_norm

    cfg = variant_config(variant)
    torch.manual_seed(1)
    released = timm.create_model(cfg.seg_model.backbone, pretrained=False, num_classes=0, img_size=56,
                                 embed_dim=32, depth=2, num_heads=2)  # 14-px patches, a 4 x 4 grid
    assert released.patch_embed.patch_size == (14, 14)
    state = {k: v.contiguous() for k, v in released.state_dict().items()}
    norm = final_norm(released).weight
    if layout == "EVA-02 MIM release":
        state = {k.replace("fc_norm.", "norm."): v for k, v in state.items()} | {"mask_token": torch.zeros(1, 1, 32)}
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    cfg.seg_model.weights_path = str(tmp_path / "weights.safetensors")
    encoder = build_segmenter(cfg, NUM_CLASSES - 1).encoder
    assert encoder.patch_embed.proj.weight.shape[-2:] == (16, 16)
    torch.testing.assert_close(final_norm(encoder).weight, norm)
    loaded = encoder.state_dict()
    for key in ("blocks.1.norm1.weight", "cls_token"):
        torch.testing.assert_close(loaded[key], state[key])
