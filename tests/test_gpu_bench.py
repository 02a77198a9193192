"""Issue 5: bench/gpu_bench.py runs (tiny, CPU), and the optimized paths give the straightforward paths' results.

Already covered elsewhere: WeakTrCAM fused vs explicit attention (tests/test_cam_model.py), Segmenter fused vs
explicit forward in eval mode (tests/test_segmenter.py), the batched CAM pass vs the one-image-at-a-time loop in
float32 (tests/test_pseudo.py). Here: bf16 autocast vs float32, training-mode Segmenter attention paths,
torch.compile vs eager, fused vs default optimizers.

torch.compile runs with backend="aot_eager": the same Dynamo graph capture and AOTAutograd forward/backward split
as the default inductor backend, without inductor's C++ code generation, which takes about a minute per graph on
the 2-core CPU machine (inductor itself is exercised by the bench on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2
from torch.testing import assert_close

from weaktr import ops
from weaktr.config import load_config
from weaktr.models.cam import CamOutput, WeakTrCAM
from weaktr.models.inference import cam_pass, cam_pass_reference
from weaktr.models.segmenter import Segmenter
from weaktr.runtime import fused_optimizer_kwargs, unwrap

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_bench.py"
NUM_CLASSES = 4
TINY_VIT = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0)


def tiny_cam(seed: int = 0, **kwargs) -> WeakTrCAM:
    torch.manual_seed(seed)
    return WeakTrCAM(NUM_CLASSES, **{**TINY_VIT, "reduction": 1, **kwargs})  # reduction 1: no dead gate unit


def tiny_segmenter(seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(NUM_CLASSES + 1, **{**TINY_VIT, "dropout": 0.0, **kwargs})


def random_images(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def clipped_seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel CE through the gradient-clipping loss (start_value high enough that the clipping branch runs)."""
    return ops.segmentation_loss(logits, target, start_value=100.0, patch_size=16)[0]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------------------
# The bench


