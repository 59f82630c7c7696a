"""The zarr files of a store: group and attribute files (written atomically), the channel layout
of the stored arrays, and the tensorstore specs that write Zarr v2 / v3 (optionally sharded)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.publish import pyramid
from pipeline.publish.omezarr.options import OmeZarrError

def store_zarr_format(store: Path) -> int | None:
    if (store / "zarr.json").is_file():
        return 3
    if (store / ".zgroup").is_file() or (store / ".zarray").is_file():
        return 2
    return None


def read_attributes(store: Path) -> dict:
    fmt = store_zarr_format(store)
    if fmt == 3:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {}) or {}
    if fmt == 2 and (store / ".zattrs").is_file():
        return json.loads((store / ".zattrs").read_text())
    return {}


def write_attributes(store: Path, attributes: dict) -> None:
    """Replace the root node's attributes atomically (readers never see a half-written file)."""
    fmt = store_zarr_format(store)
    if fmt == 3:
        meta = json.loads((store / "zarr.json").read_text())
        meta["attributes"] = attributes
        target, payload = store / "zarr.json", meta
    elif fmt == 2:
        target, payload = store / ".zattrs", attributes
    else:
        raise OmeZarrError("not a zarr store (no zarr.json, .zgroup or .zarray)", store)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))


def create_group(store: Path, zarr_format: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    if zarr_format == 3:
        with atomic_path(store / "zarr.json") as tmp:
            tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2))
    else:
        with atomic_path(store / ".zgroup") as tmp:
            tmp.write_text(json.dumps({"zarr_format": 2}))
        with atomic_path(store / ".zattrs") as tmp:
            tmp.write_text("{}")


def ts_context(threads: int):
    import tensorstore as ts

    return ts.Context({
        "cache_pool": {"total_bytes_limit": 0},
        "data_copy_concurrency": {"limit": threads},
        "file_io_concurrency": {"limit": max(2, threads)},
    })


def array_spec(path: Path, zarr_format: int, shape: Sequence[int], dtype: np.dtype, chunk: Sequence[int],
               shard: Sequence[int] | None, dimension_names: Sequence[str], compression_level: int) -> dict:
    """tensorstore spec of one level: Zarr v2 with blosc-zstd ('/' separator, as NGFF 0.4 asks),
    or Zarr v3 with zstd, optionally sharded (sharding_indexed, crc32c index)."""
    dtype = np.dtype(dtype)
    if zarr_format == 2:
        metadata = {
            "shape": list(shape), "chunks": list(chunk), "dtype": dtype.str, "fill_value": 0, "order": "C",
            "dimension_separator": "/",
            "compressor": {"id": "blosc", "cname": "zstd", "clevel": compression_level, "shuffle": 1},
        }
        return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}, "metadata": metadata}
    inner = [{"name": "bytes", "configuration": {"endian": "little"}},
             {"name": "zstd", "configuration": {"level": compression_level}}]
    if shard is not None:
        grid = list(shard)
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(chunk), "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
    else:
        grid, codecs = list(chunk), inner
    metadata = {
        "shape": list(shape), "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
        "codecs": codecs, "fill_value": 0, "dimension_names": list(dimension_names),
    }
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "metadata": metadata}


def open_array(spec: dict, context, create: bool):
    import tensorstore as ts

    try:
        if create:
            return ts.open(spec, create=True, delete_existing=True, context=context).result()
        return ts.open(spec, open=True, context=context).result()
    except ValueError as exc:
        raise OmeZarrError(f"cannot open array: {exc}", spec["kvstore"]["path"]) from exc


def open_existing(path: Path, zarr_format: int, context):
    import tensorstore as ts

    driver = "zarr3" if zarr_format == 3 else "zarr"
    try:
        return ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}, open=True,
                       context=context).result()
    except ValueError as exc:
        raise OmeZarrError(f"cannot open array: {exc}", path) from exc


@dataclasses.dataclass(frozen=True)
class Image:
    """Channel layout of the stored arrays: (c, z, y, x) for RGB, (z, y, x) for one channel."""

    c: int | None  # extent of the channel axis, None when there is none
    dtype: np.dtype

    @property
    def has_c(self) -> bool:
        return self.c is not None

    @property
    def channels(self) -> int:
        return self.c or 1

    @property
    def dims(self) -> list[str]:
        return (["c"] if self.has_c else []) + ["z", "y", "x"]

    def full(self, spatial: Sequence[int], c_extent: int | None = None) -> tuple[int, ...]:
        """Prefix a (z, y, x) shape with the channel extent (or `c_extent`, e.g. 1 for chunks)."""
        return ((c_extent or self.c,) if self.has_c else ()) + tuple(int(n) for n in spatial)

    def index(self, box: pyramid.Box) -> tuple[slice, ...]:
        return ((slice(None),) if self.has_c else ()) + tuple(slice(lo, hi) for lo, hi in box)

    def as_czyx(self, block: np.ndarray) -> np.ndarray:
        return block if self.has_c else block[None]

    def stored(self, czyx: np.ndarray) -> np.ndarray:
        return czyx if self.has_c else czyx[0]


def unit_for(unit: Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int] | None:
    """A chunk or shard shape no larger than the array (small stacks get one chunk per axis)."""
    if unit is None:
        return None
    return tuple(min(int(u), int(s)) for u, s in zip(unit, shape))


def shard_for(shard: Sequence[int], chunk: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """The shard of a level: no bigger than the level needs, and still whole chunks of that level."""
    chunk = unit_for(chunk, shape)
    return tuple(min(int(s), -(-int(n) // c) * c) for s, n, c in zip(shard, shape, chunk))
