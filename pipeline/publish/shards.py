"""Reading Neuroglancer's sharded precomputed image chunks from the format spec (no cloud-volume).

The verifier (`pipeline.publish.validate`) decodes what igneous wrote with these functions, so a
writer bug cannot hide behind the same library's reader. Format (neuroglancer
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
from typing import Mapping, Sequence

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
