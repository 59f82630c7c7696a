"""What the precomputed writer (precomputed.py) and its verifier (validate.py) both need, below
both of them: reading an aligned section TIFF a band of rows at a time, and the pyramid rounds
recorded in a layer's provenance file. validate.py imports this, never precomputed.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import SlidepipeError

PROVENANCE_STEP = "slidepipe.precomputed"
"""The `method.task` of slidepipe's own entry in a layer's provenance `processing` list."""


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
        data = self._reader.read_region(0, 1, 0, y0, self.width, y1 - y0)
        return data[:, :, None] if data.ndim == 2 else data


def read_rounds(layer_dir: str | Path) -> list[dict] | None:
    """The pyramid rounds recorded by `publish_layer` in the provenance file, if any."""
    path = Path(layer_dir) / "provenance"
    try:
        prov = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for entry in reversed(prov.get("processing", [])):
        method = entry.get("method", {}) if isinstance(entry, dict) else {}
        if method.get("task") == PROVENANCE_STEP and "rounds" in method:
            return method["rounds"]
    return None
