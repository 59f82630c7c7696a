"""Multiscale OME-Zarr from a stack of z-slice TIFFs (one file per z), for the `omezarr` stage and
as the standalone `create_pipeline tiff2omezarr` / `python -m pipeline.publish.omezarr` command.

Why it is built this way (see docs/format-omezarr.md):
- tensorstore writes the chunks (about twice zarr-python's speed here, many threads, no cache) and
  the pyramid maths is plain numpy (`pipeline.publish.pyramid`), level n+1 made from level n.
- Work is cut into slabs of whole chunks (or shards) sized from `--max-gb`, so the peak memory
  of the process is planned, not hoped for.
- A conversion records its progress (completed slabs per level) in the root node's attributes
  under "slidepipe", rewritten atomically after each slab; a killed run resumes from there, and
  the OME metadata plus `"done": true` are written last, so an unfinished store never looks
  finished.
- Chunks equal to the fill value (0) are not stored (tensorstore's default).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.atomic import atomic_path  # noqa: E402
from pipeline.errors import SlidepipeError  # noqa: E402
from pipeline.publish import pyramid  # noqa: E402

log = logging.getLogger("slidepipe")

NGFF_ZARR_FORMAT = {"0.4": 2, "0.5": 3}
STATE_KEY = "slidepipe"
STATE_FORMAT = 1
DEFAULT_CHUNK = (64, 64, 64)
GB = 10**9
RESERVE_BYTES = 96 * 2**20
"""Head-room kept under --max-gb for tensorstore's in-flight chunk buffers, thread stacks and
allocator slack (measured: ~40-60 MB above the slab estimate at 32^3 chunks)."""
HISTOGRAM_MAX_VOXELS = 2**24
"""Windows come from the finest level at most this big (a full pass over level 0 of a whole
brain would cost as much as the conversion)."""
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF")
DEFAULT_COLOR = "FFFFFF"


class OmeZarrError(SlidepipeError):
    """The store cannot be written or read as asked (exists, differs, invalid input, too little memory)."""


# ------------------------------------------------------------------------------------------
# options
@dataclasses.dataclass
class OmeZarrOptions:
    """Everything a conversion can be asked for; the CLI flags map one to one."""

    ngff_version: str = "0.5"
    chunk: tuple[int, int, int] | None = None  # (z, y, x); None: DEFAULT_CHUNK (or, adding levels, the store's)
    shard: tuple[int, int, int] | None = None
    nlevels: int | None = None  # None: until the top level fits one chunk in y and x
    max_gb: float | None = None  # None: a quarter of the available memory
    zarr_only: bool = False
    overwrite: bool = False
    algorithm: str = "mean"
    ranges: tuple[tuple[int | None, int | None], ...] | None = None  # (z, y, x) half-open
    first_new_level: int | None = None
    voxel_um: tuple[float | None, float | None, float | None] = (None, None, None)  # z, y, x
    windows: Sequence[tuple[float, float]] | None = None
    channel_names: Sequence[str] | None = None
    name: str | None = None
    compression_level: int = 1
    threads: int | None = None
    slab_budget_bytes: int | None = None  # fixed slab budget instead of measuring for max_gb (tests, bench)

    def check(self) -> None:
        if self.ngff_version not in NGFF_ZARR_FORMAT:
            raise OmeZarrError(f"--ngff-version must be one of {sorted(NGFF_ZARR_FORMAT)}, got {self.ngff_version!r}")
        if self.algorithm not in pyramid.ALGORITHMS:
            raise OmeZarrError(f"--algorithm must be one of {pyramid.ALGORITHMS}, got {self.algorithm!r}")
        chunk = self.chunk or DEFAULT_CHUNK
        if len(chunk) != 3 or any(c < 1 for c in chunk):
            raise OmeZarrError(f"--chunk-size must be three positive sizes, got {chunk}")
        if self.shard is not None:
            if self.ngff_version != "0.5":
                raise OmeZarrError("sharding needs Zarr v3: use --ngff-version 0.5")
            if any(s < c or s % c for s, c in zip(self.shard, chunk)):
                raise OmeZarrError(f"--shard-size {self.shard} must be a multiple of --chunk-size {self.chunk}")
        if self.nlevels is not None and self.nlevels < 1:
            raise OmeZarrError(f"--nlevels must be >= 1, got {self.nlevels}")
        if self.max_gb is not None and self.max_gb <= 0:
            raise OmeZarrError(f"--max-gb must be positive, got {self.max_gb}")
        if self.zarr_only and self.first_new_level is not None:
            raise OmeZarrError("--zarr-only writes one array: it has no levels to add (--first-new-level)")
        if self.first_new_level is not None and self.first_new_level < 1:
            raise OmeZarrError("--first-new-level must be >= 1 (level 0 comes from the TIFFs)")

    @property
    def zarr_format(self) -> int:
        return NGFF_ZARR_FORMAT[self.ngff_version]


@dataclasses.dataclass
class ConversionResult:
    store: Path
    ngff_version: str
    shapes: list[tuple[int, ...]]
    scales: list[tuple[float, float, float]]
    levels_written: list[int]
    slabs_written: int
    slabs_skipped: int
    bytes_in: int
    seconds: float
    windows: list[tuple[float, float]] | None
    status: str  # "written", "resumed", "complete"

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["store"] = str(self.store)
        return out


# ------------------------------------------------------------------------------------------
# the TIFF stack
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
    """Rows/cols of page 0 of a TIFF, decoding only the strips or tiles they touch.

    Uncompressed contiguous files are read row by row from the file (no whole-page buffer);
    others go through tifffile's zarr view, which decodes just the intersecting segments.
    """
    import tifffile

    (y0, y1), (x0, x1) = rows, cols
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.compression == 1 and page.is_contiguous and page.planarconfig == 1:
                width = page.shape[1]
                per_row = width * page.samplesperpixel
                dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
                fh = tif.filehandle
                fh.seek(page.dataoffsets[0] + y0 * per_row * dtype.itemsize)
                flat = np.frombuffer(fh.read((y1 - y0) * per_row * dtype.itemsize), dtype=dtype)
                block = flat.reshape((y1 - y0, width) + tuple(page.shape[2:]))[:, x0:x1]
                return np.ascontiguousarray(block).astype(dtype.newbyteorder("="), copy=False)
            import zarr

            view = zarr.open(page.aszarr(), mode="r")
            return np.asarray(view[y0:y1, x0:x1])
    except (OSError, ValueError, tifffile.TiffFileError, KeyError) as exc:
        raise OmeZarrError(f"cannot read rows {y0}:{y1}, columns {x0}:{x1}: {exc}", path) from exc


# ------------------------------------------------------------------------------------------
# store metadata and the progress record
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


def _create_group(store: Path, zarr_format: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    if zarr_format == 3:
        with atomic_path(store / "zarr.json") as tmp:
            tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2))
    else:
        with atomic_path(store / ".zgroup") as tmp:
            tmp.write_text(json.dumps({"zarr_format": 2}))
        with atomic_path(store / ".zattrs") as tmp:
            tmp.write_text("{}")


def encode_ranges(indices: set[int]) -> str:
    """{0,1,2,5} -> "0-2,5": a compact, JSON-friendly set of completed slab numbers."""
    parts, run = [], None
    for i in sorted(indices):
        if run and i == run[1] + 1:
            run[1] = i
        else:
            if run:
                parts.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
            run = [i, i]
    if run:
        parts.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
    return ",".join(parts)


def decode_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@contextlib.contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    """One writer per store: a second conversion of the same store fails instead of interleaving."""
    fd = os.open(store, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OmeZarrError("another conversion is writing this store", store) from exc
        yield
    finally:
        os.close(fd)


class _Progress:
    """The "slidepipe" attributes of the root node: signature, per-level completed slabs, done.

    `node` is the part of `state` that holds the levels: the state itself for a conversion,
    `state["extend"]` for --first-new-level (so the record of the original conversion stays).
    """

    def __init__(self, store: Path, state: dict, node: dict | None = None):
        self.store = store
        self.state = state
        self.node = state if node is None else node

    def level(self, level: int, slab: Sequence[int]) -> set[int]:
        """Completed slab numbers of `level` if they were cut the same way, else start it over."""
        rec = self.node.setdefault("levels", {}).get(str(level))
        if rec and list(rec.get("slab", [])) == list(slab):
            return decode_ranges(rec.get("done", ""))
        self.node["levels"][str(level)] = {"slab": list(slab), "done": ""}
        return set()

    def mark(self, level: int, done: set[int]) -> None:
        self.node["levels"][str(level)]["done"] = encode_ranges(done)
        self.save()

    def save(self) -> None:
        attrs = read_attributes(self.store)
        attrs[STATE_KEY] = self.state
        write_attributes(self.store, attrs)


# ------------------------------------------------------------------------------------------
# tensorstore arrays
def _ts_context(threads: int):
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


def _open_array(spec: dict, context, create: bool):
    import tensorstore as ts

    try:
        if create:
            return ts.open(spec, create=True, delete_existing=True, context=context).result()
        return ts.open(spec, open=True, context=context).result()
    except ValueError as exc:
        raise OmeZarrError(f"cannot open array: {exc}", spec["kvstore"]["path"]) from exc


def _open_existing(path: Path, zarr_format: int, context):
    import tensorstore as ts

    driver = "zarr3" if zarr_format == 3 else "zarr"
    try:
        return ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}, open=True,
                       context=context).result()
    except ValueError as exc:
        raise OmeZarrError(f"cannot open array: {exc}", path) from exc


# ------------------------------------------------------------------------------------------
# memory planning
def process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_budget(max_gb: float | None) -> int:
    """Bytes the slab buffers may use: the cap minus what the process already holds."""
    import psutil

    if max_gb is None:
        cap = psutil.virtual_memory().available // 4
        return max(cap, 64 * 2**20)
    cap = int(max_gb * GB)
    budget = cap - process_rss() - RESERVE_BYTES
    if budget <= 0:
        raise OmeZarrError(f"--max-gb {max_gb} is below what the converter needs before any data "
                           f"({(process_rss() + RESERVE_BYTES) / GB:.2f} GB)")
    return budget


@dataclasses.dataclass(frozen=True)
class _LevelWork:
    level: int
    shape: tuple[int, int, int]
    unit: tuple[int, int, int]  # slab granule: shard or chunk, capped to the shape
    factor: pyramid.Factor | None  # from the level below; None for level 0 from TIFFs


def slab_cost(work: _LevelWork, slab: Sequence[int], channels: int, itemsize: int, algorithm: str,
              threads: int, source_width: int = 0, segment_bytes: int = 0) -> int:
    """Peak bytes while one slab is produced: that slab, the previous one still being encoded by
    tensorstore, and the producing step's buffers (TIFF rows being decoded, or the level below
    and the downsampling temporaries)."""
    sz, sy, sx = slab
    out = sz * sy * sx * channels * itemsize
    if work.factor is None:
        rows = min(threads, sz) * (sy * max(source_width, sx) * channels * itemsize + 2 * segment_bytes)
        return 2 * out + rows
    fz, fy, fx = work.factor
    hz, hy, hx = pyramid.halo(work.factor, algorithm)
    in_vox = (sz * fz + 2 * hz) * (sy * fy + 2 * hy) * (sx * fx + 2 * hx)
    in_bytes = in_vox * channels * itemsize
    if algorithm == "gaussian":
        temp = 2 * in_vox * 8  # float64 copy and its filtered result, one channel at a time
    elif algorithm == "mean":
        temp = in_vox * 4 // 2 + 2 * sz * sy * sx * 4  # uint32 half-sums, float32 means
    else:
        temp = 0
    return in_bytes + temp + 2 * out


def plan_level(work: _LevelWork, budget: int, cost: Callable[[Sequence[int]], int]) -> list[pyramid.Box]:
    """The largest slabs whose `cost` fits `budget`."""
    max_voxels = int(np.prod([-(-s // u) * u for s, u in zip(work.shape, work.unit)]))
    while True:
        try:
            slabs = pyramid.plan_slabs(work.shape, work.unit, max_voxels)
        except ValueError:
            break
        biggest = max(slabs, key=lambda b: np.prod([hi - lo for lo, hi in b]))
        if cost([hi - lo for lo, hi in biggest]) <= budget:
            return slabs
        max_voxels = int(max_voxels * 0.7)
        if max_voxels < 1:
            break
    unit_cost = cost([min(u, s) for u, s in zip(work.unit, work.shape)])
    raise OmeZarrError(f"the memory cap leaves {budget / 1e6:.1f} MB for data, but one {work.unit} write unit of "
                       f"level {work.level} needs {unit_cost / 1e6:.1f} MB: raise --max-gb or lower --chunk-size "
                       "(or --shard-size)")


# ------------------------------------------------------------------------------------------
# metadata
def axes_for(channels: bool) -> list[dict]:
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in ("z", "y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + axes


def multiscales_metadata(ngff_version: str, scales: Sequence[Sequence[float]], channels: bool, name: str,
                         algorithm: str, translation: Sequence[float] | None = None,
                         paths: Sequence[str] | None = None) -> dict:
    datasets = []
    for i, scale in enumerate(scales):
        transforms: list[dict] = [{"type": "scale", "scale": ([1.0] if channels else []) + [float(s) for s in scale]}]
        if translation is not None and any(translation):
            transforms.append({"type": "translation",
                               "translation": ([0.0] if channels else []) + [float(t) for t in translation]})
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


# ------------------------------------------------------------------------------------------
# conversion
def _signature(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _input_fingerprint(paths: Sequence[Path]) -> list[list]:
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([Path(p).name, st.st_size, st.st_mtime_ns])
    return out


def resolve_ranges(ranges, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(z, y, x) bounds of the output inside the stack; None parts mean the whole axis."""
    if ranges is None:
        return tuple((0, int(n)) for n in shape)
    out = []
    for axis, ((lo, hi), n) in enumerate(zip(ranges, shape)):
        lo = 0 if lo is None else int(lo)
        hi = int(n) if hi is None else min(int(hi), int(n))
        if not 0 <= lo < hi:
            raise OmeZarrError(f"--ranges: {'zyx'[axis]} range {lo}:{hi} is empty or outside the stack (0:{n})")
        out.append((lo, hi))
    return tuple(out)


