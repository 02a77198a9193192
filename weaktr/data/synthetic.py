"""The built-in dataset: seeded, multi-label, with exact masks, learnable by a tiny ViT on a CPU.

Each class is a *texture* (stripes in three orientations, checkerboard, dots, rings, grid,
waves) painted with two colours drawn per object, so colour alone cannot tell classes apart;
the period (6-14 px, below the 16 px patch) and orientation are jittered. Objects have random
outlines (ellipse, box, triangle, blob), scales and positions, 1..max_objects per image, later
ones occluding earlier ones, over a smooth random background (low-frequency colour field +
gradient, sometimes an untextured distractor shape) with pixel noise. Images are non-square.

Masks follow VOC: 0 background, c+1 for class c, and 255 on a 2 px band along every object
outline, occlusion boundaries included. An object with too few visible (non-band) pixels is
dropped before painting, so the labels are exactly the classes visible in the mask.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weaktr.data.shards import IGNORE, MANIFEST_NAME, Manifest, ManifestError, Sample, write_dataset

CLASS_NAMES = ("hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "grid", "waves")
SHAPES = ("ellipse", "box", "triangle", "blob")
# Texture period range (px) per class; below the 16 px patch so one patch sees the pattern.
_PERIODS = {"checker": (10.0, 14.0), "dots": (7.0, 11.0), "grid": (7.0, 11.0), "waves": (7.0, 11.0)}
_DEFAULT_PERIOD = (6.0, 10.0)
_MIN_LUMA_CONTRAST = 80.0  # between an object's two texture colours (0..255): the pattern must show


@dataclass(frozen=True)
class SyntheticSpec:
    num_classes: int = 6
    num_train: int = 1200
    num_val: int = 200
    min_size: int = 96  # each side drawn independently from [min_size, max_size]
    max_size: int = 160
    max_objects: int = 3
    seed: int = 0
    samples_per_shard: int = 64  # many small shards so ranks x loader workers all get some
    # An object needs this share of the image in non-band pixels (else it is dropped, label and all): at 2%
    # one label in fifteen was an object under 5% of the image, about one 16 px patch of a 64 px crop.
    min_visible_fraction: float = 0.06
    # Noisy pseudo-labels on the training split (a ``pseudo`` map beside the exact mask): phase-2 data without a
    # phase-1 model (the clipping sweep configs/tune_clip.yaml, bench/clip_ablation.py). See noisy_pseudo_label.
    pseudo_flip: float = 0.0
    pseudo_dilate: float = 0.0
    pseudo_dilate_px: int = 6

    @property
    def has_pseudo(self) -> bool:
        return self.pseudo_flip > 0 or self.pseudo_dilate > 0

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {self.num_classes}")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.max_objects < 1 or self.num_train < 0 or self.num_val < 0 or self.samples_per_shard < 1 \
                or not 0 < self.min_visible_fraction < 0.5 or not 0 <= self.pseudo_flip <= 1 \
                or not 0 <= self.pseudo_dilate <= 1 or self.pseudo_dilate_px < 1:
            raise ValueError(f"invalid synthetic spec: {self}")


# --------------------------------------------------------------------------- textures and shapes


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _texture(name: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Binary pattern (same shape as u, v) in object-centred, slightly rotated coordinates."""
    phase_u, phase_v = rng.uniform(0, period, size=2)
    if name == "hstripes":
        return _frac((v + phase_v) / period) < 0.5
    if name == "vstripes":
        return _frac((u + phase_u) / period) < 0.5
    if name == "diagonal":
        return _frac((u + v) / np.sqrt(2) / period + phase_u / period) < 0.5
    if name == "checker":
        cells = np.floor((u + phase_u) / (period / 2)) + np.floor((v + phase_v) / (period / 2))
        return cells % 2 == 0
    if name == "dots":
        du, dv = _frac((u + phase_u) / period) - 0.5, _frac((v + phase_v) / period) - 0.5
        return du**2 + dv**2 < 0.3**2
    if name == "rings":
        return _frac(np.hypot(u, v) / period + phase_u / period) < 0.5
    if name == "grid":
        return (_frac((u + phase_u) / period) < 0.3) | (_frac((v + phase_v) / period) < 0.3)
    if name == "waves":
        wavelength = rng.uniform(3, 5) * period
        return _frac((v + 0.35 * period * np.sin(2 * np.pi * u / wavelength) + phase_v) / period) < 0.5
    raise ValueError(f"unknown texture {name!r}")


