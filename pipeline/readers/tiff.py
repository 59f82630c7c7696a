"""TIFF / OME-TIFF sections: one file is one section, read as a slide with one scene at (0, 0).

Regions are read through tifffile's zarr store, which decodes only the tiles (or strips) that
intersect the requested rectangle, so tiled files are extracted band by band like CZI scenes.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.atomic import is_temp
from pipeline.errors import SlideReadError
from pipeline.readers import TIFF_SUFFIXES, ChannelInfo, SceneInfo, SlideInfo, check_region, file_size, one_line, parse_iso_date

CHANNEL_AXES = ("C", "I", "Q")
"""tifffile axis letters that hold channels: OME/ImageJ 'C'; plain multi-page stacks ('I'/'Q')
are taken as one channel per page, the common way labs save multi-channel sections."""

UNIT_IN_UM = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
    "nm": 1e-3, "Å": 1e-4, "pm": 1e-6, "inch": 25400.0, "in": 25400.0,
}


class TiffReader:
    def __init__(self, path: str | Path):
        import tifffile

        self.path = Path(path)
        size = file_size(self.path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._axes = series.axes
            self._shape = tuple(series.shape)
            self._dtype = np.dtype(series.dtype)
            self._photometric = self._tif.pages.first.photometric
        except Exception as exc:
            raise SlideReadError(f"not a readable TIFF file ({size} bytes): {one_line(exc)}", self.path) from exc
        self._size = size
        self._array = None
        self._store = None
        self._checked_pages: set[int] = set()
        self._layout = self._classify_axes()
        self._info: SlideInfo | None = None

    def __enter__(self) -> "TiffReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._array = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    # --- layout ------------------------------------------------------------------------------
    def _classify_axes(self) -> dict[str, str | None]:
        """Which axis holds channels, RGB samples and z planes; anything else must be size 1."""
        axes, shape = self._axes, self._shape
        if "Y" not in axes or "X" not in axes:
            raise SlideReadError(f"no image plane in the TIFF (axes {axes!r})", self.path)
        sizes = dict(zip(axes, shape))
        rgb = "S" in sizes and sizes["S"] in (3, 4) and _is_rgb(self._photometric)
        channel_axis = None
        candidates = [a for a in CHANNEL_AXES if sizes.get(a, 1) > 1]
        if "S" in sizes and not rgb and sizes["S"] > 1:
            candidates.append("S")
        if len(candidates) > 1:
            raise SlideReadError(f"cannot tell which axis holds the channels (axes {axes!r}, shape {shape})", self.path)
        if candidates:
            channel_axis = candidates[0]
        elif "C" in sizes:
            channel_axis = "C"
        extra = [a for a in axes if a not in ("Y", "X", "Z", "T", "S") and a != channel_axis and sizes[a] > 1]
        if extra:
            raise SlideReadError(
                f"unsupported axes {''.join(extra)} of size > 1 (axes {axes!r}, shape {shape}): one file must be one section",
                self.path,
            )
        return {"channel": channel_axis, "rgb": "S" if rgb else None}

    def info(self) -> SlideInfo:
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> SlideInfo:
        sizes = dict(zip(self._axes, self._shape))
        channel_axis = self._layout["channel"]
        n_channels = sizes[channel_axis] if channel_axis else 1
        ome = _ome_root(self._tif)
        names = _ome_channel_names(ome)
        channels = tuple(
            ChannelInfo(i + 1, names[i] if i < len(names) and names[i] else f"C{i + 1}") for i in range(n_channels)
        )
        if self._dtype.kind not in "uif":
            raise SlideReadError(f"unsupported sample type {self._dtype}", self.path)
        scene = SceneInfo(
            index=0,
            x=0,
            y=0,
            width=int(sizes["X"]),
            height=int(sizes["Y"]),
            channels=channels,
            dtype=self._dtype.name,
            samples_per_pixel=3 if self._layout["rgb"] else 1,
            z_planes=int(sizes.get("Z", 1)),
            time_points=int(sizes.get("T", 1)),
        )
        objective, magnification = _ome_objective(ome)
        return SlideInfo(
            path=self.path,
            scenes=(scene,),
            pixel_size_um=_ome_pixel_size(ome) or _tag_pixel_size(self._tif),
            acquisition_date=_ome_date(ome) or _tag_date(self._tif),
            objective=objective,
            magnification=magnification,
        )

    # --- pixels ------------------------------------------------------------------------------
    def read_region(
        self, scene: int, channel: int, x: int, y: int, width: int, height: int, z: int = 0, t: int = 0
    ) -> np.ndarray:
        info = self.info()
        if scene != 0:
            raise SlideReadError(f"no scene {scene + 1}: a TIFF section has one scene", self.path)
        sc = info.scenes[0]
        check_region(sc, self.path, channel, x, y, width, height, z, t)
        index = []
        kept = []
        for axis in self._axes:
            if axis == "Y":
                index.append(slice(y, y + height))
                kept.append(axis)
            elif axis == "X":
                index.append(slice(x, x + width))
                kept.append(axis)
            elif axis == self._layout["channel"]:
                index.append(channel - 1)
            elif axis == "S" and self._layout["rgb"]:
                index.append(slice(0, 3))  # drop an alpha sample
                kept.append(axis)
            elif axis == "Z":
                index.append(z)
            elif axis == "T":
                index.append(t)
            else:
                index.append(0)
        plane = f"channel {channel} z {z}" + (f" t {t}" if sc.time_points > 1 else "")
        pages = self._check_pages(plane, channel, z, t)
        try:
            data = self._zarr()[tuple(index)]
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(
                f"{plane} ({pages}): cannot decode region x={x} y={y} {width}x{height}: {one_line(exc)}", self.path
            ) from exc
        order = [kept.index(a) for a in ("Y", "X", "S") if a in kept]
        data = np.transpose(np.asarray(data), order)
        if data.shape[:2] != (height, width):
            raise SlideReadError(f"read {data.shape[:2]} for a {height}x{width} region", self.path)
        return np.ascontiguousarray(data)

    def _check_pages(self, plane: str, channel: int, z: int, t: int) -> str:
        """Refuse to read a page whose strip/tile directory is damaged.

        tifffile fills a strip or tile whose offset or byte count is 0 (or whose offsets tag is
        missing) with zeros and only logs it: read through it, a damaged page directory becomes
        an all-zero section. The page's own directory entries are checked instead: one offset
        and byte count per strip or tile, each non-zero and inside the file.
        """
        if self._tif is None:
            raise SlideReadError("reader is closed", self.path)
        series = self._tif.series[0]
        pages = series.pages
        page_axes = series.keyframe.axes
        prefix = self._axes[: len(self._axes) - len(page_axes)] if self._axes.endswith(page_axes) else None
        sizes = dict(zip(self._axes, self._shape))
        if prefix is not None and math.prod(sizes[a] for a in prefix) == len(pages):
            where = {self._layout["channel"]: channel - 1, "Z": z, "T": t}
            numbers = [np.ravel_multi_index([where.get(a, 0) for a in prefix], [sizes[a] for a in prefix])] if prefix else [0]
        else:  # a layout we cannot map to pages: check them all
            numbers = list(range(len(pages)))
        for number in numbers:
            page = pages[number]
            if page is None:
                raise SlideReadError(f"{plane}: page {number + 1} of the series is missing from the file", self.path)
            if number in self._checked_pages:
                continue
            reason = _segment_damage(page, self._size)
            if reason:
                raise SlideReadError(f"{plane}: page {page.index + 1} is damaged: {reason}; not reading it as zeros", self.path)
            self._checked_pages.add(number)
        if len(numbers) == 1:
            return f"page {pages[numbers[0]].index + 1}"
        return f"pages {pages[numbers[0]].index + 1}-{pages[numbers[-1]].index + 1}"

    def _zarr(self):
        if self._tif is None:
            raise SlideReadError("reader is closed", self.path)
        if self._array is None:
            import zarr

            self._store = self._tif.aszarr(series=0, level=0)
            self._array = zarr.open(self._store, mode="r")
        return self._array


def _segment_damage(page, file_size: int) -> str | None:
    """Why the strips/tiles of `page` cannot all be read, or None."""
    keyframe = getattr(page, "keyframe", None) or page
    kind = "tile" if keyframe.is_tiled else "strip"
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    expected = math.prod(keyframe.chunked)
    if len(offsets) != expected or len(counts) != expected:
        return f"{len(offsets)} {kind} offsets and {len(counts)} byte counts for {expected} {kind}s"
    empty = np.flatnonzero((offsets <= 0) | (counts <= 0))
    if empty.size:
        i = int(empty[0])
        return f"{kind} {i} has no data (offset {offsets[i]}, {counts[i]} bytes)"
    beyond = np.flatnonzero(offsets + counts > file_size)
    if beyond.size:
        i = int(beyond[0])
        return f"{kind} {i} (bytes {offsets[i]}-{offsets[i] + counts[i]}) lies beyond the end of the file ({file_size} bytes)"
    return None


# --- folders of sections ---------------------------------------------------------------------
_DIGITS = re.compile(r"(\d+)")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(path.name)]


def natural_sorted_tiffs(folder: str | Path) -> list[Path]:
    """TIFF files of a folder in natural order (2 before 10), skipping hidden and temporary files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SlideReadError("not a folder", folder)
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TIFF_SUFFIXES and not is_temp(p)
    ]
    return sorted(files, key=_natural_key)


