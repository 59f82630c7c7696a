"""The conversion: TIFF stack -> level 0 -> each level from the one below, slab by slab, resumable;
--first-new-level (more levels on an existing store); the manifest file_log records."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.publish import pyramid
from pipeline.publish.omezarr.metadata import (channel_names, dataset_scale, dataset_translation, display_windows,
                                               multiscales_metadata, omero_metadata, stored_ome_metadata,
                                               write_ome_attributes)
from pipeline.publish.omezarr.options import DEFAULT_CHUNK, ConversionResult, OmeZarrError, OmeZarrOptions
from pipeline.publish.omezarr.planning import LevelWork, plan_level, release_free_memory, slab_budget, slab_cost, warm_imports
from pipeline.publish.omezarr.state import (STATE_FORMAT, STATE_KEY, Progress, input_fingerprint, prepare_store,
                                            signature_of, store_lock)
from pipeline.publish.omezarr.store import (Image, array_spec, create_group, open_array, open_existing, read_attributes,
                                            shard_for, store_zarr_format, ts_context, unit_for)
from pipeline.publish.omezarr.tiffstack import StackReader, probe_stack

log = logging.getLogger("slidepipe")

def resolve_ranges(ranges, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(z, y, x) bounds of the output inside the stack; None parts mean the whole axis."""
    if ranges is None:
        return tuple((0, int(n)) for n in shape)
    out = []
    for axis, ((lo, hi), n) in enumerate(zip(ranges, shape)):
        lo = 0 if lo is None else int(lo)
        hi = int(n) if hi is None else min(int(hi), int(n))
        if not 0 <= lo < hi:
            raise OmeZarrError(f"--ranges: {'zyx'[axis]} range {lo}:{hi} is empty or outside the stack (0:{n})")
        out.append((lo, hi))
    return tuple(out)


def _check_store_path(store: Path) -> None:
    if store.suffix != ".zarr":
        raise OmeZarrError("the output name must end in .zarr (e.g. brain.ome.zarr)", store)
    if store.exists() and not store.is_dir():
        raise OmeZarrError("exists and is not a directory", store)


