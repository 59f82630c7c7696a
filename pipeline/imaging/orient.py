"""Crop to the tissue, turn and mirror, place centred on the common canvas.

Conventions (the lab pipeline this replaces treated "flip" as a 180 degree turn; here each word
means one thing):

- ``rotation`` k: k quarter turns counter-clockwise as displayed (``np.rot90(image, k)``),
  applied first;
- ``flip``: vertical mirror, top row becomes the bottom row (``np.flipud``);
- ``flop``: horizontal mirror, left column becomes the right column (``np.fliplr``).

The geometry of a section is decided once, on its thumbnail (`plan_clean`), and scaled to full
resolution (`CleanGeometry.scaled`). Every output pixel then comes from exactly one source pixel,
so any output rectangle can be produced from one source window (`clean_window`): full-resolution
sections are cleaned tile by tile in bounded memory, and the thumbnail is the same code on the
whole canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.imaging.tiles import WindowReader, array_reader, padded_window


class SectionTooLargeError(SlidepipeError):
    """The oriented tissue box does not fit on the canvas (never cropped, never a black image)."""


class NoTissueError(SlidepipeError):
    """The mask of a section is empty."""


@dataclass(frozen=True)
class Orientation:
    rotation: int = 0
    flip: bool = False
    flop: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", int(self.rotation) % 4)
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "flop", bool(self.flop))


def orient(image: np.ndarray, orientation: Orientation) -> np.ndarray:
    """Rotate, then flip, then flop (works on (H, W) and (H, W, C))."""
    out = np.rot90(image, orientation.rotation, axes=(0, 1))
    if orientation.flip:
        out = out[::-1]
    if orientation.flop:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def oriented_shape(shape: tuple[int, int], orientation: Orientation) -> tuple[int, int]:
    height, width = shape[:2]
    return (width, height) if orientation.rotation % 2 else (height, width)


def source_index_matrix(shape: tuple[int, int], orientation: Orientation) -> np.ndarray:
    """Integer 3x3 matrix taking (row, col, 1) of the oriented image to (row, col, 1) of the source.

    Built from the inverse of each step in the order `orient` applies them; the unit tests
    check it against `orient` itself.
    """
    height, width = shape[:2]
    steps = []
    h, w = height, width
    for _ in range(orientation.rotation):  # rot90 ccw: out[i, j] = in[j, w - 1 - i]
        steps.append(np.array([[0, 1, 0], [-1, 0, w - 1], [0, 0, 1]], dtype=np.int64))
        h, w = w, h
    if orientation.flip:  # out[i, j] = in[h - 1 - i, j]
        steps.append(np.array([[-1, 0, h - 1], [0, 1, 0], [0, 0, 1]], dtype=np.int64))
    if orientation.flop:  # out[i, j] = in[i, w - 1 - j]
        steps.append(np.array([[1, 0, 0], [0, -1, w - 1], [0, 0, 1]], dtype=np.int64))
    matrix = np.eye(3, dtype=np.int64)
    for step in steps:
        matrix = matrix @ step
    return matrix


def tissue_box(mask: np.ndarray, margin: int = 0) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the mask's non-zero pixels, grown by `margin` and kept inside the image."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise NoTissueError("the mask is empty: no tissue found")
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape[:2]
    return (
        max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, height),
        max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, width),
    )


@dataclass(frozen=True)
class CleanGeometry:
    """Where each canvas pixel of one cleaned section comes from."""

    box: tuple[int, int, int, int]
    """(y0, y1, x0, x1) of the tissue crop in source pixels; may reach past the source edge
    (that part reads as zero)."""
    orientation: Orientation
    canvas: tuple[int, int]
    """(height, width) of the output."""
    offset: tuple[int, int]
    """(row, col) of the oriented crop's top-left corner on the canvas."""

    @property
    def crop_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.box
        return y1 - y0, x1 - x0

    @property
    def placed_shape(self) -> tuple[int, int]:
        return oriented_shape(self.crop_shape, self.orientation)

    def scaled(self, factor: int) -> CleanGeometry:
        """The same geometry at `factor` times the resolution (thumbnail -> full).

        Everything is multiplied by the integer factor, so full-resolution output pixel
        (r, c) comes from the full-resolution pixels under thumbnail pixel (r // f, c // f).
        """
        y0, y1, x0, x1 = self.box
        return replace(
            self,
            box=(y0 * factor, y1 * factor, x0 * factor, x1 * factor),
            canvas=(self.canvas[0] * factor, self.canvas[1] * factor),
            offset=(self.offset[0] * factor, self.offset[1] * factor),
        )

    def source_to_canvas(self) -> np.ndarray:
        """3x3 matrix taking source (x, y, 1) pixel coordinates to canvas (x, y, 1).

        Lets a transform known on the extracted section (e.g. the sample brain's truth) be
        expressed on the cleaned canvas.
        """
        swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
        y0, _, x0, _ = self.box
        to_crop = np.array([[1, 0, -y0], [0, 1, -x0], [0, 0, 1]], dtype=np.float64)
        to_canvas = np.array([[1, 0, self.offset[0]], [0, 1, self.offset[1]], [0, 0, 1]], dtype=np.float64)
        oriented_from_crop = np.linalg.inv(source_index_matrix(self.crop_shape, self.orientation).astype(np.float64))
        return swap @ to_canvas @ oriented_from_crop @ to_crop @ swap

    def to_dict(self) -> dict:
        return {
            "box": list(self.box), "rotation": self.orientation.rotation, "flip": self.orientation.flip,
            "flop": self.orientation.flop, "canvas": list(self.canvas), "offset": list(self.offset),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CleanGeometry:
        return cls(
            box=tuple(data["box"]), orientation=Orientation(data["rotation"], data["flip"], data["flop"]),
            canvas=tuple(data["canvas"]), offset=tuple(data["offset"]),
        )


def canvas_shape(placed_shapes: list[tuple[int, int]], margin_fraction: float = 0.05, multiple: int = 8,
                 turn_allowance_deg: float = 0.0) -> tuple[int, int]:
    """Canvas (height, width) that holds every oriented tissue box with a margin.

    `turn_allowance_deg`: room for each box to be turned by up to that angle later (alignment
    turns sections onto the middle one), so aligned tissue is not cut at the canvas edge.
    Rounded up to `multiple` so that, scaled by the thumbnail factor, full resolution stays an
    exact multiple of the thumbnail canvas.
    """
    if not placed_shapes:
        raise SlidepipeError("no section to size the canvas from")
    cos, sin = np.cos(np.deg2rad(turn_allowance_deg)), abs(np.sin(np.deg2rad(turn_allowance_deg)))
    height = max(h * cos + w * sin for h, w in placed_shapes)
    width = max(w * cos + h * sin for h, w in placed_shapes)

    def grow(n: float) -> int:
        n = int(np.ceil(n * (1 + 2 * margin_fraction)))
        return -(-n // multiple) * multiple

    return grow(height), grow(width)


def plan_clean(mask: np.ndarray, orientation: Orientation, canvas: tuple[int, int], margin: int = 0) -> CleanGeometry:
    """Geometry of one section from its thumbnail mask; raises when it does not fit the canvas."""
    box = tissue_box(mask, margin)
    y0, y1, x0, x1 = box
    placed = oriented_shape((y1 - y0, x1 - x0), orientation)
    if placed[0] > canvas[0] or placed[1] > canvas[1]:
        raise SectionTooLargeError(
            f"tissue box {placed[1]} x {placed[0]} px (w x h, after rotation) is larger than the canvas "
            f"{canvas[1]} x {canvas[0]} px: enlarge the canvas (scan_run width/height, 0 = automatic)"
        )
    offset = ((canvas[0] - placed[0]) // 2, (canvas[1] - placed[1]) // 2)
    return CleanGeometry(box=box, orientation=orientation, canvas=(int(canvas[0]), int(canvas[1])),
                         offset=(int(offset[0]), int(offset[1])))


def clean_window(
    geometry: CleanGeometry,
    read_image: WindowReader,
    read_mask: WindowReader | None,
    source_shape: tuple[int, ...],
    dtype,
    y0: int, y1: int, x0: int, x1: int,
    intensity: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Canvas rows y0:y1, columns x0:x1 of the cleaned section.

    Reads one source window (and the same window of the mask), maps intensities (optional,
    see `normalise`), zeroes the pixels outside the mask, orients and places the window. Memory
    is a few copies of the output window.
    """
    out = np.zeros((y1 - y0, x1 - x0) + tuple(source_shape[2:]), dtype=dtype)
    ph, pw = geometry.placed_shape
    oy, ox = geometry.offset
    # intersection of the requested rectangle with the placed crop, in oriented-crop coordinates
    ry0, ry1 = max(y0, oy) - oy, min(y1, oy + ph) - oy
    rx0, rx1 = max(x0, ox) - ox, min(x1, ox + pw) - ox
    if ry0 >= ry1 or rx0 >= rx1:
        return out
    matrix = source_index_matrix(geometry.crop_shape, geometry.orientation)
    corners = np.array([[ry0, rx0, 1], [ry0, rx1 - 1, 1], [ry1 - 1, rx0, 1], [ry1 - 1, rx1 - 1, 1]]).T
    src = matrix @ corners
    sy0, sy1 = int(src[0].min()), int(src[0].max()) + 1
    sx0, sx1 = int(src[1].min()), int(src[1].max()) + 1
    by0, _, bx0, _ = geometry.box
    window = padded_window(read_image, source_shape, dtype, by0 + sy0, by0 + sy1, bx0 + sx0, bx0 + sx1)
    if intensity is not None:
        window = np.asarray(intensity(window), dtype=dtype)
    if read_mask is not None:
        keep = padded_window(read_mask, source_shape[:2], np.uint8, by0 + sy0, by0 + sy1, bx0 + sx0, bx0 + sx1)
        window[keep == 0] = 0
    out[ry0 + oy - y0:ry1 + oy - y0, rx0 + ox - x0:rx1 + ox - x0] = orient(window, geometry.orientation)
    return out


def clean_section(
    image: np.ndarray, mask: np.ndarray | None, geometry: CleanGeometry,
    intensity: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Whole cleaned canvas from in-memory arrays (thumbnails): the same code as the tiled path."""
    return clean_window(
        geometry, array_reader(image), None if mask is None else array_reader(mask), image.shape, image.dtype,
        0, geometry.canvas[0], 0, geometry.canvas[1], intensity,
    )
