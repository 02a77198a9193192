"""The pseudo-label pipeline (weaktr.pseudo): batched multi-scale CAMs, the Ray Data job on the shared Ray head,
failures, checkpoint checks, the background sweep and kill-and-resume."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from job_helpers import load_job
from PIL import Image

from weaktr import ops
from weaktr.checkpoint import CheckpointMismatch, save_checkpoint
from weaktr.config import Config
from weaktr.data.shards import Manifest
from weaktr.data.stream import FailureTracker, iter_samples
from weaktr.data.synthetic import SyntheticSpec, write_synthetic
from weaktr.metrics import ConfusionMatrix, parse_sweep
from weaktr.models.cam import WeakTrCAM
from weaktr.models.inference import multiscale_cams
from weaktr.pseudo import load_cam_model, run_pseudo_labels
from weaktr.pseudo.run import PseudoLabelError

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
TINY = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0, reduction=2, feat_reduction=2)
BROKEN_KEY, UNLABELED_KEY = "broken_000", "unlabeled_000"
SWEEP = "0.30:0.60:0.02"


def tiny_model(num_classes: int = NUM_CLASSES, seed: int = 0) -> WeakTrCAM:
    torch.manual_seed(seed)
    return WeakTrCAM(num_classes, **TINY).eval()


def _rewrite_shard(path: str, insert_at: int, extra: dict) -> None:
    raws = [{k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
            for raw in wds.tarfile_samples([{"url": path}])]
    raws.insert(insert_at, extra)
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as writer:
        for raw in raws:
            writer.write(raw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Manifest:
    """20 synthetic samples in 5 shards, plus an undecodable sample (shard 1) and one without labels (shard 3)."""
    root = tmp_path_factory.mktemp("pseudo") / "data"
    spec = SyntheticSpec(num_classes=NUM_CLASSES, num_train=20, num_val=0, min_size=48, max_size=64,
                         samples_per_shard=4, seed=3)
    manifest = write_synthetic(root, spec)
    paths = manifest.shard_paths("train")
    _rewrite_shard(paths[1], 1, {"__key__": BROKEN_KEY, "png": b"\x89PNG not really", "labels.json": b"[0]"})
    image = Image.new("RGB", (48, 48), (120, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _rewrite_shard(paths[3], 2, {"__key__": UNLABELED_KEY, "png": buffer.getvalue(), "labels.json": b"[]"})
    split = manifest.splits["train"]
    split.shard_sizes[1] += 1
    split.shard_sizes[3] += 1
    split.num_samples += 2
    manifest.save()
    return manifest


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory) -> str:
    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "cam"
    save_checkpoint(path, kind="cam", model_state=model.state_dict(), arch=model.arch, classes=dataset.classes,
                    config={}, epoch=0)
    return str(path)


def pseudo_overrides(dataset: Manifest, out_dir: Path) -> dict:
    return {
        "data.root": dataset.root, "data.synthetic.enabled": False, "pseudo.out_dir": str(out_dir),
        "pseudo.batch_size": 3, "pseudo.save_cams": True, "pseudo.overlay_samples": 6, "pseudo.sweep_bg": SWEEP,
        "pseudo.cam_actors": 1, "pseudo.crf_actors": 1, "pseudo.scales": [1.0, 1.2],
    }


def make_config(overrides: dict) -> Config:
    cfg = Config()
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, value)
    return cfg


@pytest.fixture(scope="module")
def reference_run(dataset, checkpoint, ray_session, tmp_path_factory):
    """One uninterrupted in-process run on the shared Ray head: (out_dir, report)."""
    out_dir = tmp_path_factory.mktemp("out") / "pseudo"
    report = run_pseudo_labels(make_config(pseudo_overrides(dataset, out_dir)), checkpoint)
    return out_dir, report


def good_samples(dataset: Manifest):
    """The decodable samples (the planted broken one is skipped; the unlabeled one decodes but has no labels)."""
    samples = iter_samples(dataset.shard_paths("train"), tracker=FailureTracker(max_failure_fraction=1.0))
    return [s for s in samples if s.labels]


# --------------------------------------------------------------------------------------------------------------


def test_batched_multiscale_cams_match_the_reference_loop():
    model = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    # Two same-size images (one forward group), a non-square one, one that rounds to the same grid at 1.0 only.
    sizes = [(48, 64), (48, 64), (70, 41), (50, 66), (33, 90)]
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
    for scales, flip in (([1.0, 1.2], True), ([0.8], False)):
        batched = multiscale_cams(model, images, scales, flip, patch_size=16)
        reference = multiscale_cams(model, images, scales, flip, patch_size=16, reference=True)
        for image, a, b in zip(images, batched, reference):
            assert a.shape == b.shape == (NUM_CLASSES, *image.shape[:2])
            scale = b.abs().max().item()
            assert scale > 0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
    # Only each image's present classes, two images per forward (a same-shape group split): the reference's maps of
    # those classes, and the CAM labels the reference's all-class maps give.
    present = [[0, 2], [1], [0, 1, 2], [2], [1, 2]]
    kept = multiscale_cams(model, images, [1.0, 1.2], True, patch_size=16, classes=present, max_batch=2)
    full = multiscale_cams(model, images, [1.0, 1.2], True, patch_size=16, reference=True)
    for classes, a, b in zip(present, kept, full):
        torch.testing.assert_close(a, b[classes], rtol=1e-5, atol=1e-5 * b.abs().max().item())
        ids = torch.tensor([0] + [c + 1 for c in classes])
        assert torch.equal(ids[ops.cam_to_label(a, range(len(classes)), 0.4)], ops.cam_to_label(b, classes, 0.4))
    # Flipping the input mirrors the flip-averaged CAM (a check that un-flipping happened).
    mirrored = multiscale_cams(model, [images[0][:, ::-1].copy()], [1.0], True, patch_size=16)[0]
    original = multiscale_cams(model, [images[0]], [1.0], True, patch_size=16)[0]
    torch.testing.assert_close(mirrored.flip(-1), original, rtol=1e-4, atol=1e-5 * original.abs().max().item())


@pytest.mark.parametrize("attention_type, refine", [("patchcam", False), ("cross", True), ("fused", False)])
def test_multiscale_cams_other_readouts(attention_type, refine):
    """The pseudo.attention_type / patch_attn_refine readouts reach the CAM pass: each equals the readout of the
    model's own outputs, upsampled and summed over the flips, and differs from the default fine CAM."""
    from weaktr.models.inference import _scaled_input, read_cam

    model = tiny_model(seed=2)
    image = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    got = multiscale_cams(model, [image], [1.0], True, 16, reference=True, attention_type=attention_type,
                          refine=refine)[0]
    x = _scaled_input(image, 1.0, 16, model.normalization)[None]
    with torch.no_grad():
        cams = read_cam(model(torch.cat([x, x.flip(-1)])), attention_type, refine)  # [2, C, 3, 4]
    up = torch.nn.functional.interpolate(cams, size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, up[0] + up[1].flip(-1))
    default = multiscale_cams(model, [image], [1.0], True, 16, reference=True)[0]
    assert not torch.allclose(got / got.max(), default / default.max(), atol=1e-3)


