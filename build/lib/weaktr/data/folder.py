"""A plain folder of images + a label file to shards.

Label file, CSV or JSON (by extension):

* CSV: ``filename,class[;class...]`` per row (further columns are more class names; a cell may
  hold several names separated by ``;`` or ``|``); an optional header row starting with
  ``filename``/``file``/``image``/``path`` is skipped.
* JSON: ``{"filename": ["class", ...] or "class", ...}``.

Filenames are relative to the image folder. A label file is read as UTF-8; bytes that are not (a name
written in Latin-1, say) are kept as they are, so they still name the file on disk. Classes are the sorted
names found in the file unless ``classes`` is given. An optional mask folder holds
``{filename without extension}.png`` id masks (0 background, c+1 class c, 255 ignore). Keys are the filenames
without extension, with characters other than letters, digits, '_' and '-' replaced by '_'.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import time
from typing import Iterator, Optional, Sequence

from weaktr.data.convert import CONVERT_WORKERS, Unusable, read_each, write_converted
from weaktr.data.images import read_image
from weaktr.data.shards import MAX_SIDE, SAMPLES_PER_SHARD, Encoded, Manifest, Sample, Skipped
from weaktr.data.voc import read_label_png

_HEADER_NAMES = {"filename", "file", "image", "path", "name"}


def _split_names(cell: str) -> list[str]:
    return [name.strip() for name in re.split(r"[;|]", cell) if name.strip()]


def read_label_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """filename -> class names, from a CSV or JSON label file."""
    path = os.fspath(path)
    table: dict[str, list[str]] = {}
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object filename -> class name(s)")
        for filename, names in data.items():
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: entry {filename!r} must be a class name or a list of names")
            table[filename] = [n.strip() for n in names if n.strip()]
    elif path.lower().endswith((".csv", ".txt")):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row_number, row in enumerate(csv.reader(f), 1):
                if not row or not row[0].strip():
                    continue
                if row_number == 1 and row[0].strip().lower() in _HEADER_NAMES:
                    continue
                if row[0].strip() in table:
                    raise ValueError(f"{path}:{row_number}: {row[0].strip()!r} listed twice")
                table[row[0].strip()] = [name for cell in row[1:] for name in _split_names(cell)]
    else:
        raise ValueError(f"{path}: label file must be .csv/.txt or .json")
    return table


def key_for(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(filename)[0])


def _folder_samples(
    image_dir: str, files: Sequence[str], table: dict[str, list[str]], classes: list[str], mask_dir: Optional[str],
    *, progress: str, reading: dict,
) -> Iterator[Encoded | Skipped]:
    index = {name: i for i, name in enumerate(classes)}

    def read(filename: str) -> Sample:
        names = table[filename]
        if not names:
            raise Unusable("no class in the label file")
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise Unusable(f"class names {unknown} are not in classes {classes}")
        path = os.path.join(image_dir, filename)
        if not os.path.exists(path):
            raise Unusable(f"in the label file but not found: {path}")
        image, data = read_image(path)  # data None: stored re-encoded as PNG
        mask = None
        if mask_dir is not None:
            mask_path = os.path.join(mask_dir, os.path.splitext(filename)[0] + ".png")
            if os.path.exists(mask_path):
                mask = read_label_png(mask_path, len(classes))
                if mask.shape != image.shape[:2]:
                    raise Unusable(f"mask {mask_path} is {mask.shape}, the image is {image.shape[:2]}")
        return Sample(key_for(filename), image, sorted({index[name] for name in names}), mask, image_bytes=data)

    return read_each(files, read, source=lambda filename: filename, source_dirs=[image_dir], progress=progress,
                     **reading)


def convert_folder(
    image_dir: str | os.PathLike,
    label_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mask_dir: Optional[str | os.PathLike] = None,
    classes: Optional[Sequence[str]] = None,
    name: str = "folder",
    val_fraction: float = 0.0,
    seed: int = 0,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    max_shard_bytes: int = 256 * 2**20,
    max_side: Optional[int] = MAX_SIDE,
    workers: int = CONVERT_WORKERS,
    use_ray: bool = False,
) -> Manifest:
    """Write a "train" split (and a "val" split of ``val_fraction`` of the images, chosen with
    ``seed``) from ``image_dir`` labelled by ``label_file``. ``workers``, ``use_ray``: ``read_each``."""
    started = time.perf_counter()
    image_dir = os.fspath(image_dir)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    table = read_label_file(label_file)
    if not table:
        raise ValueError(f"{label_file}: no labelled images")
    # Entries naming a class outside ``classes`` or none at all are skipped (failures.jsonl), not fatal.
    classes = list(classes) if classes is not None else sorted({n for names in table.values() for n in names})
    if not classes:
        raise ValueError(f"{label_file}: no class names")
    keys: dict[str, str] = {}
    for filename in table:
        other = keys.setdefault(key_for(filename), filename)
        if other != filename:
            raise ValueError(f"{other!r} and {filename!r} map to the same sample key {key_for(filename)!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    files = sorted(table)
    val_files = set(random.Random(seed).sample(files, round(val_fraction * len(files))))
    mask_dir = os.fspath(mask_dir) if mask_dir is not None else None
    split_files = {"train": [f for f in files if f not in val_files]}
    if val_files:
        split_files["val"] = [f for f in files if f in val_files]
    reading = {"image_format": "png", "max_side": max_side, "workers": workers, "use_ray": use_ray}
    split_samples = {
        split: _folder_samples(image_dir, names, table, classes, mask_dir, progress=f"{name}/{split}", reading=reading)
        for split, names in split_files.items()
    }
    return write_converted(
        out_dir, name, classes, split_samples, meta={"source": "folder"}, started=started,
        samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes, max_side=max_side,
    )
