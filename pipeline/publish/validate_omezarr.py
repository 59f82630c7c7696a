"""Checks that a written OME-Zarr store is what viewers will accept and holds what it was made
from, before a stage calls it done.

`validate_store`: the metadata is validated with ome-zarr-models (the NGFF 0.4 or 0.5 schema,
chosen by the Zarr format on disk); on top, each level must open as an array whose shape follows
from level 0 and the scale ratio, so a level that was never written or has the wrong size is
caught here too. `verify_data`: the voxels, like `pipeline.publish.validate.verify_layer` does for
precomputed layers: chunk files are listed from the array metadata and decoded with zarr-python
(not tensorstore, the writer), so a writer bug cannot hide itself by reading back what it wrote.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.publish.validate import LayerVerificationError


class OmeZarrValidationError(SlidepipeError):
    """The store's metadata or arrays do not form a valid OME-Zarr image."""


class OmeZarrDataError(OmeZarrValidationError, LayerVerificationError):
    """The store lacks chunk files or holds voxels that differ from what it was made from
    (`problems` lists each)."""


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    store: Path
    ngff_version: str | None  # None for a plain --zarr-only array
    shapes: tuple[tuple[int, ...], ...]
    scales: tuple[tuple[float, ...], ...]
    dtype: str


def validate_store(store: str | Path, expect_levels: int | None = None, zarr_only: bool = False) -> ValidationReport:
    import zarr

    store = Path(store)
    if zarr_only:
        try:
            array = zarr.open_array(store, mode="r")
        except Exception as exc:  # zarr raises several types for "not an array"
            raise OmeZarrValidationError(f"not a zarr array: {exc}", store) from exc
        return ValidationReport(store, None, (tuple(array.shape),), (), str(array.dtype))
    if (store / "zarr.json").is_file():
        from ome_zarr_models.v05.image import Image

        version = "0.5"
    elif (store / ".zgroup").is_file():
        from ome_zarr_models.v04.image import Image

        version = "0.4"
    else:
        raise OmeZarrValidationError("no zarr.json or .zgroup: not a zarr group", store)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr's notes on unknown files; the schema is what we check
            group = zarr.open_group(store, mode="r")
            image = Image.from_zarr(group)
    except Exception as exc:  # pydantic ValidationError, zarr errors: all mean "not valid"
        raise OmeZarrValidationError(f"invalid NGFF {version} image: {_first_line(exc)}", store) from exc
    attrs = json.loads(json.dumps(image.attributes.model_dump(mode="json")))
    ms = (attrs["ome"] if version == "0.5" else attrs)["multiscales"][0]
    shapes, scales, dtype = [], [], None
    for dataset in ms["datasets"]:
        array = group[dataset["path"]]
        shapes.append(tuple(int(n) for n in array.shape))
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        scales.append(tuple(float(s) for s in scale))
        if dtype is None:
            dtype = str(array.dtype)
        elif str(array.dtype) != dtype:
            raise OmeZarrValidationError(f"level {dataset['path']} is {array.dtype}, level 0 is {dtype}", store)
    if expect_levels is not None and len(shapes) != expect_levels:
        raise OmeZarrValidationError(f"{len(shapes)} levels, expected {expect_levels}", store)
    for i in range(1, len(shapes)):
        for axis, (n0, s0, n, s) in enumerate(zip(shapes[0], scales[0], shapes[i], scales[i])):
            ratio = round(s / s0)
            if ratio < 1 or abs(s / s0 - ratio) > 1e-6 or n != -(-n0 // ratio):
                raise OmeZarrValidationError(
                    f"level {i} axis {axis}: {n} voxels at scale {s} does not follow from level 0 "
                    f"({n0} voxels at scale {s0})", store)
    return ValidationReport(store, version, tuple(shapes), tuple(scales), dtype or "")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[:3]) if text else type(exc).__name__


# ------------------------------------------------------------------------------------------
# the voxels
Box = tuple[tuple[int, int], ...]
"""Half-open ranges per stored axis: (c,) z, y, x."""


