"""Neuroglancer precomputed publishing of an aligned section stack (cloud-volume + igneous).

Two steps, as in the lab pipeline this replaces, because they parallelise differently:

1. `write_rechunkme_section`: one task per section writes that z plane into a temporary raw layer
   with flat (64, 64, 1) chunks. Sections are independent, so these run in the runner's pool.
2. `transfer_and_downsample`: igneous rechunks the temporary layer into the final gzip layer and
   builds the pyramid, as igneous tasks on python-task-queue (a local pool, or an `fq://` queue
   that `create_pipeline worker` processes on other machines).

The final layer is written under a temporary name, verified (`pipeline.publish.validate`), given
its provenance file and only then renamed into place; the temporary layer is deleted after that.
Sharded layers are the same build, its gzip chunk files then packed into shard files
(`pack_shards`), slab by slab in a slab-wise build.
See docs/format-precomputed.md for the choices (chunking, pyramid rule, RGB, gzip naming).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.atomic import atomic_path, remove_stale_temps
from pipeline.imaging.pyramid import PyramidPlan, plan_pyramid
from pipeline.publish.common import (
    CHUNK_RECORDS, GZIP_LEVEL, PROVENANCE_STEP, ROW_BAND_BYTES, PrecomputedError, SectionRows, open_section,
    prepare_igneous_process, stack_windows,
)
from pipeline.publish.validate import LayerVerificationError, verify_layer
from pipeline.queued import BUILDS_DIR, QueueTaskError, build_queue, remove_build_queue, run_worker  # noqa: F401

RECHUNKME_CHUNK = (64, 64, 1)
"""Step 1 chunks: one section plane per chunk, so each section task writes only its own files."""

DEFAULT_CHUNK = (256, 256, 16)
"""Final chunks: 1 MiB of uint8 like igneous's usual 128x128x64, but 16 sections deep instead of
64, so drawing one coronal plane (what histology users look at) reads 16x, not 64x, the shown
voxels. Measured and argued in docs/format-precomputed.md."""

DEFAULT_MEMORY_TARGET = 512 * 1024**2
"""Bytes of image one igneous task may hold (scoping: shape 2048x2048x64 uint16 peaked at 0.6 GB)."""

SUPPORTED_DTYPES = ("uint8", "uint16")

log = logging.getLogger("slidepipe")


# ------------------------------------------------------------------------------------------
# The section stack
@dataclasses.dataclass(frozen=True)
class StackShape:
    """What every section TIFF of a stack must share."""

    width: int
    height: int
    depth: int
    dtype: str
    channels: int


def inspect_stack(paths: Sequence[str | Path]) -> StackShape:
    """Shape and type shared by all sections (headers only); a mismatch names the odd file."""
    if not paths:
        raise PrecomputedError("the section stack is empty")
    first: StackShape | None = None
    for path in paths:
        with open_section(path) as section:
            this = StackShape(width=section.width, height=section.height, depth=len(paths),
                              dtype=section.dtype.name, channels=section.channels)
        if this.dtype not in SUPPORTED_DTYPES:
            raise PrecomputedError(f"data type {this.dtype} is not published; use one of {SUPPORTED_DTYPES}", path)
        if first is None:
            first = this
        elif this != first:
            raise PrecomputedError(
                f"section is {this.height}x{this.width}x{this.channels} {this.dtype}, but the stack's first "
                f"section is {first.height}x{first.width}x{first.channels} {first.dtype}", path)
    assert first is not None
    return first


# ------------------------------------------------------------------------------------------
# info
def voxel_size_nm(xy_um: float, z_um: float) -> tuple[float, float, float]:
    """Precomputed resolutions are nanometres; whole numbers stay ints so scale keys read '325_325_20000'."""
    if xy_um <= 0 or z_um <= 0:
        raise PrecomputedError(f"voxel size must be positive, got xy={xy_um} um, z={z_um} um")

    def nm(um: float) -> float:
        value = round(um * 1000.0, 3)
        return int(value) if value == int(value) else value

    return (nm(xy_um), nm(xy_um), nm(z_um))


def plan_for(stack: StackShape, voxel_nm: Sequence[float], chunk_size: Sequence[int] = DEFAULT_CHUNK,
             max_mips: int | None = None) -> PyramidPlan:
    return plan_pyramid((stack.width, stack.height, stack.depth), tuple(voxel_nm), tuple(chunk_size), max_mips)


def make_info(stack: StackShape, voxel_nm: Sequence[float], chunk_size: Sequence[int] = RECHUNKME_CHUNK,
              final_chunk_size: Sequence[int] = DEFAULT_CHUNK, max_mips: int | None = None,
              encoding: str = "raw") -> dict:
    """The info of the step-1 layer: mip 0 only, sized for the final pyramid's padding.

    RGB sections become one layer with 3 uint8 channels (not three layers): Neuroglancer's shader
    draws them as colour from one chunk fetch, and the three planes stay in one file per chunk.
    """
    from cloudvolume import CloudVolume

    plan = plan_for(stack, voxel_nm, final_chunk_size, max_mips)
    info = CloudVolume.create_new_info(
        num_channels=stack.channels,
        layer_type="image",
        data_type=stack.dtype,
        encoding=encoding,
        resolution=list(voxel_nm),
        voxel_offset=[0, 0, 0],
        volume_size=list(plan.size),
        chunk_size=list(chunk_size),
    )
    return info


def write_info(layer_dir: str | Path, info: Mapping[str, Any]) -> None:
    layer_dir = Path(layer_dir)
    layer_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(layer_dir / "info") as tmp:
        tmp.write_text(json.dumps(info, indent=1))


def read_info(layer_dir: str | Path) -> dict:
    path = Path(layer_dir) / "info"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrecomputedError("layer has no info file", path) from None
    except json.JSONDecodeError as exc:
        raise PrecomputedError(f"info is not JSON: {exc}", path) from None


def file_url(path: str | Path) -> str:
    return "file://" + Path(path).absolute().as_posix()


# ------------------------------------------------------------------------------------------
# step 1
def write_rechunkme_section(layer_dir: str, tiff_path: str, z: int, stack_width: int, stack_height: int,
                            band_bytes: int = ROW_BAND_BYTES) -> dict:
    """Write section `z` into the step-1 layer, a band of chunk rows at a time (`_write_plane`).

    Only chunks holding a non-zero voxel get a file; which ones is recorded beside them
    (`CHUNK_RECORDS`), so `check_step1` tells a background chunk (no file, read as zeros by the
    transfer) from a missing one (an error).
    """
    started = time.perf_counter()
    info = read_info(layer_dir)
    with open_section(tiff_path) as section:
        if (section.height, section.width) != (stack_height, stack_width):
            raise PrecomputedError(
                f"section is {section.height}x{section.width} px but the stack is {stack_height}x{stack_width}", tiff_path)
        if section.dtype.name != info["data_type"] or section.channels != info["num_channels"]:
            raise PrecomputedError(
                f"section is {section.dtype.name} x{section.channels} but the layer is "
                f"{info['data_type']} x{info['num_channels']}", tiff_path)
        written = _write_plane(layer_dir, info, z, section, band_bytes)
    return {"z": int(z), **written, "seconds": round(time.perf_counter() - started, 3)}


def write_padding_section(layer_dir: str, z: int) -> dict:
    """Record the blank section `z` beyond the stack that the pyramid's z padding asks for (all
    background: no chunk file)."""
    info = read_info(layer_dir)
    return {"z": int(z), **_write_plane(layer_dir, info, z, None, ROW_BAND_BYTES), "padding": True}


STEP1_WRITER = "records-1"
"""How the step-1 chunks are written (part of the stage's step-1 task parameters: a step-1 layer
kept from an earlier writer has no chunk records, so its sections are written again)."""


def _write_plane(layer_dir: str, info: dict, z: int, section: SectionRows | None, band_bytes: int) -> dict:
    """Write the chunks of plane `z` that hold data, one file each with plain `os` calls: the raw
    encoding is the chunk's bytes, channel-major, x fastest, clipped to the volume (the bytes and
    names cloud-volume writes, tested). Measured on 4 sections of 4096 x 4096 uint16 (10 144 chunk
    files): 0.38 s here, 1.0 s with tensorstore's neuroglancer_precomputed driver (and 2.7 / 7.7 s
    with 2 / 4 of its I/O threads), so no native writer; tensorstore also cannot be used in a
    process that later forks igneous's workers. Chunks that are all zero get no file (an older
    file of this plane there is removed, so rewriting a section is exact)."""
    from pipeline.imaging.tiles import chunks_with_data

    scale = info["scales"][0]
    size_x, size_y, size_z = scale["size"]
    if not 0 <= z < size_z:
        raise PrecomputedError(f"section index {z} is outside the layer's 0..{size_z - 1}", layer_dir)
    chunk_x, chunk_y, chunk_z = scale["chunk_sizes"][0]
    if chunk_z != 1:
        raise PrecomputedError(f"step-1 chunks are {chunk_z} sections deep; a section task writes one plane "
                               "(chunk z must be 1)", Path(layer_dir) / "info")
    channels, dtype = int(info["num_channels"]), np.dtype(info["data_type"])
    grid = np.zeros((-(-size_y // chunk_y), -(-size_x // chunk_x)), bool)
    folder = os.path.join(layer_dir, scale["key"])
    os.makedirs(folder, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    band = max(chunk_y, (band_bytes // (size_x * channels * dtype.itemsize)) // chunk_y * chunk_y)
    xs = [(x, min(x + chunk_x, size_x)) for x in range(0, size_x, chunk_x)]
    for y0 in range(0, size_y, band):
        y1 = min(size_y, y0 + band)
        rows = None
        if section is not None and y0 < section.height:
            rows = section.rows(y0, min(y1, section.height))
            grid[y0 // chunk_y: -(-(y0 + rows.shape[0]) // chunk_y), : -(-section.width // chunk_x)] = \
                chunks_with_data(rows, chunk_y, chunk_x)
        for iy in range(y0 // chunk_y, -(-y1 // chunk_y)):
            cy0, cy1 = iy * chunk_y, min((iy + 1) * chunk_y, size_y)
            for ix, (cx0, cx1) in enumerate(xs):
                path = os.path.join(folder, f"{cx0}-{cx1}_{cy0}-{cy1}_{z}-{z + 1}")
                if not grid[iy, ix]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                part = rows[cy0 - y0: cy1 - y0, cx0:cx1]  # type: ignore[index]
                if channels == 1 and part.shape[:2] == (cy1 - cy0, cx1 - cx0):
                    data = part.tobytes()  # (y, x, 1) in C order is [y][x], x fastest
                else:  # RGB, or an edge chunk with padding beyond the section: [c][y][x]
                    block = np.zeros((channels, cy1 - cy0, cx1 - cx0), dtype)
                    block[:, : part.shape[0], : part.shape[1]] = part.transpose(2, 0, 1)
                    data = block.tobytes()
                handle = os.open(path, flags, 0o644)
                try:
                    if os.write(handle, data) != len(data):
                        raise PrecomputedError("short write of a step-1 chunk", path)
                finally:
                    os.close(handle)
    _write_chunk_record(layer_dir, z, grid)
    return {"bytes": int(size_x * size_y * channels * dtype.itemsize), "chunks": int(grid.sum()),
            "background_chunks": int(grid.size - grid.sum())}


def _write_chunk_record(layer_dir: str | Path, z: int, grid: np.ndarray) -> None:
    import base64

    folder = Path(layer_dir) / CHUNK_RECORDS
    folder.mkdir(exist_ok=True)
    record = {"z": int(z), "grid": list(grid.shape), "data": base64.b64encode(np.packbits(grid)).decode("ascii")}
    with atomic_path(folder / f"{int(z):05d}.json") as tmp:
        tmp.write_text(json.dumps(record))


def _read_chunk_record(layer_dir: Path, z: int) -> np.ndarray | None:
    import base64

    try:
        record = json.loads((layer_dir / CHUNK_RECORDS / f"{int(z):05d}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shape = tuple(record["grid"])
    bits = np.unpackbits(np.frombuffer(base64.b64decode(record["data"]), np.uint8), count=int(np.prod(shape)))
    return bits.astype(bool).reshape(shape)


def check_step1(src_dir: str | Path, z_range: Sequence[int] | None = None) -> dict:
    """Before a transfer reads sections z0..z1-1 of the step-1 layer (the transfer reads a chunk
    without a file as zeros): every section there has its chunk record, and every chunk the record
    says holds data has its file. Raises naming the section or the first missing chunk files."""
    src_dir = Path(src_dir)
    scale = read_info(src_dir)["scales"][0]
    size_x, size_y, size_z = scale["size"]
    chunk_x, chunk_y, _ = scale["chunk_sizes"][0]
    z0, z1 = (0, size_z) if z_range is None else (int(v) for v in z_range)
    folder = src_dir / scale["key"]
    try:
        present = set(os.listdir(folder))
    except FileNotFoundError:
        present = set()
    xs = [(x, min(x + chunk_x, size_x)) for x in range(0, size_x, chunk_x)]
    ys = [(y, min(y + chunk_y, size_y)) for y in range(0, size_y, chunk_y)]
    missing, unwritten, chunks = [], [], 0
    for z in range(z0, z1):
        grid = _read_chunk_record(src_dir, z)
        if grid is None or grid.shape != (len(ys), len(xs)):
            unwritten.append(z)
            continue
        for iy, ix in zip(*np.nonzero(grid)):
            chunks += 1
            name = f"{xs[ix][0]}-{xs[ix][1]}_{ys[iy][0]}-{ys[iy][1]}_{z}-{z + 1}"
            if name not in present:
                missing.append(name)
    if unwritten:
        raise PrecomputedError(f"section(s) {unwritten[:10]} of the step-1 layer were not written (no chunk record "
                               f"in {CHUNK_RECORDS}/)", src_dir)
    if missing:
        raise PrecomputedError(f"{len(missing)} step-1 chunk(s) holding data are missing: {', '.join(missing[:5])}",
                               folder)
    return {"sections": z1 - z0, "chunks": chunks}


# ------------------------------------------------------------------------------------------
# step 2
def _task_shape_exponent(chunk: Sequence[int], itemsize: int, channels: int, memory_target: int) -> int:
    """Largest j with a (chunk_x * 2^j, chunk_y * 2^j, chunk_z) task (and its 2x2x1 pyramid,
    4/3 of it) within `memory_target` bytes; at least 0."""
    j = 0
    while (4 / 3) * chunk[0] * chunk[1] * chunk[2] * 4 ** (j + 1) * itemsize * channels <= memory_target and j < 16:
        j += 1
    return j


def run_tasks(tasks: Iterable, workers: int = 1, queue_url: str | None = None, lease_seconds: int = 600,
              gzip_level: int | None = None) -> int:
    """Execute igneous tasks and return when all are done.

    Without a queue: here (one worker) or in a pool of `workers` forked processes, each
    set to gzip at `gzip_level` first (`prepare_igneous_process`; python-task-queue's LocalTaskQueue, used
    before, gives no hook to do that in its processes). With a queue (a build's own sub-queue,
    `build_queue`): insert them there and work on that queue here too until it is empty, so
    workers on other machines share the work and a worker that dies only delays its task until
    its lease expires (`run_worker` sets the level in every worker).
    """
    if queue_url:
        from taskqueue import TaskQueue

        queue = TaskQueue(queue_url, progress=False)
        count = queue.insert(tasks)
        try:
            run_worker(queue_url, lease_seconds=lease_seconds, stop_when_empty=True, sub_queues=False)
        except QueueTaskError as exc:
            raise PrecomputedError(f"an igneous task from the queue failed: {exc.reason}", exc.path) from exc
        return count
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from taskqueue.queueables import totask

    payloads = [totask(task).payload() for task in tasks]
    gzip_level = GZIP_LEVEL if gzip_level is None else int(gzip_level)
    try:
        if max(1, int(workers)) == 1 or len(payloads) <= 1:
            _igneous_process(gzip_level)
            for payload in payloads:
                _execute_igneous(payload)
        else:
            # fork, as LocalTaskQueue's pathos pool did in effect: 'spawn' re-imports __main__,
            # so a script calling publish_stack without an `if __name__ == "__main__"` guard broke.
            with ProcessPoolExecutor(min(int(workers), len(payloads)), mp_context=get_context("fork"),
                                     initializer=_igneous_process, initargs=(gzip_level,)) as pool:
                for _ in pool.map(_execute_igneous, payloads):
                    pass
    except Exception as exc:
        raise PrecomputedError(f"an igneous task failed: {type(exc).__name__}: {exc}") from exc
    return len(payloads)


def _igneous_process(gzip_level: int) -> None:
    import igneous.tasks  # noqa: F401  registers igneous's task functions for deserialising

    prepare_igneous_process(gzip_level)


def _execute_igneous(payload) -> None:
    from taskqueue.queueables import totask

    totask(payload).execute()


@contextlib.contextmanager
def _prints_to_log() -> Iterator[None]:
    """igneous's task creation prints bounds and warnings on stdout; keep them in the debug log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("igneous: %s", line.strip())


