"""Display windows (the black and white points of a viewer) from intensity histograms."""

from __future__ import annotations

import numpy as np


def window_from_histogram(counts: np.ndarray, edges: np.ndarray, low: float = 0.005, high: float = 0.995,
                          ignore_zero: bool = True) -> tuple[float, float]:
    """Intensities at the `low` and `high` quantiles of a histogram (numpy.histogram layout:
    len(edges) == len(counts) + 1).

    Masked sections are mostly exact zeros outside the tissue; counting them would put the white
    point on background, so the bin holding 0 is left out unless `ignore_zero` is False.
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    edges = np.asarray(edges, dtype=np.float64).ravel()
    if edges.size != counts.size + 1:
        raise ValueError(f"histogram needs len(edges) == len(counts) + 1, got {edges.size} and {counts.size}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got {low}, {high}")
    if ignore_zero:
        zero_bin = (edges[:-1] <= 0) & (edges[1:] > 0)
        counts = np.where(zero_bin, 0.0, counts)
    total = counts.sum()
    if total <= 0:
        raise ValueError("histogram holds no (non-zero) values")
    cumulative = np.cumsum(counts) / total
    lo_bin = int(np.searchsorted(cumulative, low, side="right"))
    hi_bin = int(np.searchsorted(cumulative, high, side="left"))
    lo_bin = min(lo_bin, counts.size - 1)
    hi_bin = min(max(hi_bin, lo_bin), counts.size - 1)
    lo, hi = float(edges[lo_bin]), float(edges[hi_bin + 1])
    return lo, hi


def display_window(counts: np.ndarray) -> tuple[float, float]:
    """The display window of integer data from the count of each value (index = intensity): the
    0.5 % to 99.5 % quantiles of the non-zero values; data that is all zero gets the full range.
    The rule every published volume's window follows (pipeline.publish.common.stack_windows)."""
    counts = np.asarray(counts).ravel()
    try:
        return window_from_histogram(counts, np.arange(counts.size + 1, dtype=np.float64))
    except ValueError:
        return 0.0, float(counts.size - 1)


def histogram_of(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of `values` with one bin per integer value for 8/16-bit data (256 bins else)."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2:
        info = np.iinfo(dtype)
        counts = np.bincount((values.astype(np.int64) - info.min).ravel(), minlength=info.max - info.min + 1)
        edges = np.arange(info.min, info.max + 2, dtype=np.float64)
        return counts, edges
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if finite.size == 0:
        raise ValueError("no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    counts, edges = np.histogram(finite, bins=256, range=(lo, hi if hi > lo else lo + 1))
    return counts, edges
