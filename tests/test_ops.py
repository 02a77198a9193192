"""weaktr.ops against direct loop implementations of SPEC.md's equations."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from weaktr import ops


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- fuse_attention


def _fuse_attention_loop(attn, weights):
    B, L, T, _ = attn.shape
    out = torch.zeros(B, T, T, dtype=torch.float64)
    for b in range(B):
        for layer in range(L):
            out[b] += weights[b, layer].double() * attn[b, layer].double()
    return out / L


@pytest.mark.parametrize("B, L, T", [(1, 1, 1), (2, 4, 7), (3, 72, 20), (2, 6, 33)])
def test_fuse_attention_matches_loop(B, L, T):
    g = _generator(B * 1000 + L * 10 + T)
    attn = torch.rand(B, L, T, T, generator=g).softmax(-1)
    weights = torch.rand(B, L, generator=g)
    assert_close(ops.fuse_attention(attn, weights), _fuse_attention_loop(attn, weights).float())


def test_fuse_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights"):
        ops.fuse_attention(torch.rand(2, 4, 5, 5), torch.rand(2, 3))
    with pytest.raises(ValueError, match="attn"):
        ops.fuse_attention(torch.rand(2, 4, 5, 6), torch.rand(2, 4))


# ---------------------------------------------------------------- refine_cam


def _refine_cam_loop(coarse_cam, fused, attention_type="fused", refine=True):
    """G_c = PA . vec(CA_c * relu(M_c)), one image and one class at a time; the official readouts
    (engine.py: cams = CA * M, M or CA by --attention-type, then PA @ cams with --patch-attn-refine)."""
    B, C, h, w = coarse_cam.shape
    out = torch.zeros(B, C, h, w, dtype=torch.float64)
    for b in range(B):
        patch_attn = fused[b, C:, C:].double()  # [N, N]
        for c in range(C):
            cross_attn = fused[b, c, C:].double().reshape(h, w)
            activation = coarse_cam[b, c].double().clamp(min=0)
            cam = {"fused": cross_attn * activation, "patchcam": activation, "cross": cross_attn}[attention_type]
            v = cam.reshape(-1)  # vec(), row-major over (h, w)
            out[b, c] = (patch_attn @ v if refine else v).reshape(h, w)
    return out


@pytest.mark.parametrize("B, C, h, w", [(1, 1, 1, 1), (2, 3, 4, 4), (3, 5, 3, 7), (2, 20, 6, 2), (1, 4, 14, 14)])
def test_refine_cam_matches_loop(B, C, h, w):
    g = _generator(B + 10 * C + 100 * h + 1000 * w)
    T = C + h * w
    fused = torch.rand(B, T, T, generator=g).softmax(-1)
    coarse_cam = torch.randn(B, C, h, w, generator=g)  # negative values: relu must matter
    assert_close(ops.refine_cam(coarse_cam, fused), _refine_cam_loop(coarse_cam, fused).float())


@pytest.mark.parametrize("attention_type", ops.ATTENTION_TYPES)
@pytest.mark.parametrize("refine", [True, False])
def test_attention_cam_matches_loop(attention_type, refine):
    g = _generator(7)
    B, C, h, w = 2, 3, 4, 5
    fused = torch.rand(B, C + h * w, C + h * w, generator=g).softmax(-1)
    coarse_cam = torch.randn(B, C, h, w, generator=g)
    want = _refine_cam_loop(coarse_cam, fused, attention_type, refine).float()
    assert_close(ops.attention_cam(coarse_cam, fused, attention_type, refine), want)
    if (attention_type, refine) == ("fused", True):
        assert_close(ops.refine_cam(coarse_cam, fused), want)


def test_attention_cam_rejects_unknown_type():
    with pytest.raises(ValueError, match="attention_type"):
        ops.attention_cam(torch.rand(1, 2, 2, 2), torch.rand(1, 6, 6), "patch")


def test_refine_cam_ignores_negative_coarse_activations():
    g = _generator(0)
    fused = torch.rand(2, 3 + 12, 3 + 12, generator=g)
    coarse_cam = torch.randn(2, 3, 3, 4, generator=g)
    assert_close(ops.refine_cam(coarse_cam, fused), ops.refine_cam(coarse_cam.clamp(min=0), fused))
    assert not torch.equal(ops.refine_cam(coarse_cam, fused), ops.refine_cam(coarse_cam.abs(), fused))


def test_refine_cam_rejects_token_count_mismatch():
    with pytest.raises(ValueError, match="T = C \\+ h\\*w"):
        ops.refine_cam(torch.rand(1, 3, 4, 4), torch.rand(1, 18, 18))


# ---------------------------------------------------------------- gradient_clipping_loss


def _clipping_loop(pixel_loss, valid, start_value, patch_size):
    """SPEC's gradient-clipping loss, region by region in numpy (float64): the map and the 0/1 gradient mask."""
    loss = pixel_loss.detach().double().numpy()
    valid = valid.numpy()
    B, H, W = loss.shape
    out, grad = np.zeros_like(loss), np.zeros_like(loss)
    if not valid.any():
        return out, grad
    mean_loss = loss[valid].mean()
    if mean_loss > start_value:
        out[valid], grad[valid] = loss[valid], 1.0
        return out, grad
    for top in range(0, H, patch_size):
        for left in range(0, W, patch_size):
            region = (slice(None), slice(top, top + patch_size), slice(left, left + patch_size))
            region_valid = valid[region]
            values = loss[region][region_valid]
            tau = max(values.mean(), mean_loss) if values.size else mean_loss
            out[region] = np.where(region_valid, np.minimum(loss[region], tau), 0.0)
            grad[region] = np.where(region_valid & (loss[region] <= tau), 1.0, 0.0)
    return out, grad


