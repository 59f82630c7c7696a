"""What the precomputed writer (precomputed.py) and its verifier (validate.py) both need, below
both of them: reading an aligned section TIFF a band of rows at a time, and the pyramid rounds
recorded in a layer's provenance file. validate.py imports this, never precomputed.py.

Also the one rule for display windows of published data (`stack_windows`), which both
publishing stages (neuroglancer via precomputed.publish_layer, omezarr) apply to the aligned
sections they publish: a window must describe the voxels served, e.g. after `clean --normalise`
stretched them, not the extracted sections the histogram stage counts.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.errors import SlidepipeError

PROVENANCE_STEP = "slidepipe.precomputed"
"""The `method.task` of slidepipe's own entry in a layer's provenance `processing` list."""

ROW_BAND_BYTES = 64 * 1024**2
"""Sections are read and written in bands of rows of about this size, never whole."""


GZIP_LEVEL = 1
"""gzip level of published precomputed chunks (measured against 1 and 9: docs/format-precomputed.md)."""


def use_gzip_level(level: int) -> None:
    """Make cloud-volume gzip at `level` in this process (igneous's tasks included).

    cloud-volume 12.15 compresses image chunks with `compression.compress(data, "gzip")` and no
    level (its `compress_level` option is not used for them: checked, the same bytes at 1 and 9),
    and igneous's tasks open their own CloudVolume anyway; cloudfiles then takes level 9. So the
    default of cloudfiles' gzip_compress is what decides; an explicit level still wins."""
    from cloudfiles import compression

    original = getattr(compression.gzip_compress, "slidepipe_original", compression.gzip_compress)

    def gzip_compress(content, compresslevel=None):
        return original(content, int(level) if compresslevel is None else compresslevel)

    gzip_compress.slidepipe_original = original  # type: ignore[attr-defined]
    gzip_compress.slidepipe_level = int(level)  # type: ignore[attr-defined]
    compression.gzip_compress = gzip_compress


CHUNK_RECORDS = "slidepipe_chunks"
"""Inside a step-1 layer (precomputed.write_rechunkme_section): `<z>.json` per written section,
the grid of its chunks that hold data (the others are all zero and have no file). Written after
the section's chunks, so a section without one was not (completely) written. Its presence also
marks the layer as a step-1 layer for `read_step1_directly`."""


def prepare_igneous_process(gzip_level: int = GZIP_LEVEL) -> None:
    """What every process that runs igneous tasks sets first: slidepipe's gzip level
    (`use_gzip_level`) and the direct reading of step-1 layers (`read_step1_directly`)."""
    use_gzip_level(gzip_level)
    read_step1_directly()


def read_step1_directly() -> None:
    """Make cloud-volume read slidepipe's step-1 layers a chunk file at a time with plain `open`.

    igneous's transfer task reads its source with cloud-volume, whose unsharded download costs a
    heavy Python round per chunk (a CloudFiles object, a get through its job scheduler, a decode,
    a paste): the largest item of the profile after step 1's writes, for (64, 64, 1) chunks of
    8 KB. Measured on 4096 (64, 64, 1) uint16 chunks: 0.66 s through cloud-volume, 0.05 s here
    (0.08 s with tensorstore, which also cannot be used in processes forked after it ran). Only
    the plain case is taken over: a local (file://) raw, unsharded level of a layer holding
    `CHUNK_RECORDS`, a box inside the level, one process, no cache, no LRU content, no
    renumbering, no label, background 0. The result is the same array (tested against
    cloud-volume's own read); a chunk without a file is zeros only with `fill_missing`, otherwise
    an error naming it, as in cloud-volume; a chunk of the wrong size is an error naming it.
    Everything else goes to cloud-volume's own `download`, unchanged."""
    from cloudvolume.datasource.precomputed.image import rx

    if getattr(rx.download, "slidepipe_original", None) is not None:
        return

    def download(requested_bbox, mip, *args, **kwargs):
        layer = _step1_read_path(requested_bbox, mip, args, kwargs)
        if layer is None:
            return download.slidepipe_original(requested_bbox, mip, *args, **kwargs)
        from cloudvolume.volumecutout import VolumeCutout

        meta = kwargs["meta"]
        box = [(int(a), int(b)) for a, b in zip(requested_bbox.minpt, requested_bbox.maxpt)]
        data = read_raw_box(os.path.join(layer, meta.key(mip)), meta.bounds(mip), meta.chunk_size(mip),
                            meta.voxel_offset(mip), box, int(meta.num_channels), np.dtype(meta.dtype),
                            bool(kwargs["fill_missing"]), kwargs.get("order", "F"))
        return VolumeCutout.from_volume(meta, mip, data, requested_bbox)

    download.slidepipe_original = rx.download  # type: ignore[attr-defined]
    rx.download = download


def read_raw_box(folder: str, bounds, chunk, offset, box, channels: int, dtype: np.dtype, fill_missing: bool,
                 order: str = "F") -> np.ndarray:
    """The (x, y, z, channel) voxels of `box` ((x0, x1), (y0, y1), (z0, z1)) of an unsharded raw
    level whose chunk files are in `folder`: each chunk overlapping the box read with `open`,
    decoded from its raw bytes ([channel][z][y][x], x fastest) and pasted."""
    lo = [int(v) for v in bounds.minpt]
    hi = [int(v) for v in bounds.maxpt]
    out = np.zeros([b - a for a, b in box] + [channels], dtype, order=order)
    grids = []
    for axis, (a, b) in enumerate(box):
        step, base = int(chunk[axis]), int(offset[axis])
        first = base + (a - base) // step * step
        grids.append([(c, min(c + step, hi[axis])) for c in range(max(first, lo[axis]), b, step)])
    for z0, z1 in grids[2]:
        for y0, y1 in grids[1]:
            for x0, x1 in grids[0]:
                name = f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"
                try:
                    with open(os.path.join(folder, name), "rb") as handle:
                        raw = handle.read()
                except FileNotFoundError:
                    if fill_missing:
                        continue
                    raise OSError(f"step-1 chunk {os.path.join(folder, name)} is missing") from None
                shape = (channels, z1 - z0, y1 - y0, x1 - x0)
                if len(raw) != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(f"step-1 chunk {os.path.join(folder, name)} has {len(raw)} bytes, "
                                     f"not the {int(np.prod(shape)) * dtype.itemsize} of a raw {shape[::-1]} chunk")
                voxels = np.frombuffer(raw, dtype).reshape(shape).transpose(3, 2, 1, 0)
                (ax0, ax1), (ay0, ay1), (az0, az1) = box
                sx0, sy0, sz0 = max(x0, ax0), max(y0, ay0), max(z0, az0)
                sx1, sy1, sz1 = min(x1, ax1), min(y1, ay1), min(z1, az1)
                out[sx0 - ax0: sx1 - ax0, sy0 - ay0: sy1 - ay0, sz0 - az0: sz1 - az0] = \
                    voxels[sx0 - x0: sx1 - x0, sy0 - y0: sy1 - y0, sz0 - z0: sz1 - z0]
    return out


def _step1_read_path(bbox, mip, args, kwargs) -> str | None:
    """The local folder of the step-1 layer `rx.download` is asked to read, if it is the plain
    case `read_step1_directly` takes over; else None."""
    meta = kwargs.get("meta")
    if args or meta is None or meta.path.protocol != "file" or not meta.cloudpath.startswith("file://"):
        return None
    cache, lru = kwargs.get("cache"), kwargs.get("lru")
    if (kwargs.get("parallel", 1) != 1 or kwargs.get("use_shared_memory") or kwargs.get("use_file")
            or kwargs.get("renumber") or kwargs.get("label") is not None or kwargs.get("background_color", 0) != 0
            or (cache is not None and cache.enabled) or (lru is not None and len(lru) > 0)):
        return None
    if meta.encoding(mip) != "raw" or "sharding" in meta.scale(mip):
        return None
    bounds = meta.bounds(mip)
    if any(bbox.minpt[i] < bounds.minpt[i] or bbox.maxpt[i] > bounds.maxpt[i] or bbox.minpt[i] >= bbox.maxpt[i]
           for i in range(3)):
        return None
    layer = meta.cloudpath[len("file://"):].rstrip("/")
    return layer if os.path.isdir(os.path.join(layer, CHUNK_RECORDS)) else None


class PrecomputedError(SlidepipeError):
    """A stack cannot be published, or a published layer is not what it should be."""


@contextlib.contextmanager
def open_section(path: str | Path) -> Iterator["SectionRows"]:
    """A section TIFF whose rows can be read a band at a time.

    Full-resolution sections can be 60k x 40k px, so nobody should load one whole; the TIFF
    reader decodes only the strips or tiles a band touches.
    """
    from pipeline.readers.tiff import TiffReader

    with TiffReader(path) as reader:
        yield SectionRows(reader)


class SectionRows:
    """Rows of a one-channel (grey or RGB) section as (rows, width, samples) arrays."""

    def __init__(self, reader):
        scene = reader.info().scenes[0]
        self.path = Path(reader.path)
        if len(scene.channels) != 1 or scene.z_planes != 1:
            raise PrecomputedError(
                f"{len(scene.channels)} channels x {scene.z_planes} z planes in one file; an aligned section "
                "file holds one channel of one section", self.path)
        self._reader = reader
        self.width, self.height = int(scene.width), int(scene.height)
        self.channels = int(scene.samples_per_pixel)
        self.dtype = np.dtype(scene.dtype)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return self.window(y0, y1, 0, self.width)

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0..y1-1, columns x0..x1-1: only the tiles it touches are decoded (a verifier's
        chunk of a 60k-wide section does not read the whole row band)."""
        data = self._reader.read_region(0, 1, x0, y0, x1 - x0, y1 - y0)
        return data[:, :, None] if data.ndim == 2 else data


def section_counts(path: str | Path, band_bytes: int = ROW_BAND_BYTES) -> np.ndarray:
    """How often each value occurs in each sample (grey: 1, RGB: 3) of a uint8/uint16 section:
    (samples, 256 or 65536) int64, read a band of rows at a time."""
    from pipeline.imaging.histogram import histogram_length, masked_histogram

    with open_section(path) as section:
        if section.dtype.name not in ("uint8", "uint16"):
            raise PrecomputedError(f"data type {section.dtype.name}: windows are made of uint8 or uint16 data", path)
        counts = np.zeros((section.channels, histogram_length(section.dtype)), np.int64)
        band = max(1, band_bytes // (section.width * section.channels * section.dtype.itemsize))
        for y0 in range(0, section.height, band):
            rows = section.rows(y0, min(y0 + band, section.height))
            for sample in range(section.channels):
                counts[sample] += masked_histogram(rows[:, :, sample])
    return counts


def stack_windows(sections: Sequence[str | Path], per_sample: bool = False) -> list[tuple[float, float]]:
    """Display windows of the published data: `pipeline.imaging.contrast.display_window` of the
    counts of every voxel of the aligned `sections` (masked background, 0, left out). One window
    for all samples (an RGB layer's single shader range), or one per sample (`per_sample`: the
    OME-Zarr omero channels)."""
    from pipeline.imaging.contrast import display_window

    total = None
    for path in sections:
        counts = section_counts(path)
        if total is not None and counts.shape != total.shape:
            raise PrecomputedError(f"section has {counts.shape[0]} samples of {counts.shape[1]} values, the stack "
                                   f"{total.shape[0]} of {total.shape[1]}", path)
        total = counts if total is None else total + counts
    if total is None:
        raise PrecomputedError("the section stack is empty")
    rows = total if per_sample else total.sum(axis=0, keepdims=True)
    return [display_window(row) for row in rows]


def _our_entry(layer_dir: str | Path, key: str):
    """`key` of slidepipe's newest entry in the layer's provenance file, or None."""
    path = Path(layer_dir) / "provenance"
    try:
        prov = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for entry in reversed(prov.get("processing", [])):
        method = entry.get("method", {}) if isinstance(entry, dict) else {}
        if method.get("task") == PROVENANCE_STEP and key in method:
            return method[key]
    return None


def read_rounds(layer_dir: str | Path) -> list[dict] | None:
    """The pyramid rounds recorded by `publish_layer` in the provenance file, if any."""
    return _our_entry(layer_dir, "rounds")


def read_window(layer_dir: str | Path) -> tuple[float, float] | None:
    """The display window `publish_layer` recorded in the provenance file, if any."""
    window = _our_entry(layer_dir, "window")
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        return None
    return lo, hi
