"""histogram: masked intensity histogram of every section (data + plot) and the channel's sum.

Counts are taken from the extracted section (before any normalisation) under the channel-1
mask, at the dtype's full range, and plotted up to the data's real bit depth. Full resolution
(`--downsample false`) counts in tiles; thumbnails are area averages, so their histograms are
smoother than the full-resolution ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.runner import StageContext, Task

NAME = "histogram"
VERSION = 1
PER_CHANNEL = True


# ---------------------------------------------------------------------------- worker functions
def _save_counts(path: str, counts: np.ndarray, **meta) -> None:
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, counts=counts, **{k: np.asarray(v) for k, v in meta.items()})


def _plot(path: str, counts: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.imaging.histogram import real_bit_depth

    top = 1 << real_bit_depth(counts)
    group = max(1, top // 256)  # at most 256 bars: single values of 16-bit data are too sparse to see
    sums = counts[:top].reshape(-1, group).sum(axis=1)
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    try:
        ax.bar(np.arange(sums.size) * group, sums, width=group, align="edge", color="tab:blue", linewidth=0)
        ax.set_yscale("log")
        ax.set_xlim(0, top - 1)
        ax.set_xlabel(f"intensity ({real_bit_depth(counts)}-bit data)")
        ax.set_ylabel(f"pixels per {group} values" if group > 1 else "pixels")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def section_histogram(source: str, mask: str, data: str, png: str, title: str, full: bool) -> dict:
    from pipeline.imaging.histogram import histogram_summary, masked_histogram
    from pipeline.imaging.tiles import tile_grid
    from pipeline.stages.section_files import TILE, open_windows, read_image

    if full:
        with open_windows(source) as (read, shape, _), open_windows(mask) as (read_mask, mask_shape, _):
            if mask_shape[:2] != shape[:2]:
                raise SlidepipeError(f"mask is {mask_shape[1]} x {mask_shape[0]} px, the section {shape[1]} x {shape[0]}", mask)
            counts = None
            for y0, y1, x0, x1 in tile_grid(shape[:2], (TILE[0] * 4, TILE[1] * 4)):
                part = masked_histogram(read(y0, y1, x0, x1), read_mask(y0, y1, x0, x1) > 0)
                counts = part if counts is None else counts + part
    else:
        image, mask_image = read_image(source), read_image(mask) > 0
        if mask_image.shape != image.shape[:2]:
            raise SlidepipeError(f"mask is {mask_image.shape[1]} x {mask_image.shape[0]} px, the thumbnail "
                                 f"{image.shape[1]} x {image.shape[0]}", mask)
        counts = masked_histogram(image, mask_image)
    summary = histogram_summary(counts)
    if summary["pixels"] == 0:
        raise SlidepipeError("the mask selects no pixel of this section", mask)
    _save_counts(data, counts)
    _plot(png, counts, title)
    return summary


def combined_histogram(parts: list[str], data: str, png: str, title: str) -> dict:
    from pipeline.imaging.histogram import histogram_summary

    total = None
    for part in parts:
        with np.load(part) as loaded:
            counts = loaded["counts"]
        if total is not None and counts.shape != total.shape:
            raise SlidepipeError(f"histogram has {counts.size} bins, the others {total.size}: mixed dtypes in one channel", part)
        total = counts if total is None else total + counts
    _save_counts(data, total)
    _plot(png, total, title)
    return {**histogram_summary(total), "sections": len(parts)}


# ------------------------------------------------------------------------------------ the stage
def run(ctx: StageContext) -> None:
    from pipeline.stages.section_files import list_sections, usable

    layout = ctx.layout
    resolution = ctx.resolution
    sections = usable(ctx, list_sections(ctx), lambda s: s.thumbnail if ctx.downsample else s.full,
                      f"the extracted channel-{ctx.channel} section", "run --task extract again (its error says why)")
    sections = usable(ctx, sections, lambda s: layout.mask(s.name, ctx.downsample, "masked"), f"the {resolution} mask",
                      "run --task mask" + ("" if ctx.downsample else " --downsample false"))
    tasks = []
    for s in sections:
        mask = layout.mask(s.name, ctx.downsample, "masked")
        source = s.thumbnail if ctx.downsample else s.full
        data = layout.histogram_data(ctx.channel, ctx.downsample, s.name)
        png = layout.histogram_png(ctx.channel, ctx.downsample, s.name)
        tasks.append(Task(key=f"histogram:{s.name}", func=section_histogram,
                          kwargs={"source": str(source), "mask": str(mask), "data": str(data), "png": str(png),
                                  "title": f"{ctx.animal} CH{ctx.channel} section {s.name} ({resolution}, masked)",
                                  "full": not ctx.downsample},
                          inputs=[source, mask], outputs=[data, png], label=str(source)))
    results = ctx.execute(tasks, desc=f"histograms CH{ctx.channel}")
    # Sorted by name: the sum does not depend on the order, so a reorder does not redo it.
    parts = sorted((t.outputs[0] for t in tasks if t.key in results), key=lambda p: p.name)
    if not parts:
        return
    data, png = layout.histogram_data(ctx.channel, ctx.downsample), layout.histogram_png(ctx.channel, ctx.downsample)
    ctx.execute([Task(key="combined", func=combined_histogram,
                      kwargs={"parts": [str(p) for p in parts], "data": str(data), "png": str(png),
                              "title": f"{ctx.animal} CH{ctx.channel}: {len(parts)} sections ({resolution}, masked)"},
                      inputs=parts, outputs=[data, png], label=str(data))], desc="combined histogram")
