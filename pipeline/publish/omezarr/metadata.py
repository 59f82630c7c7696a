"""NGFF metadata: multiscales (axes, per-level transforms), omero (channels, display windows),
written into the root attributes; windows computed from a stored level when not given."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.publish import pyramid
from pipeline.publish.omezarr.options import OmeZarrError
from pipeline.publish.omezarr.state import STATE_KEY
from pipeline.publish.omezarr.store import Image, read_attributes, unit_for, write_attributes

HISTOGRAM_MAX_VOXELS = 2**24
"""Windows come from the finest level at most this big (a full pass over level 0 of a whole
brain would cost as much as the conversion)."""
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF")
DEFAULT_COLOR = "FFFFFF"


def axes_for(channels: bool) -> list[dict]:
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in ("z", "y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + axes


def multiscales_metadata(ngff_version: str, scales: Sequence[Sequence[float]], channels: bool, name: str,
                         algorithm: str, translations: Sequence[Sequence[float] | None] | None = None,
                         paths: Sequence[str] | None = None) -> dict:
    """`translations`: one (z, y, x) per level (`pyramid.level_translations`; None for a level
    without one); written for every level as soon as one of them is not zero."""
    translations = [list(t) if t is not None else [0.0, 0.0, 0.0] for t in (translations or [None] * len(scales))]
    placed = any(any(t) for t in translations)
    datasets = []
    for i, scale in enumerate(scales):
        transforms: list[dict] = [{"type": "scale", "scale": ([1.0] if channels else []) + [float(s) for s in scale]}]
        if placed:
            transforms.append({"type": "translation",
                               "translation": ([0.0] if channels else []) + [float(t) for t in translations[i]]})
        datasets.append({"path": paths[i] if paths else str(i), "coordinateTransformations": transforms})
    ms = {"name": name, "axes": axes_for(channels), "datasets": datasets, "type": algorithm,
          "metadata": {"method": "slidepipe.publish.pyramid.downsample", "algorithm": algorithm}}
    if ngff_version == "0.4":
        ms = {"version": "0.4", **ms}
    return ms


def omero_metadata(ngff_version: str, windows: Sequence[tuple[float, float]], dtype: np.dtype,
                   names: Sequence[str], mid_z: int) -> dict:
    info = np.iinfo(dtype)
    rgb = len(windows) == 3
    channels = []
    for i, (start, end) in enumerate(windows):
        channels.append({
            "active": True, "coefficient": 1.0,
            "color": CHANNEL_COLORS[i] if rgb else DEFAULT_COLOR,
            "family": "linear", "inverted": False, "label": names[i],
            "window": {"start": float(start), "end": float(end), "min": float(info.min), "max": float(info.max)},
        })
    omero = {"name": names[0] if len(names) == 1 else "image", "channels": channels,
             "rdefs": {"defaultZ": int(mid_z), "defaultT": 0, "model": "color" if rgb else "greyscale"}}
    if ngff_version == "0.4":
        omero["version"] = "0.4"
    return omero


def write_ome_attributes(store: Path, ngff_version: str, multiscales: dict, omero: dict | None, state: dict) -> None:
    attrs = read_attributes(store)
    attrs.pop("multiscales", None)
    attrs.pop("omero", None)
    if ngff_version == "0.5":
        ome: dict = {"version": "0.5", "multiscales": [multiscales]}
        if omero:
            ome["omero"] = omero
        attrs["ome"] = ome
    else:
        attrs["multiscales"] = [multiscales]
        if omero:
            attrs["omero"] = omero
    attrs[STATE_KEY] = state
    write_attributes(store, attrs)


def stored_ome_metadata(attrs: dict) -> tuple[dict | None, dict | None]:
    """(multiscales[0], omero) of a store's root attributes, either NGFF version."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") or [None]
    return multiscales[0], ome.get("omero")


def channel_names(names, channels: int) -> list[str]:
    if names:
        if len(names) != channels:
            raise OmeZarrError(f"{len(names)} channel names for {channels} channels")
        return list(names)
    return ["red", "green", "blue"] if channels == 3 else ["C1"]


def display_windows(given, arrays, shapes, img: Image, budget: int) -> list[tuple[float, float]]:
    """Display windows: as given, else 0.5/99.5 percentiles of the non-zero voxels of the finest
    level small enough to scan cheaply."""
    if given:
        if len(given) != img.channels:
            raise OmeZarrError(f"{len(given)} windows given for {img.channels} channels")
        return [tuple(float(v) for v in w) for w in given]
    from pipeline.imaging.contrast import window_from_histogram

    level = next((i for i, s in enumerate(shapes) if np.prod(s) <= HISTOGRAM_MAX_VOXELS), len(shapes) - 1)
    windows = []
    for counts in level_histograms(arrays[level], shapes[level], img, budget):
        try:
            windows.append(window_from_histogram(counts, np.arange(counts.size + 1)))
        except ValueError:  # nothing but zeros: an empty (masked-out) volume
            windows.append((0.0, float(counts.size - 1)))
    return windows


def level_histograms(array, shape, img: Image, budget: int) -> list[np.ndarray]:
    """Per-channel value counts of one stored level, read in slabs of whole rows and counted a
    million voxels at a time (np.bincount widens its input to int64: 4-8x the slab)."""
    bins = int(np.iinfo(img.dtype).max) + 1
    hists = [np.zeros(bins, np.int64) for _ in range(img.channels)]
    step = 2**20
    per_voxel = img.channels * img.dtype.itemsize
    unit = tuple(int(n) for n in array.chunk_layout.write_chunk.shape[-3:])  # whole stored chunks: no re-decoding
    for box in pyramid.plan_slabs(shape, unit, max(int(np.prod(unit_for(unit, shape))), (budget - 16 * step) // per_voxel)):
        block = img.as_czyx(array[img.index(box)].read().result())
        for c in range(img.channels):
            flat = block[c].reshape(-1)
            for start in range(0, flat.size, step):
                hists[c] += np.bincount(flat[start:start + step], minlength=bins)
    return hists


def dataset_scale(dataset: dict) -> list[float]:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return [float(v) for v in t["scale"]]
    raise OmeZarrError(f"dataset {dataset.get('path')} has no scale transform")


def dataset_translation(dataset: dict) -> list[float] | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "translation":
            return [float(v) for v in t["translation"]][-3:]
    return None
