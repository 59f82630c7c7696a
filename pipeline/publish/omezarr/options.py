"""What a conversion can be asked for (`OmeZarrOptions`), what it reports (`ConversionResult`),
and the converter's error type."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import SlidepipeError
from pipeline.publish import pyramid

NGFF_ZARR_FORMAT = {"0.4": 2, "0.5": 3}
DEFAULT_CHUNK = (64, 64, 64)


class OmeZarrError(SlidepipeError):
    """The store cannot be written or read as asked (exists, differs, invalid input, too little memory)."""


@dataclasses.dataclass
class OmeZarrOptions:
    """Everything a conversion can be asked for; the CLI flags map one to one."""

    ngff_version: str = "0.5"
    chunk: tuple[int, int, int] | None = None  # (z, y, x); None: DEFAULT_CHUNK (or, adding levels, the store's)
    shard: tuple[int, int, int] | None = None
    nlevels: int | None = None  # None: until the top level fits one chunk in y and x
    max_gb: float | None = None  # None: a quarter of the available memory
    max_gb_is_default: bool = False  # the stage's cap, not the user's: never refused (planning.memory_budget)
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