def _scale_count(layer_dir: Path) -> int:
    return len(read_info(layer_dir)["scales"])


def _transfer_plan(src_dir: Path, chunk_size: Sequence[int], max_mips: int | None, memory_target: int):
    """The pyramid plan of the step-1 layer, the transfer's task shape and how many leading
    2x2x1 levels the transfer tasks make themselves (as many as a task of `memory_target` holds)."""
    src_info = read_info(src_dir)
    scale0 = src_info["scales"][0]
    chunk = tuple(int(c) for c in chunk_size)
    plan = plan_pyramid(tuple(scale0["size"]), tuple(scale0["resolution"]), chunk, max_mips)
    if tuple(plan.size) != tuple(scale0["size"]):
        raise PrecomputedError(
            f"step-1 layer is {scale0['size']} voxels, but chunk size {list(chunk)} needs it padded to "
            f"{list(plan.size)}: make it with make_info(..., final_chunk_size={list(chunk)})", src_dir / "info")
    itemsize = np.dtype(src_info["data_type"]).itemsize
    channels = int(src_info["num_channels"])
    exponent = _task_shape_exponent(chunk, itemsize, channels, memory_target)
    runs = plan.runs()
    in_transfer = min(slab_levels(plan), exponent)
    shape_exp = in_transfer if in_transfer else exponent
    shape = [chunk[0] * 2**shape_exp, chunk[1] * 2**shape_exp, chunk[2]]
    return plan, chunk, runs, shape, in_transfer


