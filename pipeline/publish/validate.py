"""Verification of a published precomputed layer, independent of cloud-volume's reader.

Chunk files are listed and decoded here from the precomputed spec (raw little-endian, x fastest,
optionally gzip; sharded levels through `pipeline.publish.shards`), so a cloud-volume or igneous
bug cannot hide itself by reading back what it wrote wrongly.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.imaging.pyramid import block_mean_floor
from pipeline.publish.common import open_section, read_rounds
from pipeline.publish.shards import (
    compressed_morton_code, grid_position, grid_size, minishard_index, read_chunk_bytes, shard_and_minishard,
    shard_file_name,
)


class LayerVerificationError(SlidepipeError):
    """A published layer lacks chunks or holds voxels that differ from what it was made from."""

    def __init__(self, problems: Sequence[str], path):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:5]) + (f"; ... {len(self.problems) - 5} more" if len(self.problems) > 5 else "")
        super().__init__(f"{len(self.problems)} problem(s): {shown}", path)


@dataclass(frozen=True)
class Chunk:
    """One chunk of one mip: its voxel box (x, y, z) and its file name (without .gz)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def name(self) -> str:
        return "_".join(f"{a}-{b}" for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


def load_info(layer_dir: str | Path) -> dict:
    path = Path(layer_dir) / "info"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LayerVerificationError(["no info file"], path) from None


def expected_chunks(scale: dict, z_range: Sequence[int] | None = None) -> Iterator[Chunk]:
    """The chunk grid of one scale of the info: every file a complete layer must have (with
    `z_range` (z0, z1): those whose z start lies in it, the chunks of one z-slab)."""
    size = scale["size"]
    offset = scale.get("voxel_offset", [0, 0, 0])
    chunk = scale["chunk_sizes"][0]
    ranges = []
    for axis in range(3):
        lo, hi, step = offset[axis], offset[axis] + size[axis], chunk[axis]
        ranges.append([(a, min(a + step, hi)) for a in range(lo, hi, step)])
    if z_range is not None:
        ranges[2] = [r for r in ranges[2] if z_range[0] <= r[0] < z_range[1]]
    for z0, z1 in ranges[2]:
        for y0, y1 in ranges[1]:
            for x0, x1 in ranges[0]:
                yield Chunk((x0, y0, z0), (x1, y1, z1))


def _listing(mip_dir: Path) -> dict[str, int]:
    try:
        return {e.name: e.stat().st_size for e in os.scandir(mip_dir) if e.is_file()}
    except FileNotFoundError:
        return {}


def _sizes(mip_dir: Path, chunks: Sequence[Chunk]) -> dict[str, int]:
    """Like `_listing`, but only the files of `chunks` (a slab's, without listing the whole level)."""
    found = {}
    for chunk in chunks:
        for name in (chunk.name + ".gz", chunk.name):
            try:
                found[name] = (mip_dir / name).stat().st_size
            except FileNotFoundError:
                continue
    return found


def mip_manifest(layer_dir: str | Path, mip: int, info: dict | None = None, chunks: int | None = None) -> dict:
    """Count, bytes and a digest of one mip's files: what file_log records instead of a row per chunk.

    The digest is sha256 over the sorted "name<TAB>size" lines, the same rule the runner uses
    for a directory output, so it can be compared with `pipeline.runner.path_stats(mip_dir)`.
    `files` counts files; `chunks` the chunks (in a sharded level, those found in its shards:
    `chunks`; unsharded, one file each).
    """
    info = info or load_info(layer_dir)
    scale = info["scales"][mip]
    files = _listing(Path(layer_dir) / scale["key"])
    lines = sorted(f"{name}\t{size}" for name, size in files.items())
    return {
        "mip": mip, "key": scale["key"], "resolution": list(scale["resolution"]), "size": list(scale["size"]),
        "chunk_size": list(scale["chunk_sizes"][0]), "files": len(files),
        "chunks": len(files) if chunks is None else int(chunks), "bytes": int(sum(files.values())),
        "sharded": bool(scale.get("sharding")),
        "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
    }


def read_chunk(layer_dir: str | Path, info: dict, mip: int, chunk: Chunk, missing_zero: bool = False) -> np.ndarray:
    """Decode one chunk file to (x, y, z, channel); raises if missing (zeros with `missing_zero`:
    a background chunk, which the writer does not store), truncated or not decodable."""
    scale = info["scales"][mip]
    if scale.get("encoding", "raw") != "raw":
        raise SlidepipeError(f"only raw encoding is verified, mip {mip} is {scale.get('encoding')}")
    base = Path(layer_dir) / scale["key"] / chunk.name
    path = base.with_name(base.name + ".gz")
    if scale.get("sharding"):
        name, minishard, chunk_id = shard_address(scale, chunk)
        path = Path(layer_dir) / scale["key"] / name
        where = _minishard(path, scale["sharding"], minishard).get(chunk_id)
        if where is None:
            raise SlidepipeError(f"chunk {chunk.name} (id {chunk_id}) is not in its shard", path)
        data = read_chunk_bytes(path, scale["sharding"], where)
    elif path.is_file():
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as exc:
            raise SlidepipeError(f"not a valid gzip file: {exc}", path) from None
    elif base.is_file():
        path, data = base, base.read_bytes()
    elif missing_zero:
        return np.zeros((*chunk.shape, int(info["num_channels"])), dtype=info["data_type"])
    else:
        raise SlidepipeError("chunk file is missing", path)
    dtype = np.dtype(info["data_type"]).newbyteorder("<")
    channels = int(info["num_channels"])
    x, y, z = chunk.shape
    expected = x * y * z * channels * dtype.itemsize
    if len(data) != expected:
        raise SlidepipeError(f"chunk holds {len(data)} bytes, {expected} expected for {chunk.shape} x{channels}", path)
    # Precomputed raw: C-order [channel][z][y][x], little-endian.
    return np.frombuffer(data, dtype=dtype).reshape(channels, z, y, x).transpose(3, 2, 1, 0)


def shard_address(scale: dict, chunk: Chunk) -> tuple[str, int, int]:
    """(shard file name, minishard, chunk id) of a chunk of a sharded scale."""
    spec = scale["sharding"]
    position = grid_position(chunk.start, scale.get("voxel_offset", [0, 0, 0]), scale["chunk_sizes"][0])
    chunk_id = compressed_morton_code(position, grid_size(scale))
    shard, minishard = shard_and_minishard(chunk_id, spec)
    return shard_file_name(shard, spec), minishard, chunk_id


def _minishard(path: Path, spec: dict, minishard: int) -> dict[int, tuple[int, int]]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SlidepipeError("shard file is missing", path) from None
    return _cached_minishard(str(path), (stat.st_mtime_ns, stat.st_size, stat.st_ino), json.dumps(spec, sort_keys=True),
                             minishard)


@functools.lru_cache(maxsize=256)
def _cached_minishard(path: str, stamp: tuple, spec: str, minishard: int) -> dict[int, tuple[int, int]]:
    """Minishard indexes are read once per verification, not once per chunk (`stamp`: a
    rewritten file is read again)."""
    return minishard_index(Path(path), json.loads(spec), minishard)


def read_region(layer_dir: str | Path, info: dict, mip: int, start: Sequence[int], stop: Sequence[int],
                missing_zero: bool = False) -> np.ndarray:
    """Voxels [start, stop) of one mip, assembled from decoded chunk files (`missing_zero`: a
    missing unsharded chunk file reads as zeros, as readers with fill_missing do)."""
    scale = info["scales"][mip]
    chunk = scale["chunk_sizes"][0]
    offset = scale.get("voxel_offset", [0, 0, 0])
    size = scale["size"]
    start = [int(s) for s in start]
    stop = [min(int(s), o + n) for s, o, n in zip(stop, offset, size)]
    out = np.zeros((*(b - a for a, b in zip(start, stop)), int(info["num_channels"])), dtype=info["data_type"])
    grid = [range((a - o) // c, -(-(b - o) // c)) for a, b, o, c in zip(start, stop, offset, chunk)]
    for gz in grid[2]:
        for gy in grid[1]:
            for gx in grid[0]:
                lo = [o + g * c for o, g, c in zip(offset, (gx, gy, gz), chunk)]
                hi = [min(l + c, o + n) for l, c, o, n in zip(lo, chunk, offset, size)]
                data = read_chunk(layer_dir, info, mip, Chunk(tuple(lo), tuple(hi)), missing_zero)
                a = [max(l, s) for l, s in zip(lo, start)]
                b = [min(h, e) for h, e in zip(hi, stop)]
                out[a[0] - start[0]:b[0] - start[0], a[1] - start[1]:b[1] - start[1], a[2] - start[2]:b[2] - start[2]] = \
                    data[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1], a[2] - lo[2]:b[2] - lo[2]]
    return out


class SectionCache:
    """Open section readers, reused across the chunks of one verification (bounded: a stack can
    have more sections than a process may keep files open)."""

    def __init__(self, sections: Sequence[str | Path], limit: int = 64):
        self.sections = list(sections)
        self.limit = limit
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def get(self, z: int):
        if z in self._open:
            self._open.move_to_end(z)
            return self._open[z][1]
        context = open_section(self.sections[z])
        section = context.__enter__()
        self._open[z] = (context, section)
        while len(self._open) > self.limit:
            _, (old, _) = self._open.popitem(last=False)
            old.__exit__(None, None, None)
        return section

    def close(self) -> None:
        while self._open:
            _, (context, _) = self._open.popitem()
            context.__exit__(None, None, None)

    def __enter__(self) -> "SectionCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_sections(sections: SectionCache, start: Sequence[int], stop: Sequence[int], dtype, channels: int) -> np.ndarray:
    """The source voxels of a mip-0 box from the section TIFFs (zero beyond the stack: padding)."""
    out = np.zeros((*(b - a for a, b in zip(start, stop)), channels), dtype=dtype)
    for z in range(start[2], min(stop[2], len(sections.sections))):
        section = sections.get(z)
        y1 = min(stop[1], section.height)
        x1 = min(stop[0], section.width)
        if start[1] >= y1 or start[0] >= x1:
            continue
        rows = section.window(start[1], y1, start[0], x1)
        out[: x1 - start[0], : y1 - start[1], z - start[2], :] = rows.transpose(1, 0, 2)
    return out


def _base_of(mip: int, rounds: Sequence[dict] | None) -> int:
    """The level igneous read to compute `mip` (several levels come from one task's input)."""
    for r in rounds or ():
        if mip in r.get("mips", ()):
            return int(r["from_mip"])
    return mip - 1


def _factor_between(info: dict, low: int, high: int) -> tuple[int, int, int]:
    a = np.array(info["scales"][low]["resolution"], dtype=float)
    b = np.array(info["scales"][high]["resolution"], dtype=float)
    factor = np.rint(b / a).astype(int)
    if not np.allclose(factor * a, b):
        raise SlidepipeError(f"mip {high} resolution {list(b)} is not an integer multiple of mip {low} {list(a)}")
    return tuple(int(f) for f in factor)


def check_chunk(layer_dir, info: dict, mip: int, chunk: Chunk, sections: SectionCache,
                rounds: Sequence[dict] | None) -> str | None:
    """None when the chunk decodes to what it must hold, else the reason.

    mip 0 must equal the section TIFFs (zero in the padding); a higher mip must equal
    `block_mean_floor` of the level its igneous task read. Without the recorded rounds we only
    know the level below, and then truncation allows the stored value to exceed the truncated
    mean of the (already truncated) level below by at most 1, never to fall short.
    """
    try:
        got = read_chunk(layer_dir, info, mip, chunk)
    except SlidepipeError as exc:
        return str(exc)
    dtype, channels = info["data_type"], int(info["num_channels"])
    if mip == 0:
        want = read_sections(sections, chunk.start, chunk.stop, dtype, channels)
        return None if np.array_equal(got, want) else _diff("mip 0 differs from the sections", got, want, chunk)
    exact = rounds is not None
    base = _base_of(mip, rounds) if exact else mip - 1
    factor = _factor_between(info, base, mip)
    lo = [s * f for s, f in zip(chunk.start, factor)]
    hi = [s * f for s, f in zip(chunk.stop, factor)]
    try:
        source = read_region(layer_dir, info, base, lo, hi, missing_zero=True)  # missing ones: checked at their level
    except SlidepipeError as exc:
        return f"cannot read mip {base} under it: {exc}"
    want = block_mean_floor(source, factor)
    if want.shape != got.shape:
        return f"shape {got.shape} != {want.shape} from mip {base}"
    if exact:
        return None if np.array_equal(got, want) else _diff(f"mip {mip} != mean of mip {base}", got, want, chunk)
    delta = got.astype(np.int64) - want.astype(np.int64)
    if delta.min() < 0 or delta.max() > 1:
        return _diff(f"mip {mip} not within [0, 1] above the mean of mip {base}", got, want, chunk)
    return None


def _diff(what: str, got: np.ndarray, want: np.ndarray, chunk: Chunk) -> str:
    bad = np.argwhere(got != want)
    first = tuple(int(v) for v in bad[0][:3]) if len(bad) else None
    return f"{what}: {len(bad)} voxel values differ, first at offset {first} of chunk {chunk.name}"


def verify_layer(layer_dir: str | Path, sections: Sequence[str | Path], rounds: Sequence[dict] | None = None,
                 sample: int | None = 32, seed: int = 0, mips: Sequence[int] | None = None,
                 z_range: Sequence[int] | None = None) -> dict:
    """Check every expected chunk file of every mip exists and decode a sample against its source.

    `sample` is the decoding budget per mip, in chunks: at mip 0 that many chunks are checked;
    a higher chunk is checked against the level its igneous task read, which costs one decode
    per chunk of that level under it (4**k for k 2x2 levels), so `sample // cost` chunks (at
    least 2) are checked there. The last chunk, which holds the edges and the padding, is always
    among them. None decodes and checks every chunk. `rounds` (from `transfer_and_downsample`,
    or read from the provenance file when omitted) allow an exact check of each level. Raises
    LayerVerificationError listing the problems; returns the per-mip manifests.

    `mips` and `z_range` (z0, z1) limit the check to those levels' chunks starting in z0..z1-1:
    one z-slab of a slab-wise build, checked before its step-1 chunks are deleted (the budget
    then applies per slab; the manifests still describe the whole level).
    """
    layer_dir = Path(layer_dir)
    info = load_info(layer_dir)
    if rounds is None:
        rounds = read_rounds(layer_dir)
    rng = random.Random(seed)
    problems: list[str] = []
    manifests = []
    checked = {}
    with SectionCache(sections) as cache:
        for mip, scale in enumerate(info["scales"]):
            if mips is None or mip in mips:
                _verify_mip(layer_dir, info, mip, scale, cache, rounds, sample, rng, problems, manifests, checked,
                            z_range)
    if problems:
        raise LayerVerificationError(problems, layer_dir)
    return {"mips": manifests, "checked": checked}


def _affordable(info: dict, mip: int, rounds, budget: int) -> int:
    """How many chunks of `mip` a budget of `budget` decoded source chunks pays for."""
    if mip == 0:
        return max(1, budget)
    base = _base_of(mip, rounds) if rounds is not None else mip - 1
    factor = _factor_between(info, base, mip)
    chunk_ratio = [int(np.ceil(f * c / b)) for f, c, b in
                   zip(factor, info["scales"][mip]["chunk_sizes"][0], info["scales"][base]["chunk_sizes"][0])]
    return max(2, budget // int(np.prod(chunk_ratio)))


def _present_in_shards(layer_dir: Path, mip: int, scale: dict, chunks: list[Chunk], problems: list[str]) -> list[Chunk]:
    """The expected chunks indexed (non-empty) in their shard files; the rest become problems,
    one per unreadable shard or minishard index, one per chunk missing from a readable one."""
    groups: dict[tuple[str, int], list[tuple[Chunk, int]]] = {}
    for chunk in chunks:
        name, minishard, chunk_id = shard_address(scale, chunk)
        groups.setdefault((name, minishard), []).append((chunk, chunk_id))
    present = []
    for (name, minishard), members in sorted(groups.items()):
        try:
            index = _minishard(layer_dir / scale["key"] / name, scale["sharding"], minishard)
        except SlidepipeError as exc:
            problems.append(f"mip {mip}: shard {scale['key']}/{name} ({len(members)} chunks): {exc.reason}")
            continue
        for chunk, chunk_id in members:
            where = index.get(chunk_id)
            if where is None:
                problems.append(f"mip {mip}: chunk {scale['key']}/{chunk.name} is missing from shard {name}")
            elif where[1] == 0:
                problems.append(f"mip {mip}: chunk {scale['key']}/{chunk.name} is empty in shard {name}")
            else:
                present.append(chunk)
    present.sort(key=lambda c: (c.start[2], c.start[1], c.start[0]))
    return present


def _verify_mip(layer_dir: Path, info: dict, mip: int, scale: dict, cache: SectionCache, rounds, sample: int | None,
                rng: random.Random, problems: list[str], manifests: list[dict], checked: dict,
                z_range: Sequence[int] | None = None) -> None:
    chunks = list(expected_chunks(scale, z_range))
    if scale.get("sharding"):
        present = _present_in_shards(layer_dir, mip, scale, chunks, problems)
        _check_sample(layer_dir, info, mip, scale, present, cache, rounds, sample, rng, problems, checked)
        manifests.append({**mip_manifest(layer_dir, mip, info, chunks=len(present)), "expected_chunks": len(chunks)})
        return
    files = _listing(layer_dir / scale["key"]) if z_range is None else _sizes(layer_dir / scale["key"], chunks)
    present = []
    background = 0
    for chunk in chunks:
        size = files.get(chunk.name + ".gz", files.get(chunk.name))
        if size is None:
            # Not written because it is all zero (delete_black_uploads): only where its source is.
            reason = _not_background(layer_dir, info, mip, chunk, cache, rounds)
            if reason:
                problems.append(f"mip {mip}: chunk {scale['key']}/{chunk.name} is missing, {reason}")
            else:
                background += 1
        elif size == 0:
            problems.append(f"mip {mip}: chunk {scale['key']}/{chunk.name} is empty")
        else:
            present.append(chunk)
    _check_sample(layer_dir, info, mip, scale, present, cache, rounds, sample, rng, problems, checked)
    if z_range is None:  # a slab's check does not list the whole level
        manifests.append({**mip_manifest(layer_dir, mip, info), "expected_chunks": len(chunks),
                          "background_chunks": background})


def _not_background(layer_dir: Path, info: dict, mip: int, chunk: Chunk, sections: SectionCache,
                    rounds: Sequence[dict] | None) -> str | None:
    """None when a chunk that has no file would hold only zeros, else why it must exist: at mip 0
    the sections there, above it the truncated mean of the level its round read (which can be
    zero over a few faint voxels) must be zero everywhere. Every missing chunk is checked, not a
    sample: a dropped data chunk would otherwise be read as black by every viewer."""
    dtype, channels = info["data_type"], int(info["num_channels"])
    if mip == 0:
        source = read_sections(sections, chunk.start, chunk.stop, dtype, channels)
        nonzero = int(np.count_nonzero(source))
        return f"but the sections hold {nonzero} non-zero values there" if nonzero else None
    base = _base_of(mip, rounds) if rounds is not None else mip - 1
    factor = _factor_between(info, base, mip)
    lo = [s * f for s, f in zip(chunk.start, factor)]
    hi = [s * f for s, f in zip(chunk.stop, factor)]
    try:
        want = block_mean_floor(read_region(layer_dir, info, base, lo, hi, missing_zero=True), factor)
    except SlidepipeError as exc:
        return f"and mip {base} under it cannot be read: {exc}"
    nonzero = int(np.count_nonzero(want))
    return f"but the mean of mip {base} under it has {nonzero} non-zero values" if nonzero else None


def _check_sample(layer_dir: Path, info: dict, mip: int, scale: dict, present: list[Chunk], cache: SectionCache,
                  rounds, sample: int | None, rng: random.Random, problems: list[str], checked: dict) -> None:
    count = len(present) if sample is None else _affordable(info, mip, rounds, sample)
    if count >= len(present):
        picked = present
    else:
        picked = rng.sample(present[:-1], max(0, count - 1)) + present[-1:]
        # z-major order: the sections under one slab of chunks are opened once, not per chunk.
        picked.sort(key=lambda c: (c.start[2], c.start[1], c.start[0]))
    for chunk in picked:
        reason = check_chunk(layer_dir, info, mip, chunk, cache, rounds)
        if reason:
            problems.append(f"mip {mip}: {scale['key']}/{chunk.name}: {reason}")
    checked[mip] = len(picked)
