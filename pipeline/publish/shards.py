"""Neuroglancer's sharded precomputed image chunks, from the format spec (no cloud-volume).

`write_shard` packs gzip chunks (the unsharded build's own files) into a shard file, streaming,
so memory does not depend on the shard's size; the verifier (`pipeline.publish.validate`) decodes
shards with the readers here, and the independent readers in the tests (tensorstore,
Neuroglancer, cloud-volume) read what `write_shard` wrote. Format (neuroglancer
`src/datasource/precomputed/sharded.md`, `volume.md`):

- a chunk's id is the compressed Morton code of its grid position; `identity` hash of
  `id >> preshift_bits` gives the minishard (low `minishard_bits`) and the shard (next
  `shard_bits`); the shard file is `<shard in hex, ceil(shard_bits / 4) digits>.shard`;
- a shard starts with its index: 2**minishard_bits pairs of uint64le [start, end) of each
  minishard index, counted from the end of the shard index;
- a minishard index (raw or gzip) is 3 x n uint64le: chunk ids, delta-encoded; chunk data start
  offsets, each relative to the end of the previous chunk (the first to the end of the shard
  index); sizes. Chunk data is raw or gzip as `data_encoding` says.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.errors import SlidepipeError


class ShardError(SlidepipeError):
    """A shard file is missing, truncated or does not decode, or lacks a chunk."""


def compressed_morton_code(position: Sequence[int], grid_size: Sequence[int]) -> int:
    """Interleave the bits of a grid position x, y, z (x lowest), each axis using only the
    ceil(log2(grid size)) bits it needs, skipping axes that have run out of bits."""
    bits = [(int(n) - 1).bit_length() for n in grid_size]
    code, out = 0, 0
    for bit in range(max(bits, default=0)):
        for axis in range(3):
            if bit < bits[axis]:
                code |= ((int(position[axis]) >> bit) & 1) << out
                out += 1
    return code


def compressed_morton_codes(positions: np.ndarray, grid_size: Sequence[int]) -> np.ndarray:
    """`compressed_morton_code` of many grid positions at once ((n, 3) ints -> n uint64)."""
    positions = np.asarray(positions, dtype=np.uint64).reshape(-1, 3)
    bits = [(int(n) - 1).bit_length() for n in grid_size]
    codes = np.zeros(len(positions), dtype=np.uint64)
    out = 0
    for bit in range(max(bits, default=0)):
        for axis in range(3):
            if bit < bits[axis]:
                codes |= ((positions[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(out)
                out += 1
    return codes


def shards_and_minishards(chunk_ids: np.ndarray, spec: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """`shard_and_minishard` of many chunk ids at once."""
    _check_spec(spec)
    hashed = np.asarray(chunk_ids, dtype=np.uint64) >> np.uint64(int(spec["preshift_bits"]))
    minishard = hashed & np.uint64((1 << int(spec["minishard_bits"])) - 1)
    shard = (hashed >> np.uint64(int(spec["minishard_bits"]))) & np.uint64((1 << int(spec["shard_bits"])) - 1)
    return shard, minishard


def write_shard(path: Path, spec: Mapping, chunks: Iterable[tuple[int, Callable[[], bytes]]]) -> int:
    """Write one shard file at `path` from (chunk id, function returning the chunk's data already
    encoded as `data_encoding` says) pairs, which must all belong to that shard. Chunk data goes
    out one chunk at a time, minishard by minishard in id order; then the minishard indexes; the
    shard index is written last at the start. Returns the file's size."""
    _check_spec(spec)
    minishard_bits = int(spec["minishard_bits"])
    by_minishard: dict[int, list[tuple[int, Callable[[], bytes]]]] = {}
    for chunk_id, data in chunks:
        by_minishard.setdefault(shard_and_minishard(int(chunk_id), spec)[1], []).append((int(chunk_id), data))
    index_bytes = 16 * (1 << minishard_bits)
    shard_index = np.zeros((1 << minishard_bits, 2), dtype="<u8")
    tables: list[tuple[int, np.ndarray]] = []
    with open(path, "wb") as handle:
        handle.write(bytes(index_bytes))
        position = 0  # from the end of the shard index
        for minishard in sorted(by_minishard):
            members = sorted(by_minishard[minishard], key=lambda m: m[0])
            table = np.zeros((3, len(members)), dtype="<u8")
            previous_id, previous_end = 0, 0
            for i, (chunk_id, data) in enumerate(members):
                payload = data()
                table[:, i] = (chunk_id - previous_id, position - previous_end, len(payload))
                handle.write(payload)
                previous_id, previous_end = chunk_id, position + len(payload)
                position = previous_end
            tables.append((minishard, table))
        for minishard, table in tables:
            raw = table.tobytes()
            encoded = gzip.compress(raw, mtime=0) if spec.get("minishard_index_encoding", "raw") == "gzip" else raw
            shard_index[minishard] = (position, position + len(encoded))
            handle.write(encoded)
            position += len(encoded)
        handle.seek(0)
        handle.write(shard_index.tobytes())
    return index_bytes + position


