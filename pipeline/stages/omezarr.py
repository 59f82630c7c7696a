"""omezarr: the aligned stack of one channel -> www/omezarr/C<c>[T].ome.zarr (multiscale OME-Zarr).

One image per channel, like the precomputed layers C1, C2...: each channel's aligned stack is
made (and re-made) by its own runs, so a store per channel is rewritten only when that channel
changes; see docs/format-omezarr.md. Pixel sizes come from the scan run in the DB, the display
window from the published voxels themselves (published_windows, the rule the precomputed layer
follows too; not the histogram stage, which counts the sections before clean). The store
is one runner task: one file_log row with a per-level manifest as its result, the aligned
sections as inputs. A killed run resumes inside the converter (completed slabs are kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.runner import StageContext, Task

NAME = "omezarr"
VERSION = 2  # 2: level translations, a completion signature covering the level factors
PER_CHANNEL = True
REFRESH_PAGES = True  # create_pipeline runs the web stage after this one: the pages link the new layer

STACK_CHUNK = (16, 128, 128)
"""Default chunk (z, y, x) for section stacks: thin in z, because sections are viewed plane by
plane and a 64-deep chunk would fetch 64 sections to draw one (the standalone default, 64^3,
suits isotropic volumes)."""
STAGE_MAX_GB = 0.8
"""The stage's default --max-gb: issue 8's bound per process, whatever the section size (the
standalone converter's default stays a quarter of free memory)."""


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from pipeline.publish.omezarr import NGFF_ZARR_FORMAT, xyz_triple
    from pipeline.publish.pyramid import ALGORITHMS

    # --chunk-size is shared with the neuroglancer stage (same X,Y,Z order); whichever module
    # declares it first parses it, both into an (x, y, z) tuple.
    group.add_argument("--chunk-size", type=xyz_triple, default=None, metavar="X,Y,Z",
                       help="neuroglancer/omezarr: chunk size of the published volume (omezarr default 128,128,16)")
    group.add_argument("--ngff-version", choices=sorted(NGFF_ZARR_FORMAT), default=None,
                       help="omezarr: 0.5 (Zarr v3, default) or 0.4 (Zarr v2)")
    group.add_argument("--shard-size", type=xyz_triple, default=None, metavar="X,Y,Z",
                       help="omezarr: Zarr v3 shard shape, a multiple of the chunk (default: no sharding)")
    group.add_argument("--nlevels", type=int, default=None,
                       help="omezarr: pyramid levels including full resolution (default: until the top fits a chunk)")
    group.add_argument("--algorithm", choices=ALGORITHMS, default=None, help="omezarr: downsampling (default mean)")
    group.add_argument("--max-gb", type=float, default=None,
                       help=f"omezarr: peak memory of the conversion in GB (default {STAGE_MAX_GB:g}: a "
                            "worker's share on a cluster node)")


# ---------------------------------------------------------------------------------------
def write_store(sections: list[str], store: str, options: dict[str, Any]) -> dict:
    """Worker: convert (or resume) the store, validate it, describe it for file_log."""
    from pipeline.publish.omezarr import OmeZarrOptions, convert_stack, describe_store

    opts = OmeZarrOptions(**{k: tuple(v) if isinstance(v, list) and k != "windows" else v
                             for k, v in published_windows(sections, options).items()})
    result = convert_stack([Path(p) for p in sections], Path(store), opts)
    manifest = describe_store(Path(store))
    return {**manifest, "status": result.status, "slabs_written": result.slabs_written,
            "slabs_skipped": result.slabs_skipped, "seconds": round(result.seconds, 3),
            "windows": result.windows}


def published_windows(sections: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the display window of every channel of the published data (the aligned
    sections: the rule of pipeline.publish.common.stack_windows, which the neuroglancer stage's
    layer follows too), unless windows were given. Runs in the worker: it reads every section."""
    from pipeline.publish.common import stack_windows

    if options.get("windows"):
        return options
    return {**options, "windows": [list(w) for w in stack_windows(sections, per_sample=True)]}


def run(ctx: StageContext) -> None:
    from pipeline.publish.omezarr import probe_stack, zyx
    from pipeline.stages.common import aligned_stack

    sections, xy, z_um = aligned_stack(ctx)
    store = ctx.layout.omezarr(ctx.channel, ctx.downsample)
    # An RGB (brightfield) stack is one 3-channel image (channels red, green, blue), each with a
    # window of its own published voxels (published_windows, per sample).
    rgb = probe_stack(sections[:1]).samples == 3
    options: dict[str, Any] = {
        "ngff_version": ctx.params.get("ngff_version") or "0.5",
        "chunk": zyx(ctx.params.get("chunk_size")) or STACK_CHUNK,
        "shard": zyx(ctx.params.get("shard_size")),
        "nlevels": ctx.params.get("nlevels"),
        "algorithm": ctx.params.get("algorithm") or "mean",
        "voxel_um": [float(z_um), float(xy), float(xy)],
        "windows": None,  # from the sections, in the worker (published_windows): inputs decide it
        "channel_names": None if rgb else [f"C{ctx.channel}"],
        "name": f"{ctx.animal} C{ctx.channel}{'T' if ctx.downsample else ''}",
        "threads": ctx.settings.workers,
    }
    # Everything that changes the store's bytes (the memory cap and threads do not).
    params = {k: v for k, v in options.items() if k != "threads"}
    max_gb = ctx.params.get("max_gb")
    options.update(overwrite=True, max_gb=max_gb or STAGE_MAX_GB, max_gb_is_default=max_gb is None)
    task = Task(key=store.name, func=write_store, inputs=sections, outputs=[store], params=params, label=str(store),
                kwargs={"sections": [str(p) for p in sections], "store": str(store), "options": options})
    results = ctx.execute([task], desc=f"{store.name}: {len(sections)} sections -> OME-Zarr {options['ngff_version']}")
    if store.name in results:
        r = results[store.name]
        ctx.log.info("%s: NGFF %s, %d levels, %d files, %.1f MB", store, r.get("ngff_version"),
                     len(r.get("levels", [])), r.get("files", 0), r.get("bytes", 0) / 1e6)
