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