def _check_store_path(store: Path) -> None:
    if store.suffix != ".zarr":
        raise OmeZarrError("the output name must end in .zarr (e.g. brain.ome.zarr)", store)
    if store.exists() and not store.is_dir():
        raise OmeZarrError("exists and is not a directory", store)


def _prepare_store(store: Path, signature: str, overwrite: bool) -> str:
    """'new', 'resume' or 'complete'; an existing store that differs is only replaced with --overwrite."""
    if not store.exists() or not any(store.iterdir()):
        return "new"
    fmt = store_zarr_format(store)
    state = read_attributes(store).get(STATE_KEY) if fmt else None
    if state and state.get("signature") == signature:
        return "complete" if state.get("done") else "resume"
    if not overwrite:
        if fmt is None:
            why = "is a non-empty directory but not a zarr store"
        elif not state:
            why = "is a zarr store not written by this converter"
        elif state.get("done"):
            why = "is a finished store made from other inputs or options"
        else:
            why = "is an unfinished conversion with other inputs or options"
        raise OmeZarrError(f"already exists and {why}; pass --overwrite to replace it", store)
    if fmt is None:
        raise OmeZarrError("is a non-empty directory but not a zarr store: refusing to delete it even with --overwrite",
                           store)
    shutil.rmtree(store)
    return "new"


