"""mask: tissue masks from channel-1 thumbnails; hand-edited overlays win; full-res masks in tiles.

`--downsample true`: one mask (0/255) and one editable coloured overlay per section. An overlay
that differs from the one this stage wrote (or that a user put there) is a hand edit, unless it is
exactly the automatic overlay (one a killed run wrote and did not record): the mask is
then read from it, never recomputed, and the file record of the mask names the edited overlay as
its input (with how many pixels the edit changed). Delete an overlay to go back to the automatic
mask. `--downsample false`: the thumbnail masks upsampled nearest-neighbour to full resolution,
written tile by tile. Every channel uses these channel-1 masks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.runner import StageContext, Task

NAME = "mask"
VERSION = 1
LOCK_BY = ("resolution",)  # the masks serve every channel (runner.lock_key)
PER_CHANNEL = False

MASKERS = ("classical",)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--masker", choices=MASKERS, default="classical",
                       help="mask: how tissue is found (only the classical threshold masker is shipped)")
    group.add_argument("--mask-threshold-scale", type=float, default=None,
                       help="mask: multiply the Otsu threshold (< 1 keeps dimmer tissue; default 1)")


def make_masker(name: str = "classical", threshold_scale: float | None = None):
    from pipeline.imaging.mask import ClassicalMasker, MaskParams

    if name != "classical":
        raise SlidepipeError(f"unknown masker {name!r} (available: {', '.join(MASKERS)})")
    params = MaskParams() if threshold_scale is None else MaskParams(threshold_scale=threshold_scale)
    return ClassicalMasker(params)


# ---------------------------------------------------------------------------- worker functions
def detect_mask(thumbnail: str, mask_path: str, overlay_path: str, masker: str, threshold_scale: float | None) -> dict:
    """Automatic mask + overlay. With no tissue the overlay is still written (for painting) and
    the task fails, so no mask file claims a section that has none."""
    from pipeline.imaging.mask import mask_overlay
    from pipeline.stages.section_files import read_image, write_image

    image = read_image(thumbnail)
    mask = make_masker(masker, threshold_scale)(image)
    write_image(overlay_path, mask_overlay(image, mask))
    if not mask.any():
        raise SlidepipeError("no tissue found in the channel-1 thumbnail (paint it green in the overlay "
                             f"{Path(overlay_path).name}, or deactivate the section)", thumbnail)
    write_image(mask_path, (mask * 255).astype(np.uint8))
    return {"source": "automatic", "tissue_pixels": int(mask.sum()), "shape": list(mask.shape)}


def mask_from_edit(overlay_path: str, thumbnail: str, mask_path: str, masker: str, threshold_scale: float | None) -> dict:
    """Mask read back from a hand-edited overlay; reports how much the edit changed."""
    from pipeline.imaging.mask import mask_from_overlay
    from pipeline.stages.section_files import read_image, write_image

    overlay = read_image(overlay_path)
    image = read_image(thumbnail)
    if overlay.shape[:2] != image.shape[:2]:
        raise SlidepipeError(f"edited overlay is {overlay.shape[1]} x {overlay.shape[0]} px but the thumbnail is "
                             f"{image.shape[1]} x {image.shape[0]}: keep the size when editing", overlay_path)
    mask = mask_from_overlay(overlay)
    if not mask.any():
        raise SlidepipeError("the edited overlay marks no tissue (no green-dominant pixel)", overlay_path)
    automatic = make_masker(masker, threshold_scale)(image)
    write_image(mask_path, (mask * 255).astype(np.uint8))
    return {"source": "edited overlay", "tissue_pixels": int(mask.sum()), "shape": list(mask.shape),
            "pixels_changed_by_edit": int(np.count_nonzero(mask != automatic))}


def full_mask(thumb_mask: str, full_path: str, height: int, width: int) -> dict:
    """Thumbnail mask upsampled nearest-neighbour to the full section, one tile at a time."""
    from pipeline.imaging.mask import upsample_mask_window
    from pipeline.imaging.tiles import tile_grid
    from pipeline.stages.section_files import TILE, read_image, write_tiled

    small = read_image(thumb_mask)
    expected = (-(-height // THUMBNAIL_FACTOR), -(-width // THUMBNAIL_FACTOR))
    if small.shape[:2] != expected:
        raise SlidepipeError(f"thumbnail mask is {small.shape[1]} x {small.shape[0]} px, expected "
                             f"{expected[1]} x {expected[0]} for a {width} x {height} section", thumb_mask)
    tiles = (upsample_mask_window(small, THUMBNAIL_FACTOR, y0, y1, x0, x1)
             for y0, y1, x0, x1 in tile_grid((height, width), TILE))
    write_tiled(full_path, (height, width), np.uint8, tiles)
    return {"shape": [height, width], "tissue_pixels_thumbnail": int(np.count_nonzero(small))}


# ------------------------------------------------------------------------------------ the stage
def overlay_edited(session, layout, overlay: Path) -> bool:
    """True when the overlay on disk is not the one this stage last wrote (a hand edit, or a
    file a user put there)."""
    from sqlalchemy import select

    from db.models import FileLog
    from pipeline.atomic import sha256_file

    if not overlay.is_file():
        return False
    written = session.scalars(
        select(FileLog).where(FileLog.path == layout.relative(overlay), FileLog.kind == "output")
        .order_by(FileLog.id.desc()).limit(1)
    ).first()
    if written is None:
        return True
    st = overlay.stat()
    if written.size == st.st_size and written.mtime_ns == st.st_mtime_ns:
        return False
    return sha256_file(overlay) != written.checksum


def automatic_overlay(overlay: Path, thumbnail: Path, masker: str, threshold_scale: float | None) -> bool:
    """Whether the overlay holds exactly what `detect_mask` draws for this thumbnail: then an
    unrecorded one is no hand edit but the file of a run killed between its rename and its record
    (taking it for an edit would record the mask as made from it, unlike an uninterrupted run).
    Only asked for overlays `overlay_edited` flags; an edit that changes nothing is no edit."""
    from pipeline.imaging.mask import mask_overlay
    from pipeline.stages.section_files import read_image

    try:
        drawn = read_image(overlay)
    except SlidepipeError:  # unreadable: an edit gone wrong, which mask_from_edit reports
        return False
    image = read_image(thumbnail)
    automatic = mask_overlay(image, make_masker(masker, threshold_scale)(image))
    return drawn.shape == automatic.shape and drawn.dtype == automatic.dtype and bool(np.array_equal(drawn, automatic))


def run(ctx: StageContext) -> None:
    from pipeline.stages.section_files import list_sections, usable

    if ctx.channel != 1:
        ctx.log.info("mask: masks are made from channel 1 and used by every channel")
    sections = list_sections(ctx, channel=1)
    masker = ctx.params.get("masker") or "classical"
    scale = ctx.params.get("mask_threshold_scale")
    masker_params = make_masker(masker, scale).describe()
    if not ctx.downsample:
        _run_full(ctx, sections)
        return
    layout = ctx.layout
    _warn_positional_overlays(ctx, sections)
    sections = usable(ctx, sections, lambda s: s.thumbnail, "the extracted channel-1 thumbnail",
                      "run --task extract again (its error says why this section failed)")
    tasks = []
    with ctx.session() as session:
        edited = {s.name: overlay_edited(session, layout, layout.mask(s.name, True, "colored")) for s in sections}
    for s in sections:
        if edited[s.name] and automatic_overlay(layout.mask(s.name, True, "colored"), s.thumbnail, masker, scale):
            edited[s.name] = False  # written by a run killed before it recorded it: made again, recorded
    for s in sections:
        mask_path = layout.mask(s.name, True, "masked")
        overlay = layout.mask(s.name, True, "colored")
        kwargs = {"thumbnail": str(s.thumbnail), "mask_path": str(mask_path), "masker": masker, "threshold_scale": scale}
        if edited[s.name]:
            tasks.append(Task(key=f"edit:{s.name}", func=mask_from_edit, kwargs={**kwargs, "overlay_path": str(overlay)},
                              inputs=[overlay, s.thumbnail], outputs=[mask_path], params=masker_params,
                              label=str(overlay)))
        else:
            tasks.append(Task(key=f"auto:{s.name}", func=detect_mask, kwargs={**kwargs, "overlay_path": str(overlay)},
                              inputs=[s.thumbnail], outputs=[mask_path, overlay], params=masker_params,
                              label=str(s.thumbnail)))
    results = ctx.execute(tasks, desc="masks")
    for task in tasks:
        result = results.get(task.key)
        if result and result.get("source") == "edited overlay":
            ctx.log.info("mask %s: taken from the hand-edited overlay (%d pixels differ from the automatic mask)",
                         task.key.split(":", 1)[1], result["pixels_changed_by_edit"])


def _warn_positional_overlays(ctx: StageContext, sections) -> None:
    """Overlays named by position (000.tif ...) come from a slidepipe older than section keys:
    an edit in one of them would be ignored without a word, so say so."""
    folder = ctx.layout.masks_dir("colored", True)
    if not folder.is_dir():
        return
    old = sorted(p.name for p in folder.glob("[0-9][0-9][0-9].tif"))
    if old:
        ctx.log.warning("mask: %s holds overlays named by position (%s): masks are now named by section "
                        "(<slide>_S<scene>.tif, e.g. %s.tif); rename an edited one to its section's name, "
                        "then run --task mask again", folder, ", ".join(old[:5]) + (" ..." if len(old) > 5 else ""),
                        sections[0].name)


def _run_full(ctx: StageContext, sections) -> None:
    from pipeline.stages.section_files import usable

    sections = usable(ctx, sections, lambda s: ctx.layout.mask(s.name, True, "masked"), "the thumbnail mask",
                      "run --task mask --downsample true first")
    tasks = []
    for s in sections:
        thumb_mask = ctx.layout.mask(s.name, True, "masked")
        full = ctx.layout.mask(s.name, False, "masked")
        tasks.append(Task(key=f"full:{s.name}", func=full_mask,
                          kwargs={"thumb_mask": str(thumb_mask), "full_path": str(full), "height": s.height, "width": s.width},
                          inputs=[thumb_mask], outputs=[full], params={"shape": [s.height, s.width], "factor": THUMBNAIL_FACTOR},
                          label=str(thumb_mask)))
    ctx.execute(tasks, desc="full-resolution masks")
