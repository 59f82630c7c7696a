"""Resampling a section once with a 3x3 affine (linear for images, nearest for masks).

`matrix` always maps output (x, y) to source (x, y) (see `transforms`): the composed transform
of a section is used as it is, so each section is interpolated exactly once. `warp_window`
makes any output rectangle from the one source window it needs, so full-resolution sections
are warped tile by tile with memory set by the tile size, not the section size.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.imaging.tiles import WindowReader, tile_grid
from pipeline.imaging.transforms import translation_matrix

_CV_DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.float64)}
_MARGIN = 2  # source pixels beyond the mapped corners: covers the linear kernel and rounding


def _flags(nearest: bool) -> int:
    return (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP


def _check(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _CV_DTYPES:
        raise SlidepipeError(f"cannot resample {dtype} images (use uint8, uint16, int16 or float)")
    return dtype


def warp_affine(image: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Whole-image resampling (thumbnails): output pixels outside the source are 0."""
    dtype = _check(image.dtype)
    if image.size == 0:
        raise SlidepipeError("cannot resample an empty image")
    out = cv2.warpAffine(
        np.ascontiguousarray(image), np.asarray(matrix, np.float64)[:2], (int(output_shape[1]), int(output_shape[0])),
        flags=_flags(nearest), borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    return out.astype(dtype, copy=False).reshape(tuple(output_shape[:2]) + image.shape[2:])


def source_window(matrix: np.ndarray, source_shape: tuple[int, ...], y0: int, y1: int, x0: int, x1: int):
    """(sy0, sy1, sx0, sx1) of the source pixels output rectangle y0:y1, x0:x1 samples, or None."""
    corners = np.array([[x0, y0, 1], [x1 - 1, y0, 1], [x0, y1 - 1, 1], [x1 - 1, y1 - 1, 1]], dtype=np.float64).T
    src = np.asarray(matrix, np.float64) @ corners
    sx0 = max(int(np.floor(src[0].min())) - _MARGIN, 0)
    sx1 = min(int(np.ceil(src[0].max())) + _MARGIN + 1, source_shape[1])
    sy0 = max(int(np.floor(src[1].min())) - _MARGIN, 0)
    sy1 = min(int(np.ceil(src[1].max())) + _MARGIN + 1, source_shape[0])
    if sx0 >= sx1 or sy0 >= sy1:
        return None
    return sy0, sy1, sx0, sx1


def warp_window(
    read: WindowReader, source_shape: tuple[int, ...], dtype, matrix: np.ndarray,
    y0: int, y1: int, x0: int, x1: int, nearest: bool = False,
) -> np.ndarray:
    """Output rows y0:y1, columns x0:x1 of `warp_affine(source, matrix, ...)`, reading one window."""
    dtype = _check(dtype)
    shape = (y1 - y0, x1 - x0) + tuple(source_shape[2:])
    window_box = source_window(matrix, source_shape, y0, y1, x0, x1)
    if window_box is None:
        return np.zeros(shape, dtype)
    sy0, sy1, sx0, sx1 = window_box
    window = np.ascontiguousarray(read(sy0, sy1, sx0, sx1))
    local = translation_matrix(-sx0, -sy0) @ np.asarray(matrix, np.float64) @ translation_matrix(x0, y0)
    out = cv2.warpAffine(window, local[:2], (x1 - x0, y1 - y0), flags=_flags(nearest),
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(dtype, copy=False).reshape(shape)


def warp_tiles(
    read: WindowReader, source_shape: tuple[int, ...], dtype, matrix: np.ndarray,
    output_shape: tuple[int, int], tile: tuple[int, int] = (512, 512), nearest: bool = False,
) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
    """((y0, y1, x0, x1), tile) over the output in row-major tile order (the TIFF tile order)."""
    for y0, y1, x0, x1 in tile_grid(output_shape, tile):
        yield (y0, y1, x0, x1), warp_window(read, source_shape, dtype, matrix, y0, y1, x0, x1, nearest)
