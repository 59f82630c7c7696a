"""Checks that a written OME-Zarr store is what viewers will accept, before a stage calls it done.

The metadata is validated with ome-zarr-models (the NGFF 0.4 or 0.5 schema, chosen by the Zarr
format on disk); on top, each level must open as an array whose shape follows from level 0 and the
scale ratio, so a level that was never written or has the wrong size is caught here too.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from pipeline.errors import SlidepipeError


class OmeZarrValidationError(SlidepipeError):
    """The store's metadata or arrays do not form a valid OME-Zarr image."""


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
