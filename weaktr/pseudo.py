"""CAMs -> pseudo-labels at cluster scale (SPEC.md, "From CAMs to pseudo-labels"): a Ray Data pipeline.

    shards --read--> chunk rows --CAM actors--> per-image rows --CRF actors--> driver --> per-shard commit

- **read** (Ray tasks, one per input shard): decode every sample once to validate it; broken samples and samples
  without labels become failure rows. Valid samples are sorted by image size and cut into chunks of
  ``pseudo.batch_size`` images, so same-size images share forward passes. A row carries the original encoded image
  bytes, never decoded pixels.
- **CAM** (actor pool, GPU where configured): per chunk, ``multiscale_cams`` (every scale's same-grid images and
  their flips in one forward pass), the CAM label (``ops.cam_to_label``) and, where a GT mask exists, the CAM
  label's confusion matrix and the background-threshold sweep histogram (tiny, sparse): float CAMs never leave
  the actor unless ``save_cams``. Emits one row per image (and per failure).
- **CRF** (CPU actor pool): dense CRF on the CAM label -> pseudo-label (+ its confusion matrix).
- **driver**: collects each shard's rows (every row carries its shard's row count, known after reading) and commits
  the shard once all have arrived: PNGs, overlays, CAM arrays, then the output tar (the input samples copied
  verbatim plus ``{key}.pseudo.png``), each written under a temporary name and renamed, and *last* the shard's
  stats file ``stats/{shard}.json`` (confusion matrices, sweep counts, failures): the shard's "done" marker.

Resuming: shards with a stats file are skipped; stale ``*.tmp`` files are removed at start; a shard that was
half-committed is redone and rewrites the same bytes. The final outputs (manifest.json, failures.jsonl,
report.json, bg_sweep.csv/png) are always rebuilt from all the stats files. Outputs are deterministic: a chunk's
composition depends only on its shard (not on which shards run or how Ray batches rows), so an interrupted and
resumed run writes the same bytes as an uninterrupted one (on the same hardware). ``run_config.json`` records
what the outputs were made from (checkpoint hash, data, settings); resuming with different settings is refused
(use ``overwrite``). One run per output directory at a time.

Output layout (``pseudo.out_dir``)::

    manifest.json, {shard}.tar        a dataset: the split's samples, each with {key}.pseudo.png
    pseudo_png/{key}.png              VOC-palette pseudo-labels
    cams/{key}.npy                    (save_cams) float32 [P, H, W]: normalized CAMs of the image's labels, in order
    overlays/{key}.jpg                CAM heat-map overlays of the first ``overlay_samples`` samples of the split
    failures.jsonl, report.json, bg_sweep.csv, bg_sweep.png, stats/{shard}.json, run_config.json
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from weaktr import ops
from weaktr.checkpoint import CheckpointMismatch, check_compatible, load_checkpoint
from weaktr.config import Config
from weaktr.crf import CRFParams, crf_refine_labels
from weaktr.data.shards import IMAGE_EXTENSIONS, Manifest, SampleDecodeError, SplitInfo, decode_sample
from weaktr.data.voc import voc_palette
from weaktr.metrics import BackgroundSweep, ConfusionMatrix, normalize_cams, parse_sweep
from weaktr.models.cam import WeakTrCAM
from weaktr.models.inference import multiscale_cams

STATS_DIR = "stats"
TMP_SUFFIX = ".tmp"
TAR_MTIME = 0  # fixed tar member times: reruns write identical bytes


class PseudoLabelError(ValueError):
    """Settings or an output directory the pipeline cannot work with (a clear, one-line message)."""


# --------------------------------------------------------------------------------------------------------------
# The phase-1 model
# --------------------------------------------------------------------------------------------------------------


def load_cam_model(checkpoint_path: str | os.PathLike, classes: Sequence[str]) -> tuple[WeakTrCAM, dict]:
    """Rebuild the phase-1 model of a checkpoint (weights-only load), in eval mode on the CPU.

    Refuses (CheckpointMismatch) a checkpoint that is not a phase-1 ("cam") one, was trained on other classes or
    whose architecture / weights do not fit, naming what differs. Returns (model, checkpoint payload).
    """
    payload = load_checkpoint(checkpoint_path)
    source = f"checkpoint {checkpoint_path}"
    check_compatible(payload, kind="cam", classes=classes, source=source)
    arch = dict(payload["arch"])
    if arch.get("num_classes") != len(classes):
        raise CheckpointMismatch(
            f"{source} has a {arch.get('num_classes')}-class head but the dataset has {len(classes)} classes"
        )
    try:
        model = WeakTrCAM(**arch)
    except (TypeError, ValueError) as exn:
        raise CheckpointMismatch(f"{source}: cannot rebuild the model from its arch {arch}: {exn}") from exn
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exn:
        raise CheckpointMismatch(f"{source}: weights do not fit its architecture: {exn}") from exn
    return model.eval(), payload


# --------------------------------------------------------------------------------------------------------------
# Small encodings for rows
# --------------------------------------------------------------------------------------------------------------


def _png(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_label_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image, dtype=np.uint8)


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))  # writable: pydensecrf rejects read-only buffers


def _sparse(counts: np.ndarray) -> bytes:
    """A mostly-zero int64 array as int64 (flat index, count) pairs: per-image sweep histograms stay tiny."""
    flat = counts.reshape(-1)
    index = np.flatnonzero(flat)
    return np.stack([index, flat[index]]).astype(np.int64).tobytes()


def _add_sparse(dense: np.ndarray, data: bytes) -> None:
    if data:
        index, count = np.frombuffer(data, dtype=np.int64).reshape(2, -1)
        np.add.at(dense.reshape(-1), index, count)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _overlay_jpeg(image: np.ndarray, norm_cams: np.ndarray) -> bytes:
    """Image blended with a jet heat map of the strongest present-class CAM; norm_cams [P, H, W] in [0, 1]."""
    from matplotlib import colormaps

    heat = norm_cams.max(0) if len(norm_cams) else np.zeros(image.shape[:2], np.float32)  # [H, W]
    colour = colormaps["jet"](heat)[..., :3] * 255  # [H, W, 3]
    blend = (0.5 * image + 0.5 * colour).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blend).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Pipeline stages (run inside Ray tasks / actors)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StageSettings:
    """Everything the stages need, shipped to every task/actor."""

    num_classes: int
    scales: list[float]
    flip: bool
    bg_threshold: float
    chunk_size: int
    overlay_samples: int
    save_cams: bool
    sweep_thresholds: Optional[list[float]]
    crf: dict = field(default_factory=dict)  # CRFParams fields


# One flat schema for every row after the CAM stage (failure rows leave the data columns empty).
_ROW_META = ("kind", "shard_id", "shard_total", "index", "key", "reason")


def _failure(index: int, key: str, reason: str) -> dict:
    # Drop object addresses ("<_io.BytesIO object at 0x7f...>") that PIL puts in messages: reruns must match.
    return {"index": index, "key": key, "reason": re.sub(r" at 0x[0-9a-fA-F]+", "", reason)}


def _unusable(key: str, labels: list[int], mask: Optional[np.ndarray], num_classes: int) -> Optional[str]:
    """Why a decodable sample cannot get a pseudo-label, or None."""
    if not labels:
        return "no labels: labels.json is empty"
    if labels[-1] >= num_classes:
        return f"labels {labels} outside 0..{num_classes - 1}"
    if mask is not None:
        bad = np.unique(mask[(mask > num_classes) & (mask != 255)])
        if bad.size:
            return f"mask has ids {bad[:10].tolist()} outside 0..{num_classes} and 255"
    if not key or key.startswith(".") or any(ch in key for ch in "/\\"):
        return "unsafe key for an output file name"
    return None


def read_shard(item: dict, settings: StageSettings) -> list[dict]:
    """One input shard -> chunk rows {shard_id, shard_total, payload} (payload: pickled samples + failures).

    shard_total is how many rows the driver will receive for this shard: one per valid sample, one per failure
    (one "empty" row for a shard with neither).
    """
    samples, failures = [], []

    def shard_error(exn: Exception) -> bool:
        failures.append(_failure(-1, "", f"unreadable shard: {type(exn).__name__}: {exn}"))
        return False  # stop this (single-shard) stream

    raws = wds.tarfile_samples([{"url": item["path"]}], handler=shard_error)
    for index, raw in enumerate(raws):
        key = raw.get("__key__", "")
        try:
            sample = decode_sample(raw)
        except SampleDecodeError as exn:
            failures.append(_failure(index, key, str(exn)))
            continue
        labels = sorted(set(sample.labels))
        problem = _unusable(key, labels, sample.mask, settings.num_classes)
        if problem:
            failures.append(_failure(index, key, problem))
            continue
        samples.append({
            "index": index,
            "key": key,
            "size": sample.image.shape[:2],
            "image": raw[next(ext for ext in IMAGE_EXTENSIONS if ext in raw)],
            "labels": labels,
            "mask": raw.get("mask.png", b""),
            "overlay": item["offset"] + index < settings.overlay_samples,
        })
    empty = not samples and not failures
    total = len(samples) + len(failures) + empty
    # Same-size images next to each other -> same-grid groups in a chunk share forward passes.
    samples.sort(key=lambda s: (s["size"], s["index"]))
    chunks = [samples[i : i + settings.chunk_size] for i in range(0, len(samples), settings.chunk_size)] or [[]]
    rows = []
    for k, chunk in enumerate(chunks):
        payload = {"samples": chunk, "failures": failures if k == 0 else [], "empty": empty}
        rows.append({"shard_id": item["shard_id"], "shard_total": total, "payload": pickle.dumps(payload)})
    return rows


_INT_COLUMNS = ("shard_id", "shard_total", "index")
_STR_COLUMNS = ("kind", "key", "reason", "labels")


def _columns(rows: list[dict], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch; a column a row lacks is empty ("" / b"") so every batch has one schema."""
    out = {}
    for name in names:
        if name in _INT_COLUMNS:
            out[name] = np.array([row[name] for row in rows], dtype=np.int64)
        else:
            empty = "" if name in _STR_COLUMNS else b""
            out[name] = np.array([row.get(name, empty) for row in rows], dtype=object)
    return out


