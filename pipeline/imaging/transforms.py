"""Rigid transforms as 3x3 float64 matrices on (x, y, 1) pixel coordinates.

Convention (the one Elastix and ITK use, so stored parameters are Elastix's own numbers):
a transform maps a point of the *fixed* image to the point of the *moving* image whose value
belongs there, i.e. ``aligned(p) = moving(T(p))``. Coordinates are pixel centres, x = column to
the right, y = row downwards, origin at the centre of the top-left pixel.

``T(p) = R(rotation) (p - c) + c + (xshift, yshift)`` with ``R = [[cos, -sin], [sin, cos]]`` and
``c = ((width - 1) / 2, (height - 1) / 2)`` the centre of the canvas. With y pointing down, R
with a positive angle turns vectors clockwise on screen, so in the aligned output the moving
section's content appears turned counter-clockwise by `rotation`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.errors import SlidepipeError


def canvas_center(shape: tuple[int, ...]) -> tuple[float, float]:
    """(x, y) of the centre of an image of `shape` (rows, cols, ...)."""
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def translation_matrix(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def rigid_matrix(rotation: float, xshift: float, yshift: float, center: tuple[float, float]) -> np.ndarray:
    """Matrix of T(p) = R (p - c) + c + t (rotation in radians)."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    cx, cy = center
    rot = np.array([[cos, -sin], [sin, cos]])
    offset = np.array([cx, cy]) - rot @ np.array([cx, cy]) + np.array([xshift, yshift])
    matrix = np.eye(3)
    matrix[:2, :2] = rot
    matrix[:2, 2] = offset
    return matrix


def rigid_parameters(matrix: np.ndarray, center: tuple[float, float]) -> tuple[float, float, float]:
    """(rotation, xshift, yshift) of a rigid matrix about `center` (inverse of `rigid_matrix`)."""
    rot = matrix[:2, :2]
    if not np.allclose(rot.T @ rot, np.eye(2), atol=1e-6):
        raise SlidepipeError("the transform is not rigid (rotation part is not orthonormal)")
    rotation = float(np.arctan2(rot[1, 0], rot[0, 0]))
    c = np.asarray(center, dtype=np.float64)
    shift = matrix[:2, 2] - c + rot @ c
    return rotation, float(shift[0]), float(shift[1])


def compose_to_reference(pairwise: Sequence[np.ndarray | None], reference: int) -> list[np.ndarray]:
    """Per-section matrices taking reference-section coordinates to each section's coordinates.

    `pairwise[i]` (i >= 1) maps section i-1 (fixed) to section i (moving); `pairwise[0]` is
    unused. Products are formed once in float64 so each section is resampled once:
    ``aligned_i(p) = cleaned_i(M_i p)``.
    """
    count = len(pairwise)
    if not 0 <= reference < count:
        raise SlidepipeError(f"reference section {reference} is outside 0..{count - 1}")
    result: list[np.ndarray] = [np.eye(3) for _ in range(count)]
    for i in range(reference + 1, count):
        result[i] = np.asarray(pairwise[i], dtype=np.float64) @ result[i - 1]
    for i in range(reference - 1, -1, -1):
        result[i] = np.linalg.inv(np.asarray(pairwise[i + 1], dtype=np.float64)) @ result[i + 1]
    return result


def scale_transform(matrix: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """The same transform on images `scale_x` x `scale_y` times larger (thumbnail -> full).

    Pixel centres map as x_full = s x_thumb + (s - 1) / 2 (thumbnail pixel i is the average of
    full pixels s i .. s i + s - 1), so S M S^-1 is exact, including the centre of rotation.
    """
    scale = np.array([[scale_x, 0.0, (scale_x - 1) / 2.0], [0.0, scale_y, (scale_y - 1) / 2.0], [0.0, 0.0, 1.0]])
    return scale @ np.asarray(matrix, dtype=np.float64) @ np.linalg.inv(scale)
