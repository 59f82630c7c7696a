"""Reading a published precomputed layer back, file by file, for the publishing tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from pipeline.publish.shards import minishard_index, read_chunk_bytes


def decoded_chunk_files(layer: Path) -> dict[str, bytes]:
    """Every chunk file of every level, decoded (gzip undone), by its path in the layer (a
    chunk in a shard by the shard's path and its chunk id): two builds that should be the same
    compare equal on this, missing background chunks included."""
    out = {}
    for scale in json.loads((layer / "info").read_text())["scales"]:
        spec = scale.get("sharding")
        for path in sorted((layer / scale["key"]).iterdir()):
            if spec and path.suffix == ".shard":
                for minishard in range(1 << int(spec["minishard_bits"])):
                    for chunk_id, where in sorted(minishard_index(path, spec, minishard).items()):
                        out[f"{scale['key']}/{path.name}#{chunk_id}"] = read_chunk_bytes(path, spec, where)
                continue
            data = path.read_bytes()
            out[f"{scale['key']}/{path.name}"] = gzip.decompress(data) if path.suffix == ".gz" else data
    return out