def slab_levels(plan: PyramidPlan) -> int:
    """Levels above mip 0 that keep z (the leading 2x2x1 run): a z-slab of whole chunks maps to the
    same z-slab at each of them, so they can be built slab by slab; the levels after them halve z
    and are built once from the last of these."""
    runs = plan.runs()
    return runs[0][1] if runs and runs[0][2] == (2, 2, 1) else 0


def transfer_and_downsample(src_dir: str | Path, dest_dir: str | Path, chunk_size: Sequence[int] = DEFAULT_CHUNK,
                            max_mips: int | None = None, workers: int = 1, queue_url: str | None = None,
                            memory_target: int = DEFAULT_MEMORY_TARGET, z_range: Sequence[int] | None = None) -> dict:
    """Rechunk the step-1 layer into a gzip layer and build its pyramid with igneous.

    Rounds: the transfer itself also makes the first 2x2x1 levels (as many as a task of
    `memory_target` bytes holds); each further round is one igneous downsampling job that starts
    from the highest level made so far and makes as many levels of one factor as its tasks hold.
    Returns the plan and the rounds (which level each level was computed from: the verifier
    needs it, see `block_mean_floor`). With a queue, the build's tasks go to a sub-queue of its
    own (`build_queue`, its name in the result's `queue`), removed when the build ends.

    Chunks that are all zero (background after masking, the padding) are not written, neither in
    step 1 nor here (`delete_black_uploads`); every read takes a chunk without a file as zeros
    (`fill_missing`), so first `check_step1` makes sure that every step-1 chunk that holds data
    has its file (a missing one is an error, never silent black). `verify_layer` accepts a
    missing published chunk only where its source is zero.

    `z_range` (z0, z1): one z-slab only, into an existing (partial) `dest_dir`: mip 0 and the
    `slab_levels` of the sections z0..z1-1 (z0 a multiple of the chunk z). igneous's task grid
    starts at the bounds, so these are exactly the tasks of a whole build that cover the slab.
    """
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    plan, chunk, runs, shape, in_transfer = _transfer_plan(src_dir, chunk_size, max_mips, memory_target)
    bounds = None
    if z_range is not None:
        z0, z1 = (int(v) for v in z_range)
        if z0 % chunk[2] or not 0 <= z0 < z1 <= plan.size[2]:
            raise PrecomputedError(f"cannot build the slab z {z0}..{z1} (chunk z {chunk[2]}, size {list(plan.size)})",
                                   dest_dir)
        from cloudvolume.lib import Bbox

        bounds = Bbox((0, 0, z0), (plan.size[0], plan.size[1], z1))
        runs = runs[:1] if slab_levels(plan) else []
    elif dest_dir.exists():
        shutil.rmtree(dest_dir)
    src_url, dest_url = file_url(src_dir), file_url(dest_dir)
    started = time.perf_counter()
    queue_url, queue_name = build_queue(queue_url, dest_dir.name) if queue_url else (None, "")
    try:
        check_step1(src_dir, z_range)
        return _transfer_and_downsample(src_url, dest_url, dest_dir, plan, runs, chunk, shape, in_transfer,
                                        memory_target, workers, queue_url, queue_name, started, bounds)
    finally:
        # done or abandoned: its tasks must not be run later into a directory that means nothing
        remove_build_queue(queue_url, queue_name)


