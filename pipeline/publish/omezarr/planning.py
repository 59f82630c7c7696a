"""Memory planning: the slab budget under --max-gb, the cost of one slab, the slabs of a level,
and keeping freed slab buffers from accumulating in the heap."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable, Sequence

import numpy as np

from pipeline.publish import pyramid
from pipeline.publish.omezarr.options import OmeZarrError, OmeZarrOptions

GB = 10**9
RESERVE_BYTES = 96 * 2**20
"""Head-room kept under --max-gb for tensorstore's in-flight chunk buffers, thread stacks and
allocator slack (measured: ~40-60 MB above the slab estimate at 32^3 chunks)."""


def process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


MIN_SLAB_BUDGET = 128 * 2**20
"""Slab bytes under a default cap that the process's other contents already fill (--task all
after align loaded itk): enough for a few rows of chunks of a 100000 px wide section."""


def memory_budget(max_gb: float | None, strict: bool = True) -> int:
    """Bytes the slab buffers may use: the cap minus what the process already holds. A cap the
    process already exceeds is refused when the user gave it (`strict`); a default cap then
    leaves the slabs MIN_SLAB_BUDGET: what the converter adds stays bounded, what it did not
    load is not its to free."""
    import psutil

    if max_gb is None:
        cap = psutil.virtual_memory().available // 4
        return max(cap, 64 * 2**20)
    cap = int(max_gb * GB)
    budget = cap - process_rss() - RESERVE_BYTES
    if budget < MIN_SLAB_BUDGET and not strict:
        return MIN_SLAB_BUDGET
    if budget <= 0:
        raise OmeZarrError(f"--max-gb {max_gb} is below what the converter needs before any data "
                           f"({(process_rss() + RESERVE_BYTES) / GB:.2f} GB)")
    return budget


def slab_budget(options: OmeZarrOptions) -> int:
    return options.slab_budget_bytes or memory_budget(options.max_gb, strict=not options.max_gb_is_default)


@dataclasses.dataclass(frozen=True)
class LevelWork:
    level: int
    shape: tuple[int, int, int]
    unit: tuple[int, int, int]  # slab granule: shard or chunk, capped to the shape
    factor: pyramid.Factor | None  # from the level below; None for level 0 from TIFFs


def slab_cost(work: LevelWork, slab: Sequence[int], channels: int, itemsize: int, algorithm: str,
              threads: int, source_width: int = 0, segment_bytes: int = 0) -> int:
    """Peak bytes while one slab is produced: that slab, the previous one still being encoded by
    tensorstore, and the producing step's buffers (TIFF rows being decoded, or the level below
    and the downsampling temporaries)."""
    sz, sy, sx = slab
    out = sz * sy * sx * channels * itemsize
    if work.factor is None:
        rows = min(threads, sz) * (sy * max(source_width, sx) * channels * itemsize + 2 * segment_bytes)
        return 2 * out + rows
    fz, fy, fx = work.factor
    hz, hy, hx = pyramid.halo(work.factor, algorithm)
    in_vox = (sz * fz + 2 * hz) * (sy * fy + 2 * hy) * (sx * fx + 2 * hx)
    in_bytes = in_vox * channels * itemsize
    if algorithm == "gaussian":
        temp = 2 * in_vox * 8  # float64 copy and its filtered result, one channel at a time
    elif algorithm == "mean":
        temp = in_vox * 4 // 2 + 2 * sz * sy * sx * 4  # uint32 half-sums, float32 means
    else:
        temp = 0
    return in_bytes + temp + 2 * out


def plan_level(work: LevelWork, budget: int, cost: Callable[[Sequence[int]], int]) -> list[pyramid.Box]:
    """The largest slabs whose `cost` fits `budget`."""
    max_voxels = int(np.prod([-(-s // u) * u for s, u in zip(work.shape, work.unit)]))
    while True:
        try:
            slabs = pyramid.plan_slabs(work.shape, work.unit, max_voxels)
        except ValueError:
            break
        biggest = max(slabs, key=lambda b: np.prod([hi - lo for lo, hi in b]))
        if cost([hi - lo for lo, hi in biggest]) <= budget:
            return slabs
        max_voxels = int(max_voxels * 0.7)
        if max_voxels < 1:
            break
    unit_cost = cost([min(u, s) for u, s in zip(work.unit, work.shape)])
    raise OmeZarrError(f"the memory cap leaves {budget / 1e6:.1f} MB for data, but one {work.unit} write unit of "
                       f"level {work.level} needs {unit_cost / 1e6:.1f} MB: raise --max-gb or lower --chunk-size "
                       "(or --shard-size)")


_LIBC = None


def limit_heap_retention() -> None:
    """Make freed slab buffers leave the process: glibc otherwise keeps them in per-thread arenas
    and raises its mmap threshold after each free, so RSS creeps up slab after slab (measured:
    +60-110 MB over a 320 MB volume) and --max-gb would not hold. Large blocks are mmap'ed (and
    unmapped on free) and arenas are capped at 2. No-op off glibc."""
    import ctypes
    import ctypes.util

    global _LIBC
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 256 * 1024)
        libc.mallopt(m_arena_max, 2)
        libc.malloc_trim  # noqa: B018  (glibc only: otherwise AttributeError, and we keep None)
        _LIBC = libc


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so the next slab starts level."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def warm_imports() -> None:
    """Import what the conversion will use before measuring the process for --max-gb."""
    limit_heap_retention()
    import scipy.ndimage  # noqa: F401
    import tensorstore  # noqa: F401
    import tifffile  # noqa: F401
    import tqdm  # noqa: F401
    import zarr  # noqa: F401