def _check_clipping(pixel_loss, valid, start_value, patch_size):
    pixel_loss = pixel_loss.clone().requires_grad_(True)
    out = ops.gradient_clipping_loss(pixel_loss, valid, start_value, patch_size)
    out.sum().backward()
    want, want_grad = _clipping_loop(pixel_loss, valid, start_value, patch_size)
    assert_close(out.detach(), torch.from_numpy(want).float())
    assert_close(pixel_loss.grad, torch.from_numpy(want_grad).float())
    return want_grad


@pytest.mark.parametrize(
    "B, H, W, P",
    [(1, 8, 8, 4), (2, 10, 13, 4), (3, 7, 5, 3), (2, 17, 9, 16), (4, 6, 6, 1), (2, 5, 7, 8)],
)
def test_gradient_clipping_matches_region_loop(B, H, W, P):
    g = _generator(B + 10 * H + 100 * W + 1000 * P)
    pixel_loss = torch.rand(B, H, W, generator=g) * 3
    valid = torch.rand(B, H, W, generator=g) > 0.2
    grad = _check_clipping(pixel_loss, valid, start_value=100.0, patch_size=P)
    if P > 1:  # a 1x1 region's threshold is its own loss (or mu), so nothing clips there
        assert (grad[valid.numpy()] == 0).any(), "the clipping branch should clip some pixels"


def test_gradient_clipping_warm_up_returns_plain_loss():
    g = _generator(1)
    pixel_loss = torch.rand(2, 9, 11, generator=g) * 3
    valid = torch.rand(2, 9, 11, generator=g) > 0.3
    mean_loss = pixel_loss[valid].mean().item()
    grad = _check_clipping(pixel_loss, valid, start_value=mean_loss - 0.01, patch_size=4)
    assert (grad == valid.numpy()).all()
    out = ops.gradient_clipping_loss(pixel_loss, valid, start_value=mean_loss - 0.01, patch_size=4)
    assert_close(out, torch.where(valid, pixel_loss, 0))


def test_gradient_clipping_region_without_valid_pixels_uses_mean():
    g = _generator(2)
    pixel_loss = torch.rand(2, 8, 12, generator=g) * 3
    valid = torch.rand(2, 8, 12, generator=g) > 0.1
    valid[:, :4, 4:8] = False  # one 4x4 region empty in every image
    pixel_loss[:, :4, 4:8] = 50.0  # ignored values must not enter any mean
    _check_clipping(pixel_loss, valid, start_value=100.0, patch_size=4)


