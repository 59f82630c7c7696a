"""How alike two aligned neighbours are, measured on the tissue they share.

Only the overlap counts: the black background shared by every section would otherwise make any
pair look similar. A badly aligned or damaged section shows up as a dip along the stack.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SlidepipeError


def overlap(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None) -> np.ndarray:
    """Pixels that are tissue in both images (non-zero when no mask is given)."""
    if a.shape[:2] != b.shape[:2]:
        raise SlidepipeError(f"aligned sections differ in shape: {a.shape} vs {b.shape}")
    in_a = mask_a.astype(bool) if mask_a is not None else _nonzero(a)
    in_b = mask_b.astype(bool) if mask_b is not None else _nonzero(b)
    return in_a & in_b


def _nonzero(image: np.ndarray) -> np.ndarray:
    return image.any(axis=2) if image.ndim == 3 else image != 0


def _grey(image: np.ndarray) -> np.ndarray:
    data = image.astype(np.float64, copy=False)
    return data.mean(axis=2) if data.ndim == 3 else data


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Pearson correlation of the overlap's intensities (-1..1); NaN when undefined."""
    x, y = _grey(a)[where], _grey(b)[where]
    if x.size < 2:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def mutual_information(a: np.ndarray, b: np.ndarray, where: np.ndarray, bins: int = 32) -> float:
    """Mutual information (bits) of the overlap's intensities from a joint histogram."""
    x, y = _grey(a)[where], _grey(b)[where]
    if x.size < 2:
        return float("nan")
    joint, _, _ = np.histogram2d(x, y, bins=bins)
    p = joint / joint.sum()
    px, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def pair_metrics(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None,
                 bins: int = 32) -> dict:
    """NCC, MI and the overlap as a fraction of the smaller tissue area."""
    where = overlap(a, b, mask_a, mask_b)
    area_a = int((mask_a.astype(bool) if mask_a is not None else _nonzero(a)).sum())
    area_b = int((mask_b.astype(bool) if mask_b is not None else _nonzero(b)).sum())
    smaller = min(area_a, area_b)
    return {
        "ncc": normalized_cross_correlation(a, b, where),
        "mutual_information": mutual_information(a, b, where, bins),
        "overlap_pixels": int(where.sum()),
        "overlap_fraction": float(where.sum() / smaller) if smaller else 0.0,
    }
