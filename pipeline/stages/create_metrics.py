"""create_metrics: how alike each section and its previous neighbour are *as aligned*.

Per pair: normalised cross-correlation and mutual information on the tissue both cover
(`preps/CH<c>/<res>_metrics/<section>.json`, one `alignment_metric` row), then one plot along the
stack (`www/metrics/CH<c>_<res>.png`) with outliers in red, so a bad section or a bad transform
is seen at a glance. Full resolution reads the aligned sections window by window and takes the
mutual-information bin ranges from the aligned thumbnails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.layout import section_name
from pipeline.runner import StageContext, Task

NAME = "create_metrics"
VERSION = 1
PER_CHANNEL = False
WINDOW = (2048, 2048)


# ---------------------------------------------------------------------------- worker functions
def pair_task(fixed: str, moving: str, output: str, fixed_section: str, moving_section: str,
              fixed_thumbnail: str | None = None, moving_thumbnail: str | None = None) -> dict:
    from pipeline.imaging.metrics import PairAccumulator, overlap_range, pair_metrics
    from pipeline.imaging.tiles import tile_grid
    from pipeline.stages.section_files import open_windows, read_image

    if fixed_thumbnail is None:
        result = pair_metrics(read_image(fixed), read_image(moving))
    else:
        ranges = overlap_range(read_image(fixed_thumbnail), read_image(moving_thumbnail))
        accumulator = PairAccumulator(*ranges)
        with open_windows(fixed) as (read_a, shape_a, _), open_windows(moving) as (read_b, shape_b, _):
            if shape_a != shape_b:
                raise SlidepipeError(f"aligned sections differ in size: {shape_a} vs {shape_b}", moving)
            for y0, y1, x0, x1 in tile_grid(shape_a[:2], WINDOW):
                accumulator.add(read_a(y0, y1, x0, x1), read_b(y0, y1, x0, x1))
        result = accumulator.result()
    result = {"fixed": fixed_section, "moving": moving_section, **result}
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def outliers(values: np.ndarray, spread: float = 4.0, drop: float = 0.15, window: int = 7) -> np.ndarray:
    """Undefined values, and dips below the local trend (running median of `window` pairs) by
    more than `drop` of it and `spread` median absolute residuals. Similarity falls smoothly
    towards the ends of a brain; a bad section makes a dip."""
    finite = np.isfinite(values)
    flagged = ~finite
    if finite.sum() < window:
        return flagged
    index = np.flatnonzero(finite)
    kept = values[finite]
    half = window // 2
    trend = np.array([np.median(kept[max(0, i - half):i + half + 1]) for i in range(kept.size)])
    residual = kept - trend
    mad = np.median(np.abs(residual)) or 1e-9
    dips = (residual < -spread * 1.4826 * mad) & (residual < -drop * np.abs(trend))
    flagged[index[dips]] = True
    return flagged


def plot_task(parts: list[str], positions: list[int], output: str, title: str,
              align_flags: dict[str, str] | None = None) -> dict:
    """parts: the pair files in stack order; positions: each moving section's position now;
    align_flags: the sections align's QC flagged (name -> why), marked on the plot too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(Path(p).read_text()) for p in parts]
    names = [r["moving"] for r in rows]
    positions = np.array(positions)
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.5), dpi=100, sharex=True)
    ncc = np.array([r["ncc"] if r["ncc"] is not None else np.nan for r in rows], dtype=float)
    flagged = outliers(ncc)  # NCC is the smoother of the two along a stack
    flagged_all = {names[i] for i in np.flatnonzero(flagged)}
    by_align = np.array([n in (align_flags or {}) for n in names], dtype=bool)
    try:
        for ax, key, label in ((axes[0], "ncc", "NCC"), (axes[1], "mutual_information", "MI (bits)")):
            values = np.array([r[key] if r[key] is not None else np.nan for r in rows], dtype=float)
            ax.plot(positions, values, "-o", ms=3, color="tab:blue")
            ax.plot(positions[flagged], np.nan_to_num(values[flagged], nan=np.nanmin(values) if np.isfinite(values).any() else 0),
                    "o", ms=7, color="tab:red", label="dip / undefined")
            if by_align.any():
                ax.plot(positions[by_align], np.nan_to_num(values[by_align], nan=np.nanmin(values) if np.isfinite(values).any()
                                                           else 0), "^", ms=11, mfc="none", mew=2, color="tab:orange",
                        label="flagged by align (QC)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[1].set_xlabel("section (compared with the previous one)")
        axes[0].set_title(title, fontsize=9)
        if flagged_all or by_align.any():
            axes[0].legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        with atomic_path(Path(output)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return {"pairs": len(rows), "flagged_sections": [n for n in names if n in flagged_all],
            "align_flagged": {n: align_flags[n] for n in names if n in (align_flags or {})}}


# ------------------------------------------------------------------------------------ the stage
def run(ctx: StageContext) -> None:
    from pipeline.stages.section_files import list_sections, usable

    layout = ctx.layout
    sections = list_sections(ctx)
    flags = f"--channel {ctx.channel} --downsample {str(ctx.downsample).lower()}"
    available = usable(ctx, sections, lambda s: layout.aligned(ctx.channel, ctx.downsample, s.name), "the aligned image",
                       f"run --task align {flags} (until then its neighbours are compared across the gap)")
    if not ctx.downsample:
        available = usable(ctx, available, lambda s: layout.aligned(ctx.channel, True, s.name), "the aligned thumbnail "
                           "(full-resolution metrics take their bin ranges from it)", f"run --task align --channel {ctx.channel}")
    tasks, positions = [], []
    for fixed, moving in zip(available, available[1:]):
        a, b = layout.aligned(ctx.channel, ctx.downsample, fixed.name), layout.aligned(ctx.channel, ctx.downsample, moving.name)
        output = layout.metrics_data(ctx.channel, ctx.downsample, moving.name)
        kwargs = {"fixed": str(a), "moving": str(b), "output": str(output),
                  "fixed_section": fixed.name, "moving_section": moving.name}
        inputs = [a, b]
        if not ctx.downsample:
            ta, tb = layout.aligned(ctx.channel, True, fixed.name), layout.aligned(ctx.channel, True, moving.name)
            kwargs.update(fixed_thumbnail=str(ta), moving_thumbnail=str(tb))
            inputs += [ta, tb]
        tasks.append(Task(key=f"pair:{moving.name}", func=pair_task, kwargs=kwargs, inputs=inputs, outputs=[output],
                          params={"fixed": fixed.name, "bins": 32}, label=str(b)))
        positions.append(moving.position)
    results = ctx.execute(tasks, desc=f"metrics CH{ctx.channel}")
    _record(ctx, {s.name: s for s in sections}, results)
    done = [(t.outputs[0], p) for t, p in zip(tasks, positions) if t.key in results]
    if done:
        from pipeline.stages.align import composed_result

        with ctx.session() as session:
            align_flags = (composed_result(session, layout, available[0].name) or {}).get("flags") or {}
        png = layout.metrics_png(ctx.channel, ctx.downsample)
        parts = [p for p, _ in done]
        plotted = ctx.execute([Task(key="plot", func=plot_task,
                                    kwargs={"parts": [str(p) for p in parts], "positions": [z for _, z in done],
                                            "output": str(png),
                                            "title": f"{ctx.animal} CH{ctx.channel} {ctx.resolution}: similarity of each "
                                                     "section to the previous one, as aligned",
                                            "align_flags": align_flags},
                                    inputs=parts, outputs=[png],
                                    params={"positions": [z for _, z in done], "align_flags": align_flags},
                                    label=str(png))], desc="metrics plot")
        flagged = plotted.get("plot", {}).get("flagged_sections")
        if flagged:
            ctx.log.warning("create_metrics: sections that differ most from their neighbour: %s (see %s)",
                            ", ".join(flagged), png)
        if align_flags:
            ctx.log.warning("create_metrics: sections flagged by align's QC (orange on the plot): %s",
                            "; ".join(f"{name}: {why}" for name, why in align_flags.items()))


def _record(ctx: StageContext, by_name, results: dict[str, dict]) -> None:
    from sqlalchemy import select

    from db.models import AlignmentMetric

    def clean(value):
        return None if value is None or not np.isfinite(value) else float(value)

    with ctx.session() as session:
        for data in results.values():
            moving, fixed = by_name[data["moving"]], by_name[data["fixed"]]
            row = session.scalars(select(AlignmentMetric).where(
                AlignmentMetric.FK_prep_id == ctx.animal, AlignmentMetric.FK_section_id == moving.row_id,
                AlignmentMetric.channel == ctx.channel, AlignmentMetric.resolution == ctx.resolution)).first()
            values = {"FK_fixed_section_id": fixed.row_id, "section": section_name(moving.position), "ncc": clean(data["ncc"]),
                      "mutual_information": clean(data["mutual_information"]),
                      "overlap_fraction": clean(data["overlap_fraction"])}
            if row is None:
                session.add(AlignmentMetric(FK_prep_id=ctx.animal, FK_section_id=moving.row_id, channel=ctx.channel,
                                            resolution=ctx.resolution, FK_pipeline_run_id=ctx.run_id, **values))
            elif any(getattr(row, k) != v for k, v in values.items()):
                for k, v in values.items():
                    setattr(row, k, v)
                row.FK_pipeline_run_id = ctx.run_id
