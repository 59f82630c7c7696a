"""Zeiss CZI slides through pylibCZIrw (libCZI).

Why libCZI and not the XML: files written by pylibCZIrw (and some ZEN exports) carry SizeS but no
scene list in their metadata, so scenes, their bounding boxes, channels and z planes are taken
from the subblock directory (`SubBlockStatistics` and the subblock coordinates), which every
writer fills. Metadata (channel names, pixel size, date, objective) comes from the XML.

`read_region` asks libCZI's single-channel accessor for a rectangle in the file's global pixel
coordinates, filtered to one scene: libCZI decodes only the subblocks that intersect it and
stitches mosaic tiles. libCZI stores colour as B,G,R; we return R,G,B.
"""

from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.errors import SlideReadError
from pipeline.readers import ChannelInfo, SceneInfo, SlideInfo, check_region, file_size, one_line, parse_iso_date

# libCZI pixel type -> (numpy dtype, samples per pixel)
PIXEL_TYPES = {
    "Gray8": ("uint8", 1),
    "Gray16": ("uint16", 1),
    "Gray32Float": ("float32", 1),
    "Bgr24": ("uint8", 3),
    "Bgr48": ("uint16", 3),
    "Bgr96Float": ("float32", 3),
}

METRES_LIMIT = 1e-3
"""Pixel sizes are stored in metres (ZEN writes 3.25e-07). A stored value this large cannot be
metres per pixel of a microscope image; it was written in micrometres (as pylibCZIrw's docstring
suggests), so it is taken as such."""