def verify_data(store: str | Path, sections: Sequence[str | Path] | None = None,
                bounds: Sequence[tuple[int, int]] | None = None, levels_from: int = 0,
                sample: int | None = 32, seed: int = 0) -> dict:
    """Check the voxels of a store, not only its metadata.

    Every file (chunk, or shard when sharded) that a level's grid expects must be present, or
    absent only where the level is all zero (tensorstore does not store all-zero chunks, and
    readers fill them with 0): for level 0 the source sections are all zero there, for level n
    the downsampling of stored level n-1 is. Then `sample` present files per level (always the
    last one, which holds the far edges; None: all) are decoded and must equal what they were
    made from: level 0 the sections, level n the downsampling of stored level n-1 (the
    converter's rule, `pyramid.downsample`, with the store's recorded algorithm).
    Level 0 is checked only when `sections` are given (`bounds`: the (z, y, x) ranges of the
    stack that level 0 holds, for --ranges); levels below `levels_from` (kept by
    --first-new-level, perhaps from another writer) are taken as they are.
    Raises OmeZarrDataError listing the problems; returns per level what was checked.
    """
    import zarr

    store = Path(store)
    report = validate_store(store)
    group = zarr.open_group(store, mode="r")
    attrs = json.loads(json.dumps(dict(group.attrs)))
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    paths = [d["path"] for d in ms["datasets"]]
    algorithm = (ms.get("metadata") or {}).get("algorithm") or ms.get("type")
    source = _Sections(sections, bounds, report.shapes[0]) if sections else None
    rng = random.Random(seed)
    problems: list[str] = []
    checked: dict[int, dict] = {}
    for level in range(max(levels_from, 0 if source else 1), len(paths)):
        array = group[paths[level]]
        if level == 0:
            def expected(boxes, source=source):
                return source.blocks(boxes)
        else:
            from pipeline.publish import pyramid

            if algorithm not in pyramid.ALGORITHMS:
                problems.append(f"level {level}: unknown downsampling {algorithm!r}: cannot check it")
                break
            factor = _factor(report.scales[level - 1], report.scales[level])
            below = group[paths[level - 1]]

            def expected(boxes, below=below, factor=factor):
                return [_downsampled(below, box, factor, algorithm) for box in boxes]
        checked[level] = _verify_level(store, paths[level], array, expected, sample, rng, problems)
    if problems:
        raise OmeZarrDataError(problems, store)
    return checked


def _verify_level(store: Path, path: str, array, expected, sample: int | None, rng: random.Random,
                  problems: list[str]) -> dict:
    """One level, a layer of files at a time (one z index of the grid, per channel): the listing,
    the missing boxes and the sample in hand stay the size of a layer, not of the store."""
    level_dir = store / path
    grid, key, layer_dir = _file_grid(level_dir)
    shape = tuple(int(n) for n in array.shape)
    counts = [-(-n // g) for n, g in zip(shape, grid)]
    lead = len(shape) - 2  # the grid axes up to z: (c, z) or (z)

    def box(cell) -> Box:
        return tuple((i * g, min((i + 1) * g, n)) for i, g, n in zip(cell, grid, shape))

    def listing(where: Path) -> dict[str, int]:
        files = {}
        for root, _dirs, names in os.walk(where):
            for name in names:
                full = Path(root) / name
                files[full.relative_to(level_dir).as_posix()] = full.stat().st_size
        return files

    everything = None if layer_dir else listing(level_dir)  # flat key encodings: one listing
    seen = {"files": 0, "present": 0, "absent": 0}
    picked: list[tuple] = []
    last = None
    for layer in itertools.product(*(range(n) for n in counts[:lead])):
        files = everything if everything is not None else listing(layer_dir(layer))
        missing = []
        for rest in itertools.product(*(range(n) for n in counts[lead:])):
            cell = layer + rest
            size = files.get(key(cell))
            seen["files"] += 1
            if size is None:
                missing.append(cell)
                continue
            if size == 0:
                problems.append(f"level {path}: {path}/{key(cell)} is empty (0 bytes)")
                continue
            if last is not None:  # reservoir sample of the others; the last file is always checked
                if sample is None or len(picked) < sample - 1:
                    picked.append(last)
                elif sample > 1 and (j := rng.randrange(seen["present"])) < sample - 1:
                    picked[j] = last
            last = cell
            seen["present"] += 1
        seen["absent"] += len(missing)
        for i, want in _in_rows(expected, [box(c) for c in missing]):
            cell = missing[i]
            if isinstance(want, Exception):
                problems.append(f"level {path}: cannot read what {path}/{key(cell)} is made from: {_first_line(want)}")
            elif np.any(want):
                problems.append(f"level {path}: {path}/{key(cell)} is missing, but what it must hold is not all zero")
    picked = sorted(picked) + ([last] if last is not None and sample != 0 else [])
    boxes = [box(c) for c in picked]
    for i, want in _in_rows(expected, boxes):
        cell, b = picked[i], boxes[i]
        if isinstance(want, Exception):
            problems.append(f"level {path}: cannot read what {path}/{key(cell)} is made from: {_first_line(want)}")
            continue
        try:
            got = np.asarray(array[tuple(slice(lo, hi) for lo, hi in b)])
        except Exception as exc:  # codec errors of every kind: the file does not decode
            problems.append(f"level {path}: {path}/{key(cell)} does not decode: {_first_line(exc)}")
            continue
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)
            problems.append(f"level {path}: {path}/{key(cell)}: {len(bad)} voxel values differ from what it was "
                            f"made from, first at {tuple(int(v) for v in bad[0])} of the file's box")
    return {**seen, "decoded": len(picked)}


def _in_rows(expected, boxes: list[Box]) -> Iterator[tuple[int, np.ndarray | Exception]]:
    """(index, expected() of boxes[index]), computed one row of boxes (same z and y ranges) at a
    time, so a source section is opened once per row, not once per box, and only one row's
    blocks are in memory (the background boxes of a layer of a 30000 x 20000 section are
    gigabytes together); the exception instead where that failed (a source or a level below
    that cannot be read)."""
    rows: dict[tuple, list[int]] = {}
    for i, b in enumerate(boxes):
        rows.setdefault(tuple(b[-3:-1]), []).append(i)
    for members in rows.values():
        try:
            blocks = expected([boxes[i] for i in members])
        except Exception as exc:  # noqa: BLE001  (codec errors of every kind: reported per file)
            blocks = [exc] * len(members)
        yield from zip(members, blocks)
        del blocks


def _file_grid(level_dir: Path):
    """From the array's metadata: the shape of one stored file (the shard when sharded), the key
    of a file's grid position, and the directory holding one layer (leading grid indices) of
    files, or None when keys are flat names ("." separator)."""
    if (level_dir / "zarr.json").is_file():
        meta = json.loads((level_dir / "zarr.json").read_text())
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding") or {"name": "default"}
        name = encoding.get("name", "default")
        sep = (encoding.get("configuration") or {}).get("separator", "/" if name == "default" else ".")
        prefix = ["c"] if name == "default" else []
    else:
        meta = json.loads((level_dir / ".zarray").read_text())
        grid, sep, prefix = meta["chunks"], meta.get("dimension_separator") or ".", []

    def key(cell) -> str:
        return sep.join(prefix + [str(i) for i in cell])

    def layer_dir(layer) -> Path:
        return level_dir.joinpath(*prefix, *(str(i) for i in layer))

    return [int(g) for g in grid], key, (layer_dir if sep == "/" else None)


def _factor(low: Sequence[float], high: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(b / a)) for a, b in zip(low[-3:], high[-3:]))


