"""Mapping data of any bit depth to 8-bit for QC images (never for data products)."""

from __future__ import annotations

import numpy as np


def to_display_uint8(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Percentile stretch to uint8 so a 16-bit section with data in the low range is visible."""
    data = image.astype(np.float32, copy=False)
    lo, hi = np.percentile(data, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    scaled = (data - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)
