"""Resume state: the conversion's signature, the per-level record of completed slabs kept under
"slidepipe" in the root attributes, the one-writer lock, and what to do with an existing store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.publish.omezarr.options import OmeZarrError
from pipeline.publish.omezarr.store import read_attributes, store_zarr_format, write_attributes

STATE_KEY = "slidepipe"
STATE_FORMAT = 1


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
def store_lock(store: Path) -> Iterator[None]:
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


class Progress:
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


def signature_of(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def input_fingerprint(paths: Sequence[Path]) -> list[list]:
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([Path(p).name, st.st_size, st.st_mtime_ns])
    return out


def prepare_store(store: Path, signature: str, overwrite: bool) -> str:
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