def _downsampled(below, box: Box, factor, algorithm: str) -> np.ndarray:
    """What `box` of level n must hold: the converter's downsampling of the stored level n-1."""
    from pipeline.publish import pyramid

    spatial = tuple(int(n) for n in below.shape[-3:])
    in_box, margin = pyramid.input_box(box[-3:], factor, spatial, algorithm)
    index = tuple(slice(lo, hi) for lo, hi in box[:-3] + in_box)
    block = np.asarray(below[index])
    if block.ndim == 3:
        return pyramid.downsample(block, factor, algorithm, margin)
    return np.stack([pyramid.downsample(b, factor, algorithm, margin) for b in block])


class _Sections:
    """Level-0 boxes read from the source sections (one TIFF per z), each section opened once
    per call however many boxes of one row it serves."""

    def __init__(self, sections: Sequence[str | Path], bounds, level0_shape: Sequence[int]):
        self.paths = [Path(p) for p in sections]
        self.offset = [lo for lo, _hi in bounds] if bounds else [0, 0, 0]
        self.rgb = len(level0_shape) == 4

    def blocks(self, boxes: list[Box]) -> list[np.ndarray]:
        from pipeline.publish.omezarr.tiffstack import tiff_regions

        (z0, z1), (y0, y1) = boxes[0][-3], boxes[0][-2]
        oz, oy, ox = self.offset
        out: list[np.ndarray | None] = [None] * len(boxes)
        for k, z in enumerate(range(z0, z1)):
            with tiff_regions(self.paths[oz + z]) as read:
                for i, b in enumerate(boxes):
                    (x0, x1) = b[-1]
                    plane = read((oy + y0, oy + y1), (ox + x0, ox + x1))
                    plane = np.moveaxis(plane, -1, 0)[b[0][0]:b[0][1]] if self.rgb else plane[None]
                    if out[i] is None:
                        out[i] = np.zeros((plane.shape[0], z1 - z0) + plane.shape[1:], plane.dtype)
                    out[i][:, k] = plane
        return [block if self.rgb else block[0] for block in out]