def test_parse_sweep():
    thresholds = parse_sweep("0.30:0.60:0.01")
    assert len(thresholds) == 31 and thresholds[0] == 0.3 and thresholds[-1] == 0.6 and 0.43 in thresholds
    assert parse_sweep(None) is None
    for bad in ("0.3:0.6", "0.6:0.3:0.01", "a:b:c", "0.3:0.6:0"):
        with pytest.raises(ValueError, match="pseudo.sweep_bg"):
            parse_sweep(bad, key="pseudo.sweep_bg")


def test_mismatched_checkpoint_is_refused_before_any_work(dataset, tmp_path):
    other = tiny_model(num_classes=4)
    wrong_classes = tmp_path / "other"
    save_checkpoint(wrong_classes, kind="cam", model_state=other.state_dict(), arch=other.arch,
                    classes=["a", "b", "c", "d"], config={}, epoch=0)
    out_dir = tmp_path / "out"
    cfg = make_config(pseudo_overrides(dataset, out_dir))
    with pytest.raises(CheckpointMismatch, match="classes"):
        run_pseudo_labels(cfg, str(wrong_classes))  # no Ray needed: refused before the pipeline starts
    assert not out_dir.exists()

    model = tiny_model()
    wrong_kind = tmp_path / "seg"
    save_checkpoint(wrong_kind, kind="seg", model_state=model.state_dict(), arch=model.arch,
                    classes=dataset.classes, config={}, epoch=0)
    with pytest.raises(CheckpointMismatch, match="'seg' checkpoint"):
        load_cam_model(wrong_kind, dataset.classes)
    wrong_arch = tmp_path / "arch"
    save_checkpoint(wrong_arch, kind="cam", model_state=model.state_dict(), arch={**model.arch, "depth": 3},
                    classes=dataset.classes, config={}, epoch=0)
    with pytest.raises(CheckpointMismatch, match="weights do not fit"):
        load_cam_model(wrong_arch, dataset.classes)


