"""Area-average downsampling: the one resampling rule used for thumbnails and pyramids."""

from __future__ import annotations

import numpy as np


def downsample_area(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each `factor` x `factor` block in y and x; partial edge blocks average what they have.

    Works on (H, W) and (H, W, C) arrays and keeps the input dtype (rounded for integers), so a
    band of rows whose height is a multiple of `factor` gives exactly the rows the whole image
    would: thumbnails can be built band by band without holding a full section.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return image.copy()
    # Process block rows in slices so the float64 working copy stays small for wide bands.
    rows_per_slice = factor * max(1, (1 << 21) // max(1, image[0].size * factor))
    if image.shape[0] > rows_per_slice:
        return np.concatenate(
            [_downsample(image[r:r + rows_per_slice], factor) for r in range(0, image.shape[0], rows_per_slice)]
        )
    return _downsample(image, factor)


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    pad_h, pad_w = out_h * factor - h, out_w * factor - w
    data = image.astype(np.float64, copy=False)
    extra = image.shape[2:]
    if pad_h or pad_w:
        widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * len(extra)
        data = np.pad(data, widths)
        weight = np.pad(np.ones((h, w)), [(0, pad_h), (0, pad_w)])
    else:
        weight = None
    sums = data.reshape(out_h, factor, out_w, factor, *extra).sum(axis=(1, 3))
    if weight is None:
        means = sums / (factor * factor)
    else:
        counts = weight.reshape(out_h, factor, out_w, factor).sum(axis=(1, 3))
        means = sums / counts.reshape(out_h, out_w, *([1] * len(extra)))
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(means), info.min, info.max).astype(image.dtype)
    return means.astype(image.dtype)
