"""extract: slides (CZI, or a folder of TIFF sections) -> DB rows + per-section TIFFs.

Two phases. `describe` tasks read each slide's metadata (and are where a broken file is found);
the main process turns their results into `slide` / `slide_czi_to_tif` rows, inserting what is
new and never touching what a user may have edited (active flags, scene order). `section` tasks
then write each scene channel at full resolution and as a 1/32 thumbnail, reading the scene in
row bands so a 60000 x 40000 px scene never sits whole in memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from db.models import ScanRun, Slide, SlideCziToTif
from db.queries import current_file
from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.imaging.downsample import downsample_area
from pipeline.imaging.display import to_display_uint8
from pipeline.imaging.tiles import tile_grid
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.readers import find_gaps, natural_sorted_tiffs, open_slide
from pipeline.runner import StageContext, Task
from pipeline.stages.section_files import TILE, write_image, write_png, write_tiled

NAME = "extract"
VERSION = 1

CZI_SUFFIXES = (".czi",)
BAND_ROWS = 1024  # a multiple of the TIFF tile height and of the thumbnail factor
_SLIDE_NUMBER = re.compile(r"slide[^0-9]*?(\d+)", re.IGNORECASE)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--input", type=Path, default=None,
                       help="extract: a folder of TIFF / OME-TIFF sections instead of <animal>/czi")
    group.add_argument("--z-plane", type=int, default=None,
                       help="extract: z plane to take from multi-plane scenes (default: the middle one)")


# ---------------------------------------------------------------------------------------
# worker functions (module level: picklable)
def describe_slide(path: str) -> dict[str, Any]:
    """Metadata of one slide as plain data (runs in a worker: opening a slide can be slow)."""
    with open_slide(path) as reader:
        info = reader.info()
    if not info.scenes:
        raise SlidepipeError("the file contains no scene", path)
    return {
        "pixel_size_um": list(info.pixel_size_um) if info.pixel_size_um else None,
        "acquisition_date": info.acquisition_date.isoformat() if info.acquisition_date else None,
        "objective": info.objective,
        "magnification": info.magnification,
        "scenes": [
            {
                "index": s.index, "x": s.x, "y": s.y, "width": s.width, "height": s.height,
                "dtype": s.dtype, "samples_per_pixel": s.samples_per_pixel, "z_planes": s.z_planes,
                "channels": [{"index": c.index, "name": c.name} for c in s.channels],
            }
            for s in info.scenes
        ],
    }


def write_meta(path: str, meta_path: str) -> dict[str, Any]:
    """Describe a slide and keep the description as a file: the phase's recorded output."""
    import json

    meta = describe_slide(path)
    with atomic_path(Path(meta_path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def extract_section(
    slide_path: str, scene: int, channel: int, z: int, tif_path: str, thumb_path: str, png_path: str | None
) -> dict[str, Any]:
    """One scene channel -> full-resolution tiled TIFF + thumbnail (+ the scene's QC PNG)."""
    start = time.perf_counter()
    with open_slide(slide_path) as reader:
        info = reader.info()
        scene_info = next((s for s in info.scenes if s.index == scene), None)
        if scene_info is None:
            raise SlidepipeError(f"scene {scene} is not in the file any more", slide_path)
        height, width = scene_info.height, scene_info.width
        spp = scene_info.samples_per_pixel
        dtype = np.dtype(scene_info.dtype)
        shape = (height, width, spp) if spp > 1 else (height, width)
        thumb_bands: list[np.ndarray] = []

        def tiles():
            for row in range(0, height, BAND_ROWS):
                rows = min(BAND_ROWS, height - row)
                try:
                    band = reader.read_region(scene, channel, 0, row, width, rows, z=z)
                except SlidepipeError:
                    raise
                except Exception as exc:
                    raise SlidepipeError(f"scene {scene + 1} channel {channel}: cannot decode rows {row}-{row + rows}: {exc}", slide_path) from exc
                if band.shape[:2] != (rows, width):
                    raise SlidepipeError(
                        f"scene {scene + 1} channel {channel}: reader returned {band.shape[:2]} for rows {row}-{row + rows}, expected {(rows, width)}",
                        slide_path,
                    )
                band = band.astype(dtype, copy=False)
                thumb_bands.append(downsample_area(band, THUMBNAIL_FACTOR))
                for y0, y1, x0, x1 in tile_grid(band.shape, TILE):
                    yield band[y0:y1, x0:x1]

        write_tiled(tif_path, shape, dtype, tiles(), pixel_size_um=info.pixel_size_um)
    thumbnail = np.concatenate(thumb_bands, axis=0)
    all_zero = not thumbnail.any()
    write_image(thumb_path, thumbnail)
    if png_path:
        write_png(png_path, to_display_uint8(thumbnail))
    return {
        "width": width, "height": height, "dtype": dtype.name, "samples_per_pixel": spp,
        "thumbnail_shape": list(thumbnail.shape), "seconds": round(time.perf_counter() - start, 3),
        "all_zero": all_zero,
    }


# ---------------------------------------------------------------------------------------
def slide_inputs(ctx: StageContext) -> tuple[list[Path], str]:
    """The slide files to ingest and their kind ('CZI' or 'TIFF'); other files are reported."""
    source = ctx.params.get("input")
    if source:
        folder = Path(source)
        if not folder.is_dir():
            raise SlidepipeError("input folder does not exist", folder)
        paths = natural_sorted_tiffs(folder)
        if not paths:
            raise SlidepipeError("no .tif/.tiff files in the input folder", folder)
        for missing in find_gaps(paths):
            ctx.fail(folder, f"section number {missing} is missing from the numbered series")
        return paths, "TIFF"
    folder = ctx.layout.czi_dir
    if not folder.is_dir():
        raise SlidepipeError("no czi folder: put the slides here, or give --input DIR for TIFF sections", folder)
    paths = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() in CZI_SUFFIXES and entry.is_file():
            paths.append(entry)
        else:
            ctx.log.warning("%s: not a .czi file, ignored", entry)
    if not paths:
        raise SlidepipeError("no .czi files found", folder)
    return paths, "CZI"


def slide_numbers(paths: list[Path]) -> dict[Path, int]:
    """Slide number from the name ('..._slide012...'), else the file's position; never duplicated."""
    numbers: dict[Path, int] = {}
    found = {p: _SLIDE_NUMBER.search(p.stem) for p in paths}
    parsed = [int(m.group(1)) for m in found.values() if m]
    usable = len(parsed) == len(paths) and len(set(parsed)) == len(parsed)
    for position, path in enumerate(paths, start=1):
        numbers[path] = int(found[path].group(1)) if usable else position
    return numbers


def run(ctx: StageContext) -> None:
    paths, file_type = slide_inputs(ctx)
    meta_dir = ctx.layout.preps / "slide_meta"
    describe_tasks = [
        Task(key=f"describe:{p.name}", func=write_meta, kwargs={"path": str(p), "meta_path": str(meta_dir / f"{p.name}.json")},
             inputs=[p], outputs=[meta_dir / f"{p.name}.json"], label=str(p))
        for p in paths
    ]
    described = ctx.execute(describe_tasks, desc="read slide metadata")
    numbers = slide_numbers(paths)
    sections = _record_slides(ctx, paths, numbers, described, file_type)

    tasks = []
    for row in sections:
        stem = Path(row["file"]).stem
        tif = ctx.layout.extracted_tif(stem, row["scene_index"], row["channel"])
        thumb = ctx.layout.extracted_thumbnail(stem, row["scene_index"], row["channel"])
        png = ctx.layout.scene_png(stem, row["scene_index"]) if row["channel"] == 1 else None
        tasks.append(Task(
            key=f"{stem}:S{row['scene_index'] + 1}:C{row['channel']}",
            func=extract_section,
            kwargs={"slide_path": row["path"], "scene": row["scene_index"], "channel": row["channel"], "z": row["z_plane"],
                    "tif_path": str(tif), "thumb_path": str(thumb), "png_path": str(png) if png else None},
            inputs=[Path(row["path"])],
            outputs=[tif, thumb] + ([png] if png else []),
            params={"z": row["z_plane"], "band_rows": BAND_ROWS, "tile": TILE[0], "thumbnail_factor": THUMBNAIL_FACTOR},
            label=f"{row['path']} (scene {row['scene_index'] + 1}, channel {row['channel']})",
        ))
    results = ctx.execute(tasks, desc="extract sections")
    _record_sections(ctx, tasks, results)


def _record_slides(ctx: StageContext, paths, numbers, described, file_type) -> list[dict]:
    """Insert new slide / section rows; update read-only metadata of existing ones only."""
    from pipeline.stages.common import ensure_scan_run

    sections: list[dict] = []
    z_choice = ctx.params.get("z_plane")
    with ctx.session() as session:
        scan_run = ensure_scan_run(session, ctx.animal, file_type=file_type)
        for path in paths:
            meta = described.get(f"describe:{path.name}")
            if meta is None:
                continue  # failed: already reported by the runner
            slide = session.scalars(
                select(Slide).where(Slide.FK_scan_run_id == scan_run.id, Slide.file_name == path.name)
            ).first()
            size = path.stat().st_size
            checksum_row = current_file(session, ctx.layout.relative(path))
            pixel = meta["pixel_size_um"] or [None, None]
            if slide is None:
                slide = Slide(FK_scan_run_id=scan_run.id, file_name=path.name, slide_physical_id=numbers[path],
                              active=True, processed=False, slide_status="Good", created=dt.datetime.now())
                session.add(slide)
            slide.file_size = size
            slide.checksum = checksum_row.checksum if checksum_row else None
            slide.scenes = len(meta["scenes"])
            slide.pixel_size_x_um, slide.pixel_size_y_um = pixel
            slide.objective = meta["objective"]
            slide.magnification = meta["magnification"]
            slide.acquisition_date = dt.datetime.fromisoformat(meta["acquisition_date"]) if meta["acquisition_date"] else None
            session.flush()
            if scan_run.resolution is None and pixel[0]:
                scan_run.resolution = pixel[0]
            elif pixel[0] and scan_run.resolution and abs(pixel[0] - scan_run.resolution) > 1e-6 * scan_run.resolution:
                ctx.log.warning("%s: pixel size %.4f um differs from the scan run's %.4f um", path, pixel[0], scan_run.resolution)
            existing = {(r.scene_index, r.channel): r for r in session.scalars(select(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide.id))}
            for scene in meta["scenes"]:
                z = min(z_choice, scene["z_planes"] - 1) if z_choice is not None else scene["z_planes"] // 2
                for channel in scene["channels"]:
                    key = (scene["index"], channel["index"])
                    row = existing.get(key)
                    if row is None:
                        row = SlideCziToTif(FK_slide_id=slide.id, scene_index=scene["index"], scene_number=scene["index"] + 1,
                                            scene_order=scene["index"] + 1, channel=channel["index"], active=True,
                                            created=dt.datetime.now())
                        session.add(row)
                    row.file_name = ctx.layout.extracted_name(path.stem, scene["index"], channel["index"])
                    row.channel_name = channel["name"]
                    row.width, row.height = scene["width"], scene["height"]
                    row.bbox_x, row.bbox_y = scene["x"], scene["y"]
                    row.dtype = scene["dtype"]
                    row.samples_per_pixel = scene["samples_per_pixel"]
                    row.z_planes = scene["z_planes"]
                    row.z_plane = z
                    sections.append({"path": str(path), "file": path.name, "scene_index": scene["index"],
                                     "channel": channel["index"], "z_plane": z})
        scan_run.number_of_slides = session.query(Slide).filter(Slide.FK_scan_run_id == scan_run.id).count()
        channels = {s["channel"] for s in sections}
        if channels:
            scan_run.channels_per_scene = max(scan_run.channels_per_scene or 0, max(channels))
    return sections


def _record_sections(ctx: StageContext, tasks: list[Task], results: dict[str, dict]) -> None:
    with ctx.session() as session:
        for task in tasks:
            result = results.get(task.key)
            if result is None:
                continue
            slide = session.scalars(select(Slide).join(ScanRun).where(
                ScanRun.FK_prep_id == ctx.animal, Slide.file_name == Path(task.kwargs["slide_path"]).name)).first()
            row = session.scalars(select(SlideCziToTif).where(
                SlideCziToTif.FK_slide_id == slide.id,
                SlideCziToTif.scene_index == task.kwargs["scene"],
                SlideCziToTif.channel == task.kwargs["channel"])).first()
            recorded = current_file(session, ctx.layout.relative(Path(task.kwargs["tif_path"])))
            if recorded is not None:
                row.file_size, row.checksum = recorded.size, recorded.checksum
            row.processing_duration = result.get("seconds")
            if result.get("all_zero"):
                ctx.log.warning("%s: every pixel is 0 in the source file (extracted as is; deactivate the section if it "
                                "should not be used)", task.describe())
        incomplete = {Path(t.kwargs["slide_path"]).name for t in tasks if t.key not in results}
        for slide in session.scalars(select(Slide).join(ScanRun).where(ScanRun.FK_prep_id == ctx.animal)):
            slide.processed = slide.file_name not in incomplete