def test_bench_runs_every_stage_on_cpu_with_tiny_models(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--iters", "2", "--warmup", "1",
               "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device:" in result.stdout and "ms/step" in result.stdout and "vs reference" in result.stdout
    report = json.loads(out.read_text())
    assert report["device"] and report["torch"].startswith(torch.__version__) and report["date"]
    rows = report["rows"]
    assert {row["stage"] for row in rows} == {"phase2", "cam", "crf", "phase1"}
    for stage in ("phase2", "cam", "crf", "phase1"):
        stage_rows = [row for row in rows if row["stage"] == stage]
        assert stage_rows[0]["kind"] == "reference" and stage_rows[0]["ratio"] == pytest.approx(1.0)
        measured = [row for row in stage_rows if row["ms_per_step"] is not None]
        assert len(measured) >= 2, stage  # the reference and at least one optimized row
        for row in measured:
            assert row["ms_per_step"] > 0 and row["images_per_s"] > 0
            assert row["images_per_s"] == pytest.approx(row["batch"] * 1e3 / row["ms_per_step"])
            assert row["ratio"] == pytest.approx(row["images_per_s"] / stage_rows[0]["images_per_s"])
        for row in stage_rows:
            if row["ms_per_step"] is None:  # only the compiled rows, which run on a GPU
                assert "torch.compile" in row["variant"] and row["note"].startswith("skipped"), row
    assert any(row["kind"] == "baseline" and row["ms_per_step"] for row in rows)
    assert [goal["name"].split(":")[0] for goal in report["targets"]] == ["phase 2", "CAM pass", "CRF", "phase 1"]
    assert all(goal["value"] > 0 for goal in report["targets"])


def test_bench_imports_neither_ray_nor_the_data_readers():
    """The GPU machine has only torch and timm: importing the bench must not pull in Ray, webdataset, pydensecrf."""
    probe = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_bench', {str(BENCH)!r})\n"
        "bench = sys.modules['gpu_bench'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(bench)\n"
        "bad = ('ray', 'webdataset', 'pydensecrf', 'weaktr.data', 'weaktr.train', 'weaktr.pseudo')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(bad))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# --------------------------------------------------------------------------------------------------------------
# bf16 autocast vs float32 (CPU autocast: the same bf16 rounding of matmul inputs as on a GPU)


def test_bf16_batched_cam_pass_matches_the_float32_reference_loop():
    model = tiny_cam(seed=2).eval()
    # Two scales; at the first one two images share a shape (one forward) and one does not.
    inputs = [
        [random_images(3, 48, 64, seed=1), random_images(3, 48, 64, seed=2), random_images(3, 64, 48, seed=3)],
        [random_images(3, 64, 80, seed=4), random_images(3, 64, 80, seed=5), random_images(3, 80, 64, seed=6)],
    ]
    sizes = [(50, 70), (45, 60), (70, 50)]
    reference = cam_pass_reference(model, inputs, sizes)  # float32, one image at a time
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = cam_pass(model, inputs, sizes)
    for size, a, b in zip(sizes, batched, reference):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (NUM_CLASSES, *size)
        scale = b.abs().max().item()
        assert scale > 0
        # bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4%); the measured error is ~0.3% of the max.
        assert_close(a, b, rtol=0, atol=2e-2 * scale)


def test_bf16_segmentation_differs_from_float32_only_at_near_ties():
    model = tiny_segmenter(seed=3).eval()
    images = random_images(2, 3, 64, 96, seed=7)
    with torch.no_grad():
        exact = model(images)  # [B, K, H, W]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(images).float()
    scale = exact.abs().max().item()
    assert_close(rounded, exact, rtol=0, atol=5e-2 * scale)
    labels_exact, labels_rounded = exact.argmax(1), rounded.argmax(1)
    assert (labels_exact == labels_rounded).float().mean() > 0.98
    # Where the label changes, float32's best two classes were within the bf16 error of each other.
    top2 = exact.topk(2, dim=1).values  # [B, 2, H, W]
    margin = (top2[:, 0] - top2[:, 1])[labels_exact != labels_rounded]
    assert (margin < 2 * (rounded - exact).abs().max()).all()


def test_bf16_phase1_and_phase2_losses_match_float32():
    cam = tiny_cam(seed=4).train()
    images = random_images(2, 3, 64, 96, seed=8)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    seg = tiny_segmenter(seed=5).train()
    target = torch.randint(0, NUM_CLASSES + 1, (2, 64, 96), generator=torch.Generator().manual_seed(9))
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            cam_loss, _ = cam.loss(cam(images), labels)
            seg_loss = clipped_seg_loss(seg(images), target)
        losses[precision] = (cam_loss.item(), seg_loss.item())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


# --------------------------------------------------------------------------------------------------------------
# Segmenter: fused (SDPA) vs explicit attention in a training step


def test_segmenter_fused_and_explicit_attention_give_the_same_training_step():
    fused = tiny_segmenter(seed=6, fused_attn=True).train()
    explicit = tiny_segmenter(seed=6, fused_attn=False).train()
    explicit.load_state_dict(fused.state_dict())
    # Every attention layer, encoder and decoder, takes the path asked for.
    assert {m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn")} == {True}
    assert {m.fused_attn for m in explicit.modules() if hasattr(m, "fused_attn")} == {False}
    images = random_images(2, 3, 64, 96, seed=10)
    target = torch.randint(0, NUM_CLASSES + 1, (2, 64, 96), generator=torch.Generator().manual_seed(11))
    target[:, :8] = 255
    results = []
    for model in (fused, explicit):
        logits = model(images)
        loss = clipped_seg_loss(logits, target)
        loss.backward()
        results.append((logits, loss, grads(model)))
    (logits_f, loss_f, grads_f), (logits_e, loss_e, grads_e) = results
    assert_close(logits_f, logits_e, rtol=1e-4, atol=1e-5)
    assert_close(loss_f, loss_e)
    assert grads_f.keys() == grads_e.keys() and len(grads_f) == len(list(fused.parameters()))
    for name in grads_f:
        assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------
# torch.compile vs eager


def test_compiled_weaktr_cam_matches_eager_outputs_loss_and_gradients():
    model = tiny_cam(seed=7).train()  # fused_attn=True: SDPA plus probabilities under no_grad inside the graph
    images = random_images(2, 3, 64, 96, seed=12)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        out = forward(images)
        loss, _ = model.loss(out, labels)
        loss.backward()
        results.append((out, loss, grads(model)))
    (out_c, loss_c, grads_c), (out_e, loss_e, grads_e) = results[1], results[0]
    for name in CamOutput._fields:
        assert_close(getattr(out_c, name), getattr(out_e, name), msg=name)
    assert_close(loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_c:
        assert_close(grads_c[name], grads_e[name], msg=name)


def test_compiled_segmenter_matches_eager_and_unwraps_to_the_plain_model():
    model = tiny_segmenter(seed=8).train()
    compiled = torch.compile(model, backend="aot_eager")
    assert unwrap(compiled) is model  # checkpoints save the plain model's state_dict, without "_orig_mod."
    images = random_images(2, 3, 64, 64, seed=13)
    target = torch.randint(0, NUM_CLASSES + 1, (2, 64, 64), generator=torch.Generator().manual_seed(14))
    results = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = forward(images)
        clipped_seg_loss(logits, target).backward()
        results.append((logits, grads(model)))
    assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Fused optimizers and the config switches


def test_fused_optimizer_kwargs_only_on_gpu_and_for_optimizers_with_a_fused_kernel():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read: no GPU needed
    assert fused_optimizer_kwargs("sgd", gpu, True) == {"fused": True}
    assert fused_optimizer_kwargs("adamw", gpu, True) == {"fused": True}
    assert fused_optimizer_kwargs("lookahead_adamw", gpu, True) == {"fused": True}
    assert fused_optimizer_kwargs("lamb", gpu, True) == {}  # timm's own optimizer: no fused kernel
    assert fused_optimizer_kwargs("sgd", gpu, False) == {}
    assert fused_optimizer_kwargs("sgd", cpu, True) == {}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fused_optimizers_give_the_default_updates(opt):
    """torch also has the fused kernels on the CPU, so the GPU switch's claim can be checked here. Both optimizers
    get the same gradients every step (Adam's normalization would amplify rounding differences fed back through
    the forward pass), so this compares the update rule alone: momentum / moment buffers, weight decay groups."""
    models = [tiny_segmenter(seed=9) for _ in range(2)]
    optimizers = [
        create_optimizer_v2(model, opt=opt, lr=1e-2, weight_decay=0.01, momentum=0.9, **kwargs)
        for model, kwargs in zip(models, ({}, fused_optimizer_kwargs(opt, torch.device("cuda"), True)))
    ]
    assert optimizers[0].defaults.get("fused") is None and optimizers[1].defaults["fused"] is True
    g = torch.Generator().manual_seed(17)
    for _ in range(3):
        for name, param in models[0].named_parameters():
            grad = torch.randn(param.shape, generator=g)
            param.grad, models[1].get_parameter(name).grad = grad, grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    start = tiny_segmenter(seed=9)
    plain, fused = (dict(m.named_parameters()) for m in models)
    for name, param in plain.items():
        assert not torch.equal(param, start.get_parameter(name)), name  # every parameter moved
        assert_close(fused[name], param, msg=name)


def test_compile_and_fused_optimizer_switches_in_the_config():
    cfg = load_config(None)
    assert (cfg.train.compile, cfg.train.fused_optimizer) == (False, True)
    assert (cfg.seg_train.compile, cfg.seg_train.fused_optimizer) == (False, True)
    cfg = load_config(None, ["train.compile=true", "seg_train.compile=true", "seg_train.fused_optimizer=false"])
    assert cfg.train.compile and cfg.seg_train.compile and not cfg.seg_train.fused_optimizer
