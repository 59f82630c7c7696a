"""The input: a stack of z-slice TIFFs (one file per z), probed from headers and read by region
(only the strips or tiles a slab touches are decoded)."""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.publish import pyramid
from pipeline.publish.omezarr.options import OmeZarrError

@dataclasses.dataclass(frozen=True)
class StackInfo:
    paths: tuple[Path, ...]
    shape: tuple[int, int, int]  # z, y, x
    samples: int
    dtype: np.dtype
    voxel_um: tuple[float | None, float | None, float | None]  # from tags (z, y, x)
    segment_bytes: int  # largest decoded strip/tile: what one region read may add


def probe_stack(paths: Sequence[Path]) -> StackInfo:
    """Shape, type and pixel size of a z-slice stack from the TIFF headers (no pixel reads).

    Every slice must have the first slice's size, samples and type: a stack of mixed sections is
    an upstream error, named here with its file rather than found later as a garbled volume.
    """
    import tifffile

    if not paths:
        raise OmeZarrError("no z-slice TIFFs given")
    first = None
    segment = 0
    voxel: tuple[float | None, float | None, float | None] = (None, None, None)
    for path in paths:
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
                samples = int(page.samplesperpixel)
                if first is None:
                    voxel = _tiff_voxel_um(tif)
                segment = max(segment, _segment_bytes(page))
        except (OSError, ValueError, tifffile.TiffFileError, IndexError) as exc:
            raise OmeZarrError(f"cannot read the TIFF header: {exc}", path) from exc
        if samples not in (1, 3) or len(shape) != (2 if samples == 1 else 3):
            raise OmeZarrError(f"expected a 2-D grey or RGB slice, got shape {shape}", path)
        if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise OmeZarrError(f"pixel type {dtype} is not supported (uint8 or uint16)", path)
        if first is None:
            first = (shape, dtype, samples)
        elif (shape, dtype, samples) != first:
            raise OmeZarrError(f"slice is {shape} {dtype}, but {paths[0].name} is {first[0]} {first[1]}: "
                               "all z slices must have one size and type", path)
    (shape, dtype, samples) = first
    return StackInfo(tuple(Path(p) for p in paths), (len(paths), shape[0], shape[1]), samples, dtype, voxel, segment)


def _segment_bytes(page) -> int:
    if page.is_tiled:
        rows, cols = page.tilelength, page.tilewidth
    else:
        rows, cols = min(page.rowsperstrip or page.shape[0], page.shape[0]), page.shape[1]
    if page.compression == 1 and page.is_contiguous and page.planarconfig == 1:
        return 0  # read with plain file reads, only the rows asked for
    return int(rows * cols * page.samplesperpixel * np.dtype(page.dtype).itemsize)


def _tiff_voxel_um(tif) -> tuple[float | None, float | None, float | None]:
    """(z, y, x) micrometres per voxel from ImageJ metadata or resolution tags, None if unknown.

    Inch-based tags under 1000 ppi are ignored: those are the 72/96/300 dpi defaults image
    writers put in, not a microscope's pixel size.
    """
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    unit = str(ij.get("unit", "")).lower().replace("\\u00b5", "µ")
    z = float(ij["spacing"]) if unit in ("micron", "um", "µm", "microns") and "spacing" in ij else None

    def per_pixel(tag_name: str) -> float | None:
        tag = page.tags.get(tag_name)
        if tag is None:
            return None
        num, den = tag.value
        if not num or not den:
            return None
        ppu = num / den  # pixels per unit
        res_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        if unit in ("micron", "um", "µm", "microns") and res_unit == 1:
            return 1.0 / ppu
        if res_unit == 3:
            return 1e4 / ppu
        if res_unit == 2 and ppu >= 1000:
            return 25400.0 / ppu
        return None

    return (z, per_pixel("YResolution"), per_pixel("XResolution"))


def read_tiff_region(path: Path, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Rows/cols of page 0 of a TIFF, decoding only the strips or tiles they touch."""
    with tiff_regions(path) as read:
        return read(rows, cols)


@contextlib.contextmanager
def tiff_regions(path: Path) -> Iterator[Callable[[tuple[int, int], tuple[int, int]], np.ndarray]]:
    """A reader of rows/cols regions of page 0 of one open TIFF (many regions, one open).

    Uncompressed contiguous files are read row by row from the file (no whole-page buffer);
    others go through tifffile's zarr view, which decodes just the intersecting segments.
    """
    import tifffile

    def failed(exc, rows, cols) -> OmeZarrError:
        return OmeZarrError(f"cannot read rows {rows[0]}:{rows[1]}, columns {cols[0]}:{cols[1]}: {exc}", path)

    errors = (OSError, ValueError, tifffile.TiffFileError, KeyError)
    try:
        tif = tifffile.TiffFile(path)
    except errors as exc:
        raise OmeZarrError(f"cannot open the TIFF: {exc}", path) from exc
    with tif:
        page = tif.pages[0]
        view = None

        def read(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
            nonlocal view
            (y0, y1), (x0, x1) = rows, cols
            try:
                if page.compression == 1 and page.is_contiguous and page.planarconfig == 1:
                    width = page.shape[1]
                    per_row = width * page.samplesperpixel
                    dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
                    fh = tif.filehandle
                    fh.seek(page.dataoffsets[0] + y0 * per_row * dtype.itemsize)
                    flat = np.frombuffer(fh.read((y1 - y0) * per_row * dtype.itemsize), dtype=dtype)
                    block = flat.reshape((y1 - y0, width) + tuple(page.shape[2:]))[:, x0:x1]
                    return np.ascontiguousarray(block).astype(dtype.newbyteorder("="), copy=False)
                if view is None:
                    import zarr

                    view = zarr.open(page.aszarr(), mode="r")
                return np.asarray(view[y0:y1, x0:x1])
            except errors as exc:
                raise failed(exc, rows, cols) from exc

        yield read


class StackReader:
    """Level 0 slabs read from the TIFFs, one z plane per thread, as (c, z, y, x)."""

    def __init__(self, info: StackInfo, bounds, threads: int):
        self.info, self.bounds, self.threads = info, bounds, threads

    def read(self, box: pyramid.Box) -> np.ndarray:
        (z0, z1), (y0, y1), (x0, x1) = box
        (oz, _), (oy, _), (ox, _) = self.bounds
        c = self.info.samples
        out = np.empty((c, z1 - z0, y1 - y0, x1 - x0), self.info.dtype)

        def one(k: int) -> None:
            path = self.info.paths[oz + z0 + k]
            plane = read_tiff_region(path, (oy + y0, oy + y1), (ox + x0, ox + x1))
            if plane.dtype != self.info.dtype:
                raise OmeZarrError(f"slice is {plane.dtype}, expected {self.info.dtype}", path)
            out[:, k] = np.moveaxis(plane, -1, 0) if c > 1 else plane

        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, z1 - z0))) as pool:
            list(pool.map(one, range(z1 - z0)))
        return out


def list_slices(folder: Path) -> list[Path]:
    from pipeline.readers import natural_sorted_tiffs

    if not Path(folder).is_dir():
        raise OmeZarrError("input TIFF folder does not exist", folder)
    paths = natural_sorted_tiffs(folder)
    if not paths:
        raise OmeZarrError("no .tif/.tiff files in the folder", folder)
    return paths