def convert_stack(paths: Sequence[Path], store: Path, options: OmeZarrOptions,
                  progress: Callable[[str, int, int], None] | None = None) -> ConversionResult:
    """Write `store` from z-slice TIFFs `paths` (in z order); resume it if a run was killed."""
    options.check()
    store = Path(store).absolute()
    _check_store_path(store)
    warm_imports()
    if options.first_new_level is not None:
        return add_levels(store, options, progress)
    started = time.perf_counter()
    info = probe_stack([Path(p) for p in paths])
    bounds = resolve_ranges(options.ranges, info.shape)
    shape = tuple(hi - lo for lo, hi in bounds)
    voxel = _voxel_size(options.voxel_um, info.voxel_um)
    chunk = unit_for(options.chunk or DEFAULT_CHUNK, shape)
    shard = shard_for(options.shard, chunk, shape) if options.shard else None
    nlevels = 1 if options.zarr_only else (options.nlevels or pyramid.auto_nlevels(shape, chunk))
    factors = pyramid.level_factors(shape, voxel, nlevels)
    shapes = pyramid.level_shapes(shape, factors)
    scales = pyramid.level_scales(voxel, factors)
    translations = pyramid.level_translations([lo * v for (lo, _), v in zip(bounds, voxel)], scales, factors)
    img = Image(info.samples if info.samples > 1 else None, info.dtype)
    # Everything that decides the stored voxels and files. The voxel size enters through the
    # level factors (z halves once xy caught up); scales, translations, names and windows are
    # metadata, compared with what the store holds when these match (`_refresh_metadata`).
    layout = {
        "ngff_version": options.ngff_version, "chunk": chunk, "shard": shard, "nlevels": nlevels,
        "algorithm": options.algorithm, "bounds": bounds, "zarr_only": options.zarr_only,
        "dtype": info.dtype.str, "channels": img.channels, "compression_level": options.compression_level,
        "source_shape": info.shape, "factors": factors,
    }
    signature = signature_of({"layout": layout, "inputs": input_fingerprint(info.paths)})
    store.parent.mkdir(parents=True, exist_ok=True)
    status = prepare_store(store, signature, options.overwrite)
    threads = options.threads or os.cpu_count() or 1
    if status == "complete":
        windows, changed = None, False
        if not options.zarr_only:
            with store_lock(store):
                windows, changed = _refresh_metadata(store, options, img, shapes, scales, translations, threads)
        if changed:
            from pipeline.publish.validate_omezarr import validate_store

            validate_store(store, expect_levels=nlevels)
        return ConversionResult(store, options.ngff_version, [img.full(s) for s in shapes], scales, [], 0, 0, 0,
                                time.perf_counter() - started, windows, "metadata" if changed else "complete")
    store.mkdir(parents=True, exist_ok=True)
    context = ts_context(threads)
    fmt = options.zarr_format
    with store_lock(store):
        if status == "new" and not options.zarr_only:
            create_group(store, fmt)
        arrays = []
        for level, lshape in enumerate(shapes):
            path = store if options.zarr_only else store / str(level)
            spec = array_spec(path, fmt, img.full(lshape), img.dtype, img.full(unit_for(chunk, lshape), 1),
                              img.full(shard_for(shard, chunk, lshape), 1) if shard else None, img.dims,
                              options.compression_level)
            arrays.append(open_array(spec, context, create=(status == "new")))
        if status == "resume":
            state = read_attributes(store)[STATE_KEY]
        else:
            state = {"format": STATE_FORMAT, "signature": signature, "done": False, "options": layout, "levels": {}}
        tracker = Progress(store, state)
        tracker.save()
        budget = slab_budget(options)
        reader = StackReader(info, bounds, threads)
        counts = {"written": 0, "skipped": 0}
        for level in range(nlevels):
            work = LevelWork(level, shapes[level], unit_for(shard or chunk, shapes[level]),
                              factors[level - 1] if level else None)
            if level == 0:
                produce = reader.read
                cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                         algorithm=options.algorithm, threads=threads, source_width=info.shape[2],
                                         segment_bytes=info.segment_bytes)
            else:
                produce = _downsampler(arrays[level - 1], img, work.factor, shapes[level - 1], options.algorithm)
                cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                         algorithm=options.algorithm, threads=threads)
            _write_level(arrays[level], img, work, produce, tracker, budget, cost, counts, progress)
        windows = None
        state["done"] = True
        if options.zarr_only:
            tracker.save()
        else:
            windows = display_windows(options.windows, arrays, shapes, img, budget)
            if not options.windows:
                state["data_windows"] = windows  # the voxels decide them: kept for metadata-only updates
            ms, omero = _ome_metadata(store, options, img, shapes, scales, translations, windows)
            write_ome_attributes(store, options.ngff_version, ms, omero, state)
    from pipeline.publish.validate_omezarr import validate_store, verify_data

    validate_store(store, expect_levels=nlevels, zarr_only=options.zarr_only)
    if not options.zarr_only:
        verify_data(store, sections=info.paths, bounds=bounds)
    return ConversionResult(store, options.ngff_version, [img.full(s) for s in shapes], scales, list(range(nlevels)),
                            counts["written"], counts["skipped"], int(np.prod(shape)) * img.channels * img.dtype.itemsize,
                            time.perf_counter() - started, windows, "resumed" if status == "resume" else "written")


