"""neuroglancer: the aligned stack of one channel -> a Neuroglancer precomputed layer.

`--downsample true` publishes the thumbnail stack as C<c>T, `false` the full-resolution stack
as C<c>, under www/neuroglancer_data/. Step 1 (one runner task per section) writes the
temporary C<c>[T]_rechunkme layer; step 2 (one runner task for the layer) runs igneous's
transfer and pyramid, verifies the result and records the layer in file_log with a per-mip
manifest as its result. `--sharded` packs every level into Neuroglancer's sharded format (same
voxels, a few .shard files per level), slab by slab too. See docs/format-precomputed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path, pause_point
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.runner import StageContext, Task

NAME = "neuroglancer"
VERSION = 2  # 2: provenance with the published data's display window, relative paths, no user@host
PER_CHANNEL = True
REFRESH_PAGES = True  # create_pipeline runs the web stage after this one: the pages link the new layer

MARKER_DIR = "slidepipe_sections"
"""Inside the step-1 layer: one small JSON per written section, the step-1 tasks' recorded
outputs. They live (and are deleted) with that layer, so a missing layer means unwritten sections."""


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers x,y,z, got {text!r}")
    return values  # type: ignore[return-value]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from pipeline.publish.precomputed import DEFAULT_CHUNK, RECHUNKME_CHUNK

    group.add_argument("--chunk-size", type=_triple, default=None, metavar="X,Y,Z",
                       help=f"neuroglancer: chunk size of the published layer (default {','.join(map(str, DEFAULT_CHUNK))})")
    group.add_argument("--rechunkme-chunk-size", type=_triple, default=None, metavar="X,Y,Z",
                       help=f"neuroglancer: chunk size of the temporary step-1 layer (default "
                            f"{','.join(map(str, RECHUNKME_CHUNK))})")
    group.add_argument("--keep-rechunkme", action="store_true", default=None,
                       help="neuroglancer: keep the temporary step-1 layer after a verified transfer")
    group.add_argument("--sharded", action="store_true", default=None,
                       help="neuroglancer: write every level in Neuroglancer's sharded format (a few large .shard files "
                            "per level instead of a file per chunk)")
    group.add_argument("--shard-bytes", type=int, default=None, metavar="N",
                       help="neuroglancer --sharded: about N uncompressed bytes of one channel per shard (default "
                            "536870912, 512 MiB: e.g. 2048x2048x64-voxel shards of uint16 (256,256,16) chunks); "
                            "sets the file count, not the memory used")
    group.add_argument("--slab-depth", type=int, default=None, metavar="N",
                       help="neuroglancer: publish N sections at a time (a multiple of the chunk z), so the temporary "
                            "step-1 files never exceed one slab (default: whole chunks holding about 1 GB, at least "
                            "one chunk deep; 0: the whole stack at once)")
    group.add_argument("--mips", type=int, default=None, metavar="N",
                       help="neuroglancer: at most N levels above full resolution (default: until the top level is small)")
    group.add_argument("--verify-sample", type=int, default=None, metavar="N",
                       help="neuroglancer: verification budget per level, in decoded chunks (default 32; "
                            "0: decode and compare every chunk); every chunk file's presence is always checked")


# ---------------------------------------------------------------------------------------
# worker functions (module level: picklable)
def rechunk_section(layer_dir: str, tiff_path: str, z: int, width: int, height: int, marker: str) -> dict:
    from pipeline.publish.precomputed import write_rechunkme_section

    result = write_rechunkme_section(layer_dir, tiff_path, z, width, height)
    _write_marker(marker, {**result, "source": tiff_path})
    return result


def pad_section(layer_dir: str, z: int, marker: str) -> dict:
    from pipeline.publish.precomputed import write_padding_section

    result = write_padding_section(layer_dir, z)
    _write_marker(marker, result)
    return result


def publish(src_dir: str, dest_dir: str, sections: list[str], chunk_size: list[int], max_mips: int | None,
            workers: int, queue_url: str | None, keep_rechunkme: bool, sample: int | None, description: str,
            params: dict, root: str, sharded: bool = False, shard_bytes: int | None = None) -> dict:
    from pipeline.publish.precomputed import publish_layer

    return publish_layer(src_dir, dest_dir, sections, chunk_size=chunk_size, max_mips=max_mips, workers=workers,
                         queue_url=queue_url, keep_rechunkme=keep_rechunkme, sample=sample,
                         description=description, params=params, root=root, sharded=sharded, shard_bytes=shard_bytes)


def publish_slab(src_dir: str, partial_dir: str, sections: list[str], z0: int, z1: int, chunk_size: list[int],
                 max_mips: int | None, workers: int, queue_url: str | None, sample: int | None, keep_rechunkme: bool,
                 section_markers: list[str], marker: str, sharded: bool = False, shard_bytes: int | None = None) -> dict:
    """One verified slab; then its sections' markers go before their chunks, so a kill in between
    leaves sections that are written again, never markers vouching for deleted chunks."""
    from pipeline.publish.precomputed import delete_rechunkme_slab, publish_slab as build_slab

    result = build_slab(src_dir, partial_dir, sections, z0, z1, chunk_size=chunk_size, max_mips=max_mips,
                        workers=workers, queue_url=queue_url, sample=sample, sharded=sharded, shard_bytes=shard_bytes)
    if not keep_rechunkme:
        for path in section_markers:
            Path(path).unlink(missing_ok=True)
        result["deleted"] = delete_rechunkme_slab(src_dir, z0, z1)
    _write_marker(marker, result)
    return result


def finish_slabs(src_dir: str, partial_dir: str, dest_dir: str, sections: list[str], slabs: list[dict],
                 chunk_size: list[int], max_mips: int | None, workers: int, queue_url: str | None,
                 keep_rechunkme: bool, sample: int | None, description: str, params: dict, root: str,
                 sharded: bool = False, shard_bytes: int | None = None) -> dict:
    from pipeline.publish.precomputed import finish_slab_build

    return finish_slab_build(src_dir, partial_dir, dest_dir, sections, slabs, chunk_size=chunk_size,
                             max_mips=max_mips, workers=workers, queue_url=queue_url, keep_rechunkme=keep_rechunkme,
                             sample=sample, description=description, params=params, root=root, sharded=sharded,
                             shard_bytes=shard_bytes)


def _write_marker(path: str, content: dict) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(content, default=str))


# ---------------------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    from pipeline.publish.precomputed import (
        DEFAULT_CHUNK, RECHUNKME_CHUNK, STEP1_WRITER, create_rechunkme_layer, default_slab_depth, inspect_stack,
        padding_sections, slab_ranges, voxel_size_nm,
    )
    from pipeline.stages.common import aligned_stack

    sections, xy_um, z_um = aligned_stack(ctx)
    count = len(sections)
    stack = inspect_stack(sections)
    voxel = voxel_size_nm(xy_um, z_um)
    chunk = tuple(ctx.params.get("chunk_size") or DEFAULT_CHUNK)
    rechunk = tuple(ctx.params.get("rechunkme_chunk_size") or RECHUNKME_CHUNK)
    max_mips = ctx.params.get("mips")
    keep = bool(ctx.params.get("keep_rechunkme"))
    sample = ctx.params.get("verify_sample")
    sample = 32 if sample is None else (None if sample <= 0 else int(sample))
    final = ctx.layout.precomputed_layer(ctx.channel, ctx.downsample)
    temp = ctx.layout.precomputed_layer(ctx.channel, ctx.downsample, rechunkme=True)
    partial = ctx.layout.precomputed_partial(ctx.channel, ctx.downsample)
    # Everything that changes the published voxels or files, for both steps' fingerprints.
    params: dict[str, Any] = {
        "voxel_nm": list(voxel), "chunk_size": list(chunk), "rechunkme_chunk_size": list(rechunk),
        "mips": max_mips, "stack": [stack.width, stack.height, stack.depth, stack.dtype, stack.channels],
    }
    sharded = bool(ctx.params.get("sharded"))
    shard_bytes = ctx.params.get("shard_bytes") if sharded else None
    # Only the layer task depends on them (step 1 is the same); present only when set, so layers
    # published before the flags existed stay current.
    layer_params = {**params, "sharded": True} if sharded else params
    if shard_bytes:
        layer_params = {**layer_params, "shard_bytes": int(shard_bytes)}
    name = final.name
    resolution = f"thumbnail (1/{THUMBNAIL_FACTOR})" if ctx.downsample else "full resolution"
    layer_task = Task(
        key=name, func=publish, inputs=sections, outputs=[final], params=layer_params, label=str(final),
        kwargs={
            "src_dir": str(temp), "dest_dir": str(final), "sections": [str(p) for p in sections],
            "chunk_size": list(chunk), "max_mips": max_mips, "workers": ctx.settings.workers,
            "queue_url": ctx.settings.queue_url, "keep_rechunkme": keep, "sample": sample,
            "description": f"{ctx.animal} channel {ctx.channel}, {resolution}: the aligned stack of {count} "
                           f"sections, published by slidepipe",
            "params": {"animal": ctx.animal, "channel": ctx.channel, "downsample": ctx.downsample, **params,
                       "sharded": sharded},
            "root": str(ctx.layout.data_root), "sharded": sharded, "shard_bytes": shard_bytes,
        },
    )
    if not ctx.is_current(layer_task):
        create_rechunkme_layer(temp, stack, voxel, chunk, max_mips, rechunk)
        markers = temp / MARKER_DIR
        # The step-1 writer too: a section kept (--keep-rechunkme) from another writer lacks the
        # chunk record the transfer's check needs, so it is written again.
        step1_params = {**params, "step1_writer": STEP1_WRITER}

        def step1(zs) -> list[Task]:
            """The step-1 tasks of sections (and blank padding sections) `zs`."""
            return [
                Task(key=f"z{z:03d}", func=rechunk_section, inputs=[sections[z]], outputs=[markers / f"{z:03d}.json"],
                     params=step1_params, kwargs={"layer_dir": str(temp), "tiff_path": str(sections[z]), "z": z,
                                            "width": stack.width, "height": stack.height,
                                            "marker": str(markers / f"{z:03d}.json")})
                if z < count else
                Task(key=f"z{z:03d}", func=pad_section, outputs=[markers / f"{z:03d}.json"], params=step1_params,
                     label=f"{temp} (blank section {z})",
                     kwargs={"layer_dir": str(temp), "z": z, "marker": str(markers / f"{z:03d}.json")})
                for z in zs
            ]

        size_z = count + len(padding_sections(temp, count))
        depth = ctx.params.get("slab_depth")
        depth = default_slab_depth(stack, chunk[2]) if depth is None else depth
        slabs = slab_ranges(size_z, chunk[2], depth)
        if len(slabs) > 1:
            done = _publish_slabs(ctx, slabs, step1, sections, temp, partial, layer_params, chunk, max_mips, sample,
                                  keep, sharded, shard_bytes)
            # The same task (key, inputs, output, params: the same record) finishing the partial layer.
            layer_task = dataclasses.replace(layer_task, func=finish_slabs,
                                             kwargs={**layer_task.kwargs, "partial_dir": str(partial), "slabs": done})
            if ctx.failures:
                return  # a slab failed (recorded); the finished ones stay done for the next run
        else:
            ctx.execute(step1(range(size_z)), desc=f"{name}: sections -> {temp.name}")
            if ctx.failures:
                return  # step 2 would only meet missing chunks; the failures are already recorded
    results = ctx.execute([layer_task], desc=f"{name}: transfer, pyramid, verify")
    if name in results and not keep and temp.exists():
        shutil.rmtree(temp)  # left from a run whose layer task was already done
    if name in results:
        mips = results[name].get("mips", [])
        ctx.log.info("%s: %d levels, %d chunks in %d %sfiles, %.1f MB", final, len(mips),
                     sum(m["chunks"] for m in mips), sum(m.get("files", m["chunks"]) for m in mips),
                     "shard " if results[name].get("sharded") else "", sum(m["bytes"] for m in mips) / 1e6)


def _publish_slabs(ctx: StageContext, slabs, step1, sections, temp: Path, partial: Path, layer_params: dict,
                   chunk, max_mips, sample, keep: bool, sharded: bool, shard_bytes: int | None) -> list[dict]:
    """Slab after slab: its step-1 tasks, then its slab task (transfer, z-keeping levels, verify,
    delete its step-1 chunks). A finished slab is a recorded marker, so a rerun skips it and
    writes no step-1 chunk for it. Returns the slabs' results (stored ones for skipped slabs)."""
    from pipeline.publish.precomputed import prepare_slab_build

    slab_markers = ctx.layout.precomputed_slab_markers(ctx.channel, ctx.downsample)
    prepare_slab_build(partial, slab_markers, layer_params)
    done = []
    count = len(sections)
    for z0, z1 in slabs:
        marker = slab_markers / f"z{z0:05d}-{z1:05d}.json"
        task = Task(
            key=f"slab{z0:05d}", func=publish_slab, inputs=list(sections[z0:min(z1, count)]), outputs=[marker],
            params={**layer_params, "slab": [z0, z1]}, label=f"{partial} (sections {z0}..{z1 - 1})",
            kwargs={"src_dir": str(temp), "partial_dir": str(partial), "sections": [str(p) for p in sections],
                    "z0": z0, "z1": z1, "chunk_size": list(chunk), "max_mips": max_mips,
                    "workers": ctx.settings.workers, "queue_url": ctx.settings.queue_url, "sample": sample,
                    "keep_rechunkme": keep, "marker": str(marker), "sharded": sharded, "shard_bytes": shard_bytes,
                    "section_markers": [str(temp / MARKER_DIR / f"{z:03d}.json") for z in range(z0, z1)]},
        )
        if not ctx.is_current(task):
            ctx.execute(step1(range(z0, z1)), desc=f"{partial.parent.name}: sections {z0}..{z1 - 1}")
            if ctx.failures:
                return done
        result = ctx.execute([task], desc=f"{partial.parent.name}: slab {z0}..{z1 - 1} -> transfer, levels, verify")
        if ctx.failures:
            return done
        done.append(result[task.key])
        pause_point(f"{marker} recorded")  # kill tests: between two slabs
    return done