def _shape(kind: str, a: np.ndarray, b: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean outline [H, W] in rotated object coordinates (a, b) centred on the object."""
    aspect = rng.uniform(0.6, 1.0)
    if kind == "ellipse":
        return (a / radius) ** 2 + (b / (radius * aspect)) ** 2 <= 1
    if kind == "box":
        return (np.abs(a) <= 0.85 * radius) & (np.abs(b) <= 0.85 * radius * aspect)
    if kind == "triangle":
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-20, 20, size=3))
        xs, ys = radius * np.cos(angles), radius * np.sin(angles)
        # Inside when on the same side of all three (counter-clockwise) edges.
        inside = np.ones(a.shape, dtype=bool)
        for i in range(3):
            x0, y0, x1, y1 = xs[i], ys[i], xs[(i + 1) % 3], ys[(i + 1) % 3]
            inside &= (x1 - x0) * (b - y0) - (y1 - y0) * (a - x0) >= 0
        return inside
    if kind == "blob":
        # Radius wobbles with the angle t: r(t) = R (1 + sum_k amp_k cos(k t + phase_k)), k = 2..4,
        # with cos(k t + phase) = Re(e^{i phase} z^k) for the unit complex z = e^{i t} (no trig per pixel).
        coefficients = rng.uniform(0, 0.18, size=3) * np.exp(1j * rng.uniform(0, 2 * np.pi, size=3))
        distance = np.hypot(a, b)
        z = (a + 1j * b) / np.maximum(distance, 1e-6)
        z2 = z * z
        wobble = (coefficients[0] * z2 + coefficients[1] * z2 * z + coefficients[2] * z2 * z2).real
        return distance <= radius * (1 + wobble)
    raise ValueError(f"unknown shape {kind!r}")


def _object_frame(xx, yy, cx, cy, angle_deg):
    """Coordinates relative to (cx, cy), rotated by angle: (along, across)."""
    theta = np.deg2rad(angle_deg)
    dx, dy = xx - cx, yy - cy
    return np.cos(theta) * dx + np.sin(theta) * dy, -np.sin(theta) * dx + np.cos(theta) * dy


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours whose brightness differs enough for the texture to be visible."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        first, second = rng.uniform(0, 255, size=(2, 3))
        if abs(luma @ (first - second)) >= _MIN_LUMA_CONTRAST:
            return first, second


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Smooth float [H, W, 3]: a bicubically upsampled coarse colour grid plus a linear gradient."""
    height, width = xx.shape
    grid_h, grid_w = rng.integers(2, 5, size=2)
    coarse = rng.uniform(20, 235, size=(grid_h, grid_w, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / width + np.sin(direction) * yy / height)[..., None]  # [H, W, 1]
    return field + ramp * rng.uniform(-40, 40, size=3).astype(np.float32)


def _boundary_band(instances: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another instance (or background): a 2 px band per edge."""
    padded = np.pad(instances, 1, mode="edge")
    height, width = instances.shape
    band = np.zeros(instances.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        band |= padded[dy : dy + height, dx : dx + width] != instances
    return band


def _compose(masks: list[np.ndarray], shape) -> np.ndarray:
    instances = np.zeros(shape, dtype=np.int32)  # 0 background, k+1 object k (later on top)
    for k, mask in enumerate(masks):
        instances[mask] = k + 1
    return instances


# --------------------------------------------------------------------------- samples


def _draw_objects(rng, spec, xx, yy):
    """Classes, centres and the instance map [H, W] (0 background, k+1 object k) of the objects,
    after dropping those left (almost) hidden by the ones in front."""
    height, width = xx.shape
    min_visible = spec.min_visible_fraction * height * width
    while True:
        count = int(rng.integers(1, spec.max_objects + 1))
        classes = [int(c) for c in rng.integers(0, spec.num_classes, size=count)]
        centres, masks = [], []
        for _ in range(count):
            radius = rng.uniform(0.2, 0.4) * min(height, width)
            cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
            a, b = _object_frame(xx, yy, cx, cy, rng.uniform(0, 360))
            masks.append(_shape(SHAPES[rng.integers(len(SHAPES))], a, b, radius, rng))
            centres.append((cx, cy))
        while masks:
            instances = _compose(masks, xx.shape)
            interior = np.bincount(instances[~_boundary_band(instances)], minlength=len(masks) + 1)[1:]
            keep = interior >= min_visible
            if keep.all():
                return classes, centres, instances
            masks = [m for m, k in zip(masks, keep) if k]
            classes = [c for c, k in zip(classes, keep) if k]
            centres = [c for c, k in zip(centres, keep) if k]


def benchmark_texture(cls: int, rng: np.random.Generator):
    """The benchmark's class ``cls`` (CLASS_NAMES) with a random period in its range: a painter (u, v) -> binary
    pattern at texture coordinates [P] (which draws the pattern's phase from ``rng`` when called)."""
    name = CLASS_NAMES[cls]
    period = rng.uniform(*_PERIODS.get(name, _DEFAULT_PERIOD))
    return lambda u, v: _texture(name, u, v, period, rng)


def generate_sample(rng: np.random.Generator, spec: SyntheticSpec, index: int, texture=benchmark_texture) -> Sample:
    """One image with its labels and exact mask; deterministic given ``rng``'s state. ``texture(class, rng)`` makes
    each object's painter; the pretraining generator (``weaktr.pretrain``) brings classes of its own, with a spec of
    its own (the fields read here: min_size, max_size, num_classes, max_objects, min_visible_fraction)."""
    height, width = (int(s) for s in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, xx, yy)  # float [H, W, 3]

    if rng.random() < 0.5:  # an untextured distractor: shape alone must not mean "object"
        a, b = _object_frame(xx, yy, rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, 360))
        distractor = _shape(SHAPES[rng.integers(len(SHAPES))], a, b, rng.uniform(0.1, 0.3) * min(height, width), rng)
        image[distractor] = rng.uniform(0, 255, size=3)

    classes, centres, instances = _draw_objects(rng, spec, xx, yy)
    for k, (cls, (cx, cy)) in enumerate(zip(classes, centres)):
        paint = texture(cls, rng)
        visible = instances == k + 1
        # Texture coordinates of the visible pixels only: [P] each.
        u, v = _object_frame(xx[visible], yy[visible], cx, cy, rng.uniform(-12, 12))
        pattern = paint(u, v)[:, None]  # [P, 1]
        first, second = _colour_pair(rng)
        image[visible] = np.where(pattern, first, second)  # [P, 3]

    image += rng.standard_normal(size=image.shape, dtype=np.float32) * rng.uniform(3, 10)
    lookup = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    mask = lookup[instances]
    mask[_boundary_band(instances)] = IGNORE
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:IGNORE])  # ids 1..254, minus one
    return Sample(
        key=f"synthetic_{index:06d}",
        image=np.clip(image, 0, 255).astype(np.uint8),
        labels=present.tolist(),
        mask=mask,
    )


def iter_synthetic(spec: SyntheticSpec, start: int, count: int, with_pseudo: bool = False) -> Iterator[Sample]:
    """Samples ``start .. start+count-1``; sample i only depends on (spec, i). ``with_pseudo``: each also carries
    a noisy pseudo-label (drawn after the sample, so images and masks are the same either way)."""
    for index in range(start, start + count):
        rng = np.random.default_rng([spec.seed, index])
        sample = generate_sample(rng, spec, index)
        if with_pseudo:
            sample.pseudo = noisy_pseudo_label(
                sample.mask, spec.num_classes, rng, spec.pseudo_flip, spec.pseudo_dilate, spec.pseudo_dilate_px
            )
        yield sample


def dilate(region: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation of a bool map [H, W] by a (2*pixels+1)-square."""
    grown = F.max_pool2d(torch.from_numpy(region).float()[None, None], 2 * pixels + 1, stride=1, padding=pixels)
    return grown[0, 0].numpy() > 0


def noisy_pseudo_label(
    mask: np.ndarray, num_classes: int, rng: np.random.Generator, flip: float, dilate_prob: float, dilate_px: int
) -> np.ndarray:
    """A pseudo-label made from a ground-truth mask (dataset ids, 255 ignored) with the two errors CAM
    pseudo-labels make, object by object.

    Each object (the pixels of one foreground class) is, independently, dilated by ``dilate_px`` with probability
    ``dilate_prob`` (over background and ignored pixels only, as a CAM spills into the background) and given a
    random other foreground class with probability ``flip``. The ignore band of the ground truth stays ignored.
    """
    pseudo = mask.copy()
    for cls in sorted(set(np.unique(mask).tolist()) - {0, IGNORE}):
        region = mask == cls
        if rng.random() < dilate_prob:
            region = dilate(region, dilate_px) & ((mask == 0) | (mask == IGNORE) | region)
        new_id = cls
        if num_classes > 1 and rng.random() < flip:
            new_id = int(rng.choice([c for c in range(1, num_classes + 1) if c != cls]))
        pseudo[region & (mask != IGNORE)] = new_id
    return pseudo


def write_synthetic(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Manifest:
    """Generate the dataset into ``out_dir``; reuses an existing one written with the same spec.

    Train is samples 0..num_train-1, val the next num_val, so keys are unique across splits.
    """
    out_dir = os.fspath(out_dir)
    wanted = dataclasses.asdict(spec)
    try:
        existing = Manifest.load(os.path.join(out_dir, MANIFEST_NAME))
        complete = all(os.path.exists(p) for split in existing.splits for p in existing.shard_paths(split))
        if existing.meta.get("synthetic_spec") == wanted and complete:
            return existing
    except ManifestError:
        pass  # nothing (usable) there yet
    splits = {
        "train": iter_synthetic(spec, 0, spec.num_train, with_pseudo=spec.has_pseudo),
        "val": iter_synthetic(spec, spec.num_train, spec.num_val),
    }
    return write_dataset(
        out_dir, "synthetic", CLASS_NAMES[: spec.num_classes], splits,
        meta={"synthetic_spec": wanted}, samples_per_shard=spec.samples_per_shard, image_format="png",
    )