def _ome_metadata(store: Path, options: OmeZarrOptions, img: Image, shapes, scales, translations,
                  windows) -> tuple[dict, dict]:
    """The multiscales and omero attributes this conversion writes (plain JSON values)."""
    ms = multiscales_metadata(options.ngff_version, scales, img.has_c, options.name or store.name.split(".")[0],
                              options.algorithm, translations=translations)
    omero = omero_metadata(options.ngff_version, windows, img.dtype,
                           channel_names(options.channel_names, img.channels), shapes[0][0] // 2)
    return json.loads(json.dumps(ms)), json.loads(json.dumps(omero))


def _refresh_metadata(store: Path, options: OmeZarrOptions, img: Image, shapes, scales, translations,
                      threads: int) -> tuple[list, bool]:
    """A finished store whose voxels are what is asked: give it the NGFF metadata this conversion
    would write (voxel size, translations, names, windows), touching nothing else. Returns the
    windows and whether anything changed."""
    attrs = read_attributes(store)
    state = attrs[STATE_KEY]
    if options.windows or not state.get("data_windows"):
        arrays = [] if options.windows else [
            open_existing(store / str(level), options.zarr_format, ts_context(threads)) for level in range(len(shapes))]
        budget = 0 if options.windows else slab_budget(options)
        windows = display_windows(options.windows, arrays, shapes, img, budget)
        if not options.windows:
            state["data_windows"] = windows
    else:
        windows = [tuple(w) for w in state["data_windows"]]
    ms, omero = _ome_metadata(store, options, img, shapes, scales, translations, windows)
    if stored_ome_metadata(attrs) == (ms, omero):
        return windows, False
    write_ome_attributes(store, options.ngff_version, ms, omero, state)
    return windows, True


def describe_store(store: Path) -> dict:
    """What file_log records for a store instead of a row per chunk: per level its shape, chunk
    shape, scale, file count, bytes and the digest the runner uses for directories (sha256 over
    the sorted "name<TAB>size" lines of `pipeline.runner.path_stats`)."""
    from pipeline.runner import path_stats

    from pipeline.publish.validate_omezarr import validate_store

    report = validate_store(store)
    attrs = read_attributes(store)
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    levels = []
    for i, dataset in enumerate(ms["datasets"]):
        level_dir = Path(store) / dataset["path"]
        meta_name = "zarr.json" if report.ngff_version == "0.5" else ".zarray"
        meta = json.loads((level_dir / meta_name).read_text())
        if report.ngff_version == "0.5":
            grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
            codec = meta["codecs"][0]
            chunk = codec["configuration"]["chunk_shape"] if codec["name"] == "sharding_indexed" else grid
        else:
            grid = chunk = meta["chunks"]
        files = sum(len(names) for _root, _dirs, names in os.walk(level_dir))
        size, _mtime, digest = path_stats(level_dir)
        levels.append({"level": i, "path": dataset["path"], "shape": list(report.shapes[i]),
                       "scale": list(report.scales[i]), "chunk_shape": list(chunk), "file_shape": list(grid),
                       "files": files, "bytes": size, "sha256": digest})
    return {"ngff_version": report.ngff_version, "dtype": report.dtype, "levels": levels,
            "files": sum(level["files"] for level in levels), "bytes": sum(level["bytes"] for level in levels)}


def _voxel_size(flags, tags) -> tuple[float, float, float]:
    out = []
    for axis, flag, tag in zip("zyx", flags, tags):
        value = flag if flag is not None else tag
        if value is None:
            log.warning("no %s pixel size in the TIFF tags or flags: using 1 micrometer (--resolution-%s)",
                        axis, "z" if axis == "z" else "xy")
            value = 1.0
        if value <= 0:
            raise OmeZarrError(f"pixel size along {axis} must be positive, got {value}")
        out.append(float(value))
    return tuple(out)


def _downsampler(source, img: Image, factor, source_shape, algorithm: str):
    """Slabs of level n+1 made from the stored level n (read with the filter's halo)."""

    def produce(box: pyramid.Box) -> np.ndarray:
        in_box, margin = pyramid.input_box(box, factor, source_shape, algorithm)
        block = img.as_czyx(source[img.index(in_box)].read().result())
        first = pyramid.downsample(block[0], factor, algorithm, margin)
        if block.shape[0] == 1:
            return first[None]
        out = np.empty((block.shape[0],) + first.shape, first.dtype)
        out[0] = first
        for c in range(1, block.shape[0]):
            out[c] = pyramid.downsample(block[c], factor, algorithm, margin)
        return out

    return produce


def _write_level(array, img: Image, work: LevelWork, produce, tracker: Progress, budget: int, cost,
                 counts: dict, progress) -> None:
    from tqdm import tqdm

    slabs = plan_level(work, budget, cost)
    done = tracker.level(work.level, [hi - lo for lo, hi in slabs[0]])
    counts["skipped"] += len(done & set(range(len(slabs))))
    bar = tqdm(total=len(slabs), initial=len(done), desc=f"level {work.level}", unit="slab", disable=None,
               file=sys.stderr)
    pending = None  # (slab number, write future): slab i is encoded while slab i+1 is produced

    def finish() -> None:
        nonlocal pending
        if pending is None:
            return
        i, future = pending
        pending = None
        future.result()
        release_free_memory()
        done.add(i)  # recorded only once its chunks are on disk
        tracker.mark(work.level, done)
        counts["written"] += 1
        bar.update()
        if progress:
            progress(f"level {work.level}", len(done), len(slabs))

    try:
        for i, box in enumerate(slabs):
            if i in done:
                continue
            data = produce(box)
            finish()
            # The slab is never modified after this, so tensorstore may encode straight from it
            # instead of copying it (slab_cost counts it twice: this one and the next produced).
            future = array[img.index(box)].write(img.stored(data), can_reference_source_data_indefinitely=True)
            pending = (i, future)
            del data
        finish()
    finally:
        if pending is not None:  # an error while producing: let the write in flight end first
            with contextlib.suppress(Exception):
                pending[1].result()
        bar.close()


def add_levels(store: Path, options: OmeZarrOptions,
               progress: Callable[[str, int, int], None] | None = None) -> ConversionResult:
    """Recompute levels >= N of an existing multiscale store from its level N-1.

    Works on stores of other writers too (ome-zarr-py, scroll_to_ome): only the multiscales
    metadata and level N-1 are used. Resumable like a conversion.
    """
    started = time.perf_counter()
    first = options.first_new_level
    fmt = store_zarr_format(store)
    if fmt is None:
        raise OmeZarrError("--first-new-level needs an existing OME-Zarr store", store)
    attrs = read_attributes(store)
    ngff = "0.5" if fmt == 3 else "0.4"
    ome_attrs = attrs.get("ome", {}) if fmt == 3 else attrs
    if not ome_attrs.get("multiscales"):
        raise OmeZarrError("has no multiscales metadata: not an OME-Zarr image", store)
    ms = ome_attrs["multiscales"][0]
    datasets = ms["datasets"]
    if first > len(datasets):
        raise OmeZarrError(f"--first-new-level {first}: the store has only levels 0..{len(datasets) - 1}", store)
    axes = [a["name"] for a in ms["axes"]]
    if axes[-3:] != ["z", "y", "x"] or len(axes) not in (3, 4):
        raise OmeZarrError(f"axes {axes}: only (c,) z, y, x images are supported", store)
    threads = options.threads or os.cpu_count() or 1
    context = ts_context(threads)
    base = open_existing(store / datasets[first - 1]["path"], fmt, context)
    img = Image(int(base.shape[0]) if len(axes) == 4 else None, np.dtype(base.dtype.numpy_dtype))
    spatial = tuple(int(n) for n in base.shape[-3:])
    base_scale = dataset_scale(datasets[first - 1])[-3:]
    chunk = tuple(options.chunk) if options.chunk else tuple(int(c) for c in base.chunk_layout.read_chunk.shape[-3:])
    shape0 = tuple(int(n) for n in open_existing(store / datasets[0]["path"], fmt, context).shape[-3:])
    nlevels = options.nlevels or pyramid.auto_nlevels(shape0, chunk)
    if nlevels <= first:
        raise OmeZarrError(f"--nlevels {nlevels} adds nothing above level {first - 1}", store)
    factors = pyramid.level_factors(spatial, base_scale, nlevels - first + 1)
    shapes = pyramid.level_shapes(spatial, factors)
    scales = pyramid.level_scales(base_scale, factors)
    layout = {"extend_from": first, "nlevels": nlevels, "algorithm": options.algorithm, "chunk": chunk,
              "shard": options.shard, "base_shape": img.full(spatial), "base_scale": base_scale,
              "compression_level": options.compression_level}
    signature = signature_of({"layout": layout})
    state = attrs.get(STATE_KEY) or {}
    extending = state.get("extend") or {}
    resume = extending.get("signature") == signature and not extending.get("done")
    counts = {"written": 0, "skipped": 0}
    with store_lock(store):
        if not resume:
            for stale in {d["path"] for d in datasets[first:]} | {str(n) for n in range(first, nlevels)}:
                shutil.rmtree(store / stale, ignore_errors=True)
            extending = {"signature": signature, "done": False, "options": layout, "levels": {}}
        state = dict(state, extend=extending)
        tracker = Progress(store, state, extending)
        tracker.save()
        budget = slab_budget(options)
        previous = base
        for k in range(1, len(shapes)):
            level = first - 1 + k
            path = store / str(level)
            spec = array_spec(path, fmt, img.full(shapes[k]), img.dtype, img.full(unit_for(chunk, shapes[k]), 1),
                              img.full(shard_for(options.shard, chunk, shapes[k]), 1) if options.shard else None,
                              img.dims, options.compression_level)
            array = open_array(spec, context, create=not (resume and path.exists()))
            work = LevelWork(level, shapes[k], unit_for(options.shard or chunk, shapes[k]), factors[k - 1])
            produce = _downsampler(previous, img, work.factor, shapes[k - 1], options.algorithm)
            cost = functools.partial(slab_cost, work, channels=img.channels, itemsize=img.dtype.itemsize,
                                     algorithm=options.algorithm, threads=threads)
            _write_level(array, img, work, produce, tracker, budget, cost, counts, progress)
            previous = array
        extending["done"] = True
        paths = [d["path"] for d in datasets[:first]] + [str(n) for n in range(first, nlevels)]
        all_scales = [dataset_scale(d)[-3:] for d in datasets[:first]] + scales[1:]
        kept = [dataset_translation(d) or [0.0, 0.0, 0.0] for d in datasets[:first]]
        added = pyramid.level_translations(kept[-1], scales, factors)[1:]
        new_ms = multiscales_metadata(ngff, all_scales, img.has_c, ms.get("name") or store.name.split(".")[0],
                                      options.algorithm, translations=kept + added, paths=paths)
        write_ome_attributes(store, ngff, new_ms, ome_attrs.get("omero"), state)
    from pipeline.publish.validate_omezarr import validate_store, verify_data

    validate_store(store, expect_levels=nlevels)
    verify_data(store, levels_from=first)
    return ConversionResult(store, ngff, [img.full(s) for s in shapes[1:]], scales[1:], list(range(first, nlevels)),
                            counts["written"], counts["skipped"], 0, time.perf_counter() - started, None,
                            "resumed" if resume else "written")