_LIBC = None


def limit_heap_retention() -> None:
    """Make freed slab buffers leave the process: glibc otherwise keeps them in per-thread arenas
    and raises its mmap threshold after each free, so RSS creeps up slab after slab (measured:
    +60-110 MB over a 320 MB volume) and --max-gb would not hold. Large blocks are mmap'ed (and
    unmapped on free) and arenas are capped at 2. No-op off glibc."""
    import ctypes
    import ctypes.util

    global _LIBC
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 256 * 1024)
        libc.mallopt(m_arena_max, 2)
        libc.malloc_trim  # noqa: B018  (glibc only: otherwise AttributeError, and we keep None)
        _LIBC = libc


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so the next slab starts level."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _warm_imports() -> None:
    """Import what the conversion will use before measuring the process for --max-gb."""
    limit_heap_retention()
    import scipy.ndimage  # noqa: F401
    import tensorstore  # noqa: F401
    import tifffile  # noqa: F401
    import tqdm  # noqa: F401
    import zarr  # noqa: F401


def convert_stack(paths: Sequence[Path], store: Path, options: OmeZarrOptions,
                  progress: Callable[[str, int, int], None] | None = None) -> ConversionResult:
    """Write `store` from z-slice TIFFs `paths` (in z order); resume it if a run was killed."""
    options.check()
    store = Path(store).absolute()
    _check_store_path(store)
    _warm_imports()
    if options.first_new_level is not None:
        return add_levels(store, options, progress)
    started = time.perf_counter()
    info = probe_stack([Path(p) for p in paths])
    bounds = resolve_ranges(options.ranges, info.shape)
    shape = tuple(hi - lo for lo, hi in bounds)
    voxel = _voxel_size(options.voxel_um, info.voxel_um)
    chunk = _unit(options.chunk or DEFAULT_CHUNK, shape)
    shard = _shard_for(options.shard, chunk, shape) if options.shard else None
    nlevels = 1 if options.zarr_only else (options.nlevels or pyramid.auto_nlevels(shape, chunk))
    factors = pyramid.level_factors(shape, voxel, nlevels)
    shapes = pyramid.level_shapes(shape, factors)
    scales = pyramid.level_scales(voxel, factors)
    img = _Image(info.samples if info.samples > 1 else None, info.dtype)
    layout = {
        "ngff_version": options.ngff_version, "chunk": chunk, "shard": shard, "nlevels": nlevels,
        "algorithm": options.algorithm, "bounds": bounds, "zarr_only": options.zarr_only,
        "dtype": info.dtype.str, "channels": img.channels, "compression_level": options.compression_level,
        "source_shape": info.shape,
    }
    signature = _signature({"layout": layout, "inputs": _input_fingerprint(info.paths)})
    store.parent.mkdir(parents=True, exist_ok=True)
    status = _prepare_store(store, signature, options.overwrite)
    if status == "complete":
        if options.windows and not options.zarr_only:
            _update_windows(store, options.ngff_version, options.windows)
        return ConversionResult(store, options.ngff_version, [img.full(s) for s in shapes], scales, [], 0, 0, 0,
                                time.perf_counter() - started, None, "complete")
    store.mkdir(parents=True, exist_ok=True)
    threads = options.threads or os.cpu_count() or 1
    context = _ts_context(threads)
    fmt = options.zarr_format
    with _store_lock(store):
        if status == "new" and not options.zarr_only:
            _create_group(store, fmt)
        arrays = []
        for level, lshape in enumerate(shapes):
            path = store if options.zarr_only else store / str(level)
            spec = array_spec(path, fmt, img.full(lshape), img.dtype, img.full(_unit(chunk, lshape), 1),
                              img.full(_shard_for(shard, chunk, lshape), 1) if shard else None, img.dims,
                              options.compression_level)
            arrays.append(_open_array(spec, context, create=(status == "new")))
        if status == "resume":
            state = read_attributes(store)[STATE_KEY]
        else:
            state = {"format": STATE_FORMAT, "signature": signature, "done": False, "options": layout, "levels": {}}
        tracker = _Progress(store, state)
        tracker.save()
        budget = options.slab_budget_bytes or memory_budget(options.max_gb)
        reader = _StackReader(info, bounds, threads)
        counts = {"written": 0, "skipped": 0}
        for level in range(nlevels):
            work = _LevelWork(level, shapes[level], _unit(shard or chunk, shapes[level]),
                              factors[level - 1] if level else None)
            if level == 0:
                produce = reader.read
                cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                         algorithm=options.algorithm, threads=threads, source_width=info.shape[2],
                                         segment_bytes=info.segment_bytes)
            else:
                produce = _downsampler(arrays[level - 1], img, work.factor, shapes[level - 1], options.algorithm)
                cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                         algorithm=options.algorithm, threads=threads)
            _write_level(arrays[level], img, work, produce, tracker, budget, cost, counts, progress)
        windows = None
        state["done"] = True
        if options.zarr_only:
            tracker.save()
        else:
            windows = _windows(options.windows, arrays, shapes, img, budget)
            ms = multiscales_metadata(options.ngff_version, scales, img.has_c, options.name or store.name.split(".")[0],
                                      options.algorithm, translation=[lo * v for (lo, _), v in zip(bounds, voxel)])
            omero = omero_metadata(options.ngff_version, windows, img.dtype,
                                   _channel_names(options.channel_names, img.channels), shapes[0][0] // 2)
            write_ome_attributes(store, options.ngff_version, ms, omero, state)
    from pipeline.publish.validate_omezarr import validate_store

    validate_store(store, expect_levels=nlevels, zarr_only=options.zarr_only)
    return ConversionResult(store, options.ngff_version, [img.full(s) for s in shapes], scales, list(range(nlevels)),
                            counts["written"], counts["skipped"], int(np.prod(shape)) * img.channels * img.dtype.itemsize,
                            time.perf_counter() - started, windows, "resumed" if status == "resume" else "written")


def _update_windows(store: Path, ngff_version: str, windows) -> None:
    """New display windows on a finished store (they are metadata only: no voxel changes)."""
    attrs = read_attributes(store)
    omero = (attrs.get("ome", {}) if ngff_version == "0.5" else attrs).get("omero") or {}
    channels = omero.get("channels", [])
    if len(channels) != len(windows):
        raise OmeZarrError(f"{len(windows)} windows given for {len(channels)} channels", store)
    changed = False
    for channel, (start, end) in zip(channels, windows):
        if (channel["window"]["start"], channel["window"]["end"]) != (float(start), float(end)):
            channel["window"].update(start=float(start), end=float(end))
            changed = True
    if changed:
        write_attributes(store, attrs)


def describe_store(store: Path) -> dict:
    """What file_log records for a store instead of a row per chunk: per level its shape, chunk
    shape, scale, file count, bytes and the digest the runner uses for directories (sha256 over
    the sorted "name<TAB>size" lines of `pipeline.runner.path_stats`)."""
    from pipeline.runner import path_stats

    from pipeline.publish.validate_omezarr import validate_store

    report = validate_store(store)
    attrs = read_attributes(store)
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    levels = []
    for i, dataset in enumerate(ms["datasets"]):
        level_dir = Path(store) / dataset["path"]
        meta_name = "zarr.json" if report.ngff_version == "0.5" else ".zarray"
        meta = json.loads((level_dir / meta_name).read_text())
        if report.ngff_version == "0.5":
            grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
            codec = meta["codecs"][0]
            chunk = codec["configuration"]["chunk_shape"] if codec["name"] == "sharding_indexed" else grid
        else:
            grid = chunk = meta["chunks"]
        files = sum(len(names) for _root, _dirs, names in os.walk(level_dir))
        size, _mtime, digest = path_stats(level_dir)
        levels.append({"level": i, "path": dataset["path"], "shape": list(report.shapes[i]),
                       "scale": list(report.scales[i]), "chunk_shape": list(chunk), "file_shape": list(grid),
                       "files": files, "bytes": size, "sha256": digest})
    return {"ngff_version": report.ngff_version, "dtype": report.dtype, "levels": levels,
            "files": sum(level["files"] for level in levels), "bytes": sum(level["bytes"] for level in levels)}


@dataclasses.dataclass(frozen=True)
class _Image:
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


def _voxel_size(flags, tags) -> tuple[float, float, float]:
    out = []
    for axis, flag, tag in zip("zyx", flags, tags):
        value = flag if flag is not None else tag
        if value is None:
            log.warning("no %s pixel size in the TIFF tags or flags: using 1 micrometer (--resolution-%s)",
                        axis, "z" if axis == "z" else "xy")
            value = 1.0
        if value <= 0:
            raise OmeZarrError(f"pixel size along {axis} must be positive, got {value}")
        out.append(float(value))
    return tuple(out)


def _unit(unit: Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int] | None:
    """A chunk or shard shape no larger than the array (small stacks get one chunk per axis)."""
    if unit is None:
        return None
    return tuple(min(int(u), int(s)) for u, s in zip(unit, shape))


def _shard_for(shard: Sequence[int], chunk: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """The shard of a level: no bigger than the level needs, and still whole chunks of that level."""
    chunk = _unit(chunk, shape)
    return tuple(min(int(s), -(-int(n) // c) * c) for s, n, c in zip(shard, shape, chunk))


def _channel_names(names, channels: int) -> list[str]:
    if names:
        if len(names) != channels:
            raise OmeZarrError(f"{len(names)} channel names for {channels} channels")
        return list(names)
    return ["red", "green", "blue"] if channels == 3 else ["C1"]


class _StackReader:
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


def _downsampler(source, img: _Image, factor, source_shape, algorithm: str):
    """Slabs of level n+1 made from the stored level n (read with the filter's halo)."""

    def produce(box: pyramid.Box) -> np.ndarray:
        in_box, margin = pyramid.input_box(box, factor, source_shape, algorithm)
        block = img.as_czyx(source[img.index(in_box)].read().result())
        first = pyramid.downsample(block[0], factor, algorithm, margin)
        if block.shape[0] == 1:
            return first[None]
        out = np.empty((block.shape[0],) + first.shape, first.dtype)
        out[0] = first
        for c in range(1, block.shape[0]):
            out[c] = pyramid.downsample(block[c], factor, algorithm, margin)
        return out

    return produce


def _write_level(array, img: _Image, work: _LevelWork, produce, tracker: _Progress, budget: int, cost,
                 counts: dict, progress) -> None:
    from tqdm import tqdm

    slabs = plan_level(work, budget, cost)
    done = tracker.level(work.level, [hi - lo for lo, hi in slabs[0]])
    counts["skipped"] += len(done & set(range(len(slabs))))
    bar = tqdm(total=len(slabs), initial=len(done), desc=f"level {work.level}", unit="slab", disable=None,
               file=sys.stderr)
    pending = None  # (slab number, write future): slab i is encoded while slab i+1 is produced

    def finish() -> None:
        nonlocal pending
        if pending is None:
            return
        i, future = pending
        pending = None
        future.result()
        release_free_memory()
        done.add(i)  # recorded only once its chunks are on disk
        tracker.mark(work.level, done)
        counts["written"] += 1
        bar.update()
        if progress:
            progress(f"level {work.level}", len(done), len(slabs))

    try:
        for i, box in enumerate(slabs):
            if i in done:
                continue
            data = produce(box)
            finish()
            # The slab is never modified after this, so tensorstore may encode straight from it
            # instead of copying it (slab_cost counts it twice: this one and the next produced).
            future = array[img.index(box)].write(img.stored(data), can_reference_source_data_indefinitely=True)
            pending = (i, future)
            del data
        finish()
    finally:
        if pending is not None:  # an error while producing: let the write in flight end first
            with contextlib.suppress(Exception):
                pending[1].result()
        bar.close()


def _windows(given, arrays, shapes, img: _Image, budget: int) -> list[tuple[float, float]]:
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


def level_histograms(array, shape, img: _Image, budget: int) -> list[np.ndarray]:
    """Per-channel value counts of one stored level, read in slabs of whole rows and counted a
    million voxels at a time (np.bincount widens its input to int64: 4-8x the slab)."""
    bins = int(np.iinfo(img.dtype).max) + 1
    hists = [np.zeros(bins, np.int64) for _ in range(img.channels)]
    step = 2**20
    per_voxel = img.channels * img.dtype.itemsize
    unit = tuple(int(n) for n in array.chunk_layout.write_chunk.shape[-3:])  # whole stored chunks: no re-decoding
    for box in pyramid.plan_slabs(shape, unit, max(int(np.prod(_unit(unit, shape))), (budget - 16 * step) // per_voxel)):
        block = img.as_czyx(array[img.index(box)].read().result())
        for c in range(img.channels):
            flat = block[c].reshape(-1)
            for start in range(0, flat.size, step):
                hists[c] += np.bincount(flat[start:start + step], minlength=bins)
    return hists


# ------------------------------------------------------------------------------------------
# --first-new-level: more levels on an existing store
def add_levels(store: Path, options: OmeZarrOptions,
               progress: Callable[[str, int, int], None] | None = None) -> ConversionResult:
    """Recompute levels >= N of an existing multiscale store from its level N-1.

    Works on stores of other writers too (ome-zarr-py, scroll_to_ome): only the multiscales
    metadata and level N-1 are used. Resumable like a conversion.
    """
    started = time.perf_counter()
    first = options.first_new_level
    fmt = store_zarr_format(store)
    if fmt is None:
        raise OmeZarrError("--first-new-level needs an existing OME-Zarr store", store)
    attrs = read_attributes(store)
    ngff = "0.5" if fmt == 3 else "0.4"
    ome_attrs = attrs.get("ome", {}) if fmt == 3 else attrs
    if not ome_attrs.get("multiscales"):
        raise OmeZarrError("has no multiscales metadata: not an OME-Zarr image", store)
    ms = ome_attrs["multiscales"][0]
    datasets = ms["datasets"]
    if first > len(datasets):
        raise OmeZarrError(f"--first-new-level {first}: the store has only levels 0..{len(datasets) - 1}", store)
    axes = [a["name"] for a in ms["axes"]]
    if axes[-3:] != ["z", "y", "x"] or len(axes) not in (3, 4):
        raise OmeZarrError(f"axes {axes}: only (c,) z, y, x images are supported", store)
    threads = options.threads or os.cpu_count() or 1
    context = _ts_context(threads)
    base = _open_existing(store / datasets[first - 1]["path"], fmt, context)
    img = _Image(int(base.shape[0]) if len(axes) == 4 else None, np.dtype(base.dtype.numpy_dtype))
    spatial = tuple(int(n) for n in base.shape[-3:])
    base_scale = _dataset_scale(datasets[first - 1])[-3:]
    chunk = tuple(options.chunk) if options.chunk else tuple(int(c) for c in base.chunk_layout.read_chunk.shape[-3:])
    shape0 = tuple(int(n) for n in _open_existing(store / datasets[0]["path"], fmt, context).shape[-3:])
    nlevels = options.nlevels or pyramid.auto_nlevels(shape0, chunk)
    if nlevels <= first:
        raise OmeZarrError(f"--nlevels {nlevels} adds nothing above level {first - 1}", store)
    factors = pyramid.level_factors(spatial, base_scale, nlevels - first + 1)
    shapes = pyramid.level_shapes(spatial, factors)
    scales = pyramid.level_scales(base_scale, factors)
    layout = {"extend_from": first, "nlevels": nlevels, "algorithm": options.algorithm, "chunk": chunk,
              "shard": options.shard, "base_shape": img.full(spatial), "base_scale": base_scale,
              "compression_level": options.compression_level}
    signature = _signature({"layout": layout})
    state = attrs.get(STATE_KEY) or {}
    extending = state.get("extend") or {}
    resume = extending.get("signature") == signature and not extending.get("done")
    counts = {"written": 0, "skipped": 0}
    with _store_lock(store):
        if not resume:
            for stale in {d["path"] for d in datasets[first:]} | {str(n) for n in range(first, nlevels)}:
                shutil.rmtree(store / stale, ignore_errors=True)
            extending = {"signature": signature, "done": False, "options": layout, "levels": {}}
        state = dict(state, extend=extending)
        tracker = _Progress(store, state, extending)
        tracker.save()
        budget = options.slab_budget_bytes or memory_budget(options.max_gb)
        previous = base
        for k in range(1, len(shapes)):
            level = first - 1 + k
            path = store / str(level)
            spec = array_spec(path, fmt, img.full(shapes[k]), img.dtype, img.full(_unit(chunk, shapes[k]), 1),
                              img.full(_shard_for(options.shard, chunk, shapes[k]), 1) if options.shard else None,
                              img.dims, options.compression_level)
            array = _open_array(spec, context, create=not (resume and path.exists()))
            work = _LevelWork(level, shapes[k], _unit(options.shard or chunk, shapes[k]), factors[k - 1])
            produce = _downsampler(previous, img, work.factor, shapes[k - 1], options.algorithm)
            cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                     algorithm=options.algorithm, threads=threads)
            _write_level(array, img, work, produce, tracker, budget, cost, counts, progress)
            previous = array
        extending["done"] = True
        paths = [d["path"] for d in datasets[:first]] + [str(n) for n in range(first, nlevels)]
        all_scales = [_dataset_scale(d)[-3:] for d in datasets[:first]] + scales[1:]
        new_ms = multiscales_metadata(ngff, all_scales, img.has_c, ms.get("name") or store.name.split(".")[0],
                                      options.algorithm, translation=_dataset_translation(datasets[0]), paths=paths)
        write_ome_attributes(store, ngff, new_ms, ome_attrs.get("omero"), state)
    from pipeline.publish.validate_omezarr import validate_store

    validate_store(store, expect_levels=nlevels)
    return ConversionResult(store, ngff, [img.full(s) for s in shapes[1:]], scales[1:], list(range(first, nlevels)),
                            counts["written"], counts["skipped"], 0, time.perf_counter() - started, None,
                            "resumed" if resume else "written")


def _dataset_scale(dataset: dict) -> list[float]:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return [float(v) for v in t["scale"]]
    raise OmeZarrError(f"dataset {dataset.get('path')} has no scale transform")


def _dataset_translation(dataset: dict) -> list[float] | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "translation":
            return [float(v) for v in t["translation"]][-3:]
    return None

# ------------------------------------------------------------------------------------------
# command line
def xyz_triple(text: str) -> tuple[int, int, int]:
    """'N' or 'X,Y,Z' -> (x, y, z): x first, like --ranges and the neuroglancer stage's flags."""
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z (positive integers), got {text!r}")
    return tuple(parts)


def zyx(xyz: Sequence[int] | None) -> tuple[int, int, int] | None:
    return None if xyz is None else tuple(int(v) for v in reversed(tuple(xyz)))


def parse_ranges(text: str) -> tuple[tuple[int | None, int | None], ...]:
    """'x0:x1,y0:y1,z0:z1' (xyz order, as scroll_to_ome) -> ((z0, z1), (y0, y1), (x0, x1));
    an empty side is open: ':,100:,0:50'."""
    parts = str(text).split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--ranges wants x0:x1,y0:y1,z0:z1, got {text!r}")
    out = []
    for part in parts:
        lo, sep, hi = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--ranges: {part!r} is not lo:hi")
        out.append((int(lo) if lo.strip() else None, int(hi) if hi.strip() else None))
    return tuple(reversed(out))


def _window(text: str) -> tuple[float, float]:
    lo, sep, hi = str(text).partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--window wants START:END, got {text!r}")
    return float(lo), float(hi)


def add_format_arguments(group) -> None:
    """Flags shared by the standalone command and the omezarr stage."""
    group.add_argument("--ngff-version", "--ngff_version", choices=sorted(NGFF_ZARR_FORMAT), default="0.5",
                       help="0.5: Zarr v3 (default); 0.4: Zarr v2")
    group.add_argument("--chunk-size", "--chunk_size", type=xyz_triple, default=None, metavar="N|X,Y,Z",
                       help=f"chunk shape in voxels (default {DEFAULT_CHUNK[0]})")
    group.add_argument("--shard-size", type=xyz_triple, default=None, metavar="N|X,Y,Z",
                       help="Zarr v3 shard shape in voxels, a multiple of the chunk (default: no sharding)")
    group.add_argument("--nlevels", type=int, default=None,
                       help="pyramid levels including level 0 (default: until the top fits one chunk)")
    group.add_argument("--max-gb", "--max_gb", type=float, default=None,
                       help="peak memory of the converter in GB (1e9 bytes); slabs are planned to fit")
    group.add_argument("--algorithm", choices=pyramid.ALGORITHMS, default="mean", help="downsampling (default mean)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="create_pipeline tiff2omezarr",
        description="Convert a folder of z-slice TIFFs (one file per z, natural name order) to a multiscale OME-Zarr.",
    )
    parser.add_argument("input_tiff_dir", type=Path, nargs="?", help="folder of z-slice TIFFs")
    parser.add_argument("output_zarr", type=Path, help="output store, ending in .zarr")
    add_format_arguments(parser)
    parser.add_argument("--zarr-only", "--zarr_only", action="store_true",
                        help="write one full-resolution Zarr array, no pyramid or OME metadata")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store that differs")
    parser.add_argument("--ranges", type=parse_ranges, default=None, metavar="x0:x1,y0:y1,z0:z1",
                        help="convert only this box (xyz order; empty sides are open)")
    parser.add_argument("--first-new-level", "--first_new_level", type=int, default=None,
                        help="keep levels below N of the existing store, recompute N and above from N-1")
    parser.add_argument("--resolution-xy", type=float, default=None, help="xy pixel size in um (default: TIFF tags)")
    parser.add_argument("--resolution-z", type=float, default=None, help="z step in um (default: ImageJ spacing)")
    parser.add_argument("--window", type=_window, action="append", default=None, metavar="START:END",
                        help="display window of a channel (repeat per channel; default: 0.5-99.5 percentiles)")
    parser.add_argument("--channel-name", action="append", default=None, help="channel label (repeat per channel)")
    parser.add_argument("--name", default=None, help="image name in the metadata (default: the store's stem)")
    parser.add_argument("--compression-level", type=int, default=1, help="zstd level (default 1)")
    parser.add_argument("--threads", "--num_threads", type=int, default=None, help="threads (default: all cores)")
    return parser


def options_from_args(args: argparse.Namespace) -> OmeZarrOptions:
    return OmeZarrOptions(
        ngff_version=args.ngff_version, chunk=zyx(args.chunk_size), shard=zyx(args.shard_size),
        nlevels=args.nlevels, max_gb=args.max_gb, zarr_only=getattr(args, "zarr_only", False),
        overwrite=getattr(args, "overwrite", False), algorithm=args.algorithm, ranges=getattr(args, "ranges", None),
        first_new_level=getattr(args, "first_new_level", None),
        voxel_um=(getattr(args, "resolution_z", None), getattr(args, "resolution_xy", None),
                  getattr(args, "resolution_xy", None)),
        windows=getattr(args, "window", None), channel_names=getattr(args, "channel_name", None),
        name=getattr(args, "name", None), compression_level=getattr(args, "compression_level", 1),
        threads=getattr(args, "threads", None),
    )


def list_slices(folder: Path) -> list[Path]:
    from pipeline.readers import natural_sorted_tiffs

    if not Path(folder).is_dir():
        raise OmeZarrError("input TIFF folder does not exist", folder)
    paths = natural_sorted_tiffs(folder)
    if not paths:
        raise OmeZarrError("no .tif/.tiff files in the folder", folder)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        options = options_from_args(args)
        if options.first_new_level is None and args.input_tiff_dir is None:
            parser.error("input_tiff_dir is required (except with --first-new-level)")
        paths = [] if options.first_new_level is not None else list_slices(args.input_tiff_dir)
        result = convert_stack(paths, args.output_zarr, options)
    except SlidepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mb = result.bytes_in / 1e6
    rate = f", {mb / result.seconds:.0f} MB/s" if result.bytes_in and result.seconds > 0 else ""
    print(f"{result.store}: {result.status}; levels {result.shapes} (NGFF {result.ngff_version}); "
          f"{result.slabs_written} slabs written, {result.slabs_skipped} already done; "
          f"{result.seconds:.1f} s{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
