"""Test helpers: write small CZI files with pylibCZIrw and damage chosen subblocks.

Used by test_readers.py and by stage tests that need a slide with a scene that cannot decode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.sample import tile_origins

REAL_CZI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "czi"
"""Real ZEN files kept beside the work tree (/work/shared/data/czi); tests skip when absent."""

ZSTD = "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"


def write_czi(
    path: Path,
    scenes: list[tuple[tuple[int, int], list[np.ndarray]]],
    *,
    tile: int = 256,
    overlap: int = 16,
    channel_names: dict[int, str] | None = None,
    scale_x: float = 0.325e-6,
    scale_y: float = 0.325e-6,
    compression: str | None = ZSTD,
    z_planes: list[list[list[np.ndarray]]] | None = None,
    time_points: list[list[list[np.ndarray]]] | None = None,
) -> Path:
    """A mosaic CZI: scenes = [((x, y) origin, [channel arrays])], each written as overlapping tiles.

    `z_planes`, when given, replaces the channel arrays by [scene][channel][z] arrays;
    `time_points` by [scene][channel][t] arrays (a time series, one z plane).
    """
    from pylibCZIrw import czi as pyczi

    axis = "T" if time_points is not None else "Z"
    stacked = time_points if time_points is not None else z_planes
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=compression) as writer:
        for s, ((ox, oy), channels) in enumerate(scenes):
            stacks = stacked[s] if stacked is not None else [[c] for c in channels]
            for c, planes in enumerate(stacks):
                for k, image in enumerate(planes):
                    for ty, tx in tile_origins(image.shape[:2], tile, overlap):
                        part = np.ascontiguousarray(image[ty : ty + tile, tx : tx + tile])
                        writer.write(part, location=(ox + tx, oy + ty), plane={"C": c, axis: k}, scene=s)
        writer.write_metadata(channel_names=channel_names or {}, scale_x=scale_x, scale_y=scale_y)
    return path


@dataclass(frozen=True)
class Subblock:
    offset: int  # file offset of the segment
    data_offset: int  # file offset of the (compressed) pixel data
    data_size: int
    compression: int
    dims: dict[str, int]  # dimension -> start coordinate (X, Y in pixels; S, C, Z, M indices)
    sizes: dict[str, int]


def subblocks(path: Path) -> list[Subblock]:
    """Walk the file's ZISRAW segments and describe every subblock (independent of libCZI)."""
    data = Path(path).read_bytes()
    found = []
    pos = 0
    while pos + 32 <= len(data):
        sid = data[pos : pos + 16].rstrip(b"\0")
        allocated = struct.unpack_from("<q", data, pos + 16)[0]
        if allocated <= 0:
            break
        if sid == b"ZISRAWSUBBLOCK":
            meta_size, _attachment_size, data_size = struct.unpack_from("<iiq", data, pos + 32)
            entry = pos + 48  # DirectoryEntryDV: schema 'DV', then fixed fields, then dimensions
            compression = struct.unpack_from("<i", data, entry + 18)[0]
            count = struct.unpack_from("<i", data, entry + 28)[0]
            dims, sizes = {}, {}
            for k in range(count):
                e = entry + 32 + 20 * k
                name = data[e : e + 4].rstrip(b"\0").decode()
                dims[name], sizes[name] = struct.unpack_from("<ii", data, e + 4)
            header = max(256, 16 + 32 + 20 * count)
            found.append(Subblock(pos, pos + 32 + header + meta_size, data_size, compression, dims, sizes))
        pos += 32 + allocated
    return found


def corrupt_subblock(path: Path, block: Subblock) -> None:
    """Overwrite the start of a compressed subblock's data so that libCZI cannot decode it."""
    if block.compression == 0:
        raise ValueError("an uncompressed subblock decodes whatever its bytes are; write the file compressed")
    with open(path, "r+b") as handle:
        handle.seek(block.data_offset)
        handle.write(b"\xff" * min(16, block.data_size))


def corrupt_scene(path: Path, scene: int, channel: int = 0) -> Subblock:
    """Damage the first subblock of one scene/channel (0-based): that scene fails to decode."""
    for block in subblocks(path):
        if block.dims.get("S", 0) == scene and block.dims.get("C", 0) == channel:
            corrupt_subblock(path, block)
            return block
    raise ValueError(f"no subblock of scene {scene} channel {channel} in {path}")