def test_null_threshold_takes_the_checkpoints_and_is_refused_without_one(dataset, checkpoint, tmp_path):
    from weaktr.pseudo.run import checkpoint_threshold

    cfg = make_config(pseudo_overrides(dataset, tmp_path / "out") | {"pseudo.bg_threshold": None})
    with pytest.raises(PseudoLabelError, match="pseudo.bg_threshold is null"):  # saved without metrics
        run_pseudo_labels(cfg, checkpoint)  # refused before Ray is needed
    assert not (tmp_path / "out").exists()
    assert checkpoint_threshold({"metrics": {"cam_bg_threshold": 0.26}}, "ckpt") == 0.26


def test_pipeline_labels_every_sample_and_reports_quality(reference_run, dataset):
    out_dir, report = reference_run
    samples = good_samples(dataset)
    assert len(samples) == 20

    # Every valid sample has its pseudo-label, in the new shards (phase 2 input) and as a palette PNG.
    out = Manifest.load(out_dir)
    assert out.classes == dataset.classes
    assert out.splits["train"].shards == dataset.splits["train"].shards  # names mirror the input shards
    labelled = {s.key: s for s in iter_samples(out.shard_paths("train"))}
    assert sorted(labelled) == sorted(s.key for s in samples)
    for sample in samples:
        new = labelled[sample.key]
        assert np.array_equal(new.image, sample.image) and np.array_equal(new.mask, sample.mask)
        assert new.labels == sample.labels
        ids = set(np.unique(new.pseudo).tolist())
        assert ids <= {0, *(c + 1 for c in sample.labels)}
        with Image.open(out_dir / "pseudo_png" / f"{sample.key}.png") as png:
            assert png.mode == "P" and np.array_equal(np.array(png), new.pseudo)
        cams = np.load(out_dir / "cams" / f"{sample.key}.npy")
        assert cams.shape == (len(sample.labels), *sample.image.shape[:2]) and cams.dtype == np.float32

    # Overlays for the first 6 samples of the split that could be used (index 5 in split order is the broken one).
    assert len(list((out_dir / "overlays").glob("*.jpg"))) == 5

    # Failures are listed, the rest went on.
    failures = [json.loads(line) for line in (out_dir / "failures.jsonl").read_text().splitlines()]
    by_key = {f["key"]: f for f in failures}
    assert set(by_key) == {BROKEN_KEY, UNLABELED_KEY}
    assert by_key[BROKEN_KEY]["shard"] == "train-000001.tar" and "decode" in by_key[BROKEN_KEY]["reason"]
    assert "no labels" in by_key[UNLABELED_KEY]["reason"]

    # Quality report from confusion matrices over all pixels with GT.
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["num_samples"] == 20 and saved["num_failures"] == 2
    for stage in ("cam", "crf"):
        assert 0 <= saved[stage]["miou"] <= 1
        assert set(saved[stage]["per_class"]) == {"background", *dataset.classes}
        assert {"iou", "precision", "recall"} <= set(saved[stage]["per_class"]["background"])
    crf_cm = ConfusionMatrix(NUM_CLASSES + 1)
    for sample in samples:
        crf_cm.update(labelled[sample.key].pseudo, sample.mask)
    assert saved["crf"]["miou"] == pytest.approx(crf_cm.miou(), abs=1e-12)
    assert report["run"]["shards_processed"] == 5 and report["run"]["shards_skipped"] == 0


