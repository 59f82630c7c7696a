"""What the processing stages (mask, clean, histogram, align, create_metrics) share: the ordered
sections with their files, and TIFF reading/writing in windows and tiles.

Full-resolution files are read through a window reader (only the TIFF tiles a window touches
are decoded) and written from an iterator of tiles, so no stage holds a whole section.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.imaging.tiles import WindowReader, pad_tile
from pipeline.layout import section_name

TILE = (512, 512)
"""Tile of every full-resolution TIFF we write (the extract stage uses the same)."""
COMPRESSION = ("zlib", 1)
"""Deflate at level 1: readable by every TIFF reader; level 6 costs ~3x the time for ~5% size."""
BIGTIFF_BYTES = 2**32 - 2**25


@dataclass(frozen=True)
class Section:
    """One section (a scene) of the ordered active stack, in one channel.

    `name` (`<slide>_S<scene>`, layout.section_key) is its identity: every per-section file
    after extract is named by it, so an edit stays with its tissue when sections are reordered
    or deactivated. `position` is where it is in the stack now (its z in the published volume).
    """

    name: str
    position: int
    row_id: int
    """slide_czi_to_tif.id of this channel's row."""
    channel1_id: int
    """slide_czi_to_tif.id of the scene's channel-1 row (alignment rows link to it)."""
    thumbnail: Path
    full: Path
    width: int
    height: int
    dtype: str
    samples_per_pixel: int
    slide_id: int = 0
    scene_index: int = 0
    mirrored: bool = False
    """Mounted face down, by the user's word (channel-1 row's `mirrored`): align mirrors it."""

    @property
    def deactivate(self) -> str:
        """The SQL that takes this section out of the stack (all channels)."""
        from db.queries import deactivate_sql

        return deactivate_sql([(self.slide_id, self.scene_index)])

    @property
    def label(self) -> str:
        return f"section {self.name} (position {section_name(self.position)})"


def list_sections(ctx, channel: int | None = None) -> list[Section]:
    """The animal's ordered active sections in `channel` (default: the stage's channel), in the
    order of the database now."""
    from db.queries import ordered_sections, section_key_of

    channel = ctx.channel if channel is None else channel
    with ctx.session() as session:
        rows = ordered_sections(session, ctx.animal, channel)
        firsts = rows if channel == 1 else ordered_sections(session, ctx.animal, 1)
        if len(firsts) != len(rows):
            raise SlidepipeError(
                f"channel {channel} has {len(rows)} active sections but channel 1 has {len(firsts)}: "
                "every channel must have the same sections"
            )
        sections = []
        for position, (row, first) in enumerate(zip(rows, firsts)):
            if (row.FK_slide_id, row.scene_index) != (first.FK_slide_id, first.scene_index):
                raise SlidepipeError(f"section {section_name(position)}: channel {channel} and channel 1 differ in order")
            stem = Path(row.slide.file_name).stem
            sections.append(Section(
                name=section_key_of(row), position=position, row_id=row.id, channel1_id=first.id,
                thumbnail=ctx.layout.extracted_thumbnail(stem, row.scene_index, channel),
                full=ctx.layout.extracted_tif(stem, row.scene_index, channel),
                width=row.width, height=row.height, dtype=row.dtype, samples_per_pixel=row.samples_per_pixel or 1,
                slide_id=row.FK_slide_id, scene_index=row.scene_index, mirrored=bool(first.mirrored),
            ))
    if not sections:
        raise SlidepipeError(f"animal {ctx.animal} has no active sections in channel {channel}: run --task extract first")
    return sections


def usable(ctx, sections: list[Section], path_of: Callable[[Section], Path], what: str, fix: str) -> list[Section]:
    """The sections whose `path_of(section)` can be trusted now (recorded in file_log, unchanged
    on disk, made from the current version of its inputs: `StageContext.output_problem`). Each
    other section fails alone, once, by name, with what to do: `fix`, or deactivate it."""
    kept = []
    with ctx.session() as session:
        for s in sections:
            path = path_of(s)
            problem = ctx.output_problem(session, path)
            if problem is None:
                kept.append(s)
            else:
                ctx.fail(path, f"{s.label}: {what} {problem}: {fix}, or take the section out of the stack: {s.deactivate}")
    return kept


# ------------------------------------------------------------------------------------------ I/O
def read_image(path: str | Path) -> np.ndarray:
    """A whole (thumbnail-sized) TIFF or PNG; a missing or unreadable file names itself."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SlidepipeError("file is missing", path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError("OpenCV cannot decode it")
        return image[..., ::-1] if image.ndim == 3 else image  # BGR -> RGB
    except Exception as exc:
        raise SlidepipeError(f"cannot read image: {exc}", path) from exc


def write_image(path: str | Path, image: np.ndarray) -> None:
    """A small TIFF (thumbnails, masks), atomically."""
    import tifffile

    photometric = "rgb" if image.ndim == 3 and image.shape[2] in (3, 4) else "minisblack"
    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(tmp, image, photometric=photometric, compression="zlib", metadata=None)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """A QC PNG (8-bit for display), atomically."""
    import cv2

    from pipeline.imaging.display import to_display_uint8

    display = image if image.dtype == np.uint8 else to_display_uint8(image)
    if display.ndim == 3:
        display = display[..., ::-1]
    with atomic_path(Path(path)) as tmp:
        if not cv2.imwrite(str(tmp), display):
            raise SlidepipeError("cannot write PNG", path)


@contextlib.contextmanager
def open_windows(path: str | Path) -> Iterator[tuple[WindowReader, tuple[int, ...], np.dtype]]:
    """(read, shape, dtype) of a TIFF whose windows are decoded on demand."""
    from pipeline.readers.tiff import TiffReader

    with TiffReader(path) as reader:
        scene = reader.info().scenes[0]
        shape = (scene.height, scene.width) + ((scene.samples_per_pixel,) if scene.samples_per_pixel > 1 else ())

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return reader.read_region(0, 1, x0, y0, x1 - x0, y1 - y0)

        yield read, shape, np.dtype(scene.dtype)


def write_tiled(path: str | Path, shape: tuple[int, ...], dtype, tiles: Iterator[np.ndarray],
                pixel_size_um: tuple[float, float] | None = None) -> None:
    """A tiled TIFF from tiles in row-major order (edge tiles may be short), atomically; with
    the pixel size in the resolution tags when given, so other tools see the physical scale."""
    import tifffile

    dtype = np.dtype(dtype)
    bigtiff = int(np.prod(shape)) * dtype.itemsize > BIGTIFF_BYTES
    photometric = "rgb" if len(shape) == 3 else "minisblack"
    scale = {}
    if pixel_size_um:
        scale = {"resolution": (1e4 / pixel_size_um[0], 1e4 / pixel_size_um[1]), "resolutionunit": "CENTIMETER"}
    with atomic_path(Path(path)) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            tif.write((pad_tile(t, TILE) for t in tiles), shape=tuple(shape), dtype=dtype, tile=TILE,
                      compression=COMPRESSION[0], compressionargs={"level": COMPRESSION[1]},
                      photometric=photometric, metadata=None, **scale)
