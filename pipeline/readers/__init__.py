"""One reading interface for every slide format, so extract never cares whether it got a CZI or a TIFF.

Readers expose metadata (`info()`) and pixel *regions* rather than whole scenes: a 60000 x 40000
scene must be extractable band by band without ever sitting whole in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline.errors import SlideReadError

CZI_SUFFIXES = (".czi",)
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ChannelInfo:
    index: int  # 1-based, as users and the file names count channels
    name: str


@dataclass(frozen=True)
class SceneInfo:
    index: int  # 0-based scene index in the file
    x: int  # bounding-box origin in the file's pixel coordinates (may be negative / far from 0)
    y: int
    width: int
    height: int
    channels: tuple[ChannelInfo, ...]
    dtype: str  # numpy dtype name of one sample: "uint8", "uint16"
    samples_per_pixel: int  # 1, or 3 for bgr24/bgr48 (returned as RGB)
    z_planes: int
    time_points: int = 1  # T: a time series; one time point becomes the section


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    scenes: tuple[SceneInfo, ...]
    pixel_size_um: tuple[float, float] | None  # (x, y) micrometres per pixel
    acquisition_date: datetime | None
    objective: str | None
    magnification: float | None


@runtime_checkable
class SlideReader(Protocol):
    def info(self) -> SlideInfo: ...

    def read_region(
        self, scene: int, channel: int, x: int, y: int, width: int, height: int, z: int = 0, t: int = 0
    ) -> np.ndarray:
        """Pixels of one channel (1-based) of z plane `z` at time point `t`, coordinates relative
        to the scene's bounding-box origin.

        Returns (height, width) or (height, width, 3) RGB; mosaics come back stitched. Only the
        stored tiles that intersect the region are decoded.
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> "SlideReader": ...

    def __exit__(self, *exc) -> None: ...


def open_slide(path: str | Path) -> SlideReader:
    """A reader for `path`, chosen by suffix; unreadable files raise SlideReadError naming the file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(CZI_SUFFIXES):
        from pipeline.readers.czi import CziReader

        return CziReader(path)
    if name.endswith(TIFF_SUFFIXES):
        from pipeline.readers.tiff import TiffReader

        return TiffReader(path)
    raise SlideReadError(f"unsupported slide format {path.suffix!r} (expected .czi, .tif, .tiff)", path)


def natural_sorted_tiffs(folder: str | Path) -> list[Path]:
    from pipeline.readers.tiff import natural_sorted_tiffs as _impl

    return _impl(folder)


def find_gaps(paths: list[Path]) -> list[int]:
    from pipeline.readers.tiff import find_gaps as _impl

    return _impl(paths)


def check_region(
    info: SceneInfo, path: Path, channel: int, x: int, y: int, width: int, height: int, z: int, t: int = 0
) -> None:
    """Reject requests outside the scene loudly instead of returning padding."""
    if not any(c.index == channel for c in info.channels):
        raise SlideReadError(
            f"scene {info.index + 1}: no channel {channel} (has {[c.index for c in info.channels]})", path
        )
    if not 0 <= z < info.z_planes:
        raise SlideReadError(f"scene {info.index + 1}: no z plane {z} (has {info.z_planes})", path)
    if not 0 <= t < info.time_points:
        raise SlideReadError(f"scene {info.index + 1}: no time point {t} (has {info.time_points})", path)
    if width <= 0 or height <= 0 or x < 0 or y < 0 or x + width > info.width or y + height > info.height:
        raise SlideReadError(
            f"scene {info.index + 1}: region x={x} y={y} {width}x{height} is outside the scene "
            f"({info.width}x{info.height})",
            path,
        )


def file_size(path: Path) -> int:
    """Size of a slide file that exists and is not empty: the first two things that go wrong."""
    if not path.is_file():
        raise SlideReadError("file does not exist", path)
    size = path.stat().st_size
    if size == 0:
        raise SlideReadError("empty file (0 bytes)", path)
    return size


def one_line(exc: BaseException) -> str:
    """A library's exception text on one line, for a reason in SlideReadError."""
    return " ".join(str(exc).split()) or type(exc).__name__


_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_iso_date(text: str | None) -> datetime | None:
    """ISO 8601 as microscopes write it (7-digit fractions, 'Z'); None when absent or a placeholder."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(_LONG_FRACTION.sub(r"\1", text.strip()).replace("Z", "+00:00"))
    except ValueError:
        return None
    return None if value.year < 1900 else value  # ZEN writes 0001-01-01 for "unknown"


__all__ = [
    "ChannelInfo",
    "SceneInfo",
    "SlideInfo",
    "SlideReader",
    "open_slide",
    "natural_sorted_tiffs",
    "find_gaps",
    "check_region",
    "file_size",
    "one_line",
    "parse_iso_date",
    "CZI_SUFFIXES",
    "TIFF_SUFFIXES",
]