def test_sweep_best_threshold_matches_brute_force(reference_run, dataset):
    out_dir, report = reference_run
    thresholds = parse_sweep(SWEEP)
    matrices = {t: ConfusionMatrix(NUM_CLASSES + 1) for t in thresholds + [0.43]}
    for sample in good_samples(dataset):
        present = torch.from_numpy(np.load(out_dir / "cams" / f"{sample.key}.npy"))  # normalized [P, H, W]
        cams = torch.zeros(NUM_CLASSES, *present.shape[1:])
        cams[sample.labels] = present
        for t, cm in matrices.items():
            cm.update(ops.cam_to_label(cams, sample.labels, t), sample.mask)
    curve = [matrices[t].miou() for t in thresholds]
    best = thresholds[int(np.argmax(curve))]
    assert report["sweep"]["best_threshold"] == pytest.approx(best)
    assert report["sweep"]["best_miou"] == pytest.approx(max(curve), abs=1e-12)
    assert [m for _, m in report["sweep"]["curve"]] == pytest.approx(curve, abs=1e-12)
    assert report["cam"]["miou"] == pytest.approx(matrices[0.43].miou(), abs=1e-12)  # the CAM labels themselves
    lines = (out_dir / "bg_sweep.csv").read_text().splitlines()
    assert lines[0] == "bg_threshold,miou" and len(lines) == len(thresholds) + 1
    assert (out_dir / "bg_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_crf_on_the_cam_actors_with_the_torch_backend_gives_the_pools_pseudo_labels(
    reference_run, dataset, checkpoint, tmp_path,
):
    """crf.backend torch run inside the CAM actor (no CRF pool; on a GPU node it runs on the GPU) against the
    reference run's CRF pool: the same CAM labels, pseudo-labels that agree on >= 99% of the pixels (both
    backends approximate the same CRF; test_crf has the kernel-level comparison)."""
    reference_dir, reference = reference_run
    out_dir = tmp_path / "pseudo"
    overrides = pseudo_overrides(dataset, out_dir) | {"pseudo.crf_in_cam_actors": True}
    cfg = make_config(overrides)
    cfg.pseudo.crf = replace(cfg.pseudo.crf, backend="torch")
    cfg.tracking.backend, cfg.tracking.uri = "mlflow", str(tmp_path / "mlflow")
    report = run_pseudo_labels(cfg, checkpoint)
    assert json.loads((out_dir / "run_config.json").read_text())["settings"]["crf"]["backend"] == "torch"
    # Tracked: the pseudo-labels' mIoU and the background-threshold curve (test_tracking.py has the readers).
    from test_tracking import metric_steps, mlflow_runs

    (run,) = mlflow_runs(tmp_path / "mlflow", cfg.run.name)
    assert run.info.run_name == "pseudo" and run.data.metrics["crf.miou"] == pytest.approx(report["crf"]["miou"])
    curve = metric_steps(tmp_path / "mlflow", run.info.run_id, "sweep_mIoU")
    assert [step for step, _ in curve] == [round(t * 100) for t, m in report["sweep"]["curve"] if m is not None]
    assert report["cam"] == reference["cam"]
    same = total = 0
    for png in sorted((reference_dir / "pseudo_png").glob("*.png")):
        ours, theirs = np.array(Image.open(out_dir / "pseudo_png" / png.name)), np.array(Image.open(png))
        same, total = same + int((ours == theirs).sum()), total + ours.size
    assert total and same / total >= 0.99, same / total
    assert abs(report["crf"]["miou"] - reference["crf"]["miou"]) <= 0.003

    cfg.pseudo.crf = replace(cfg.pseudo.crf, backend="pydensecrf")
    installed = importlib.util.find_spec("pydensecrf") is not None
    refusal = "pseudo.crf_in_cam_actors needs pseudo.crf.backend: torch" if installed else "pydensecrf, which is not"
    with pytest.raises(PseudoLabelError, match=refusal):
        run_pseudo_labels(cfg, checkpoint)


def test_killed_run_resumes_to_identical_outputs(reference_run, dataset, checkpoint, ray_session, tmp_path, capsys):
    reference_dir, _ = reference_run
    out_dir = tmp_path / "pseudo"
    overrides = pseudo_overrides(dataset, out_dir) | {"run.storage_path": str(tmp_path / "runs")}
    command = [sys.executable, str(ROOT / "ray_jobs" / "make_pseudo_labels.py"), "--checkpoint", checkpoint]
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "RAY_ADDRESS": ray_session[0], "OMP_NUM_THREADS": "1"}
    stats_dir = out_dir / "stats"

    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (stats_dir.exists() and any(stats_dir.glob("*.json"))):
        assert first.poll() is None, "the job ended before finishing a shard"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = sorted(p.name for p in stats_dir.glob("*.json"))
    assert 1 <= len(done) < 5, f"the kill should land mid-run, {len(done)} of 5 shards were done"
    finished = [out_dir / name.removesuffix(".json") for name in done] + [stats_dir / name for name in done]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    (out_dir / "train-000004.tar.tmp").write_bytes(b"half a shard")  # as a crash mid-commit leaves it

    # Resumed in this process (on the same head): the job's main, as its command line runs it.
    assert load_job("make_pseudo_labels").main([*command[2:], "--resume"]) == 0
    assert f"skipped {len(done)} finished shards" in capsys.readouterr().err  # the job's log line
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == before  # not recomputed

    resumed, reference = _tree(out_dir), _tree(reference_dir)
    assert sorted(resumed) == sorted(reference)  # no stale temp files, nothing missing
    assert [name for name in reference if resumed[name] != reference[name]] == []