def test_gradient_clipping_threshold_is_shared_across_the_batch():
    # Image 0 has low loss, image 1 high loss in the same region: one region threshold for both images.
    pixel_loss = torch.stack([torch.full((4, 4), 0.5), torch.full((4, 4), 1.5)])
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    out = ops.gradient_clipping_loss(pixel_loss, valid, start_value=100.0, patch_size=4)
    assert_close(out[1], torch.full((4, 4), 1.0))  # tau = max(mean 1.0, mu 1.0)
    assert_close(out[0], pixel_loss[0])


def test_gradient_clipping_ignores_non_finite_values_at_ignored_pixels():
    pixel_loss = torch.rand(2, 6, 6, generator=_generator(3))
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, 0, 0] = False
    pixel_loss[0, 0, 0] = float("inf")
    _check_clipping(pixel_loss, valid, start_value=100.0, patch_size=4)


def test_gradient_clipping_no_valid_pixels_gives_zeros():
    pixel_loss = torch.rand(2, 5, 5, requires_grad=True)
    valid = torch.zeros(2, 5, 5, dtype=torch.bool)
    out = ops.gradient_clipping_loss(pixel_loss, valid, start_value=1.2, patch_size=2)
    assert torch.equal(out, torch.zeros(2, 5, 5))
    out.sum().backward()  # still differentiable: a batch of ignored pixels must not break the step
    assert torch.equal(pixel_loss.grad, torch.zeros(2, 5, 5))


def test_gradient_clipping_rejects_bad_input():
    with pytest.raises(ValueError, match="valid"):
        ops.gradient_clipping_loss(torch.rand(1, 4, 4), torch.ones(1, 4, 4), 1.2, 2)
    with pytest.raises(ValueError, match="patch_size"):
        ops.gradient_clipping_loss(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), 1.2, 0)


# ---------------------------------------------------------------- cam_to_label


def _cam_to_label_loop(cams, present, bg_threshold):
    cams = cams.double().numpy()
    C, H, W = cams.shape
    normalized = {}
    for c in present:
        lo, hi = cams[c].min(), cams[c].max()
        normalized[c] = (cams[c] - lo) / (hi - lo) if hi > lo else np.zeros((H, W))
    labels = np.zeros((H, W), dtype=np.int64)
    for y in range(H):
        for x in range(W):
            best_id, best = 0, bg_threshold
            for c in sorted(present):
                if normalized[c][y, x] > best:
                    best_id, best = c + 1, normalized[c][y, x]
            labels[y, x] = best_id
    return torch.from_numpy(labels)


@pytest.mark.parametrize(
    "C, H, W, present, bg",
    [(1, 5, 5, [0], 0.43), (4, 6, 9, [1, 3], 0.43), (20, 7, 4, [0, 5, 19], 0.2), (3, 8, 8, [2], 0.9)],
)
def test_cam_to_label_matches_loop(C, H, W, present, bg):
    cams = torch.randn(C, H, W, generator=_generator(C * H * W))
    cams[[c for c in range(C) if c not in present]] = 100.0  # absent classes must never win
    got = ops.cam_to_label(cams, present, bg)
    assert got.dtype == torch.int64
    assert torch.equal(got, _cam_to_label_loop(cams, present, bg))
    assert set(got.unique().tolist()) <= {0} | {c + 1 for c in present}


def test_cam_to_label_constant_map_and_ties_go_to_background():
    cams = torch.zeros(3, 4, 4)
    cams[1] = 7.0  # constant: normalizes to 0
    cams[2, 0, 0] = 1.0  # normalizes to 1 at (0, 0), 0 elsewhere
    got = ops.cam_to_label(cams, [1, 2], bg_threshold=0.0)
    want = torch.zeros(4, 4, dtype=torch.int64)
    want[0, 0] = 3
    assert torch.equal(got, want)


def test_cam_to_label_no_present_class_is_all_background():
    assert torch.equal(ops.cam_to_label(torch.rand(3, 2, 5), [], 0.4), torch.zeros(2, 5, dtype=torch.int64))


def test_cam_to_label_rejects_unknown_class():
    with pytest.raises(ValueError, match="present"):
        ops.cam_to_label(torch.rand(3, 4, 4), [3], 0.4)
