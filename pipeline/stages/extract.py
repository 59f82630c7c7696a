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
from pipeline.imaging.pixeltype import WIDEN_FACTOR, widen
from pipeline.imaging.tiles import tile_grid
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.readers import find_gaps, natural_sorted_tiffs, open_slide
from pipeline.runner import StageContext, Task
from pipeline.stages.section_files import TILE, write_image, write_png, write_tiled

NAME = "extract"
VERSION = 1
LOCK_BY = ()  # one extract per animal: it writes every channel at both resolutions (runner.lock_key)

CZI_SUFFIXES = (".czi",)
BAND_ROWS = 1024  # a multiple of the TIFF tile height and of the thumbnail factor
_SLIDE_NUMBER = re.compile(r"slide[^0-9]*?(\d+)", re.IGNORECASE)


PIXEL_SIZE_TOLERANCE = 1e-4
"""Relative difference above which two slides' pixel sizes are different (0.01 %: TIFF resolution
tags are rationals, so the same size read back from two files may differ in the 7th digit)."""


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--input", type=Path, default=None,
                       help="extract: a folder of TIFF / OME-TIFF sections instead of <animal>/czi")
    group.add_argument("--z-plane", type=int, default=None,
                       help="extract: z plane (0-based) to take from multi-plane scenes (default: the middle one); "
                            "a scene without that plane is refused")
    group.add_argument("--time-point", type=int, default=None,
                       help="extract: time point (0-based) to take from time series (default: the first one, with a "
                            "warning); a scene without that time point is refused")
    group.add_argument("--convert-dtype", choices=["uint16"], default=None,
                       help="extract: widen uint8 sections to uint16 (value x 257: 255 -> 65535) so they can join "
                            "uint16 ones; without it an animal whose sections mix pixel types is refused")


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
                "time_points": s.time_points,
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
    slide_path: str, scene: int, channel: int, z: int, tif_path: str, thumb_path: str, png_path: str | None,
    t: int = 0, convert_dtype: str | None = None,
) -> dict[str, Any]:
    """One scene channel -> full-resolution tiled TIFF + thumbnail (+ the scene's QC PNG).

    The result says what the files hold (size, pixel type, z plane, time point) so that the
    database is changed only once they are written, and the brightest full-resolution value
    (`max_value`), so that "every pixel is 0" is never judged on a rounded thumbnail.
    """
    start = time.perf_counter()
    with open_slide(slide_path) as reader:
        info = reader.info()
        scene_info = next((s for s in info.scenes if s.index == scene), None)
        if scene_info is None:
            raise SlidepipeError(f"scene {scene} is not in the file any more", slide_path)
        height, width = scene_info.height, scene_info.width
        spp = scene_info.samples_per_pixel
        dtype = np.dtype(convert_dtype or scene_info.dtype)
        shape = (height, width, spp) if spp > 1 else (height, width)
        thumb_bands: list[np.ndarray] = []
        peak = 0

        def tiles():
            nonlocal peak
            for row in range(0, height, BAND_ROWS):
                rows = min(BAND_ROWS, height - row)
                try:
                    band = reader.read_region(scene, channel, 0, row, width, rows, z=z, t=t)
                except SlidepipeError:
                    raise
                except Exception as exc:
                    raise SlidepipeError(f"scene {scene + 1} channel {channel}: cannot decode rows {row}-{row + rows}: {exc}", slide_path) from exc
                if band.shape[:2] != (rows, width):
                    raise SlidepipeError(
                        f"scene {scene + 1} channel {channel}: reader returned {band.shape[:2]} for rows {row}-{row + rows}, expected {(rows, width)}",
                        slide_path,
                    )
                band = widen(band, dtype.name) if convert_dtype else band.astype(dtype, copy=False)
                peak = max(peak, int(band.max()))
                thumb_bands.append(downsample_area(band, THUMBNAIL_FACTOR))
                for y0, y1, x0, x1 in tile_grid(band.shape, TILE):
                    yield band[y0:y1, x0:x1]

        write_tiled(tif_path, shape, dtype, tiles(), pixel_size_um=info.pixel_size_um)
    thumbnail = np.concatenate(thumb_bands, axis=0)
    write_image(thumb_path, thumbnail)
    if png_path:
        write_png(png_path, to_display_uint8(thumbnail))
    return {
        "width": width, "height": height, "dtype": dtype.name, "samples_per_pixel": spp, "z": z, "t": t,
        "thumbnail_shape": list(thumbnail.shape), "seconds": round(time.perf_counter() - start, 3),
        "max_value": peak,
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
    described = {p: described[f"describe:{p.name}"] for p in paths if f"describe:{p.name}" in described}
    refused = _refuse_misfits(ctx, described)
    numbers = slide_numbers(paths)
    sections = _record_slides(ctx, paths, numbers, described, file_type, refused)

    tasks = []
    for row in sections:
        stem = Path(row["file"]).stem
        tif = ctx.layout.extracted_tif(stem, row["scene_index"], row["channel"])
        thumb = ctx.layout.extracted_thumbnail(stem, row["scene_index"], row["channel"])
        png = ctx.layout.scene_png(stem, row["scene_index"]) if row["channel"] == 1 else None
        params: dict[str, Any] = {"z": row["z_plane"], "band_rows": BAND_ROWS, "tile": TILE[0], "thumbnail_factor": THUMBNAIL_FACTOR}
        # only what changes the output: files extracted before these options existed stay current
        if row["time_points"] > 1:
            params["t"] = row["time_point"]
        if row["convert_dtype"]:
            params["convert_dtype"] = row["convert_dtype"]
        tasks.append(Task(
            key=f"{stem}:S{row['scene_index'] + 1}:C{row['channel']}",
            func=extract_section,
            kwargs={"slide_path": row["path"], "scene": row["scene_index"], "channel": row["channel"], "z": row["z_plane"],
                    "t": row["time_point"], "convert_dtype": row["convert_dtype"],
                    "tif_path": str(tif), "thumb_path": str(thumb), "png_path": str(png) if png else None},
            inputs=[Path(row["path"])],
            outputs=[tif, thumb] + ([png] if png else []),
            params=params,
            label=f"{row['path']} (scene {row['scene_index'] + 1}, channel {row['channel']})",
        ))
    results = ctx.execute(tasks, desc="extract sections")
    _record_sections(ctx, tasks, results, incomplete={p.name for p in paths if p not in described or p.name in refused})


# ---------------------------------------------------------------------------------------
# one volume needs one pixel type and one pixel size: refuse the misfits here, not 5 stages later
def _pixel_kind(dtype: str, samples_per_pixel: int) -> str:
    return f"{dtype} RGB" if samples_per_pixel == 3 else dtype


def _output_dtype(scene: dict, convert: str | None) -> str:
    """The pixel type the extracted TIFF will have: --convert-dtype widens only what is narrower."""
    if convert and scene["dtype"] != convert and (scene["dtype"], convert) in WIDEN_FACTOR:
        return convert
    return scene["dtype"]


def _most_common(values: list, same=lambda a, b: a == b):
    """The value seen most often (the first seen wins a tie), with `same` deciding equality."""
    groups: list[list] = []
    for value in values:
        for group in groups:
            if same(group[0], value):
                group.append(value)
                break
        else:
            groups.append([value])
    return max(groups, key=len)[0] if groups else None


def _same_size(a: float, b: float) -> bool:
    return abs(a - b) <= PIXEL_SIZE_TOLERANCE * max(a, b)


def _refuse_misfits(ctx: StageContext, described: dict[Path, dict]) -> dict[str, set[int]]:
    """Scenes whose pixel type or pixel size differs from the animal's, by file name.

    The animal's value is the one of the sections already extracted (so adding slides never
    turns the animal's existing sections into the misfits), else the most common one. Each
    refused file gets one error line naming it, the value that differs and a file that has the
    animal's value; nothing is written for it.
    """
    convert = ctx.params.get("convert_dtype")
    with ctx.session() as session:
        extracted = {(name, scene): _pixel_kind(dtype, spp) for name, scene, dtype, spp in session.execute(
            select(Slide.file_name, SlideCziToTif.scene_index, SlideCziToTif.dtype, SlideCziToTif.samples_per_pixel)
            .select_from(SlideCziToTif).join(SlideCziToTif.slide).join(Slide.scan_run).where(ScanRun.FK_prep_id == ctx.animal, ScanRun.active.is_(True),
                                        SlideCziToTif.checksum.is_not(None)))}
    kinds = {(path, sc["index"]): _pixel_kind(_output_dtype(sc, convert), sc["samples_per_pixel"])
             for path, meta in described.items() for sc in meta["scenes"]}
    kept = [kind for (path, index), kind in kinds.items() if extracted.get((path.name, index)) == kind]
    ref_kind = _most_common(kept) or _most_common(list(kinds.values()))
    sizes = {path: meta["pixel_size_um"][0] for path, meta in described.items() if meta["pixel_size_um"]}
    kept_sizes = [size for path, size in sizes.items() if any(name == path.name for name, _ in extracted)]
    ref_size = _most_common(kept_sizes, _same_size) or _most_common(list(sizes.values()), _same_size)

    refused: dict[str, set[int]] = {}
    for path, meta in described.items():
        scenes = meta["scenes"]
        odd = [sc for sc in scenes if kinds[(path, sc["index"])] != ref_kind]
        if odd:
            kind = kinds[(path, odd[0]["index"])]
            example = next(p.name for (p, i), k in kinds.items() if k == ref_kind)
            where = "" if len(odd) == len(scenes) else " in scene " + ", ".join(str(sc["index"] + 1) for sc in odd)
            hint = ("rerun with --convert-dtype uint16 to widen them (value x 257)"
                    if _output_dtype(odd[0], "uint16") == "uint16" and ref_kind == _pixel_kind("uint16", odd[0]["samples_per_pixel"])
                    else "remove the file or extract it as another animal")
            ctx.fail(path, f"{kind} pixels{where}, but this animal's sections are {ref_kind} (e.g. {example}): "
                           f"refused; {hint}")
            refused.setdefault(path.name, set()).update(sc["index"] for sc in odd)
        size = sizes.get(path)
        if size is not None and ref_size is not None and not _same_size(size, ref_size):
            example = next(p.name for p, v in sizes.items() if _same_size(v, ref_size))
            ctx.fail(path, f"pixel size {size:.6g} um, but this animal's sections are {ref_size:.6g} um (e.g. {example}): "
                           "refused; one volume needs one pixel size: remove the file or extract it as another animal")
            refused.setdefault(path.name, set()).update(sc["index"] for sc in scenes)
    return refused


def _plane_choice(ctx: StageContext, path: Path, meta: dict) -> tuple[dict[int, tuple[int, int]], list[str]]:
    """(scene index -> (z plane, time point)) of the scenes that have the chosen plane, and the
    reasons for the others: a plane the scene does not have is refused, never clamped. The
    choice applies to scenes that have a choice (several z planes, several time points); a
    single plane is what it is."""
    z_choice, t_choice = ctx.params.get("z_plane"), ctx.params.get("time_point")
    chosen: dict[int, tuple[int, int]] = {}
    problems: list[str] = []
    for scene in meta["scenes"]:
        nz, nt = scene["z_planes"], scene.get("time_points", 1)
        z = nz // 2 if z_choice is None or nz == 1 else z_choice
        t = 0 if t_choice is None or nt == 1 else t_choice
        label = f"scene {scene['index'] + 1}" if len(meta["scenes"]) > 1 else "the file"
        if not 0 <= z < nz:
            problems.append(f"--z-plane {z} is out of range: {label} has {nz} z plane{'s' if nz != 1 else ''} (0-{nz - 1})")
        elif not 0 <= t < nt:
            problems.append(f"--time-point {t} is out of range: {label} has {nt} time point{'s' if nt != 1 else ''} (0-{nt - 1})")
        else:
            chosen[scene["index"]] = (z, t)
    series = sorted({sc.get("time_points", 1) for sc in meta["scenes"] if sc.get("time_points", 1) > 1})
    if series and t_choice is None:
        ctx.log.warning("%s: a time series (%s time points); extracted time point 0 only (choose another with "
                        "--time-point N)", path, ", ".join(map(str, series)))
    return chosen, problems


def _record_slides(ctx: StageContext, paths, numbers, described, file_type, refused: dict[str, set[int]]) -> list[dict]:
    """Insert new slide / section rows and update the source's metadata of existing ones.

    What describes an extracted file (its size, pixel type, z plane, time point, checksum) is
    left to `_record_sections`, once the file is written: a failed rerun must not leave rows
    describing files that are not the ones on disk.
    """
    from pipeline.stages.common import ensure_scan_run

    sections: list[dict] = []
    convert = ctx.params.get("convert_dtype")
    with ctx.session() as session:
        scan_run = ensure_scan_run(session, ctx.animal, file_type=file_type)
        for path in paths:
            meta = described.get(path)
            if meta is None:
                continue  # failed: already reported by the runner
            chosen, problems = _plane_choice(ctx, path, meta)
            if problems:
                ctx.fail(path, "; ".join(dict.fromkeys(problems)))
                refused.setdefault(path.name, set()).update(i for i in range(len(meta["scenes"])) if i not in chosen)
            usable = [sc for sc in meta["scenes"] if sc["index"] in chosen and sc["index"] not in refused.get(path.name, ())]
            if not usable:
                continue
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
            elif pixel[0] and scan_run.resolution and not _same_size(pixel[0], scan_run.resolution):
                ctx.log.warning("%s: pixel size %.4f um differs from the scan run's %.4f um (set with --resolution)",
                                path, pixel[0], scan_run.resolution)
            existing = {(r.scene_index, r.channel): r for r in session.scalars(select(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide.id))}
            for scene in usable:
                z, t = chosen[scene["index"]]
                for channel in scene["channels"]:
                    key = (scene["index"], channel["index"])
                    row = existing.get(key)
                    if row is None:  # nothing on disk yet (no checksum): describe what will be written
                        row = SlideCziToTif(FK_slide_id=slide.id, scene_index=scene["index"], scene_number=scene["index"] + 1,
                                            scene_order=scene["index"] + 1, channel=channel["index"], active=True,
                                            width=scene["width"], height=scene["height"],
                                            dtype=_output_dtype(scene, convert), samples_per_pixel=scene["samples_per_pixel"],
                                            z_plane=z, time_point=t, created=dt.datetime.now())
                        session.add(row)
                    row.file_name = ctx.layout.extracted_name(path.stem, scene["index"], channel["index"])
                    row.channel_name = channel["name"]
                    row.bbox_x, row.bbox_y = scene["x"], scene["y"]
                    row.z_planes = scene["z_planes"]
                    row.time_points = scene.get("time_points", 1)
                    sections.append({"path": str(path), "file": path.name, "scene_index": scene["index"],
                                     "channel": channel["index"], "z_plane": z, "time_point": t,
                                     "time_points": scene.get("time_points", 1),
                                     "convert_dtype": convert if _output_dtype(scene, convert) != scene["dtype"] else None})
        scan_run.number_of_slides = session.query(Slide).filter(Slide.FK_scan_run_id == scan_run.id).count()
        channels = {s["channel"] for s in sections}
        if channels:
            scan_run.channels_per_scene = max(scan_run.channels_per_scene or 0, max(channels))
    return sections


def _record_sections(ctx: StageContext, tasks: list[Task], results: dict[str, dict], incomplete: set[str]) -> None:
    """Describe each written file in its row: the row changes together with the file on disk."""
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
            # results recorded before these keys existed were made with these kwargs (same fingerprint)
            row.z_plane = result.get("z", task.kwargs["z"])
            row.time_point = result.get("t", task.kwargs["t"])
            row.width, row.height = result.get("width", row.width), result.get("height", row.height)
            row.dtype = result.get("dtype", row.dtype)
            row.samples_per_pixel = result.get("samples_per_pixel", row.samples_per_pixel)
            row.processing_duration = result.get("seconds")
            if result.get("max_value") == 0:
                ctx.log.warning("%s: every pixel is 0 in the source file (extracted as is; deactivate the section if it "
                                "should not be used)", task.describe())
        incomplete = incomplete | {Path(t.kwargs["slide_path"]).name for t in tasks if t.key not in results}
        for slide in session.scalars(select(Slide).join(ScanRun).where(ScanRun.FK_prep_id == ctx.animal)):
            slide.processed = slide.file_name not in incomplete
