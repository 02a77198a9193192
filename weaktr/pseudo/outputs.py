"""The driver side of the pseudo-label pipeline (see ``weaktr.pseudo``): committing finished shards atomically, the
per-shard stats files that mark them done, and the output directory's housekeeping."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import webdataset as wds

from weaktr.data.shards import TMP_SUFFIX, atomic_write
from weaktr.pseudo.stages import _add_sparse

STATS_DIR = "stats"
RUN_CONFIG = "run_config.json"  # the settings a run started with; written before its first shard
TAR_MTIME = 0  # fixed tar member times: reruns write identical bytes


# --------------------------------------------------------------------------------------------------------------
# Driver side: committing shards, merging stats
# --------------------------------------------------------------------------------------------------------------


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
        atomic_write(out_dir / "pseudo_png" / f"{f['key']}.png", f["pseudo_color"])
        if f["cams"]:
            atomic_write(out_dir / "cams" / f"{f['key']}.npy", f["cams"])
        if f["overlay"]:
            atomic_write(out_dir / "overlays" / f"{f['key']}.jpg", f["overlay"])

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
    atomic_write(_stats_path(out_dir, shard), _json_bytes(stats))


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
_OUTPUT_FILES = ("manifest.json", "failures.jsonl", "report.json", "bg_sweep.csv", "bg_sweep.png", RUN_CONFIG)


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


