"""Masked intensity histograms at the data's real bit depth (counts with np.bincount).

Counts cover the whole integer range of the dtype, so histograms of strips add up to the
histogram of the section and sections of one channel add up to the channel's histogram. The
plot range is the real bit depth (e.g. 12 bits stored in uint16), found from the counts.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SlidepipeError


def histogram_length(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise SlidepipeError(f"histograms are made of uint8 or uint16 data, got {dtype}")
    return 1 << (8 * dtype.itemsize)


def masked_histogram(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """int64 counts of every value of the dtype over the mask's pixels (all samples of RGB pixels)."""
    length = histogram_length(image.dtype)
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise SlidepipeError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
        values = image[mask.astype(bool)]
    else:
        values = image
    return np.bincount(values.ravel(), minlength=length).astype(np.int64)


def real_bit_depth(counts: np.ndarray) -> int:
    """Bits needed for the highest value present (at least 8)."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return 8
    return max(8, int(present[-1]).bit_length())


def histogram_summary(counts: np.ndarray) -> dict:
    """Pixel count, mean and a few percentiles: what the histogram stage stores per section."""
    total = int(counts.sum())
    if total == 0:
        return {"pixels": 0, "bit_depth": 8}
    values = np.arange(counts.size)
    cumulative = np.cumsum(counts)
    pct = {f"p{p:g}": int(np.searchsorted(cumulative, p / 100 * total)) for p in (1, 50, 99)}
    return {
        "pixels": total,
        "mean": float((counts * values).sum() / total),
        "min": int(np.flatnonzero(counts)[0]),
        "max": int(np.flatnonzero(counts)[-1]),
        "bit_depth": real_bit_depth(counts),
        **pct,
    }
