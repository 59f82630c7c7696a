"""Pixel-type conversion of sections, for an animal whose slides were saved at different depths.

Only widening is offered: uint8 -> uint16 by x 257 maps 0 -> 0 and 255 -> 65535 exactly (the
same as repeating the byte, v * 256 + v), so the full display range of an 8-bit section lands on
the full range of the 16-bit ones and no value is lost or clipped.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SlidepipeError

WIDEN_FACTOR = {("uint8", "uint16"): 257}
"""(from, to) -> the multiplier that maps the full range of `from` onto the full range of `to`."""


def widen(image: np.ndarray, to: str) -> np.ndarray:
    """`image` in dtype `to`, scaled so that the top of its own range becomes the top of `to`'s."""
    source = np.dtype(image.dtype).name
    if source == to:
        return image
    factor = WIDEN_FACTOR.get((source, to))
    if factor is None:
        raise SlidepipeError(f"no conversion from {source} to {to} (only {', '.join(f'{a} -> {b}' for a, b in WIDEN_FACTOR)})")
    return image.astype(to) * np.array(factor, dtype=to)
