"""Windows and tiles: how full-resolution kernels see a section without holding it whole.

A kernel that touches full resolution takes a *window reader*: a callable
`read(y0, y1, x0, x1) -> array` returning rows y0:y1 and columns x0:x1 of the source. Stages
back it with a tiled TIFF (only the needed tiles are decoded); tests back it with an array.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

WindowReader = Callable[[int, int, int, int], np.ndarray]
"""read(y0, y1, x0, x1) -> the source's rows y0:y1, columns x0:x1 (bounds inside the source)."""


def array_reader(array: np.ndarray) -> WindowReader:
    """A window reader over an in-memory array (thumbnails, tests)."""

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return array[y0:y1, x0:x1]

    return read


def padded_window(read: WindowReader, shape: tuple[int, ...], dtype, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Window that may reach outside the source: the outside is zero (the slide background).

    Full-resolution geometry is the thumbnail geometry times the thumbnail factor, which can
    reach up to factor-1 pixels past a section's last row or column; treating those as zero
    keeps the two resolutions pixel-consistent.
    """
    height, width = shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + tuple(shape[2:]), dtype=dtype)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if cy0 < cy1 and cx0 < cx1:
        out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = read(cy0, cy1, cx0, cx1)
    return out


def tile_grid(shape: tuple[int, int], tile: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of each tile in row-major order (TIFF tile order); edge tiles are short."""
    height, width = shape[:2]
    th, tw = tile
    for y0 in range(0, height, th):
        for x0 in range(0, width, tw):
            yield y0, min(y0 + th, height), x0, min(x0 + tw, width)


def pad_tile(tile: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Edge tiles padded with zeros to the full tile shape, as TIFF writers expect."""
    th, tw = tile_shape
    if tile.shape[0] == th and tile.shape[1] == tw:
        return tile
    out = np.zeros((th, tw) + tile.shape[2:], tile.dtype)
    out[: tile.shape[0], : tile.shape[1]] = tile
    return out


def chunks_with_data(rows: np.ndarray, chunk_y: int, chunk_x: int) -> np.ndarray:
    """Which chunks of a band of rows hold a non-zero voxel: a (ceil(h / chunk_y), ceil(w / chunk_x))
    bool grid for a (h, w) or (h, w, samples) band whose first row and column start chunks; edge
    chunks are the partial blocks at the far edges."""
    nonzero = rows != 0
    if nonzero.ndim == 3:
        nonzero = nonzero.any(axis=2)
    h, w = nonzero.shape
    by_rows = np.logical_or.reduceat(nonzero, np.arange(0, h, chunk_y), axis=0)
    return np.logical_or.reduceat(by_rows, np.arange(0, w, chunk_x), axis=1)