def _check_spec(spec: Mapping) -> None:
    if spec.get("@type") != "neuroglancer_uint64_sharded_v1" or spec.get("hash", "identity") != "identity":
        raise ShardError(f"unsupported sharding {dict(spec)} (only neuroglancer_uint64_sharded_v1, identity hash)")


def shard_and_minishard(chunk_id: int, spec: Mapping) -> tuple[int, int]:
    _check_spec(spec)
    hashed = chunk_id >> int(spec["preshift_bits"])
    minishard = hashed & ((1 << int(spec["minishard_bits"])) - 1)
    shard = (hashed >> int(spec["minishard_bits"])) & ((1 << int(spec["shard_bits"])) - 1)
    return shard, minishard


def shard_file_name(shard: int, spec: Mapping) -> str:
    digits = math.ceil(int(spec["shard_bits"]) / 4)
    return f"{shard:0{digits}x}.shard"


def _decode(data: bytes, encoding: str, what: str, path: Path) -> bytes:
    if encoding == "raw":
        return data
    if encoding != "gzip":
        raise ShardError(f"unknown {what} encoding {encoding!r}", path)
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ShardError(f"{what} is not valid gzip: {exc}", path) from None


def _read_at(handle, path: Path, start: int, length: int, what: str) -> bytes:
    handle.seek(start)
    data = handle.read(length)
    if len(data) != length:
        raise ShardError(f"{what} at bytes {start}-{start + length} is past the end of the file (truncated)", path)
    return data


def minishard_index(path: Path, spec: Mapping, minishard: int) -> dict[int, tuple[int, int]]:
    """{chunk id: (absolute byte offset, size)} of one minishard of a shard file."""
    _check_spec(spec)
    entries = 1 << int(spec["minishard_bits"])
    index_bytes = 16 * entries
    try:
        with open(path, "rb") as handle:
            index = np.frombuffer(_read_at(handle, path, 0, index_bytes, "shard index"), dtype="<u8").reshape(entries, 2)
            start, end = (int(v) for v in index[minishard])
            if end < start:
                raise ShardError(f"minishard {minishard} has a negative extent [{start}, {end})", path)
            if end == start:
                return {}
            raw = _read_at(handle, path, index_bytes + start, end - start, f"minishard index {minishard}")
    except FileNotFoundError:
        raise ShardError("shard file is missing", path) from None
    table = _decode(raw, spec.get("minishard_index_encoding", "raw"), f"minishard index {minishard}", path)
    if len(table) % 24:
        raise ShardError(f"minishard index {minishard} holds {len(table)} bytes, not a multiple of 24", path)
    ids, offsets, sizes = np.frombuffer(table, dtype="<u8").reshape(3, -1).astype(np.uint64)
    ids = np.cumsum(ids, dtype=np.uint64)
    found: dict[int, tuple[int, int]] = {}
    position = index_bytes
    for chunk_id, delta, size in zip(ids.tolist(), offsets.tolist(), sizes.tolist()):
        position += delta
        found[int(chunk_id)] = (position, int(size))
        position += size
    return found


def read_chunk_bytes(path: Path, spec: Mapping, where: tuple[int, int]) -> bytes:
    """The decoded data of a chunk at (offset, size) of a shard file (from `minishard_index`)."""
    offset, size = where
    with open(path, "rb") as handle:
        data = _read_at(handle, path, offset, size, "chunk data")
    return _decode(data, spec.get("data_encoding", "raw"), "chunk data", path)


def grid_position(start: Sequence[int], offset: Sequence[int], chunk: Sequence[int]) -> tuple[int, int, int]:
    return tuple((int(s) - int(o)) // int(c) for s, o, c in zip(start, offset, chunk))  # type: ignore[return-value]


def grid_size(scale: Mapping) -> tuple[int, int, int]:
    return tuple(-(-int(n) // int(c)) for n, c in zip(scale["size"], scale["chunk_sizes"][0]))  # type: ignore[return-value]
