"""The driver side of the pseudo-label pipeline (see ``weaktr.pseudo``): committing finished shards atomically, the
per-shard stats files that mark them done, and the output directory's housekeeping."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import webdataset as wds

from weaktr import storage
from weaktr.checkpoint import checkpoint_file
from weaktr.data.stream import read_records
from weaktr.pseudo.stages import _add_sparse
from weaktr.storage import TMP_SUFFIX

STATS_DIR = "stats"
RUN_CONFIG = "run_config.json"  # the settings a run started with; written before its first shard
TAR_MTIME = 0  # fixed tar member times: reruns write identical bytes


# --------------------------------------------------------------------------------------------------------------
# Driver side: committing shards, merging stats
# --------------------------------------------------------------------------------------------------------------


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _stats_path(out_dir: str, shard: str) -> str:
    return storage.join(out_dir, STATS_DIR, shard.replace("/", "__") + ".json")


class _ShardResult:
    """One shard's rows as they arrive at the driver, reduced to what its commit needs."""

    def __init__(self, total: int, num_classes: int, num_thresholds: int):
        self.total = total
        # The rows taken, by what they are about: a row delivered twice (Ray Data retries the tasks of an actor
        # that died) must not make the shard look complete while another row is still on its way.
        self.received: set[tuple] = set()
        self.files: dict[int, dict] = {}  # sample index -> key, pseudo, pseudo_color, cams, overlay
        self.failures: list[dict] = []
        K = num_classes + 1
        self.cam_cm = np.zeros((K, K), np.int64)
        self.crf_cm = np.zeros((K, K), np.int64)
        self.sweep = np.zeros((num_thresholds + 1, K, K), np.int64) if num_thresholds else None

    def add(self, row: dict) -> bool:
        """Take one row (again: ignored); True once the shard is complete."""
        identity = (row["kind"], int(row["index"]), row["reason"])
        if identity in self.received:
            return False
        self.received.add(identity)
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
        return len(self.received) == self.total


def _commit_shard(out_dir: str, shard: str, src_path: str, result: _ShardResult) -> None:
    """Write one shard's outputs (under ``out_dir``, local or a URI), each whole; the stats file goes last and marks
    the shard done."""
    for index in sorted(result.files):
        f = result.files[index]
        storage.write_bytes(storage.join(out_dir, "pseudo_png", f"{f['key']}.png"), f["pseudo_color"])
        if f["cams"]:
            storage.write_bytes(storage.join(out_dir, "cams", f"{f['key']}.npy"), f["cams"])
        if f["overlay"]:
            storage.write_bytes(storage.join(out_dir, "overlays", f"{f['key']}.jpg"), f["overlay"])

    written = 0
    if result.files:  # the input samples, verbatim, in their order, each with its pseudo-label
        tar_path = storage.join(out_dir, shard)
        # Written locally first: beside its final name when out_dir is local, in the temporary directory when not.
        if storage.is_uri(out_dir):
            tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False).name
        else:
            tmp = tar_path + TMP_SUFFIX
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for index, raw in enumerate(read_records([src_path], lambda failure: None, keep_going=False)):
                if index in result.files:
                    sample = {k: v for k, v in raw.items() if not k.startswith("__") and k != "pseudo.png"}
                    writer.write({"__key__": raw["__key__"], **sample, "pseudo.png": result.files[index]["pseudo"]})
                    written += 1
        if written != len(result.files):
            os.unlink(tmp)
            raise RuntimeError(f"{src_path} changed while it was processed ({written} of {len(result.files)} samples)")
        storage.put_file(tmp, tar_path)

    stats = {
        "shard": shard,
        "num_samples": written,
        "failures": sorted(result.failures, key=lambda f: f["index"]),
        "cam_confusion": result.cam_cm.tolist(),
        "crf_confusion": result.crf_cm.tolist(),
        "sweep": None if result.sweep is None else _sparse_dict(result.sweep),
    }
    storage.write_bytes(_stats_path(out_dir, shard), _json_bytes(stats))


def _sparse_dict(counts: np.ndarray) -> dict:
    flat = counts.reshape(-1)
    index = np.flatnonzero(flat)
    return {"shape": list(counts.shape), "index": index.tolist(), "count": flat[index].tolist()}


def _load_stats(out_dir: str, shard: str) -> Optional[dict]:
    try:
        return json.loads(storage.read_bytes(_stats_path(out_dir, shard)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Output directory management
# --------------------------------------------------------------------------------------------------------------

_OUTPUT_DIRS = ("pseudo_png", "cams", "overlays", STATS_DIR)
_OUTPUT_FILES = ("manifest.json", "failures.jsonl", "report.json", "bg_sweep.csv", "bg_sweep.png", RUN_CONFIG)


def _clear_outputs(out_dir: str, shards: Sequence[str]) -> None:
    """Remove what a previous run wrote (only our own files: out_dir may hold other things)."""
    for name in (*_OUTPUT_DIRS, *_OUTPUT_FILES, *shards):
        storage.remove(storage.join(out_dir, name))


def _remove_stale_temps(out_dir: str) -> int:
    """Remove the temporary files an interrupted run left in a local ``out_dir`` (an object store gets none: its
    writes are whole uploads)."""
    if storage.is_uri(out_dir):
        return 0
    stale = [os.path.join(folder, name) for folder, _, names in os.walk(out_dir) for name in names
             if name.endswith(TMP_SUFFIX)]
    for path in stale:
        os.unlink(path)
    return len(stale)


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """The SHA-256 of a checkpoint's file (local or a URI): what a pseudo-label run was made from."""
    digest = hashlib.sha256()
    with storage.open_input(checkpoint_file(checkpoint)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
