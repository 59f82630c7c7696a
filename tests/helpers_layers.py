"""Reading a published precomputed layer back, file by file, for the publishing tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def decoded_chunk_files(layer: Path) -> dict[str, bytes]:
    """Every chunk file of every level, decoded (gzip undone), by its path in the layer: two
    builds that should be the same compare equal on this, missing background chunks included."""
    out = {}
    for scale in json.loads((layer / "info").read_text())["scales"]:
        for path in sorted((layer / scale["key"]).iterdir()):
            data = path.read_bytes()
            out[f"{scale['key']}/{path.name}"] = gzip.decompress(data) if path.suffix == ".gz" else data
    return out
