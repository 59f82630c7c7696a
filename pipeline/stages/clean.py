"""clean: mask, crop to the tissue, turn/mirror (scan_run rotation, flip, flop), place centred on
the animal's canvas; optional intensity normalisation of channel 1.

The geometry of every section is decided here in the main process from the channel-1 thumbnail
masks, and passed to the tasks as parameters: a changed mask, orientation or canvas changes the
fingerprint of exactly the sections it affects. The canvas is the largest oriented tissue box
plus a margin, recorded at full resolution in scan_run.width/height on first use and reused
afterwards (set both to 0 to have it recomputed). Full resolution uses the same geometry times
the thumbnail factor and is written tile by tile.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.runner import StageContext, Task

NAME = "clean"
VERSION = 1
PER_CHANNEL = True

CANVAS_MARGIN = 0.05
"""Fraction of the largest tissue box added on each side of the canvas."""
CANVAS_TURN_ALLOWANCE_DEG = 15.0
"""Room for sections to be turned this much by alignment without leaving the canvas."""
NORMALISE_PERCENTILES = (1.0, 99.0)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from pipeline.stages.common import _bool

    group.add_argument("--normalise", type=_bool, default=False, metavar="true|false",
                       help="clean: stretch channel 1's tissue intensities (1st-99th percentile) to the full range")


# ---------------------------------------------------------------------------- worker functions
def _intensity_map(thumbnail: str | None, thumb_mask: str | None, percentiles):
    if thumbnail is None:
        return None, None
    from pipeline.imaging.normalise import apply_stretch, stretch_limits
    from pipeline.stages.section_files import read_image

    low, high = stretch_limits(read_image(thumbnail), read_image(thumb_mask) > 0, *percentiles)
    return (lambda window: apply_stretch(window, low, high)), [low, high]


def clean_thumbnail(source: str, mask: str, output: str, png: str, geometry: dict,
                    normalise_from: str | None = None, percentiles=NORMALISE_PERCENTILES) -> dict:
    from pipeline.imaging.orient import CleanGeometry, clean_section
    from pipeline.stages.section_files import read_image, write_image, write_png

    image = read_image(source)
    mask_image = read_image(mask)
    if mask_image.shape[:2] != image.shape[:2]:
        raise SlidepipeError(f"mask is {mask_image.shape[1]} x {mask_image.shape[0]} px, the section thumbnail "
                             f"{image.shape[1]} x {image.shape[0]}", mask)
    intensity, limits = _intensity_map(normalise_from, mask if normalise_from else None, percentiles)
    cleaned = clean_section(image, mask_image, CleanGeometry.from_dict(geometry), intensity)
    if not cleaned.any():
        raise SlidepipeError("the cleaned section is all zero (masked tissue has no signal)", source)
    write_image(output, cleaned)
    write_png(png, cleaned)
    return {"shape": list(cleaned.shape), "dtype": cleaned.dtype.name, "stretch": limits}


def clean_full(source: str, mask: str, output: str, geometry: dict, factor: int,
               normalise_from: str | None = None, normalise_mask: str | None = None,
               percentiles=NORMALISE_PERCENTILES) -> dict:
    """Full resolution, one output tile at a time: memory is set by the tile, not the section."""
    from pipeline.imaging.orient import CleanGeometry, clean_window
    from pipeline.imaging.tiles import tile_grid
    from pipeline.stages.section_files import TILE, open_windows, write_tiled

    big = CleanGeometry.from_dict(geometry).scaled(factor)
    intensity, limits = _intensity_map(normalise_from, normalise_mask, percentiles)
    with open_windows(source) as (read, shape, dtype), open_windows(mask) as (read_mask, mask_shape, _):
        if mask_shape[:2] != shape[:2]:
            raise SlidepipeError(f"full-resolution mask is {mask_shape[1]} x {mask_shape[0]} px, the section "
                                 f"{shape[1]} x {shape[0]}", mask)
        out_shape = tuple(big.canvas) + tuple(shape[2:])
        tiles = (clean_window(big, read, read_mask, shape, dtype, y0, y1, x0, x1, intensity)
                 for y0, y1, x0, x1 in tile_grid(big.canvas, TILE))
        write_tiled(output, out_shape, dtype, tiles)
    return {"shape": list(out_shape), "dtype": np.dtype(dtype).name, "stretch": limits}


# ------------------------------------------------------------------------------------ the stage
def plan_geometries(ctx: StageContext, sections) -> dict[str, dict]:
    """Thumbnail geometry of every section (each has a usable mask); records the canvas in scan_run."""
    from pipeline.imaging.orient import (
        Orientation, SectionTooLargeError, canvas_shape, oriented_shape, plan_clean, tissue_box,
    )
    from pipeline.stages.common import require_scan_run
    from pipeline.stages.section_files import read_image

    masks = {s.name: read_image(ctx.layout.mask(s.name, True, "masked")) > 0 for s in sections}
    with ctx.session() as session:
        scan_run = require_scan_run(session, ctx.animal)
        orientation = Orientation(scan_run.rotation or 0, scan_run.flip, scan_run.flop)
        if scan_run.width and scan_run.height:
            canvas = (-(-scan_run.height // THUMBNAIL_FACTOR), -(-scan_run.width // THUMBNAIL_FACTOR))
        else:
            if not masks:
                raise SlidepipeError("no section has a mask: run --task mask first")
            placed = []
            for mask in masks.values():
                y0, y1, x0, x1 = tissue_box(mask)
                placed.append(oriented_shape((y1 - y0, x1 - x0), orientation))
            canvas = canvas_shape(placed, CANVAS_MARGIN, turn_allowance_deg=CANVAS_TURN_ALLOWANCE_DEG)
            scan_run.height, scan_run.width = canvas[0] * THUMBNAIL_FACTOR, canvas[1] * THUMBNAIL_FACTOR
            ctx.log.info("clean: canvas %d x %d px at full resolution (recorded in scan_run)", scan_run.width, scan_run.height)
    geometries = {}
    for s in sections:
        try:
            geometries[s.name] = plan_clean(masks[s.name], orientation, canvas).to_dict()
        except SectionTooLargeError as exc:
            ctx.fail(ctx.layout.mask(s.name, True, "masked"), f"{s.label}: {exc.reason}")
    return geometries


def run(ctx: StageContext) -> None:
    from pipeline.stages.section_files import list_sections, usable

    sections = usable(ctx, list_sections(ctx), lambda s: s.thumbnail if ctx.downsample else s.full,
                      f"the extracted channel-{ctx.channel} section", "run --task extract again (its error says why)")
    sections = usable(ctx, sections, lambda s: ctx.layout.mask(s.name, True, "masked"), "the mask",
                      "run --task mask (if no tissue was found there, paint it in the overlay)")
    if not ctx.downsample:
        sections = usable(ctx, sections, lambda s: ctx.layout.mask(s.name, False, "masked"), "the full-resolution mask",
                          "run --task mask --downsample false")
    geometries = plan_geometries(ctx, sections)
    normalise = bool(ctx.params.get("normalise"))
    if normalise and ctx.channel != 1:
        ctx.log.info("clean: --normalise applies to channel 1 only; channel %d is not normalised", ctx.channel)
        normalise = False
    layout = ctx.layout
    tasks = []
    for s in sections:
        if s.name not in geometries:
            continue
        geometry = geometries[s.name]
        thumb_mask = layout.mask(s.name, True, "masked")
        output = layout.cleaned(ctx.channel, ctx.downsample, s.name)
        params = {"geometry": geometry, "normalise": list(NORMALISE_PERCENTILES) if normalise else None}
        if ctx.downsample:
            png = layout.section_png(ctx.channel, True, s.name)
            tasks.append(Task(
                key=f"clean:{s.name}", func=clean_thumbnail,
                kwargs={"source": str(s.thumbnail), "mask": str(thumb_mask), "output": str(output), "png": str(png),
                        "geometry": geometry, "normalise_from": str(s.thumbnail) if normalise else None},
                inputs=[s.thumbnail, thumb_mask], outputs=[output, png], params=params, label=str(s.thumbnail)))
        else:
            full_mask = layout.mask(s.name, False, "masked")
            extra = [s.thumbnail, thumb_mask] if normalise else []
            tasks.append(Task(
                key=f"clean:{s.name}", func=clean_full,
                kwargs={"source": str(s.full), "mask": str(full_mask), "output": str(output), "geometry": geometry,
                        "factor": THUMBNAIL_FACTOR, "normalise_from": str(s.thumbnail) if normalise else None,
                        "normalise_mask": str(thumb_mask) if normalise else None},
                inputs=[s.full, full_mask, *extra], outputs=[output], params={**params, "factor": THUMBNAIL_FACTOR},
                label=str(s.full)))
    ctx.execute(tasks, desc=f"clean CH{ctx.channel}")