def section_numbers(paths: list[Path]) -> list[int] | None:
    """The number that changes from file to file (e.g. 003 in 'DK39_003_C1.tif'), or None.

    Names often carry constant numbers too (animal id, channel), so when every name has the same
    count of digit groups the group that varies is used; otherwise the last group of each name.
    """
    groups = [[int(g) for g in _DIGITS.findall(_stem(p))] for p in paths]
    if not groups or any(not g for g in groups):
        return None
    counts = {len(g) for g in groups}
    if len(counts) == 1:
        varying = [i for i in range(counts.pop()) if len({g[i] for g in groups}) > 1]
        if len(varying) == 1:
            return [g[varying[0]] for g in groups]
    return [g[-1] for g in groups]


def find_gaps(paths: list[Path]) -> list[int]:
    """Numbers missing inside a numbered series (001, 002, 004 -> [3]).

    Only gaps between the lowest and highest number count: whether a series starts at 0 or 1 is
    not knowable from the names.
    """
    numbers = section_numbers(list(paths))
    if not numbers or len(numbers) < 2:
        return []
    present = set(numbers)
    return [n for n in range(min(present), max(present) + 1) if n not in present]


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# --- metadata helpers ------------------------------------------------------------------------
def _is_rgb(photometric) -> bool:
    return getattr(photometric, "name", str(photometric)).upper() in ("RGB", "YCBCR")


