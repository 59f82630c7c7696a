"""Pure maths of the OME-Zarr pyramid: which levels, how one level is made from the one below,
and how a level is cut into slabs that fit a memory budget.

Arrays here are (z, y, x) numpy volumes; no files. Unlike the precomputed pyramid (igneous,
`pipeline.imaging.pyramid`), nothing is padded: level 0 is the stack itself, and a block cut by
the volume edge averages the voxels it has, with integer means rounded (not truncated).
Every level is computed from the level below it, so `downsample(level[n])` *is* `level[n+1]`,
slab by slab or whole: the slab engine reads a halo (`halo`) wherever the filter needs one.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline.imaging.downsample import downsample_area

ALGORITHMS = ("mean", "nearest", "gaussian")
Factor = tuple[int, int, int]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""((z0, z1), (y0, y1), (x0, x1)), half-open."""

GAUSSIAN_TRUNCATE = 4.0


def level_factors(shape: Sequence[int], voxel_um: Sequence[float], nlevels: int) -> list[Factor]:
    """(fz, fy, fx) taking level i to level i+1, for `nlevels` levels (so nlevels-1 steps).

    x and y always halve; z halves only once the xy voxel has caught up with it (xy * sqrt 2 >= z,
    the rule the precomputed pyramid uses), so thick sections are not blurred away while xy is
    still fine, and an isotropic volume halves all three axes as scroll_to_ome does. An axis of
    one voxel is never halved.
    """
    if nlevels < 1:
        raise ValueError(f"nlevels must be >= 1, got {nlevels}")
    z, y, x = (int(s) for s in shape)
    rz, ry, rx = (float(v) for v in voxel_um)
    steps: list[Factor] = []
    for _ in range(nlevels - 1):
        fz = 2 if (max(ry, rx) * math.sqrt(2) >= rz and z > 1) else 1
        fy = 2 if y > 1 else 1
        fx = 2 if x > 1 else 1
        steps.append((fz, fy, fx))
        z, y, x = -(-z // fz), -(-y // fy), -(-x // fx)
        rz, ry, rx = rz * fz, ry * fy, rx * fx
    return steps


def auto_nlevels(shape: Sequence[int], chunk: Sequence[int]) -> int:
    """Levels until the top level's y and x both fit in one chunk (Neuroglancer's overview)."""
    _z, y, x = shape
    n = 1
    while y > chunk[1] or x > chunk[2]:
        y, x = -(-y // 2), -(-x // 2)
        n += 1
    return n


def level_shapes(shape: Sequence[int], factors: Sequence[Factor]) -> list[tuple[int, int, int]]:
    shapes = [tuple(int(s) for s in shape)]
    for f in factors:
        shapes.append(tuple(-(-s // k) for s, k in zip(shapes[-1], f)))
    return shapes


def level_scales(voxel_um: Sequence[float], factors: Sequence[Factor]) -> list[tuple[float, float, float]]:
    scales = [tuple(float(v) for v in voxel_um)]
    for f in factors:
        scales.append(tuple(s * k for s, k in zip(scales[-1], f)))
    return scales


def level_translations(translation0: Sequence[float], scales: Sequence[Sequence[float]],
                       factors: Sequence[Factor]) -> list[tuple[float, float, float]]:
    """Physical position of each level's first voxel centre (NGFF places voxel centres at
    scale * index + translation), so that every level lies where the level-0 voxels it came from lie.

    A voxel made from the block [0, f) of the level below stands for that block, whose centre is
    (f - 1) / 2 voxels of the level below from its first voxel: translation(n+1) = translation(n)
    + (f - 1) / 2 * scale(n) per axis, so level k of 2x halvings is shifted (2^k - 1) / 2 level-0
    voxels. ome-zarr-py 0.18 and ngff-zarr write the same, for every downsampling method; for
    `nearest` it places a block-aligned feature exactly (a single voxel sampled at the block's
    first voxel moves by up to half a block, as it does in those writers).
    `scales` are the levels' scales (`level_scales`), `factors` the steps between them.
    """
    out = [tuple(float(t) for t in translation0)]
    for scale, factor in zip(scales, factors):
        out.append(tuple(t + (f - 1) / 2 * s for t, f, s in zip(out[-1], factor, scale)))
    return out


def gaussian_sigmas(factor: Factor) -> tuple[float, ...]:
    """Anti-aliasing sigma per axis, (f - 1) / 2 as skimage uses: 0.5 for a halving, 0 otherwise."""
    return tuple((f - 1) / 2.0 for f in factor)


def halo(factor: Factor, algorithm: str) -> tuple[int, int, int]:
    """Input voxels a slab needs beyond its own block on each side (the filter's radius)."""
    if algorithm != "gaussian":
        return (0, 0, 0)
    return tuple(int(GAUSSIAN_TRUNCATE * s + 0.5) for s in gaussian_sigmas(factor))


def downsample(block: np.ndarray, factor: Factor, algorithm: str = "mean",
               margin: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0))) -> np.ndarray:
    """The next level of the (z, y, x) `block`, whose first voxel sits on a multiple of `factor`.

    `margin` = voxels of halo before/after the block on each axis that are included in `block`
    (read from the neighbours for the gaussian filter) and not part of the result; at the volume's
    own edges the margin is 0 and the filter repeats the edge voxel ('nearest').
    mean: mean of each block (edge blocks: of the voxels present), rounded for integers.
    nearest: the first voxel of each block. gaussian: a Gaussian low-pass, then the block mean
    (for a halving that is the smoothed signal sampled at the block centre).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if block.ndim != 3:
        raise ValueError(f"expected a (z, y, x) block, got shape {block.shape}")
    fz, fy, fx = factor
    if fy != fx or fy not in (1, 2) or fz not in (1, 2):
        raise ValueError(f"unsupported factor {factor}: y and x must both be 1 or 2, z 1 or 2")
    core = tuple(slice(lo, block.shape[i] - hi) for i, (lo, hi) in enumerate(margin))
    if algorithm == "nearest":
        return np.ascontiguousarray(block[core][::fz, ::fy, ::fx])
    if algorithm == "gaussian":
        from scipy.ndimage import gaussian_filter

        smooth = gaussian_filter(block.astype(np.float64), gaussian_sigmas(factor), mode="nearest",
                                 truncate=GAUSSIAN_TRUNCATE)
        return _block_mean(smooth[core], fz, fy, block.dtype)
    data = block[core]
    if data.dtype in (np.uint8, np.uint16):
        return block_mean_uint(data, factor)
    return _block_mean(data, fz, fy, data.dtype)


def block_mean_uint(data: np.ndarray, factor: Factor) -> np.ndarray:
    """The mean rule of `downsample` for uint8/uint16 in integer sums: ~5x faster than the float64
    path through `downsample_area` (the conversion's bottleneck, measured in bench/omezarr.py)
    and the same result, which tests check against `downsample_area` and a naive loop.

    Sums of up to 8 voxels fit uint32; a block's count is a power of two (1, 2, 4, 8), so
    float32 sum * (1 / count) is exact and np.rint rounds halves to even as downsample_area does.
    """
    sums = data  # widened to uint32 by the first halving, which copies half the voxels, not all
    counts = []
    for axis, f in enumerate(factor):
        n = sums.shape[axis]
        if f == 1:
            counts.append(np.ones(n, np.float32))
            continue
        first = sums[(slice(None),) * axis + (slice(0, None, 2),)]
        second = sums[(slice(None),) * axis + (slice(1, None, 2),)]
        first = first.astype(np.uint32)
        first[(slice(None),) * axis + (slice(0, second.shape[axis]),)] += second
        sums = first
        count = np.full(first.shape[axis], 2, np.float32)
        if n % 2:
            count[-1] = 1
        counts.append(count)
    scale = (1.0 / counts[0])[:, None, None] * (1.0 / counts[1])[None, :, None] * (1.0 / counts[2])[None, None, :]
    means = sums.astype(np.float32)
    means *= scale.astype(np.float32)
    return np.rint(means, out=means).astype(data.dtype)


def _block_mean(data: np.ndarray, fz: int, fxy: int, dtype) -> np.ndarray:
    """Exact block means cast to `dtype`, one output plane at a time so float temporaries stay
    the size of a plane, not of the slab."""
    out_z = -(-data.shape[0] // fz)
    out = np.empty((out_z, -(-data.shape[1] // fxy), -(-data.shape[2] // fxy)), dtype)
    for k in range(out_z):
        planes = data[k * fz:(k + 1) * fz]
        total = planes.sum(axis=0, dtype=np.float64)
        # downsample_area on float input returns float means; dividing by the plane count is exact
        # in binary for 1 or 2 planes, so integer results round once, like a direct 3-D mean.
        out[k] = _cast_like(downsample_area(total, fxy) / planes.shape[0], dtype)
    return out


def _cast_like(values: np.ndarray, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def input_box(out_box: Box, factor: Factor, in_shape: Sequence[int], algorithm: str) -> tuple[Box, tuple[tuple[int, int], ...]]:
    """The box of the level below that makes `out_box`, with its halo clipped to the volume,
    and the margins (before, after) that `downsample` must drop."""
    pad = halo(factor, algorithm)
    box, margin = [], []
    for (o0, o1), f, h, n in zip(out_box, factor, pad, in_shape):
        i0, i1 = o0 * f, min(o1 * f, n)
        lo, hi = max(i0 - h, 0), min(i1 + h, n)
        box.append((lo, hi))
        margin.append((i0 - lo, hi - i1))
    return tuple(box), tuple(margin)


def plan_slabs(shape: Sequence[int], unit: Sequence[int], max_voxels: int) -> list[Box]:
    """Cut a (z, y, x) volume into slabs of whole write units (chunks or shards) of at most
    `max_voxels` each: one unit deep in z, full rows in x when they fit (long contiguous reads),
    then as many rows of units in y as fit. Raises ValueError if one unit does not fit."""
    z, y, x = (int(s) for s in shape)
    uz, uy, ux = (min(int(u), int(s)) for u, s in zip(unit, shape))
    if uz * uy * ux > max_voxels:
        raise ValueError(f"one write unit of {uz}x{uy}x{ux} voxels exceeds the budget of {max_voxels} voxels")
    row_units = -(-x // ux)
    units_x = max(1, min(row_units, max_voxels // (uz * uy * ux)))
    sx = units_x * ux
    units_y = max(1, min(-(-y // uy), max_voxels // (uz * uy * sx)))
    sy = units_y * uy
    slabs: list[Box] = []
    for z0 in range(0, z, uz):
        for y0 in range(0, y, sy):
            for x0 in range(0, x, sx):
                slabs.append(((z0, min(z0 + uz, z)), (y0, min(y0 + sy, y)), (x0, min(x0 + sx, x))))
    return slabs