class CamStage:
    """Actor: chunk rows -> one row per image with its CAM label, metrics and (optional) CAM array / overlay."""

    COLUMNS = _ROW_META + ("labels", "image", "mask", "cam_label", "cam_cm", "sweep", "cams", "overlay")

    def __init__(self, model_ref: list, settings: StageSettings, use_gpu: bool = False, num_threads: int = 1):
        import ray

        state = ray.get(model_ref[0])  # wrapped in a list: Ray Data passes it through unresolved
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("pseudo.cam_gpus_per_actor > 0 but this CAM actor sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model = WeakTrCAM(**state["arch"])
        self.model.load_state_dict(state["model"])
        self.model.eval().to(self.device)
        self.patch_size = self.model.patch_size[0]
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for shard_id, total, payload in zip(batch["shard_id"], batch["shard_total"], batch["payload"]):
            chunk = pickle.loads(payload)
            meta = {"shard_id": int(shard_id), "shard_total": int(total)}
            for failure in chunk["failures"]:
                rows.append({**meta, "kind": "failure", **failure})
            if chunk["empty"]:
                rows.append({**meta, "kind": "empty", "index": -1, "key": "", "reason": ""})
            if chunk["samples"]:
                rows.extend({**meta, **row} for row in self._process(chunk["samples"]))
        return _columns(rows, self.COLUMNS)

    def _process(self, samples: list[dict]) -> list[dict]:
        s = self.settings
        images = [_decode_rgb(sample["image"]) for sample in samples]
        cams = multiscale_cams(self.model, images, s.scales, s.flip, self.patch_size)  # [C, H, W] each
        rows = []
        for sample, image, cam in zip(samples, images, cams):
            present = sample["labels"]
            # cam_to_label reads only the present classes: the same as zeroing the absent ones first.
            cam_label = ops.cam_to_label(cam, present, s.bg_threshold).cpu().numpy().astype(np.uint8)  # [H, W]
            norm = normalize_cams(cam[present].cpu().numpy(), range(len(present)))  # [P, H, W] in [0, 1]
            row = {
                "kind": "sample", "index": sample["index"], "key": sample["key"], "reason": "",
                "labels": json.dumps(present), "image": sample["image"], "mask": sample["mask"],
                "cam_label": _png(cam_label), "cams": _npy(norm) if s.save_cams else b"",
                "overlay": _overlay_jpeg(image, norm) if sample["overlay"] else b"",
            }
            if sample["mask"]:
                mask = _decode_label_png(sample["mask"])
                row["cam_cm"] = _sparse(ConfusionMatrix(s.num_classes + 1).update(cam_label, mask).matrix)
                if s.sweep_thresholds:
                    full = np.zeros((s.num_classes, *mask.shape), np.float32)  # calloc: only present pages touched
                    full[present] = norm
                    sweep = BackgroundSweep(s.sweep_thresholds, s.num_classes).update(full, present, mask)
                    row["sweep"] = _sparse(sweep.histogram)
            rows.append(row)
        return rows


class CrfStage:
    """Actor: dense CRF of each image's CAM label over its present classes -> the pseudo-label."""

    COLUMNS = _ROW_META + ("pseudo", "pseudo_color", "cam_cm", "crf_cm", "sweep", "cams", "overlay")

    def __init__(self, settings: StageSettings):
        self.settings = settings
        self.params = CRFParams(**settings.crf)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i in range(len(batch["kind"])):
            row = {name: batch[name][i] for name in _ROW_META + ("cam_cm", "sweep", "cams", "overlay")}
            if row["kind"] == "sample":
                image = _decode_rgb(batch["image"][i])
                cam_label = _decode_label_png(batch["cam_label"][i])
                pseudo = crf_refine_labels(image, cam_label, json.loads(batch["labels"][i]), self.params)
                row["pseudo"], row["pseudo_color"] = _png(pseudo), _png(pseudo, palette=True)
                if batch["mask"][i]:
                    mask = _decode_label_png(batch["mask"][i])
                    row["crf_cm"] = _sparse(ConfusionMatrix(self.settings.num_classes + 1).update(pseudo, mask).matrix)
            rows.append(row)
        return _columns(rows, self.COLUMNS)


# --------------------------------------------------------------------------------------------------------------
# Driver side: committing shards, merging stats
# --------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _stats_path(out_dir: Path, shard: str) -> Path:
    return out_dir / STATS_DIR / (shard.replace("/", "__") + ".json")


class _ShardResult:
    """One shard's rows as they arrive at the driver, reduced to what its commit needs."""

    def __init__(self, total: int, num_classes: int, num_thresholds: int):
        self.total = total
        self.received = 0
        self.files: dict[int, dict] = {}  # sample index -> key, pseudo, pseudo_color, cams, overlay
        self.failures: list[dict] = []
        K = num_classes + 1
        self.cam_cm = np.zeros((K, K), np.int64)
        self.crf_cm = np.zeros((K, K), np.int64)
        self.sweep = np.zeros((num_thresholds + 1, K, K), np.int64) if num_thresholds else None

    def add(self, row: dict) -> bool:
        """Take one row; True once the shard is complete."""
        self.received += 1
        if row["kind"] == "failure":
            self.failures.append({"index": int(row["index"]), "key": row["key"], "reason": row["reason"]})
        elif row["kind"] == "sample":
            self.files[int(row["index"])] = {
                name: row[name] for name in ("key", "pseudo", "pseudo_color", "cams", "overlay")
            }
            _add_sparse(self.cam_cm, row["cam_cm"])
            _add_sparse(self.crf_cm, row["crf_cm"])
            if self.sweep is not None:
                _add_sparse(self.sweep, row["sweep"])
        return self.received == self.total


def _commit_shard(out_dir: Path, shard: str, src_path: str, result: _ShardResult) -> None:
    """Write one shard's outputs, each atomically; the stats file goes last and marks the shard done."""
    for index in sorted(result.files):
        f = result.files[index]
        _atomic_write(out_dir / "pseudo_png" / f"{f['key']}.png", f["pseudo_color"])
        if f["cams"]:
            _atomic_write(out_dir / "cams" / f"{f['key']}.npy", f["cams"])
        if f["overlay"]:
            _atomic_write(out_dir / "overlays" / f"{f['key']}.jpg", f["overlay"])

    written = 0
    if result.files:  # the input samples, verbatim, in their order, each with its pseudo-label
        tar_path = out_dir / shard
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tar_path.with_name(tar_path.name + TMP_SUFFIX)
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for index, raw in enumerate(wds.tarfile_samples([{"url": src_path}], handler=lambda exn: False)):
                if index in result.files:
                    sample = {k: v for k, v in raw.items() if not k.startswith("__") and k != "pseudo.png"}
                    writer.write({"__key__": raw["__key__"], **sample, "pseudo.png": result.files[index]["pseudo"]})
                    written += 1
        if written != len(result.files):
            tmp.unlink()
            raise RuntimeError(f"{src_path} changed while it was processed ({written} of {len(result.files)} samples)")
        os.replace(tmp, tar_path)

    stats = {
        "shard": shard,
        "num_samples": written,
        "failures": sorted(result.failures, key=lambda f: f["index"]),
        "cam_confusion": result.cam_cm.tolist(),
        "crf_confusion": result.crf_cm.tolist(),
        "sweep": None if result.sweep is None else _sparse_dict(result.sweep),
    }
    _atomic_write(_stats_path(out_dir, shard), _json_bytes(stats))


def _sparse_dict(counts: np.ndarray) -> dict:
    flat = counts.reshape(-1)
    index = np.flatnonzero(flat)
    return {"shape": list(counts.shape), "index": index.tolist(), "count": flat[index].tolist()}


def _load_stats(out_dir: Path, shard: str) -> Optional[dict]:
    path = _stats_path(out_dir, shard)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Output directory management
# --------------------------------------------------------------------------------------------------------------

_OUTPUT_DIRS = ("pseudo_png", "cams", "overlays", STATS_DIR)
_OUTPUT_FILES = ("manifest.json", "failures.jsonl", "report.json", "bg_sweep.csv", "bg_sweep.png", "run_config.json")


def _clear_outputs(out_dir: Path, shards: Sequence[str]) -> None:
    """Remove what a previous run wrote (only our own files: out_dir may hold other things)."""
    for name in _OUTPUT_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (*_OUTPUT_FILES, *shards):
        (out_dir / name).unlink(missing_ok=True)


def _remove_stale_temps(out_dir: Path) -> int:
    stale = list(out_dir.rglob(f"*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_file(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    return path / "checkpoint.pt" if path.is_dir() else path


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def run_pseudo_labels(cfg: Config, checkpoint: str | os.PathLike) -> dict:
    """Generate pseudo-labels for ``cfg.pseudo.split`` of the dataset at ``cfg.data.root`` (see the module
    docstring). Needs a connected Ray (``ray.init``). Returns the report (report.json) plus a "run" entry saying
    how many shards were processed / skipped."""
    import ray

    started = time.perf_counter()
    p = cfg.pseudo
    manifest = Manifest.load(cfg.data.root)
    split = manifest.split(p.split)
    shard_paths = manifest.shard_paths(p.split)
    for shard in split.shards:
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise PseudoLabelError(
                f"shard path {shard!r} in {manifest.root}/manifest.json must be relative, inside the dataset"
            )
    missing = [path for path in shard_paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of split '{p.split}' do not exist, first: {missing[0]}")
    # Refuse a checkpoint of another dataset / architecture before any work.
    model, payload = load_cam_model(checkpoint, manifest.classes)
    try:
        thresholds = parse_sweep(p.sweep_bg, key="pseudo.sweep_bg")
    except ValueError as err:
        raise PseudoLabelError(str(err)) from None
    if p.batch_size < 1 or p.cam_actors < 1 or p.crf_actors < 1:
        raise PseudoLabelError("pseudo.batch_size, pseudo.cam_actors and pseudo.crf_actors must be >= 1")

    out_dir = Path(p.out_dir).expanduser().resolve()
    if out_dir == Path(manifest.root).resolve():
        raise PseudoLabelError(f"pseudo.out_dir {out_dir} is the input dataset's directory; choose another")
    run_config = {
        "checkpoint_sha256": _file_sha256(_checkpoint_file(checkpoint)),
        "data_root": str(Path(manifest.root).resolve()),
        "split": p.split,
        "shards": split.shards,
        "settings": {
            name: getattr(p, name)
            for name in ("scales", "flip", "bg_threshold", "batch_size", "save_cams", "overlay_samples", "sweep_bg")
        }
        | {"crf": asdict(p.crf)},
    }
    if p.overwrite:
        _clear_outputs(out_dir, split.shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    previous = out_dir / "run_config.json"
    if previous.exists() and json.loads(previous.read_text()) != run_config:
        raise PseudoLabelError(
            f"{out_dir} holds outputs made from another checkpoint, dataset or settings ({previous}); "
            "pass --overwrite (pseudo.overwrite=true) to start over, or choose another pseudo.out_dir"
        )
    _atomic_write(previous, _json_bytes(run_config))

    todo = [i for i, shard in enumerate(split.shards) if _load_stats(out_dir, shard) is None]
    skipped = len(split.shards) - len(todo)
    print(f"pseudo-labels: {len(split.shards)} shards of '{p.split}', {skipped} already done, {len(todo)} to process")
    if todo:
        settings = StageSettings(
            num_classes=manifest.num_classes, scales=list(p.scales), flip=p.flip, bg_threshold=p.bg_threshold,
            chunk_size=p.batch_size, overlay_samples=p.overlay_samples, save_cams=p.save_cams,
            sweep_thresholds=thresholds, crf=asdict(CRFParams(**asdict(p.crf))),
        )
        offsets = np.concatenate([[0], np.cumsum(split.shard_sizes)]).tolist()
        model_ref = ray.put({"arch": model.arch, "model": model.state_dict()})
        dataset = _build_dataset(
            [{"shard_id": i, "path": shard_paths[i], "offset": offsets[i]} for i in todo], settings, model_ref, p
        )
        _consume(dataset, out_dir, split, shard_paths, settings, sum(split.shard_sizes[i] for i in todo))

    report = _finalize(out_dir, manifest, p.split, thresholds, str(checkpoint), p.bg_threshold)
    report["run"] = {
        "shards": len(split.shards), "shards_skipped": skipped, "shards_processed": len(todo),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(f"pseudo-labels: processed {len(todo)} shards, skipped {skipped} finished shards; outputs in {out_dir}")
    return report


def _build_dataset(items: list[dict], settings: StageSettings, model_ref, p):
    import ray.data

    from weaktr.launch import actor_pool, quiet_ray_data

    quiet_ray_data()
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Reading is light (tar + image decode to validate): zero logical CPUs, so it never waits on the actor pools
    # holding every CPU of a small machine; `concurrency` bounds it instead.
    dataset = dataset.flat_map(
        read_shard, fn_kwargs={"settings": settings}, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2)
    )
    dataset = dataset.map_batches(
        CamStage, fn_constructor_kwargs={
            "model_ref": [model_ref], "settings": settings, "use_gpu": p.cam_gpus_per_actor > 0,
            "num_threads": max(1, int(p.cam_cpus_per_actor)),
        },
        batch_size=1, batch_format="numpy",
        compute=actor_pool("pseudo.cam_actors", p.cam_actors, p.cam_cpus_per_actor, p.cam_gpus_per_actor),
        num_gpus=p.cam_gpus_per_actor, num_cpus=p.cam_cpus_per_actor,
    )
    return dataset.map_batches(
        CrfStage, fn_constructor_kwargs={"settings": settings},
        batch_size=1, batch_format="numpy", compute=actor_pool("pseudo.crf_actors", p.crf_actors, 1), num_cpus=1,
    )


def _consume(
    dataset, out_dir: Path, split: SplitInfo, shard_paths: list[str], settings: StageSettings, num_images: int
) -> None:
    """Drive the pipeline; commit each shard as soon as all its rows (one per image) are in."""
    from weaktr.launch import progress

    num_thresholds = len(settings.sweep_thresholds or [])
    pending: dict[int, _ShardResult] = {}
    with progress(num_images, "pseudo-labels") as bar:
        for row in dataset.iter_rows():
            shard_id = int(row["shard_id"])
            result = pending.get(shard_id)
            if result is None:
                total = int(row["shard_total"])
                result = pending[shard_id] = _ShardResult(total, settings.num_classes, num_thresholds)
            bar.update(1)
            if result.add(row):
                _commit_shard(out_dir, split.shards[shard_id], shard_paths[shard_id], pending.pop(shard_id))
    if pending:
        raise RuntimeError(f"the pipeline ended with incomplete shards: {[split.shards[i] for i in pending]}")


def _finalize(
    out_dir: Path, manifest: Manifest, split_name: str, thresholds: Optional[list[float]], checkpoint: str,
    bg_threshold: float,
) -> dict:
    """Merge every shard's stats into manifest.json, failures.jsonl, report.json and the sweep curve."""
    split = manifest.split(split_name)
    K = manifest.num_classes + 1
    cam_cm, crf_cm = ConfusionMatrix(K), ConfusionMatrix(K)
    sweep = BackgroundSweep(thresholds, manifest.num_classes) if thresholds else None
    shards, sizes, failures = [], [], []
    for shard in split.shards:
        stats = _load_stats(out_dir, shard)
        if stats is None:
            raise RuntimeError(f"shard {shard} has no stats file in {out_dir / STATS_DIR}")
        if stats["num_samples"]:
            shards.append(shard)
            sizes.append(stats["num_samples"])
        failures += [
            {"key": f["key"], "shard": shard, "index": f["index"], "reason": f["reason"]} for f in stats["failures"]
        ]
        cam_cm.matrix += np.asarray(stats["cam_confusion"], dtype=np.int64)
        crf_cm.matrix += np.asarray(stats["crf_confusion"], dtype=np.int64)
        if sweep is not None and stats["sweep"] is not None:
            np.add.at(sweep.histogram.reshape(-1), stats["sweep"]["index"], stats["sweep"]["count"])

    out_manifest = Manifest(
        manifest.name, list(manifest.classes), {split_name: SplitInfo(shards, sum(sizes), sizes)}, str(out_dir),
        {"pseudo_labels": {"source": manifest.root, "split": split_name, "checkpoint": checkpoint}},
    )
    out_manifest.save()
    _atomic_write(out_dir / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures).encode())

    names = ["background", *manifest.classes]
    has_gt = cam_cm.matrix.sum() > 0
    report = {
        "split": split_name,
        "num_samples": sum(sizes),
        "num_failures": len(failures),
        "bg_threshold": bg_threshold,
        "cam": cam_cm.to_dict(names) if has_gt else None,
        "crf": crf_cm.to_dict(names) if has_gt else None,
        "sweep": None,
    }
    if sweep is not None and sweep.histogram.sum() > 0:
        sweep.write_csv(out_dir / f"bg_sweep.csv{TMP_SUFFIX}")
        os.replace(out_dir / f"bg_sweep.csv{TMP_SUFFIX}", out_dir / "bg_sweep.csv")
        plot = io.BytesIO()
        sweep.plot(plot)  # PNG (matplotlib's default format for a file object)
        _atomic_write(out_dir / "bg_sweep.png", plot.getvalue())
        best_t, best_miou = sweep.best()
        curve = [[t, None if math.isnan(m) else m] for t, m in sweep.curve()]
        report["sweep"] = {"best_threshold": best_t, "best_miou": best_miou, "curve": curve}
    _atomic_write(out_dir / "report.json", _json_bytes(report))
    print(format_report(report, names, cam_cm, crf_cm))
    return report


def format_report(report: dict, names: Sequence[str], cam_cm: ConfusionMatrix, crf_cm: ConfusionMatrix) -> str:
    lines = [f"split '{report['split']}': {report['num_samples']} pseudo-labels, {report['num_failures']} failures"]
    if report["cam"] is None:
        lines.append("no ground-truth masks: no quality figures")
        return "\n".join(lines)

    def pct(values):
        return [f"{100 * v:7.2f}" if not math.isnan(v) else f"{'-':>7}" for v in values]

    width = max(12, *(len(n) for n in names))
    cam_title = f"CAM label (t={report['bg_threshold']:g})"
    lines.append(f"{'':<{width}} {cam_title:^23} | {'CRF pseudo-label':^23}")
    lines.append(f"{'class':<{width}} {'IoU':>7} {'prec':>7} {'recall':>7} | {'IoU':>7} {'prec':>7} {'recall':>7}")
    columns = [pct(cm.iou()) + pct(cm.precision()) + pct(cm.recall()) for cm in (cam_cm, crf_cm)]
    K = len(names)
    for k, name in enumerate(names):
        cam = " ".join(columns[0][k + j * K] for j in range(3))
        crf = " ".join(columns[1][k + j * K] for j in range(3))
        lines.append(f"{name:<{width}} {cam} | {crf}")
    lines.append(f"{'mIoU':<{width}} {pct([cam_cm.miou()])[0]} {'':15} | {pct([crf_cm.miou()])[0]}")
    if report["sweep"]:
        s = report["sweep"]
        lines.append(
            f"background-threshold sweep: best t={s['best_threshold']:g} (CAM mIoU {100 * s['best_miou']:.2f})"
        )
    return "\n".join(lines)