def _transfer_and_downsample(src_url, dest_url, dest_dir: Path, plan, runs, chunk, shape, in_transfer,
                             memory_target, workers, queue_url, queue_name, started, bounds=None) -> dict:
    import igneous.task_creation as tc

    with _prints_to_log():
        # The dest info is cut back to mip 0 (truncate_scales) and the levels are added again by
        # each round, as in a whole build: a slab's rounds then see and make the same levels.
        tasks = list(tc.create_transfer_tasks(
            src_url, dest_url, chunk_size=list(chunk), shape=shape, compress="gzip", encoding="raw",
            skip_downsamples=in_transfer == 0, factor=(2, 2, 1), fill_missing=True, no_src_update=True,
            bounds=bounds, delete_black_uploads=True, background_color=0,
        ))
    count = run_tasks(tasks, workers=workers, queue_url=queue_url)
    made = _scale_count(dest_dir) - 1
    rounds: list[dict] = [{"kind": "transfer", "from_mip": 0, "mips": list(range(1, made + 1)),
                           "factor": [2, 2, 1], "task_shape": shape, "tasks": count}]
    transfer_seconds = time.perf_counter() - started
    rounds += _downsample_rounds(
        dest_dir, runs, made, "downsample", workers, queue_url,
        lambda mip, wanted, factor: tc.create_downsampling_tasks(
            dest_url, mip=mip, num_mips=wanted, factor=factor, compress="gzip",
            fill_missing=True, preserve_chunk_size=True, memory_target=memory_target, bounds=bounds,
            delete_black_uploads=True, background_color=0,
        ))
    if bounds is not None:
        return {"rounds": rounds, "levels": _scale_count(dest_dir) - 1,
                "seconds": {"transfer": round(transfer_seconds, 3), "total": round(time.perf_counter() - started, 3)}}
    return _built(dest_dir, plan, chunk, rounds, queue_name, transfer_seconds, started, sharded=False)


def _downsample_rounds(dest_dir: Path, runs, made: int, kind: str, workers, queue_url, make_tasks) -> list[dict]:
    """igneous rounds until every planned level exists: each asks `make_tasks(mip, wanted, factor)`
    for the levels its run still lacks, from the highest level made so far. igneous may make fewer
    than asked (memory target, shard boxes), so the levels on disk decide, and a round that adds
    none is an error rather than an endless loop."""
    rounds = []
    for first, length, factor in runs:
        while made < first + length:
            with _prints_to_log():
                tasks = list(make_tasks(made, first + length - made, factor))
            count = run_tasks(tasks, workers=workers, queue_url=queue_url)
            now = _scale_count(dest_dir) - 1
            if now <= made:
                raise PrecomputedError(f"igneous made no level above mip {made} ({kind}, factor {list(factor)})", dest_dir)
            rounds.append({"kind": kind, "from_mip": made, "mips": list(range(made + 1, now + 1)),
                           "factor": list(factor), "tasks": count})
            made = now
    return rounds


def level_sharding(size: Sequence[int], chunk: Sequence[int], dtype: str, shard_bytes: int) -> dict:
    """The sharding spec of a level of `size` voxels: igneous's own recommendation for shards of
    `shard_bytes` uncompressed bytes of one channel (`create_sharded_image_info`; by default the
    memory target, 512 MiB, as igneous's shard tasks used). Packing streams chunk by chunk
    (`pack_shards`), so the shard size sets nobody's memory, only the file count and how many
    sections of loose chunk files wait for their shard in a slab-wise build."""
    from igneous.task_creation.image import create_sharded_image_info

    return create_sharded_image_info(dataset_size=list(size), chunk_size=list(chunk), encoding="raw", dtype=dtype,
                                     uncompressed_shard_bytesize=int(shard_bytes))


def shard_shape(size: Sequence[int], chunk: Sequence[int], dtype: str, shard_bytes: int) -> tuple[int, int, int]:
    """The voxel box of one shard of a level of `size` (`level_sharding`)."""
    from igneous.shards import image_shard_shape_from_spec

    spec = level_sharding(size, chunk, dtype, shard_bytes)
    return tuple(int(v) for v in image_shard_shape_from_spec(spec, list(size), list(chunk)))  # type: ignore[return-value]


def _built(dest_dir: Path, plan: PyramidPlan, chunk, rounds, queue_name, transfer_seconds, started, sharded) -> dict:
    _check_scales(dest_dir, plan, chunk, sharded)
    return {
        "plan": {"size": list(plan.size), "factors": [list(f) for f in plan.factors],
                 "resolution": list(plan.resolution), "chunk_size": list(chunk)},
        "rounds": rounds, "queue": queue_name or None, "sharded": bool(sharded),
        "seconds": {"transfer": round(transfer_seconds, 3), "total": round(time.perf_counter() - started, 3)},
    }


def _check_scales(layer_dir: Path, plan: PyramidPlan, chunk: Sequence[int], sharded: bool = False) -> None:
    """igneous decides scales itself from task shapes: make sure it built exactly the plan."""
    scales = read_info(layer_dir)["scales"]
    expected_sizes = plan.sizes()
    expected_res = plan.resolutions()
    if len(scales) != plan.num_mips:
        raise PrecomputedError(f"layer has {len(scales)} levels, the plan {plan.num_mips}", layer_dir / "info")
    for mip, scale in enumerate(scales):
        problems = []
        if list(scale["size"]) != list(expected_sizes[mip]):
            problems.append(f"size {scale['size']} != {list(expected_sizes[mip])}")
        if not np.allclose(scale["resolution"], expected_res[mip]):
            problems.append(f"resolution {scale['resolution']} != {list(expected_res[mip])}")
        if list(scale["chunk_sizes"][0]) != list(chunk):
            problems.append(f"chunk size {scale['chunk_sizes'][0]} != {list(chunk)}")
        if scale.get("encoding") != "raw":
            problems.append(f"encoding {scale.get('encoding')!r} != 'raw'")
        if bool(scale.get("sharding")) != bool(sharded):
            problems.append("sharded" if scale.get("sharding") else "not sharded")
        if problems:
            raise PrecomputedError(f"mip {mip}: " + "; ".join(problems), layer_dir / "info")