class CziReader:
    """One open CZI file. Not thread-safe; open one per worker process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = file_size(self.path)
        _check_magic(self.path, size)
        from pylibCZIrw import czi as pyczi

        try:
            self._czi = pyczi.CziReader(str(self.path))
        except Exception as exc:  # libCZI raises RuntimeError with its own wording
            detail = one_line(exc)
            what = "truncated CZI file" if "Not enough data" in detail else "not a readable CZI file"
            raise SlideReadError(f"{what} ({size} bytes): {detail}", self.path) from exc
        try:
            self._short_subblocks = _check_complete(self.path, size)
        except SlideReadError:
            self.close()
            raise
        self._info: SlideInfo | None = None
        self._scene_filter: dict[int, int | None] = {}
        self._channel_types: dict[tuple[int, int], str] = {}

    # --- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "CziReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._czi is not None:
            self._czi.close()
            self._czi = None

    # --- metadata ----------------------------------------------------------------------------
    def info(self) -> SlideInfo:
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> SlideInfo:
        czi = self._open()
        try:
            xml = czi.raw_metadata
            root = ET.fromstring(xml) if xml else None
        except Exception as exc:
            raise SlideReadError(f"cannot parse the CZI metadata XML: {one_line(exc)}", self.path) from exc
        blocks = self._layer0_subblocks()
        if not blocks:
            raise SlideReadError("the file contains no image subblocks", self.path)
        names = _channel_names(root)
        stats = czi._stats
        scene_boxes = {int(k): v for k, v in stats.sceneBoundingBoxes.items()}

        scenes: list[SceneInfo] = []
        if scene_boxes:
            items = sorted(scene_boxes.items())
        else:  # no S dimension: the whole document is one scene
            items = [(None, None)]
        for position, (s_index, boxes) in enumerate(items):
            if boxes is None:
                rect = stats.boundingBoxLayer0Only
            else:
                rect = boxes.boundingBoxLayer0
                if rect.w <= 0 or rect.h <= 0:
                    rect = boxes.boundingBox
            mine = [b for b in blocks if b["S"] == s_index] if s_index is not None else blocks
            if not mine or rect.w <= 0 or rect.h <= 0:
                raise SlideReadError(f"scene {position + 1} has no image data", self.path)
            channels = sorted({b["C"] for b in mine})
            z_values = sorted({b["Z"] for b in mine})
            t_values = sorted({b["T"] for b in mine})
            types = {b["C"]: b["pixel_type"] for b in mine}
            for c in channels:
                self._channel_types[(position, c + 1)] = types[c]
            dtype, spp = _scene_pixel_format(types, position, self.path)
            if z_values != list(range(len(z_values))):
                raise SlideReadError(f"scene {position + 1}: z planes {z_values} are not contiguous from 0", self.path)
            if t_values != list(range(len(t_values))):
                raise SlideReadError(f"scene {position + 1}: time points {t_values} are not contiguous from 0", self.path)
            self._scene_filter[position] = s_index
            scenes.append(
                SceneInfo(
                    index=position,
                    x=int(rect.x),
                    y=int(rect.y),
                    width=int(rect.w),
                    height=int(rect.h),
                    channels=tuple(ChannelInfo(c + 1, names[c] if c < len(names) and names[c] else f"C{c + 1}") for c in channels),
                    dtype=dtype,
                    samples_per_pixel=spp,
                    z_planes=len(z_values),
                    time_points=len(t_values),
                )
            )
        objective, magnification = _objective(root)
        return SlideInfo(
            path=self.path,
            scenes=tuple(scenes),
            pixel_size_um=_pixel_size_um(root),
            acquisition_date=_acquisition_date(root),
            objective=objective,
            magnification=magnification,
        )

    def _layer0_subblocks(self) -> list[dict]:
        """Coordinates of every full-resolution subblock (pyramid levels skipped)."""
        blocks: list[dict] = []

        def visit(_index, info) -> bool:
            if abs(info.get_zoom() - 1.0) > 1e-6:
                return True
            coord = info.coordinate.to_dict()
            blocks.append(
                {
                    "S": coord.get("S"),
                    "C": int(coord.get("C", 0)),
                    "Z": int(coord.get("Z", 0)),
                    "T": int(coord.get("T", 0)),
                    "pixel_type": info.pixelType.name,
                }
            )
            return True

        try:
            self._open().enumerate_subblocks(visit)
        except Exception as exc:
            raise SlideReadError(f"cannot read the subblock directory: {one_line(exc)}", self.path) from exc
        return blocks

    # --- pixels ------------------------------------------------------------------------------
    def read_region(
        self, scene: int, channel: int, x: int, y: int, width: int, height: int, z: int = 0, t: int = 0
    ) -> np.ndarray:
        info = self.info()
        if not 0 <= scene < len(info.scenes):
            raise SlideReadError(f"no scene {scene + 1} (the file has {len(info.scenes)})", self.path)
        sc = info.scenes[scene]
        check_region(sc, self.path, channel, x, y, width, height, z, t)
        pixel_type = self._channel_types[(scene, channel)]
        plane = {"C": channel - 1, "Z": z, "T": t}
        s_filter = self._scene_filter[scene]
        roi = (sc.x + x, sc.y + y, width, height)
        short = _short_subblock_in(self._short_subblocks, s_filter, channel - 1, z, t, roi)
        if short is not None:
            raise SlideReadError(
                f"scene {scene + 1} channel {channel} z {z}{f' t {t}' if sc.time_points > 1 else ''}: the uncompressed subblock at "
                f"byte {short['position']} (x={short['dims'].get('X')} y={short['dims'].get('Y')}) holds {short['have']} bytes "
                f"for {short['need']}: damaged; not reading it as zeros",
                self.path,
            )
        try:
            data = self._open().read(
                roi=roi,
                plane=plane,
                scene=s_filter,
                pixel_type=pixel_type,
            )
        except Exception as exc:
            raise SlideReadError(
                f"scene {scene + 1} channel {channel} z {z}{f' t {t}' if sc.time_points > 1 else ''}: cannot decode region x={x} y={y} {width}x{height}: {one_line(exc)}",
                self.path,
            ) from exc
        if data.shape[:2] != (height, width):
            raise SlideReadError(
                f"scene {scene + 1} channel {channel}: libCZI returned {data.shape[:2]} for a {height}x{width} region", self.path
            )
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[..., 0]
        elif data.ndim == 3 and data.shape[2] == 3:
            data = data[..., ::-1]  # libCZI memory order is B, G, R
        out = np.ascontiguousarray(data)
        if out.dtype != np.dtype(sc.dtype):
            out = out.astype(sc.dtype)  # gray8 channel in a scene reported as uint16: widen losslessly
        return out

    def _open(self):
        if self._czi is None:
            raise SlideReadError("reader is closed", self.path)
        return self._czi


CZI_MAGIC = b"ZISRAWFILE"
"""Every CZI starts with its file-header segment, named by these bytes."""


def _check_magic(path: Path, size: int) -> None:
    """A file that does not start like a CZI is not one, whatever its name: say so, rather than
    letting libCZI call a short text file 'truncated'."""
    with open(path, "rb") as handle:
        head = handle.read(len(CZI_MAGIC))
    if head != CZI_MAGIC and CZI_MAGIC.startswith(head):
        raise SlideReadError(f"truncated CZI file ({size} bytes): it ends inside the file header", path)
    if head != CZI_MAGIC:
        raise SlideReadError(f"not a CZI file ({size} bytes; it starts with {head[:10]!r}, not {CZI_MAGIC!r})", path)


BYTES_PER_PIXEL = {0: 1, 1: 2, 2: 4, 3: 3, 4: 6, 8: 12, 9: 4, 12: 4, 13: 8}
"""CZI pixel type code (directory entry) -> bytes per pixel, for uncompressed subblocks."""


def _check_complete(path: Path, size: int) -> list[dict]:
    """Fail on open when the file ends before its last subblock does; return the uncompressed
    subblocks that hold fewer bytes than their pixels need.

    ZEN writes the subblock directory near the start of a file, so libCZI opens a file cut in half
    without complaint and fails only when a missing subblock is drawn. Reading the directory
    (segment layout of the CZI format: file header -> directory position -> entries with each
    subblock's file position) and the last subblock's segment header finds the cut up front.
    libCZI also draws an uncompressed subblock whose data size is too small padded with zeros;
    those are returned (coordinates and sizes) so that a read touching one is an error.
    """
    short: list[dict] = []
    with open(path, "rb") as handle:
        def read(offset: int, length: int) -> bytes:
            handle.seek(offset)
            data = handle.read(length)
            if len(data) != length:
                raise SlideReadError(f"truncated CZI file ({size} bytes): nothing at offset {offset}", path)
            return data

        directory = struct.unpack_from("<q", read(32 + 52, 8))[0]
        if directory <= 0:
            return short  # no directory: libCZI already refused such a file
        header = read(directory, 32 + 4)
        if header[:15] != b"ZISRAWDIRECTORY":
            raise SlideReadError(f"damaged CZI file: no subblock directory at offset {directory}", path)
        count = struct.unpack_from("<i", header, 32)[0]
        entries_start = directory + 32 + 128
        allocated = struct.unpack_from("<q", header, 16)[0]
        entries = read(entries_start, max(0, min(allocated - 128, size - entries_start)))
        last, pos = 0, 0
        for _ in range(count):
            if pos + 32 > len(entries):
                raise SlideReadError(f"truncated CZI file ({size} bytes): subblock directory is cut short", path)
            pixel_type, position, _part, compression = struct.unpack_from("<iqii", entries, pos + 2)
            n_dims = struct.unpack_from("<i", entries, pos + 28)[0]
            last = max(last, position)
            if compression == 0 and pixel_type in BYTES_PER_PIXEL and pos + 32 + 20 * n_dims <= len(entries):
                dims = {}
                for k in range(n_dims):
                    e = pos + 32 + 20 * k
                    name = entries[e : e + 4].rstrip(b"\0").decode("ascii", "replace")
                    start, extent, _coord, stored = struct.unpack_from("<iifi", entries, e + 4)
                    dims[name] = (start, extent, stored or extent)
                need = dims.get("X", (0, 0, 0))[2] * dims.get("Y", (0, 0, 0))[2] * BYTES_PER_PIXEL[pixel_type]
                have = struct.unpack_from("<q", read(position + 32 + 8, 8))[0] if position + 48 <= size else 0
                if have < need:
                    short.append({"dims": {k: v[0] for k, v in dims.items()}, "sizes": {k: v[1] for k, v in dims.items()},
                                  "position": position, "have": have, "need": need})
            pos += 32 + 20 * n_dims
        if count:
            used = struct.unpack_from("<q", read(last, 32), 24)[0]
            if last + 32 + used > size:
                raise SlideReadError(
                    f"truncated CZI file ({size} bytes): the last subblock ends at byte {last + 32 + used}", path
                )
    return short


def _short_subblock_in(short: list[dict], s_index: int | None, c: int, z: int, t: int, roi: tuple[int, int, int, int]) -> dict | None:
    """The first too-short uncompressed subblock of this plane that intersects `roi` (global x, y, w, h)."""
    x, y, w, h = roi
    for block in short:
        d, n = block["dims"], block["sizes"]
        if s_index is not None and d.get("S", 0) != s_index:
            continue
        if (d.get("C", 0), d.get("Z", 0), d.get("T", 0)) != (c, z, t):
            continue
        bx, by, bw, bh = d.get("X", 0), d.get("Y", 0), n.get("X", 0), n.get("Y", 0)
        if bx < x + w and x < bx + bw and by < y + h and y < by + bh:
            return block
    return None


# --- metadata helpers (pure functions of the XML tree) -----------------------------------------
def _scene_pixel_format(types: dict[int, str], scene: int, path: Path) -> tuple[str, int]:
    formats = {c: PIXEL_TYPES.get(t) for c, t in types.items()}
    unknown = sorted({types[c] for c, f in formats.items() if f is None})
    if unknown:
        raise SlideReadError(f"scene {scene + 1}: unsupported pixel type {', '.join(unknown)}", path)
    spps = {f[1] for f in formats.values()}
    dtypes = {f[0] for f in formats.values()}
    if len(spps) > 1 or (len(dtypes) > 1 and not dtypes <= {"uint8", "uint16"}):
        raise SlideReadError(f"scene {scene + 1}: channels mix pixel types {sorted(set(types.values()))}", path)
    dtype = "uint16" if len(dtypes) > 1 else dtypes.pop()
    return dtype, spps.pop()


def _find(root: ET.Element | None, path: str) -> ET.Element | None:
    return None if root is None else root.find(path)


def _text(root: ET.Element | None, path: str) -> str | None:
    node = _find(root, path)
    text = None if node is None else (node.text or "").strip()
    return text or None


def _channel_names(root: ET.Element | None) -> list[str]:
    for path in ("./Metadata/Information/Image/Dimensions/Channels", "./Metadata/DisplaySetting/Channels"):
        node = _find(root, path)
        if node is not None:
            names = [(ch.get("Name") or "").strip() for ch in node.findall("Channel")]
            if names:
                return names
    return []


def _pixel_size_um(root: ET.Element | None) -> tuple[float, float] | None:
    items = _find(root, "./Metadata/Scaling/Items")
    if items is None:
        return None
    values = {}
    for distance in items.findall("Distance"):
        axis = distance.get("Id")
        try:
            values[axis] = float(_text(distance, "Value") or "nan")
        except ValueError:
            continue
    size = []
    for axis in ("X", "Y"):
        value = values.get(axis)
        if value is None or not math.isfinite(value) or value <= 0:
            return None
        size.append(value if value >= METRES_LIMIT else value * 1e6)
    return (size[0], size[1])


def _acquisition_date(root: ET.Element | None) -> datetime | None:
    return parse_iso_date(_text(root, "./Metadata/Information/Image/AcquisitionDateAndTime")) or parse_iso_date(
        _text(root, "./Metadata/Information/Document/CreationDate")
    )


_MAGNIFICATION = re.compile(r"(\d+(?:\.\d+)?)\s*x", re.IGNORECASE)


def _objective(root: ET.Element | None) -> tuple[str | None, float | None]:
    """Objective used for the image: the one ObjectiveSettings refers to, else the first listed."""
    objectives = _find(root, "./Metadata/Information/Instrument/Objectives")
    chosen = None
    if objectives is not None:
        listed = objectives.findall("Objective")
        ref = _find(root, "./Metadata/Information/Image/ObjectiveSettings/ObjectiveRef")
        ref_id = None if ref is None else ref.get("Id")
        chosen = next((o for o in listed if ref_id and o.get("Id") == ref_id), listed[0] if listed else None)
    name = None
    magnification = None
    if chosen is not None:
        name = (chosen.get("Name") or "").strip() or _text(chosen, "./Manufacturer/Model")
        try:
            magnification = float(_text(chosen, "NominalMagnification") or "nan")
        except ValueError:
            magnification = None
        if magnification is not None and not math.isfinite(magnification):
            magnification = None
    name = name or _text(root, "./Metadata/Scaling/AutoScaling/ObjectiveName")
    if magnification is None and name:
        match = _MAGNIFICATION.search(name)
        magnification = float(match.group(1)) if match else None
    return name, magnification