def _ome_root(tif) -> ET.Element | None:
    text = tif.ome_metadata if tif.is_ome else None
    if not text:
        return None
    try:
        return ET.fromstring(text)
    except ET.ParseError:
        return None


def _ome_pixels(ome: ET.Element | None) -> ET.Element | None:
    return None if ome is None else ome.find("./{*}Image/{*}Pixels")


def _ome_channel_names(ome: ET.Element | None) -> list[str]:
    pixels = _ome_pixels(ome)
    if pixels is None:
        return []
    return [(ch.get("Name") or "").strip() for ch in pixels.findall("{*}Channel")]


def _ome_pixel_size(ome: ET.Element | None) -> tuple[float, float] | None:
    pixels = _ome_pixels(ome)
    if pixels is None:
        return None
    size = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")  # OME's default unit
        scale = UNIT_IN_UM.get(unit)
        try:
            number = float(value) if value is not None else math.nan
        except ValueError:
            number = math.nan
        if scale is None or not math.isfinite(number) or number <= 0:
            return None
        size.append(number * scale)
    return (size[0], size[1])


def _ome_date(ome: ET.Element | None) -> datetime | None:
    node = None if ome is None else ome.find("./{*}Image/{*}AcquisitionDate")
    return parse_iso_date(node.text if node is not None else None)


def _ome_objective(ome: ET.Element | None) -> tuple[str | None, float | None]:
    node = None if ome is None else ome.find("./{*}Instrument/{*}Objective")
    if node is None:
        return None, None
    name = node.get("Model") or node.get("ID")
    try:
        magnification = float(node.get("NominalMagnification")) if node.get("NominalMagnification") else None
    except ValueError:
        magnification = None
    return name, magnification


def _tag_pixel_size(tif) -> tuple[float, float] | None:
    """From XResolution/YResolution (pixels per unit); ImageJ keeps its unit in the description."""
    page = tif.pages.first
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    unit_tag = tags.get("ResolutionUnit")
    unit_value = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if unit_value == 2:
        unit_um = 25400.0
    elif unit_value == 3:
        unit_um = 1e4
    else:
        imagej_unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
        unit_um = UNIT_IN_UM.get(str(imagej_unit).replace("\\u00B5", "µ")) if imagej_unit else None
        if unit_um is None:
            return None
    size = []
    for name in ("XResolution", "YResolution"):
        value = tags[name].value
        per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
        if not per_unit or per_unit <= 0 or not math.isfinite(per_unit):
            return None
        size.append(unit_um / per_unit)
    return (size[0], size[1])


def _tag_date(tif) -> datetime | None:
    tag = tif.pages.first.tags.get("DateTime")
    if tag is None:
        return None
    try:
        return datetime.strptime(str(tag.value).strip(), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None

