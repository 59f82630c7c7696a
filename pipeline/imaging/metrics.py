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


class PairAccumulator:
    """NCC and mutual information of two aligned images gathered window by window.

    The joint histogram needs fixed bin edges: `range_a` / `range_b` are the intensity ranges of
    the overlap (full-resolution callers take them from the thumbnails; values outside fall in
    the edge bins). Sums are taken relative to the range's low end to keep float64 exact enough.
    """

    def __init__(self, range_a: tuple[float, float], range_b: tuple[float, float], bins: int = 32):
        self.range_a, self.range_b, self.bins = _widen(range_a), _widen(range_b), bins
        self.n = 0
        self.sums = np.zeros(5)  # x, y, xx, yy, xy
        self.joint = np.zeros((bins, bins))
        self.area_a = 0
        self.area_b = 0

    def add(self, a: np.ndarray, b: np.ndarray, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None) -> None:
        in_a = mask_a.astype(bool) if mask_a is not None else _nonzero(a)
        in_b = mask_b.astype(bool) if mask_b is not None else _nonzero(b)
        self.area_a += int(in_a.sum())
        self.area_b += int(in_b.sum())
        where = overlap(a, b, in_a, in_b)
        x = _grey(a)[where] - self.range_a[0]
        y = _grey(b)[where] - self.range_b[0]
        if x.size == 0:
            return
        self.n += x.size
        self.sums += [x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
        span_a = self.range_a[1] - self.range_a[0]
        span_b = self.range_b[1] - self.range_b[0]
        ia = np.clip((x * (self.bins / span_a)).astype(np.int64), 0, self.bins - 1)
        ib = np.clip((y * (self.bins / span_b)).astype(np.int64), 0, self.bins - 1)
        self.joint += np.bincount(ia * self.bins + ib, minlength=self.bins * self.bins).reshape(self.bins, self.bins)

    def result(self) -> dict:
        smaller = min(self.area_a, self.area_b)
        return {
            "ncc": self._ncc(),
            "mutual_information": self._mutual_information(),
            "overlap_pixels": int(self.n),
            "overlap_fraction": float(self.n / smaller) if smaller else 0.0,
        }

    def _ncc(self) -> float:
        if self.n < 2:
            return float("nan")
        sx, sy, sxx, syy, sxy = self.sums
        n = self.n
        covariance = sxy - sx * sy / n
        denominator = np.sqrt(max(sxx - sx * sx / n, 0.0) * max(syy - sy * sy / n, 0.0))
        return float(covariance / denominator) if denominator > 0 else float("nan")

    def _mutual_information(self) -> float:
        if self.n < 2:
            return float("nan")
        p = self.joint / self.joint.sum()
        px, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
        nz = p > 0
        return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def _widen(value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = float(value_range[0]), float(value_range[1])
    return (low, high) if high > low else (low, low + 1.0)


def overlap_range(a: np.ndarray, b: np.ndarray, mask_a=None, mask_b=None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Intensity ranges of both images over their overlap ((0, 1) each when there is none)."""
    where = overlap(a, b, mask_a, mask_b)
    if not where.any():
        return (0.0, 1.0), (0.0, 1.0)
    x, y = _grey(a)[where], _grey(b)[where]
    # the top value must fall inside the last bin, not on its upper edge
    return (float(x.min()), float(np.nextafter(x.max(), np.inf))), (float(y.min()), float(np.nextafter(y.max(), np.inf)))


def pair_metrics(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None,
                 bins: int = 32) -> dict:
    """NCC (-1..1; NaN when undefined), mutual information (bits) and the overlap as a fraction
    of the smaller tissue area, for two whole images."""
    range_a, range_b = overlap_range(a, b, mask_a, mask_b)
    accumulator = PairAccumulator(range_a, range_b, bins)
    accumulator.add(a, b, mask_a, mask_b)
    return accumulator.result()
