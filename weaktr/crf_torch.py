"""The fully-connected CRF of ``weaktr.crf`` in PyTorch: batched, on the CPU or a GPU (``crf.backend: torch``).

The same model and algorithm as pydensecrf (Kraehenbuehl & Koltun 2011, the densecrf code it wraps): mean-field
inference with Potts compatibilities, a Gaussian (smoothness) kernel over (x, y) and a bilateral (appearance) kernel
over (x, y, r, g, b), each filtered on a permutohedral lattice (Adams, Baek & Davis 2010) with symmetric
normalization. Every step of the lattice follows densecrf's: the same elevation and scale, the same rounding to the
nearest remainder-0 point, barycentric weights, a blur of weights (1/2, 1, 1/2) along each of the d + 1 lattice
axes, the same slicing constant. What differs is float summation order (splat and slice are sparse matrix
products here) and the hash table: lattice points are integer keys packed into one int64 (with the image index, so
a batch is one lattice whose images never touch), made unique by one sort and found with ``torch.searchsorted``.
On a CPU it runs at 0.55-0.85x pydensecrf's speed per core (BENCHMARKS.md); it is for GPUs and for machines
without a compiler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from weaktr.crf import CRFParams

# The lattice's splat and slice are sparse CSR matrices, which torch 2.x still calls beta on first use.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

# An unreachable label (a padded channel of a batch of images with fewer labels) gets this energy: exp(-it) is 0.
_PAD_ENERGY = 1e4


@dataclass
class Lattice:
    """A permutohedral lattice over N points with d features, as the three linear maps of a filtering.

    splat [M+1, N] and slice [N, M+1] (sparse CSR): each point's barycentric weights on the d + 1 lattice points of
    its simplex (slice carries densecrf's constant alpha); row / column 0 is an always-zero lattice row standing for
    "no such point". neighbours [d+1, 2, M+1] long: for each lattice axis, the two neighbours of every row (0 where
    absent)."""

    splat: Tensor
    slice: Tensor
    neighbours: Tensor

    def filter(self, values: Tensor) -> Tensor:
        """Gaussian filtering of values [K, N] over the feature space: splat, blur, slice -> [K, N]."""
        grid = (self.splat @ values.T).T.contiguous()  # [K, M+1]: channels apart, each gather stays in one row
        for before, after in self.neighbours:  # one pass per lattice axis, weights (1/2, 1, 1/2); row 0 stays 0
            grid = grid.add_(grid.index_select(1, before).add_(grid.index_select(1, after)), alpha=0.5)
        return (self.slice @ grid.T).T  # [K, N]


def build_lattice(features: Tensor, image_index: Tensor) -> Lattice:
    """The lattice of points with features [N, d] (already divided by the kernel's standard deviations);
    image_index [N] long keeps the images of a batch apart."""
    N, d = features.shape
    device = features.device
    axis = torch.arange(d + 1, device=device)

    # Elevate onto the hyperplane x . 1 = 0 of R^{d+1}, scaled so that the blur is a unit-variance Gaussian.
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)], device=device)
    cf = features.float() * scale  # [N, d]
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(N, 1)], 1)  # [N, d+1]: sum of cf[j:]
    shifted = torch.cat([cf.new_zeros(N, 1), cf], 1)  # [N, d+1]: cf[j-1]
    elevated = suffix - axis * shifted  # [N, d+1]

    # The nearest remainder-0 lattice point, then the simplex around the point: rank = order of the residuals.
    rounded = torch.round(elevated * (1.0 / (d + 1)))  # half to even, as densecrf's SSE rounding
    rem0 = rounded * (d + 1)  # [N, d+1]
    residual = elevated - rem0
    # Position in decreasing order of the residual, ties to the earlier coordinate (densecrf's pairwise count).
    descending = residual.argsort(dim=1, descending=True, stable=True)  # [N, d+1]
    rank = torch.empty_like(descending).scatter_(1, descending, axis.expand(N, d + 1))  # [N, d+1]
    rank = rank + rounded.sum(1, keepdim=True).long()
    wrap = (rank < 0).long() - (rank > d).long()  # bring the point back onto the plane
    rank = rank + wrap * (d + 1)
    rem0 = rem0 + wrap * (d + 1)

    # Barycentric coordinates of the point in its simplex.
    v = (elevated - rem0) * (1.0 / (d + 1))
    bary = v.new_zeros(N, d + 2)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    weights = bary[:, : d + 1]  # [N, d+1]

    # Vertex r of the simplex has key_i = rem0_i + r - (d+1) [rank_i > d - r] in the first d coordinates. Keys are
    # packed (with the image) into one int64, coordinates offset to stay >= 0 with a margin of d + 1, so that a
    # neighbour's key (each coordinate moved by at most d) is the packed key plus a constant.
    rem0 = rem0[:, :d].long()  # [N, d]
    low = rem0.amin(0) - 2 * (d + 1)  # [d]
    sizes = (rem0.amax(0) + 2 * (d + 1) - low + 1).tolist()
    num_images = int(image_index.max()) + 1 if N else 1
    if math.prod(sizes) * num_images >= 2**62:
        raise ValueError("the CRF's kernel widths are too small for the torch lattice's 63-bit keys at this image "
                         "size; use crf.backend: pydensecrf")
    strides = torch.tensor([math.prod(sizes[i + 1 :]) for i in range(d)], device=device)  # [d]
    base = ((rem0 - low) * strides).sum(1) + image_index.long() * math.prod(sizes)  # [N]
    stride_of_rank = torch.zeros(N, d + 1, dtype=torch.long, device=device).scatter_(
        1, rank[:, :d], strides.expand(N, d))  # [N, d+1]: coordinate d has no key
    top_ranks = torch.cat([stride_of_rank.new_zeros(N, 1), stride_of_rank.flip(1).cumsum(1)[:, :d]], 1)  # [N, d+1]
    packed = base[:, None] + axis * strides.sum() - (d + 1) * top_ranks  # [N, d+1]: vertex r of each simplex

    # Lattice points = distinct keys (one sort); rows 1..M of the value table, in key order.
    flat, order = packed.reshape(-1).sort()  # [N*(d+1)]
    is_new = torch.ones_like(flat, dtype=torch.bool)
    is_new[1:] = flat[1:] != flat[:-1]
    row_of_sorted = is_new.cumsum(0)  # [N*(d+1)], 1-based rows
    keys = flat[is_new]  # [M]
    M = keys.numel()
    pixel = order // (d + 1)
    counts = torch.bincount(row_of_sorted, minlength=M + 1)  # [M+1]
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    splat = torch.sparse_csr_tensor(crow, pixel, weights.reshape(-1)[order], (M + 1, N), check_invariants=False)
    row = torch.empty_like(row_of_sorted).scatter_(0, order, row_of_sorted).reshape(N, d + 1)
    alpha = 1.0 / (1.0 + 2.0 ** -d)  # densecrf's slicing constant
    slice_ = torch.sparse_csr_tensor(torch.arange(0, N * (d + 1) + 1, d + 1, device=device), row.reshape(-1),
                                     (weights * alpha).reshape(-1), (N, M + 1), check_invariants=False)

    # Neighbours along axis j: every coordinate -1 except j +d, and the opposite (axis d: all -1 / all +1).
    neighbours = []
    for j in range(d + 1):
        step = -strides.sum() + ((d + 1) * strides[j] if j < d else 0)
        pair = []
        for offset in (step, -step):
            wanted = keys + offset
            found = torch.searchsorted(keys, wanted).clamp(max=M - 1)
            hit = torch.where(keys[found] == wanted, found + 1, 0)  # [M]
            pair.append(torch.cat([hit.new_zeros(1), hit]))  # [M+1]: row 0 -> row 0
        neighbours.append(torch.stack(pair))
    return Lattice(splat, slice_, torch.stack(neighbours))


def mean_field(images: Sequence[Tensor], unaries: Sequence[Tensor], params: CRFParams) -> list[Tensor]:
    """Posterior marginals of a batch: images uint8 [H_i, W_i, 3], unaries float [K_i, H_i, W_i] (negative
    log-probabilities), all on one device -> float32 [K_i, H_i, W_i] each. densecrf's DenseCRF2D with
    addPairwiseGaussian(sxy, compat) + addPairwiseBilateral(sxy, srgb, compat) and inference(iterations), the
    kernels of ``params`` (its backend is not read)."""
    if len(images) != len(unaries) or not images:
        raise ValueError(f"need one unary per image, got {len(images)} images and {len(unaries)} unaries")
    device = unaries[0].device
    num_labels = max(u.shape[0] for u in unaries)
    gaussian, bilateral, unary, index = [], [], [], []
    for i, (image, u) in enumerate(zip(images, unaries)):
        K, H, W = u.shape
        if tuple(image.shape) != (H, W, 3):
            raise ValueError(f"image {i} is {tuple(image.shape)}, its unary {tuple(u.shape)}: need [H, W, 3]")
        y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
        xy = torch.stack([x, y], -1).reshape(-1, 2).float()  # [H*W, 2], pixel order row-major as densecrf
        rgb = image.to(device).reshape(-1, 3).float()
        gaussian.append(xy / params.gaussian_sxy)
        bilateral.append(torch.cat([xy / params.bilateral_sxy, rgb / params.bilateral_srgb], 1))  # [H*W, 5]
        padded = torch.full((num_labels, H * W), _PAD_ENERGY, device=device)
        padded[:K] = u.reshape(K, -1).float()
        unary.append(padded)  # [K_max, H*W]
        index.append(torch.full((H * W,), i, dtype=torch.long, device=device))
    index = torch.cat(index)
    unary = torch.cat(unary, 1)  # [K_max, N]: label-major, so that the softmax over labels runs along whole rows
    kernels = []
    for features, compat in ((gaussian, params.gaussian_compat), (bilateral, params.bilateral_compat)):
        lattice = build_lattice(torch.cat(features), index)
        norm = lattice.filter(unary.new_ones(1, len(index))).add(1e-20).rsqrt()  # [1, N], symmetric normalization
        kernels.append((lattice, norm, compat))

    q = torch.softmax(-unary, 0)  # [K_max, N]
    for _ in range(params.iterations):
        energy = -unary
        for lattice, norm, compat in kernels:  # Potts: a label is rewarded by its own filtered marginal
            energy = energy + compat * norm * lattice.filter(norm * q)
        q = torch.softmax(energy, 0)

    out, start = [], 0
    for u in unaries:
        K, H, W = u.shape
        out.append(q[:K, start : start + H * W].reshape(K, H, W))
        start += H * W
    return out
