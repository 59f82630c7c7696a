"""Optional intensity normalisation of channel 1 (a linear stretch of the tissue's percentiles).

Sections of one animal are imaged with drifting exposure; stretching each section's tissue
intensities to a common range makes neighbours comparable for the eye and for registration.
The limits are measured once on the thumbnail (tissue pixels only, so the black background does
not pull the low limit to zero) and the same map is applied to every full-resolution strip, so
both resolutions get the same intensities.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SlidepipeError


def stretch_limits(image: np.ndarray, mask: np.ndarray | None = None,
                   low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[float, float]:
    """(low, high) intensity percentiles of the tissue pixels."""
    values = image[mask.astype(bool)] if mask is not None else image.ravel()
    if values.size == 0:
        raise SlidepipeError("cannot normalise: the mask selects no pixel")
    low, high = np.percentile(values, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def apply_stretch(image: np.ndarray, low: float, high: float, dtype=None) -> np.ndarray:
    """Map `low` -> 0 and `high` -> the top of the integer dtype (clipped); keeps the dtype."""
    dtype = np.dtype(dtype or image.dtype)
    top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(top / (high - low))
    np.clip(scaled, 0.0, top, out=scaled)
    if np.issubdtype(dtype, np.integer):
        np.rint(scaled, out=scaled)
    return scaled.astype(dtype)