# ------------------------------------------------------------------------------------------
# sharded layers: the unsharded build's gzip chunk files packed into shard files
def pack_shards(layer_dir: str | Path, mips: Iterable[int], shard_bytes: int = DEFAULT_MEMORY_TARGET,
                z_done: int | None = None, delete: bool = True) -> dict:
    """Pack the gzip chunk files of levels `mips` into `level_sharding` shard files.

    Only shards whose every chunk lies below z `z_done` (None: all) and that are not packed yet;
    after a shard is renamed into place its chunk files go (`delete`). A chunk without a file is
    background that the verification of its level has already accepted (`delete_black_uploads`),
    stored as a gzip chunk of zeros, as igneous's shard tasks store every chunk. Memory: one chunk
    at a time, whatever the shard size. The info is not changed (`mark_sharded`), so igneous still
    reads the levels unsharded while the build goes on."""
    from pipeline.publish.shards import (
        compressed_morton_codes, grid_size, shard_file_name, shards_and_minishards, write_shard,
    )
    from pipeline.publish.validate import expected_chunks

    layer_dir = Path(layer_dir)
    info = read_info(layer_dir)
    voxel_bytes = np.dtype(info["data_type"]).itemsize * int(info["num_channels"])
    zeros: dict[int, bytes] = {}
    packed = {"shards": 0, "bytes": 0, "chunks": 0, "background_chunks": 0}
    for mip in mips:
        scale = info["scales"][mip]
        chunk = scale["chunk_sizes"][0]
        spec = level_sharding(scale["size"], chunk, info["data_type"], shard_bytes)
        folder = layer_dir / scale["key"]
        folder.mkdir(exist_ok=True)
        remove_stale_temps(folder)  # a shard a killed run was writing
        chunks = list(expected_chunks(scale))
        offset = scale.get("voxel_offset", [0, 0, 0])
        positions = np.array([[(c.start[a] - offset[a]) // chunk[a] for a in range(3)] for c in chunks])
        ids = compressed_morton_codes(positions, grid_size(scale))
        shards, _ = shards_and_minishards(ids, spec)
        groups: dict[int, list] = {}
        for c, chunk_id, shard in zip(chunks, ids.tolist(), shards.tolist()):
            groups.setdefault(shard, []).append((chunk_id, c))
        for shard, members in sorted(groups.items()):
            if z_done is not None and max(c.stop[2] for _, c in members) > z_done:
                continue
            path = folder / shard_file_name(shard, spec)
            if path.exists():
                continue
            with atomic_path(path, make_parent=False) as tmp:
                packed["bytes"] += write_shard(tmp, spec, [
                    (chunk_id, lambda c=c: _gzip_chunk(folder, c, voxel_bytes, zeros, packed)) for chunk_id, c in members])
            packed["shards"] += 1
            packed["chunks"] += len(members)
            if delete:
                for _, c in members:
                    (folder / (c.name + ".gz")).unlink(missing_ok=True)
    return packed


def _gzip_chunk(folder: Path, chunk, voxel_bytes: int, zeros: dict[int, bytes], counts: dict) -> bytes:
    import gzip

    try:
        return (folder / (chunk.name + ".gz")).read_bytes()
    except FileNotFoundError:
        pass
    length = int(np.prod(chunk.shape)) * voxel_bytes
    if length not in zeros:
        zeros[length] = gzip.compress(bytes(length), compresslevel=GZIP_LEVEL, mtime=0)
    counts["background_chunks"] += 1
    return zeros[length]


def mark_sharded(layer_dir: str | Path, shard_bytes: int = DEFAULT_MEMORY_TARGET) -> None:
    """Give every level of the info its `level_sharding` spec (after `pack_shards` packed them all)."""
    info = read_info(layer_dir)
    for scale in info["scales"]:
        scale["sharding"] = level_sharding(scale["size"], scale["chunk_sizes"][0], info["data_type"], shard_bytes)
    write_info(layer_dir, info)


def drop_chunk_files(layer_dir: str | Path) -> int:
    """Delete what is not a shard file in a sharded layer's level folders (chunk files kept for a
    resumable finish, or rewritten by a slab done again after its shards were packed)."""
    removed = 0
    for scale in read_info(layer_dir)["scales"]:
        folder = Path(layer_dir) / scale["key"]
        for entry in os.scandir(folder) if folder.is_dir() else ():
            if entry.is_file() and not entry.name.endswith(".shard"):
                os.unlink(entry.path)
                removed += 1
    return removed


def _shard_built_layer(layer_dir: Path, plan: PyramidPlan, chunk, sections, built: dict, sample: int | None,
                       shard_bytes: int, verify_mips: Sequence[int], keep: Sequence[int] = (),
                       before_mark=None) -> None:
    """The unsharded levels `verify_mips` verified (so every missing chunk file is proven
    background before it is packed as zeros), every level packed (the chunk files of levels
    `keep` deleted only once the info says sharded), the info marked, the chunk files dropped.
    `before_mark(built)` is called with the finished record just before the info is marked."""
    started = time.perf_counter()
    verify_layer(layer_dir, sections, rounds=built["rounds"], sample=sample, mips=list(verify_mips))
    count = len(read_info(layer_dir)["scales"])
    packed = pack_shards(layer_dir, [m for m in range(count) if m not in keep], shard_bytes)
    kept = pack_shards(layer_dir, list(keep), shard_bytes, delete=False)
    built["sharded"] = True
    built.setdefault("shards", {k: 0 for k in packed})
    for totals in (packed, kept):
        for k, v in totals.items():
            built["shards"][k] += v
    built["seconds"]["shard"] = round(time.perf_counter() - started, 3)
    if before_mark is not None:
        before_mark(built)
    mark_sharded(layer_dir, shard_bytes)
    drop_chunk_files(layer_dir)
    _check_scales(layer_dir, plan, chunk, sharded=True)


# ------------------------------------------------------------------------------------------
# provenance
def software_versions() -> dict[str, str]:
    versions = {}
    for name in ("slidepipe", "cloud-volume", "igneous-pipeline", "task-queue", "tinybrain", "numpy", "tifffile"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_provenance(layer_dir: str | Path, description: str, step: Mapping[str, Any],
                     owners: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> None:
    """Fill cloud-volume's `provenance` file (served next to `info`) with what the layer was made
    from and how; igneous has already appended its own transfer/downsample entries. Who ran it on
    which machine is not written (the file is served): the pipeline_run row records that."""
    from cloudvolume import CloudVolume

    vol = CloudVolume(file_url(layer_dir), progress=False)
    prov = vol.provenance
    prov.description = description
    prov.owners = list(owners or [])
    if sources is not None:
        prov.sources = list(sources)
    entry = {"method": {"task": PROVENANCE_STEP, **dict(step)},
             "date": time.strftime("%Y-%m-%d %H:%M %Z"), "software": software_versions()}
    prov.processing.append(json.loads(json.dumps(entry, default=str)))
    vol.commit_provenance()


# ------------------------------------------------------------------------------------------
# the whole thing, for one stack (the stage splits step 1 into runner tasks instead)
def create_rechunkme_layer(layer_dir: str | Path, stack: StackShape, voxel_nm: Sequence[float],
                           final_chunk_size: Sequence[int] = DEFAULT_CHUNK, max_mips: int | None = None,
                           chunk_size: Sequence[int] = RECHUNKME_CHUNK) -> dict:
    """(Re)create the step-1 layer's info; an existing layer with another info is emptied."""
    layer_dir = Path(layer_dir)
    info = make_info(stack, voxel_nm, chunk_size, final_chunk_size, max_mips)
    if layer_dir.exists():
        try:
            same = read_info(layer_dir) == json.loads(json.dumps(info))
        except PrecomputedError:
            same = False
        if not same:
            shutil.rmtree(layer_dir)
    write_info(layer_dir, info)
    return info


def padding_sections(layer_dir: str | Path, depth: int) -> range:
    """z indices of the blank sections the step-1 layer has beyond a stack of `depth`."""
    return range(depth, int(read_info(layer_dir)["scales"][0]["size"][2]))


def publish_layer(src_dir: str | Path, dest_dir: str | Path, sections: Sequence[str | Path], *,
                  chunk_size: Sequence[int] = DEFAULT_CHUNK, max_mips: int | None = None, workers: int = 1,
                  queue_url: str | None = None, keep_rechunkme: bool = False, sample: int | None = 32,
                  description: str = "", params: Mapping[str, Any] | None = None,
                  memory_target: int = DEFAULT_MEMORY_TARGET, root: str | Path | None = None,
                  sharded: bool = False, shard_bytes: int | None = None) -> dict:
    """Step 2 + verification + provenance, then the atomic rename and the step-1 cleanup.

    The final layer is built under a temporary name next to `dest_dir`, so an interrupted or
    unverified build never looks published. Its `provenance` records the display window of the
    published voxels (`stack_windows` of the sections); paths in it are relative to `root` (the
    data root; default: the deepest folder holding the layer and the sections). Returns the
    result recorded in file_log.
    """
    dest_dir = Path(dest_dir)
    stack = inspect_stack(sections)
    started = time.perf_counter()
    window = stack_windows(sections)[0]
    window_seconds = round(time.perf_counter() - started, 3)
    with atomic_path(dest_dir) as tmp:
        built = transfer_and_downsample(src_dir, tmp, chunk_size=chunk_size, max_mips=max_mips, workers=workers,
                                        queue_url=queue_url, memory_target=memory_target)
        if sharded:
            plan, chunk = _transfer_plan(Path(src_dir), chunk_size, max_mips, memory_target)[:2]
            _shard_built_layer(tmp, plan, chunk, sections, built, sample, shard_bytes or memory_target,
                               verify_mips=range(plan.num_mips))
        report = _provenance_and_verify(tmp, dest_dir, sections, stack, built, window, window_seconds, sample,
                                        description, params)
    return _published(src_dir, dest_dir, tmp, sections, built, report, window, keep_rechunkme, root)


def _provenance_and_verify(built_at: Path, dest_dir: Path, sections, stack: StackShape, built: dict, window,
                           window_seconds: float, sample: int | None, description: str, params) -> dict:
    # The stack's own extent: the layer can be larger by the pyramid's zero padding.
    built["seconds"]["window"] = window_seconds
    # `window`: the display window of the published voxels (web.state reads it from here)
    step = {"params": dict(params or {}), "stack": dataclasses.asdict(stack),
            "sections": [str(s) for s in sections], "window": list(window), **built}
    write_provenance(built_at, description or f"Neuroglancer precomputed layer {dest_dir.name}", step,
                     sources=[str(s) for s in sections])
    started = time.perf_counter()
    report = verify_layer(built_at, sections, rounds=built["rounds"], sample=sample)
    built["seconds"]["verify"] = round(time.perf_counter() - started, 3)
    return report


def _published(src_dir, dest_dir: Path, built_at: Path, sections, built: dict, report: dict, window,
               keep_rechunkme: bool, root) -> dict:
    """After the rename: the served provenance, then (only now) the step-1 layer goes."""
    _served_provenance(dest_dir, built_at, Path(root) if root else _common_root(dest_dir, sections))
    removed = False
    if not keep_rechunkme:
        started = time.perf_counter()
        shutil.rmtree(src_dir, ignore_errors=True)
        built["seconds"]["delete_rechunkme"] = round(time.perf_counter() - started, 3)
        removed = True
    return {"mips": report["mips"], "verified": report["checked"], "plan": built["plan"], "rounds": built["rounds"],
            "window": list(window), "seconds": built["seconds"], "rechunkme_deleted": removed,
            "sharded": built["sharded"]}


# ------------------------------------------------------------------------------------------
# z-slab publishing: temporary files bounded by one slab, whatever the section count
SLAB_BYTES = 1024**3
"""Default slab: whole final chunks deep (at least one), about this many bytes of step-1 chunks."""

PARTIAL_DIR = "partial"
"""Inside the step-1 layer: the published layer while it is built slab by slab (deleted with it)."""


def default_slab_depth(stack: StackShape, chunk_z: int, slab_bytes: int = SLAB_BYTES) -> int:
    """Sections per slab: a multiple of the final chunk z holding about `slab_bytes` of step-1
    chunks (one chunk deep at least: a 30000 x 20000 uint16 section is 1.2 GB alone). Small
    stacks fit one slab and are built as a whole, as before."""
    plane = stack.width * stack.height * stack.channels * np.dtype(stack.dtype).itemsize
    return int(chunk_z) * max(1, int(slab_bytes) // (plane * int(chunk_z)))


def slab_ranges(size_z: int, chunk_z: int, slab_depth: int | None) -> list[tuple[int, int]]:
    """z ranges [z0, z1) of the slabs of a padded depth `size_z`; one range: build it whole."""
    if not slab_depth or slab_depth >= size_z:
        return [(0, int(size_z))]
    if slab_depth % chunk_z:
        raise PrecomputedError(f"slab depth {slab_depth} is not a multiple of the chunk z {chunk_z}")
    return [(z, min(z + slab_depth, size_z)) for z in range(0, size_z, slab_depth)]


def prepare_slab_build(partial_dir: str | Path, markers_dir: str | Path, stamp: Mapping[str, Any]) -> None:
    """Start or resume a slab-wise build: the partial layer and the finished slabs' markers are
    kept only when both exist and were made with the same parameters (`stamp`); otherwise both go,
    so a marker never vouches for a slab that is not in the partial layer."""
    partial_dir, markers_dir = Path(partial_dir), Path(markers_dir)
    path = markers_dir / "params.json"
    text = json.dumps(dict(stamp), sort_keys=True, default=str)
    try:
        same = path.read_text() == text and (partial_dir / "info").is_file()
    except FileNotFoundError:
        same = False
    if not same:
        shutil.rmtree(partial_dir, ignore_errors=True)
        shutil.rmtree(markers_dir, ignore_errors=True)
        markers_dir.mkdir(parents=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def publish_slab(src_dir: str | Path, partial_dir: str | Path, sections: Sequence[str | Path], z0: int, z1: int, *,
                 chunk_size: Sequence[int] = DEFAULT_CHUNK, max_mips: int | None = None, workers: int = 1,
                 queue_url: str | None = None, sample: int | None = 32,
                 memory_target: int = DEFAULT_MEMORY_TARGET, sharded: bool = False,
                 shard_bytes: int | None = None) -> dict:
    """Transfer one slab of the step-1 layer into the partial layer, make its z-keeping levels
    and verify them against the sections, so its step-1 chunks may be deleted next.

    `sharded`: then pack the shards that this slab completes (every chunk below z1) of the
    levels below the last slab level (`pack_shards`; the finishing step reads that last level's
    chunk files), so loose chunk files never span more than a shard's depth."""
    built = transfer_and_downsample(src_dir, partial_dir, chunk_size=chunk_size, max_mips=max_mips, workers=workers,
                                    queue_url=queue_url, memory_target=memory_target, z_range=(z0, z1))
    started = time.perf_counter()
    report = verify_layer(partial_dir, sections, rounds=built["rounds"], sample=sample,
                          mips=range(built["levels"] + 1), z_range=(z0, z1))
    built["seconds"]["verify"] = round(time.perf_counter() - started, 3)
    if sharded:
        started = time.perf_counter()
        built["shards"] = pack_shards(partial_dir, range(built["levels"]), shard_bytes or memory_target, z_done=z1)
        built["seconds"]["shard"] = round(time.perf_counter() - started, 3)
    return {"z": [int(z0), int(z1)], **built, "verified": report["checked"]}


def delete_rechunkme_slab(src_dir: str | Path, z0: int, z1: int) -> dict:
    """Delete the step-1 chunks of sections z0..z1-1 and their chunk records (after their slab
    was verified): one listing of the folder, not a lookup per expected chunk (most background
    chunks have no file)."""
    scale = read_info(src_dir)["scales"][0]
    folder = Path(src_dir) / scale["key"]
    files = size = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            start = int(entry.name.split("_")[2].split("-")[0])
        except (IndexError, ValueError):
            continue
        if z0 <= start < z1:
            with contextlib.suppress(FileNotFoundError):
                size += entry.stat().st_size
                os.unlink(entry.path)
                files += 1
    for z in range(z0, z1):
        (Path(src_dir) / CHUNK_RECORDS / f"{z:05d}.json").unlink(missing_ok=True)
    return {"files": files, "bytes": size}


def _merged_slab_rounds(slabs: Sequence[Mapping[str, Any]], where: Path) -> tuple[int, list[dict]]:
    """The slab rounds as one build's (task counts summed); every slab must have made the same levels."""
    if not slabs:
        raise PrecomputedError("no finished slab to publish", where)
    shape = [(r["kind"], r["from_mip"], r["mips"]) for r in slabs[0]["rounds"]]
    rounds = [dict(r) for r in slabs[0]["rounds"]]
    for slab in slabs[1:]:
        if [(r["kind"], r["from_mip"], r["mips"]) for r in slab["rounds"]] != shape:
            raise PrecomputedError(f"slab z {slab['z']} made other levels than slab z {slabs[0]['z']}", where)
        for total, r in zip(rounds, slab["rounds"]):
            total["tasks"] += r["tasks"]
    return int(slabs[0]["levels"]), rounds


def _trim_scales(layer_dir: Path, levels: int) -> None:
    """Drop levels above `levels` (left by a killed finishing step) with their files."""
    info = read_info(layer_dir)
    for scale in info["scales"][levels + 1:]:
        shutil.rmtree(layer_dir / scale["key"], ignore_errors=True)
    if len(info["scales"]) > levels + 1:
        info["scales"] = info["scales"][:levels + 1]
        write_info(layer_dir, info)


SHARDED_STATE = "slidepipe_sharded.json"
"""In the step-1 layer, while a sharded finishing step ends: its build record, written just before
the partial layer's info says sharded. From then on the last slab level's chunk files may be
gone, so a finishing step resumed after a kill takes the levels above it as recorded here."""


def finish_slab_build(src_dir: str | Path, partial_dir: str | Path, dest_dir: str | Path,
                      sections: Sequence[str | Path], slabs: Sequence[Mapping[str, Any]], *,
                      chunk_size: Sequence[int] = DEFAULT_CHUNK, max_mips: int | None = None, workers: int = 1,
                      queue_url: str | None = None, keep_rechunkme: bool = False, sample: int | None = 32,
                      description: str = "", params: Mapping[str, Any] | None = None,
                      memory_target: int = DEFAULT_MEMORY_TARGET, root: str | Path | None = None,
                      sharded: bool = False, shard_bytes: int | None = None) -> dict:
    """After every slab: the levels that halve z, from the last slab-wise level of the whole
    volume (small: 1/4**levels of mip 0), then provenance, verification of the whole layer, the
    rename into place and the step-1 layer's deletion, as `publish_layer` does.

    `sharded`: the slabs packed the shards of their levels below the last slab level (verified by
    the slabs, as that level was); here the levels above it are verified unsharded (they are read
    from it), then it and they are packed and the info is marked sharded."""
    src_dir, partial_dir, dest_dir = Path(src_dir), Path(partial_dir), Path(dest_dir)
    stack = inspect_stack(sections)
    started = time.perf_counter()
    window = stack_windows(sections)[0]
    window_seconds = round(time.perf_counter() - started, 3)
    plan, chunk, runs, _, _ = _transfer_plan(src_dir, chunk_size, max_mips, memory_target)
    levels, rounds = _merged_slab_rounds(slabs, partial_dir)
    state = src_dir / SHARDED_STATE
    if sharded and state.is_file() and all(scale.get("sharding") for scale in read_info(partial_dir)["scales"]):
        built = json.loads(state.read_text())  # killed after the info was marked: only cleaning up was left
        drop_chunk_files(partial_dir)
        _check_scales(partial_dir, plan, chunk, sharded=True)
    else:
        built = _finish_levels(partial_dir, dest_dir, plan, chunk, runs, levels, rounds, slabs, workers, queue_url,
                               memory_target)
        if sharded:
            built["shards"] = {k: sum(s.get("shards", {}).get(k, 0) for s in slabs)
                               for k in ("shards", "bytes", "chunks", "background_chunks")}

            def record(done: dict) -> None:
                with atomic_path(state) as tmp:
                    tmp.write_text(json.dumps(done))

            _shard_built_layer(partial_dir, plan, chunk, sections, built, sample, shard_bytes or memory_target,
                               verify_mips=range(levels + 1, plan.num_mips), keep=[levels], before_mark=record)
    try:
        report = _provenance_and_verify(partial_dir, dest_dir, sections, stack, built, window, window_seconds, sample,
                                        description, params)
    except LayerVerificationError:
        shutil.rmtree(partial_dir, ignore_errors=True)  # a wrong layer is never resumed
        raise
    if dest_dir.is_dir():
        shutil.rmtree(dest_dir)
    os.replace(partial_dir, dest_dir)
    state.unlink(missing_ok=True)
    return _published(src_dir, dest_dir, partial_dir, sections, built, report, window, keep_rechunkme, root)


def _finish_levels(partial_dir: Path, dest_dir: Path, plan: PyramidPlan, chunk, runs, levels: int, rounds, slabs,
                   workers, queue_url, memory_target) -> dict:
    """The igneous rounds of the levels above the slab levels, over the whole partial layer."""
    import igneous.task_creation as tc

    _trim_scales(partial_dir, levels)
    started = time.perf_counter()
    queue_url, queue_name = build_queue(queue_url, dest_dir.name) if queue_url else (None, "")
    dest_url = file_url(partial_dir)
    try:
        rounds += _downsample_rounds(
            partial_dir, runs, levels, "downsample", workers, queue_url,
            lambda mip, wanted, factor: tc.create_downsampling_tasks(
                dest_url, mip=mip, num_mips=wanted, factor=factor, compress="gzip",
                fill_missing=True, preserve_chunk_size=True, memory_target=memory_target,
                delete_black_uploads=True, background_color=0,
            ))
    finally:
        remove_build_queue(queue_url, queue_name)
    slab_seconds = sum(float(s["seconds"]["total"]) + float(s["seconds"].get("verify", 0))
                       + float(s["seconds"].get("shard", 0)) for s in slabs)
    built = _built(partial_dir, plan, chunk, rounds, queue_name, slab_seconds, started, sharded=False)
    built["slabs"] = [list(s["z"]) for s in slabs]
    return built


def _common_root(layer_dir: Path, sections: Sequence[str | Path]) -> Path:
    return Path(os.path.commonpath([Path(layer_dir).absolute(), *(Path(p).absolute() for p in sections)]))


def _served_provenance(layer_dir: Path, built_at: Path, root: Path) -> None:
    """The provenance as it is served: the temporary directory igneous wrote to renamed to the
    layer's own name, every path relative to `root` (the data root), and no `by` (igneous puts
    the operator's e-mail or user@host there): nothing that names a machine, a person or an
    absolute path. file_log keeps absolute facts; the pipeline_run row the user and host."""
    path = layer_dir / "provenance"
    absolute = [(file_url(built_at), file_url(layer_dir)), (str(Path(built_at).absolute()), str(layer_dir.absolute())),
                (file_url(root) + "/", ""), (str(Path(root).absolute()) + "/", "")]

    def relative(value):
        if isinstance(value, str):
            for old, new in absolute:
                value = value.replace(old, new)
            return value
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        return value

    prov = relative(json.loads(path.read_text()))
    prov["owners"] = []
    for entry in prov.get("processing", []):
        if isinstance(entry, dict):
            entry.pop("by", None)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(prov, indent=2))


def publish_stack(sections: Sequence[str | Path], dest_dir: str | Path, xy_um: float, z_um: float, *,
                  chunk_size: Sequence[int] = DEFAULT_CHUNK, rechunk_chunk_size: Sequence[int] = RECHUNKME_CHUNK,
                  max_mips: int | None = None, workers: int = 1, queue_url: str | None = None,
                  keep_rechunkme: bool = False, sample: int | None = 32, rechunkme_dir: str | Path | None = None,
                  description: str = "", sharded: bool = False, slab_depth: int | None = None,
                  memory_target: int = DEFAULT_MEMORY_TARGET, shard_bytes: int | None = None) -> dict:
    """Both steps in this process, for scripts, tests and the benchmark.

    `slab_depth` (sections, a multiple of the chunk z): step 1, transfer, z-keeping levels and
    verification one slab at a time, deleting each slab's step-1 chunks before the next (as the
    stage does); None or 0: the whole stack at once. Not resumable here (the stage is)."""
    dest_dir = Path(dest_dir)
    src_dir = Path(rechunkme_dir) if rechunkme_dir else dest_dir.with_name(dest_dir.name + "_rechunkme")
    stack = inspect_stack(sections)
    voxel = voxel_size_nm(xy_um, z_um)
    create_rechunkme_layer(src_dir, stack, voxel, chunk_size, max_mips, rechunk_chunk_size)
    size_z = int(read_info(src_dir)["scales"][0]["size"][2])
    slabs = slab_ranges(size_z, int(chunk_size[2]), slab_depth)
    options = dict(chunk_size=chunk_size, max_mips=max_mips, workers=workers, queue_url=queue_url, sample=sample,
                   memory_target=memory_target)
    params = {"xy_um": xy_um, "z_um": z_um, "chunk_size": list(chunk_size), "max_mips": max_mips, "sharded": sharded}
    if len(slabs) > 1:
        partial = src_dir / PARTIAL_DIR
        shutil.rmtree(partial, ignore_errors=True)
        done = []
        for z0, z1 in slabs:
            for z in range(z0, z1):
                _write_stack_plane(src_dir, sections, stack, z)
            done.append(publish_slab(src_dir, partial, sections, z0, z1, sharded=sharded, shard_bytes=shard_bytes,
                                     **options))
            if not keep_rechunkme:
                delete_rechunkme_slab(src_dir, z0, z1)
        return finish_slab_build(src_dir, partial, dest_dir, sections, done, keep_rechunkme=keep_rechunkme,
                                 description=description, params=params, sharded=sharded, shard_bytes=shard_bytes,
                                 **options)
    for z in range(size_z):
        _write_stack_plane(src_dir, sections, stack, z)
    return publish_layer(src_dir, dest_dir, sections, keep_rechunkme=keep_rechunkme, description=description,
                         sharded=sharded, shard_bytes=shard_bytes, params=params, **options)


def _write_stack_plane(src_dir: Path, sections: Sequence[str | Path], stack: StackShape, z: int) -> None:
    if z < len(sections):
        write_rechunkme_section(str(src_dir), str(sections[z]), z, stack.width, stack.height)
    else:
        write_padding_section(str(src_dir), z)
