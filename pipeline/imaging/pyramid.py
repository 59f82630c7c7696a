"""The resolution pyramid of a section stack: which downsampling steps, and what each level holds.

Pure functions (no files): the publishing code asks `plan_pyramid` what to build, and the
verifier uses `block_mean_floor` as its independent reference for what igneous must have written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Factor = tuple[int, int, int]


@dataclass(frozen=True)
class PyramidPlan:
    """`factors[i]` takes mip i to mip i+1; `size` is the mip-0 size after padding (x, y, z)."""

    size: tuple[int, int, int]
    factors: tuple[Factor, ...]
    resolution: tuple[float, float, float]

    @property
    def num_mips(self) -> int:
        """Levels including mip 0."""
        return len(self.factors) + 1

    def sizes(self) -> list[tuple[int, int, int]]:
        out = [self.size]
        for f in self.factors:
            out.append(tuple(-(-s // k) for s, k in zip(out[-1], f)))
        return out

    def resolutions(self) -> list[tuple[float, float, float]]:
        out = [self.resolution]
        for f in self.factors:
            out.append(tuple(r * k for r, k in zip(out[-1], f)))
        return out

    def runs(self) -> list[tuple[int, int, Factor]]:
        """(first mip, number of steps, factor) of each run of equal consecutive steps."""
        out: list[tuple[int, int, Factor]] = []
        for mip, f in enumerate(self.factors):
            if out and out[-1][2] == f:
                out[-1] = (out[-1][0], out[-1][1] + 1, f)
            else:
                out.append((mip, 1, f))
        return out


def _steps(size, resolution, chunk, max_mips):
    sx, sy, sz = size
    rx, ry, rz = resolution
    cxy = min(chunk[0], chunk[1])
    steps: list[Factor] = []
    # Stop once the smaller xy side of the top level is under two chunks: the top is then a few
    # chunks at most, and igneous cannot halve an axis that is already smaller than one chunk.
    while min(sx, sy) >= 2 * cxy and (max_mips is None or len(steps) < max_mips):
        # 2x2x1 until doubling xy would overshoot z more than staying undershoots it (in log
        # terms: xy >= z / sqrt 2); then 2x2x2 while z still spans two chunks.
        halve_z = max(rx, ry) * math.sqrt(2) >= rz and sz >= 2 * chunk[2]
        f: Factor = (2, 2, 2 if halve_z else 1)
        steps.append(f)
        sx, sy = -(-sx // 2), -(-sy // 2)
        rx, ry = rx * 2, ry * 2
        if halve_z:
            sz, rz = -(-sz // 2), rz * 2
    return steps


def plan_pyramid(
    size: tuple[int, int, int],
    resolution: tuple[float, float, float],
    chunk: tuple[int, int, int],
    max_mips: int | None = None,
) -> PyramidPlan:
    """Downsampling steps for a volume of `size` voxels (x, y, z) at `resolution` (nm).

    The volume is padded so that every step halves even sizes: igneous's averaging (tinybrain
    <= 1.7) writes wrong values and zeros along an odd x or y edge in 2x2x1 steps, and refuses a
    2x2x2 task whose edge is one voxel thick. x and y are padded to a multiple of 2**(steps), z
    to a multiple of 2**(z halvings); the padding is zero voxels at the far edges, so voxel
    coordinates of the stack do not change.
    """
    if any(s < 1 for s in size):
        raise ValueError(f"empty volume {size}")
    if any(c < 1 for c in chunk) or chunk[0] % 2 or chunk[1] % 2:
        raise ValueError(f"chunk size {chunk} must be positive with even x and y")
    padded = tuple(int(s) for s in size)
    for _ in range(64):  # padding can add a step, which can need more padding: iterate to a fixpoint
        steps = _steps(padded, resolution, chunk, max_mips)
        xy_multiple = 2 ** len(steps)
        z_multiple = 2 ** sum(1 for f in steps if f[2] == 2)
        new = tuple(-(-s // m) * m for s, m in zip(padded, (xy_multiple, xy_multiple, z_multiple)))
        if new == padded:
            return PyramidPlan(size=padded, factors=tuple(steps), resolution=tuple(float(r) for r in resolution))
        padded = new
    raise AssertionError("pyramid padding did not converge")


def block_mean_floor(volume: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Mean of each `factor` block of an (x, y, z, channel) volume, truncated for integers.

    This is igneous's rule (tinybrain average pooling): integer means are truncated (floor), not
    rounded, and a block cut by the volume edge averages the voxels it has. When igneous makes
    several levels in one task, level k is this function applied to the task's base level with
    factor 2**k (not to the already-truncated level below), which is how we verify them.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected an (x, y, z, channel) array, got shape {volume.shape}")
    fx, fy, fz = factor
    X, Y, Z, C = volume.shape
    ox, oy, oz = -(-X // fx), -(-Y // fy), -(-Z // fz)
    integer = np.issubdtype(volume.dtype, np.integer)
    acc = np.int64 if integer else np.float64
    pad = [(0, ox * fx - X), (0, oy * fy - Y), (0, oz * fz - Z), (0, 0)]
    # Sum in the accumulator type without first copying the whole block into it (a verifier's
    # block can be 2048 x 2048 x 16 voxels).
    data = np.pad(volume, pad) if any(p[1] for p in pad) else volume
    sums = data.reshape(ox, fx, oy, fy, oz, fz, C).sum(axis=(1, 3, 5), dtype=acc)
    counts = np.pad(np.ones((X, Y, Z), dtype=np.int64), pad[:3]) if any(p[1] for p in pad) else None
    if counts is None:
        n = np.int64(fx * fy * fz)
    else:
        n = counts.reshape(ox, fx, oy, fy, oz, fz).sum(axis=(1, 3, 5))[..., None]
    if integer:
        return (sums // n).astype(volume.dtype)  # sums are >= 0 for the unsigned stacks we publish
    return (sums / n).astype(volume.dtype)
