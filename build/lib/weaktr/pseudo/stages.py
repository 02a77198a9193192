"""The pseudo-label pipeline's stages, run inside Ray tasks and actors (see ``weaktr.pseudo``): reading and
validating shards, the CAM actor, the CRF actor, the phase-1 model they load, and the small encodings of their rows."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from weaktr import ops
from weaktr.crf import CRFParams, crf_refine_label_batch
from weaktr.data.convert import without_addresses
from weaktr.data.images import load_rgb
from weaktr.data.shards import IMAGE_EXTENSIONS, SampleDecodeError, decode_sample
from weaktr.data.stream import read_records
from weaktr.data.voc import voc_palette
from weaktr.metrics import BackgroundSweep, ConfusionMatrix, normalize_cams
from weaktr.models.build import load_model
from weaktr.models.cam import WeakTrCAM
from weaktr.models.inference import multiscale_cams

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The phase-1 model
# --------------------------------------------------------------------------------------------------------------


def load_cam_model(checkpoint_path: str | os.PathLike, classes: Sequence[str]) -> tuple[WeakTrCAM, dict]:
    """The phase-1 model of a checkpoint trained on ``classes``, in eval mode on the CPU (``load_model``)."""
    return load_model(checkpoint_path, "cam", classes)


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
    attention_type: str  # the CAM readout (ops.attention_cam)
    patch_attn_refine: bool
    bg_threshold: float
    chunk_size: int
    forward_batch: int
    overlay_samples: int
    save_cams: bool
    sweep_thresholds: Optional[list[float]]
    crf: dict = field(default_factory=dict)  # CRFParams fields, the backend resolved
    crf_in_cam_actor: bool = False  # the CAM actor makes the pseudo-labels itself (no CRF pool)


# One flat schema for every row after the CAM stage (failure rows leave the data columns empty).
_ROW_META = ("kind", "shard_id", "shard_total", "index", "key", "reason")


def _failure(index: int, key: str, reason: str) -> dict:
    return {"index": index, "key": key, "reason": without_addresses(reason)}


def _unusable(key: str, labels: list[int]) -> Optional[str]:
    """Why a decodable sample (its ids checked against the classes by ``decode_sample``) cannot get a
    pseudo-label, or None."""
    if not labels:
        return "no labels: labels.json is empty"
    if not key or key.startswith(".") or any(ch in key for ch in "/\\"):
        return "unsafe key for an output file name"
    return None


def read_shard(item: dict, settings: StageSettings) -> list[dict]:
    """One input shard -> chunk rows {shard_id, shard_total, payload} (payload: pickled samples + failures).

    shard_total is how many rows the driver will receive for this shard: one per valid sample, one per failure
    (one "empty" row for a shard with neither).

    A shard that cannot be opened at all (missing on this node, unreadable) is one "unreadable" row instead, which
    the driver never commits: committed with no sample it would count as done, and ``--resume`` would skip it for
    ever. A shard cut short keeps the samples before the cut and counts the cut as one failure.
    """
    samples, failures, unreadable = [], [], []

    def shard_error(failure) -> None:
        if not samples and not failures:
            from ray.util import get_node_ip_address  # Ray: only inside the task

            unreadable.append(f"shard {item['path']} cannot be read on the node at {get_node_ip_address()}: "
                              f"{failure.reason}")
        else:
            failures.append(_failure(-1, "", f"unreadable shard {item['path']}: {failure.reason}"))

    # A broken shard stops this (single-shard) stream; the samples read before the break are kept.
    for index, raw in enumerate(read_records([item["path"]], shard_error, keep_going=False)):
        key = raw.get("__key__", "")
        try:
            sample = decode_sample(raw, num_classes=settings.num_classes)
        except SampleDecodeError as exn:
            failures.append(_failure(index, key, str(exn)))
            continue
        labels = sorted(set(sample.labels))
        problem = _unusable(key, labels)
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
    if unreadable:
        payload = {"samples": [], "failures": [], "empty": False, "unreadable": unreadable[0]}
        return [{"shard_id": item["shard_id"], "shard_total": 1, "payload": pickle.dumps(payload)}]
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
    """Actor: chunk rows -> one row per image with its CAM label, metrics and (optional) CAM array / overlay; with
    ``settings.crf_in_cam_actor``, the CRF's pseudo-label too, made on the actor's device (CrfStage's rows)."""

    COLUMNS = _ROW_META + ("labels", "image", "mask", "cam_label", "cam_cm", "sweep", "cams", "overlay")

    def __init__(self, model_ref: list, settings: StageSettings, use_gpu: bool = False, num_threads: int = 1):
        from weaktr.launch import take_model  # Ray: only inside the actor

        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("pseudo.cam_gpus_per_actor > 0 but this CAM actor sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model = take_model("cam", model_ref, self.device)
        self.patch_size = self.model.patch_size[0]
        self.settings = settings
        self.columns = CrfStage.COLUMNS if settings.crf_in_cam_actor else self.COLUMNS
        log.info("CAM actor ready on %s (%s threads): %d classes, scales %s%s", self.device,
                 torch.get_num_threads() if self.device.type == "cpu" else "-", settings.num_classes,
                 list(settings.scales), " + flip" if settings.flip else "")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for shard_id, total, payload in zip(batch["shard_id"], batch["shard_total"], batch["payload"]):
            chunk = pickle.loads(payload)
            meta = {"shard_id": int(shard_id), "shard_total": int(total)}
            if chunk.get("unreadable"):
                rows.append({**meta, "kind": "unreadable", "index": -1, "key": "", "reason": chunk["unreadable"]})
            for failure in chunk["failures"]:
                rows.append({**meta, "kind": "failure", **failure})
            if chunk["empty"]:
                rows.append({**meta, "kind": "empty", "index": -1, "key": "", "reason": ""})
            if chunk["samples"]:
                rows.extend({**meta, **row} for row in self._process(chunk["samples"]))
        return _columns(rows, self.columns)

    def _process(self, samples: list[dict]) -> list[dict]:
        s = self.settings
        images = [load_rgb(sample["image"]) for sample in samples]
        cams = multiscale_cams(
            self.model, images, s.scales, s.flip, self.patch_size, attention_type=s.attention_type,
            refine=s.patch_attn_refine, classes=[sample["labels"] for sample in samples], max_batch=s.forward_batch,
        )  # [P, H, W] each: the present classes only
        rows, cam_labels = [], []
        for sample, image, cam in zip(samples, images, cams):
            present = sample["labels"]  # sorted
            compact = ops.cam_to_label(cam, range(len(present)), s.bg_threshold)  # [H, W]: k + 1 <-> present[k]
            ids = torch.tensor([0] + [c + 1 for c in present], device=compact.device)
            cam_label = ids[compact].cpu().numpy().astype(np.uint8)  # [H, W] dataset ids
            cam_labels.append(cam_label)
            norm = normalize_cams(cam.cpu().numpy(), range(len(present)))  # [P, H, W] in [0, 1]
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
        if s.crf_in_cam_actor:
            pseudos = crf_refine_label_batch(images, cam_labels, [sample["labels"] for sample in samples],
                                             CRFParams(**s.crf), self.device)
            for row, pseudo in zip(rows, pseudos):
                _add_pseudo_label(row, pseudo, s.num_classes)
        return rows


def _add_pseudo_label(row: dict, pseudo: np.ndarray, num_classes: int) -> None:
    """The CRF stage's columns of a sample row: its pseudo-label (plain and in the VOC palette) and, where the
    sample has a mask, the pseudo-label's confusion counts."""
    row["pseudo"], row["pseudo_color"] = _png(pseudo), _png(pseudo, palette=True)
    if row["mask"]:
        row["crf_cm"] = _sparse(ConfusionMatrix(num_classes + 1).update(pseudo, _decode_label_png(row["mask"])).matrix)


class CrfStage:
    """Actor: dense CRF of each image's CAM label over its present classes -> the pseudo-label."""

    COLUMNS = _ROW_META + ("pseudo", "pseudo_color", "cam_cm", "crf_cm", "sweep", "cams", "overlay")

    def __init__(self, settings: StageSettings):
        self.settings = settings
        self.params = CRFParams(**settings.crf)
        torch.set_num_threads(1)  # the torch backend: one CPU per CRF actor, as pydensecrf

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i in range(len(batch["kind"])):
            row = {name: batch[name][i] for name in _ROW_META + ("cam_cm", "sweep", "cams", "overlay", "mask")}
            if row["kind"] == "sample":
                image = load_rgb(batch["image"][i])
                cam_label = _decode_label_png(batch["cam_label"][i])
                present = json.loads(batch["labels"][i])
                _add_pseudo_label(row, crf_refine_label_batch([image], [cam_label], [present], self.params)[0],
                                  self.settings.num_classes)
            rows.append(row)
        return _columns(rows, self.COLUMNS)