def test_phase1_cam_miou_scores_the_first_masked_samples_of_its_split(tmp_path):
    """evaluate_cam_miou (phase 1's per-epoch metric) outside Ray: the same sweep as scoring the first N samples
    by hand, a different figure for other samples, and a missing split named by its config key."""
    from weaktr.config import load_config
    from weaktr.data.shards import DataError
    from weaktr.data.stream import iter_samples
    from weaktr.launch import prepare_data
    from weaktr.metrics import BackgroundSweep, normalize_cams
    from weaktr.models.build import build_cam_model as build_model
    from weaktr.train.cam_loop import evaluate_cam_miou

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.root={tmp_path / 'data'}", "train.cam_eval.samples=6"])
    manifest = prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, len(manifest.classes)).eval()
    miou, threshold = evaluate_cam_miou(model, manifest, cfg, 0, 1, torch.device("cpu"))

    sweep = BackgroundSweep(parse_sweep(cfg.train.cam_eval.sweep), len(manifest.classes))
    samples = [s for _, s in zip(range(6), iter_samples(manifest.shard_paths("train")))]
    for sample, cam in zip(samples, multiscale_cams(model, [s.image for s in samples], [1.0], True, 16)):
        sweep.update(normalize_cams(cam, sample.labels), sample.labels, sample.mask)
    assert (threshold, miou) == pytest.approx(sweep.best())
    cfg.train.cam_eval.split = "val"
    assert evaluate_cam_miou(model, manifest, cfg, 0, 1, torch.device("cpu"))[0] != pytest.approx(miou)
    cfg.train.cam_eval.split = "nope"
    with pytest.raises(DataError, match="train.cam_eval.split.*'nope'"):
        evaluate_cam_miou(model, manifest, cfg, 0, 1, torch.device("cpu"))


def test_phase1_cam_eval_ranks_read_disjoint_shares_of_the_first_samples(tmp_path):
    """Each rank decodes only its shards; together the ranks score exactly the split's first N samples. A split the
    dataset lacks is refused by fit() on the driver, before any worker trains an epoch."""
    from weaktr.config import ConfigError, load_config
    from weaktr.data.shards import DataError
    from weaktr.launch import prepare_data
    from weaktr.train.cam_loop import cam_eval_samples, fit

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.root={tmp_path / 'data'}"])
    manifest = prepare_data(cfg)
    first = [s.key for s in iter_samples(manifest.shard_paths("train"))]
    for limit in (0, 100, 20):  # shards hold 64 samples: 20 lie in one shard, so one rank reads them all
        shares = [[s.key for s in cam_eval_samples(manifest, "train", limit, rank, 2)] for rank in (0, 1)]
        assert not set(shares[0]) & set(shares[1]) and (all(shares) or limit == 20)
        assert sorted(shares[0] + shares[1]) == sorted(first[:limit] if limit else first)
    cfg.train.cam_eval.split = "nope"
    with pytest.raises(DataError, match="train.cam_eval.split.*'nope'"):
        fit(cfg)
    cfg.train.cam_eval.split, cfg.train.cam_eval.sweep = "train", "0.6:0.4:0.1"
    with pytest.raises(ConfigError, match="train.cam_eval.sweep"):
        fit(cfg)


def test_a_row_delivered_twice_does_not_complete_its_shard_early():
    """Ray Data retries the tasks of an actor that died (a lost node): a row may reach the driver twice. Counted
    twice, a shard of three images looked complete after two and was committed without the third."""
    from weaktr.pseudo.outputs import _ShardResult

    def row(kind: str, index: int, reason: str = "") -> dict:
        return {"kind": kind, "index": index, "key": f"k{index}", "reason": reason, "pseudo": b"", "pseudo_color": b"",
                "cams": b"", "overlay": b"", "cam_cm": b"", "crf_cm": b"", "sweep": b""}

    shard = _ShardResult(total=3, num_classes=NUM_CLASSES, num_thresholds=0)
    assert not shard.add(row("sample", 0))
    assert not shard.add(row("sample", 0))  # again
    assert not shard.add(row("failure", 1, "cannot decode"))
    assert not shard.add(row("failure", 1, "cannot decode"))  # again
    assert shard.add(row("sample", 2))
    assert sorted(shard.files) == [0, 2] and len(shard.failures) == 1
