"""Publishing one aligned stack three ways, in one run, on the same files and worker count.

- lab recipe: how the lab pipeline this project replaces publishes (its code, 2026-12-02
  scoping): a cloud-volume `[1024,1024,1]` gzip layer written one section per worker process,
  igneous `create_transfer_tasks` to `[256,256,128]` with `skip_downsamples`, then one igneous
  downsampling pass per level (factor 2,2,1), as many levels as the stage's own plan.
- the stage as shipped: `create_pipeline --task neuroglancer --downsample false` (and
  `--sharded`) on a data root whose aligned sections are the stack (recorded as align's outputs,
  as the stage tests do), so whatever pipeline/publish/ does today is what is measured.
- the floor: read every section once, gzip every final mip-0 chunk once (libdeflate level 1, the
  `deflate` package), write it once; no pyramid, no verification: no publisher can beat it.

Every method runs in a subprocess of its own (bench.measure). Seconds are the work itself: for
the stage its pipeline_run row (start to end), for the others the child's own clock after its
imports; MB/s = the stack's mip-0 bytes / those seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

ANIMAL = "BENCH"
LAB_RECHUNK_CHUNK = (1024, 1024, 1)
LAB_FINAL_CHUNK = (256, 256, 128)


# --------------------------------------------------------------------------------------------
# the stack
def write_stack(folder: Path, width: int, height: int, depth: int, dtype: str = "uint16", seed: int = 0) -> list[Path]:
    """`depth` section-like images (zero background, as after masking) written as the align
    stage writes its full-resolution sections (`section_files.write_tiled`)."""
    from bench.precomputed import synthetic_section
    from pipeline.stages.section_files import TILE, write_tiled

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for z in range(depth):
        plane = synthetic_section(rng, height, width, np.dtype(dtype), rgb=False)
        th, tw = TILE
        tiles = (plane[y:y + th, x:x + tw] for y in range(0, height, th) for x in range(0, width, tw))
        path = folder / f"{z:04d}.tif"
        write_tiled(path, plane.shape, plane.dtype, tiles)
        paths.append(path)
    return paths


def stack_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.tif"))


def stack_levels(paths: list[Path], xy_um: float, z_um: float) -> int:
    """Levels (mip 0 included) of the stage's plan for this stack: the lab recipe makes as many."""
    from pipeline.publish import precomputed as pc

    return pc.plan_for(pc.inspect_stack(paths), pc.voxel_size_nm(xy_um, z_um), pc.DEFAULT_CHUNK).num_mips


# --------------------------------------------------------------------------------------------
# lab recipe (child process)
def _lab_section(url: str, path: str, z: int) -> None:
    import tifffile
    from cloudvolume import CloudVolume

    image = tifffile.imread(path)
    vol = CloudVolume(url, parallel=1, progress=False, compress="gzip")
    vol[:, :, z] = image.T[:, :, None]


def lab_recipe(stack: Path, out: Path, workers: int, levels: int, xy_um: float, z_um: float) -> dict:
    import igneous.task_creation as tc
    import tifffile
    from cloudvolume import CloudVolume
    from taskqueue import LocalTaskQueue

    from pipeline.publish.precomputed import file_url, voxel_size_nm

    paths = stack_paths(stack)
    first = tifffile.TiffFile(paths[0]).pages[0]
    height, width = first.shape[:2]
    rechunk, final = out / "rechunkme", out / "final"
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type=first.dtype.name, encoding="raw",
        resolution=list(voxel_size_nm(xy_um, z_um)), voxel_offset=[0, 0, 0],
        volume_size=[width, height, len(paths)], chunk_size=list(LAB_RECHUNK_CHUNK))
    CloudVolume(file_url(rechunk), info=info).commit_info()
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for job in [pool.submit(_lab_section, file_url(rechunk), str(p), z) for z, p in enumerate(paths)]:
            job.result()
    step1 = time.perf_counter()
    queue = LocalTaskQueue(parallel=workers, progress=False)
    queue.insert(tc.create_transfer_tasks(file_url(rechunk), file_url(final), chunk_size=list(LAB_FINAL_CHUNK),
                                          mip=0, skip_downsamples=True))
    queue.execute(progress=False)
    transfer = time.perf_counter()
    for mip in range(levels - 1):
        queue.insert(tc.create_downsampling_tasks(file_url(final), mip=mip, num_mips=1, factor=(2, 2, 1),
                                                  compress=True))
        queue.execute(progress=False)
    done = time.perf_counter()
    return {"seconds": done - started, "step1": step1 - started, "transfer": transfer - step1,
            "downsample": done - transfer}


# --------------------------------------------------------------------------------------------
# floor (child process)
def _floor_job(paths: list[str], z0: int, y0: int, y1: int, chunk: tuple[int, int, int], out: str) -> int:
    import deflate

    from pipeline.publish.common import open_section

    planes = []
    for path in paths:
        with open_section(path) as section:
            planes.append(section.rows(y0, y1)[:, :, 0])
    block = np.stack(planes)  # (z, y, x): C order of it is precomputed's x-fastest chunk order
    width = block.shape[2]
    written = 0
    for cy in range(0, y1 - y0, chunk[1]):
        for x0 in range(0, width, chunk[0]):
            part = np.ascontiguousarray(block[:, cy:cy + chunk[1], x0:x0 + chunk[0]])
            z1, x1, ya, yb = z0 + part.shape[0], x0 + part.shape[2], y0 + cy, y0 + cy + part.shape[1]
            data = deflate.gzip_compress(part.tobytes(), 1)
            with open(os.path.join(out, f"{x0}-{x1}_{ya}-{yb}_{z0}-{z1}.gz"), "wb") as handle:
                handle.write(data)
            written += 1
    return written


def floor(stack: Path, out: Path, workers: int, chunk: tuple[int, int, int]) -> dict:
    """One job per z slab of chunk-z sections and band of rows; a band is at least one TIFF tile
    high, so every tile of the stack is decoded once."""
    import deflate  # noqa: F401  imported before the clock, like the others

    from pipeline.stages.section_files import TILE

    paths = [str(p) for p in stack_paths(stack)]
    import tifffile

    height = tifffile.TiffFile(paths[0]).pages[0].shape[0]
    band = -(-max(chunk[1], TILE[0]) // chunk[1]) * chunk[1]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(_floor_job, paths[z0:z0 + chunk[2]], z0, y0, min(height, y0 + band), chunk, str(out))
                for z0 in range(0, len(paths), chunk[2]) for y0 in range(0, height, band)]
        chunks = sum(job.result() for job in jobs)
    return {"seconds": time.perf_counter() - started, "chunks": chunks}


# --------------------------------------------------------------------------------------------
# the stage (through the CLI)
def stage_data_root(root: Path, paths: list[Path], xy_um: float, z_um: float, dtype: str) -> tuple[Path, str]:
    """A data root and SQLite database in which `paths` are the animal's aligned channel-1
    sections at full resolution, recorded as align's outputs (hard links: no copy)."""
    from pipeline.layout import AnimalLayout
    from tests.helpers_db import record_outputs, seed_sections

    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{(root / 'slidepipe.db').as_posix()}"
    layout = AnimalLayout(data, ANIMAL)
    keys = seed_sections(db_url, ANIMAL, len(paths), resolution_um=xy_um, z_um=z_um, dtype=dtype)
    placed = []
    for key, src in zip(keys, paths):
        dst = layout.aligned(1, False, key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        placed.append(dst)
    record_outputs(db_url, data, placed)
    return data, db_url


def stage_seconds(db_url: str, stage: str) -> float:
    """Start to end of the newest successful run of `stage` (its own pipeline_run row)."""
    from sqlalchemy import select

    from db.models import PipelineRun
    from db.session import init_db, session_scope

    engine = init_db(db_url)
    try:
        with session_scope(engine) as s:
            run = s.scalars(select(PipelineRun).where(PipelineRun.stage == stage, PipelineRun.status == "success")
                            .order_by(PipelineRun.id.desc()).limit(1)).first()
            if run is None or run.ended is None:
                raise SystemExit(f"no finished {stage} run in {db_url}")
            return (run.ended - run.started).total_seconds()
    finally:
        engine.dispose()


def stage_cli(data: Path, db_url: str, task: str, workers: int, *extra: str, channel: int = 1,
              downsample: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--animal", ANIMAL, "--task", task, "--channel", str(channel),
            "--downsample", "true" if downsample else "false", "--data-root", str(data), "--db-url", db_url,
            "--workers", str(workers), *extra]


# --------------------------------------------------------------------------------------------
def progress(message: str) -> None:
    """What the harness is doing, on stderr: stdout keeps only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_all(work: Path, paths: list[Path], workers: int, xy_um: float, z_um: float,
                stage_flags: Sequence[str] = ()) -> list[dict]:
    """Rows (one per method) for one stack; `stage_flags` go to both neuroglancer stage runs."""
    from bench.measure import run_measured, tree_stats
    from pipeline.layout import AnimalLayout
    from pipeline.publish.precomputed import DEFAULT_CHUNK

    stack = paths[0].parent
    import tifffile

    page = tifffile.TiffFile(paths[0]).pages[0]
    mb = page.shape[0] * page.shape[1] * page.dtype.itemsize * len(paths) / 1e6
    depth = len(paths)
    rows = []

    def row(method: str, seconds, measured, final: Path, **extra) -> dict:
        if measured.returncode:
            return failed_row(method, depth, mb, measured)
        seconds = seconds()
        files, size = tree_stats(final)
        return {"method": method, "depth": depth, "MB": mb, "seconds": seconds, "MB/s": mb / seconds,
                "files": files, "bytes": size, "temp_files": measured.temp_files, "temp_bytes": measured.temp_bytes,
                "rss_main": measured.peak_main, "rss_worker": measured.peak_worker, "cpu": measured.cpu, **extra}

    child = [sys.executable, "-m", "bench.publish", "--child"]
    levels = stack_levels(paths, xy_um, z_um)
    out = work / "lab"
    progress(f"lab recipe, {depth} sections")
    m = run_measured([*child, "lab", "--stack", str(stack), "--out", str(out), "--workers", str(workers),
                      "--levels", str(levels), "--xy-um", str(xy_um), "--z-um", str(z_um)],
                     temp_folder=out, is_final=lambda p: p == out / "final", check=False)
    rows.append(row("lab recipe", lambda: m.result()["seconds"], m, out / "final"))
    shutil.rmtree(out)

    for variant, extra in (("stage", ()), ("stage --sharded", ("--sharded",))):
        extra = (*stage_flags, *extra)
        progress(f"{variant}, {depth} sections{' (' + ' '.join(stage_flags) + ')' if stage_flags else ''}")
        root = work / variant.replace(" --", "-")
        data, db_url = stage_data_root(root, paths, xy_um, z_um, page.dtype.name)
        layout = AnimalLayout(data, ANIMAL)
        final = layout.precomputed_layer(1, False)
        # Temporary: anything in the animal's folder but the inputs (preps/) and the layer itself
        # (under its own or its temporary name, or being built slab by slab inside the step-1
        # layer: that is output, not temporary), wherever the stage puts it.
        partial = layout.precomputed_partial(1, False)
        m = run_measured(stage_cli(data, db_url, "neuroglancer", workers, *extra), temp_folder=layout.root,
                         is_final=lambda p, f=final, q=partial, i=layout.preps:
                         p in (i, f, q) or p.name.startswith(f.name + ".tmp-"), check=False)
        rows.append(row(variant, lambda: stage_seconds(db_url, "neuroglancer"), m, final))
        shutil.rmtree(root)

    out = work / "floor"
    progress(f"floor, {depth} sections")
    m = run_measured([*child, "floor", "--stack", str(stack), "--out", str(out), "--workers", str(workers),
                      "--chunk", ",".join(map(str, DEFAULT_CHUNK))], check=False)
    rows.append(row("floor", lambda: m.result()["seconds"], m, out))
    shutil.rmtree(out)
    return rows


def failed_row(method: str, depth: int, mb: float, measured) -> dict:
    """A method whose command failed: the harness goes on with the others (it runs unattended);
    the reason goes to stderr in full and under the table in one line."""
    lines = [line for line in measured.stderr.strip().splitlines() if line.strip()]
    reason = f"exit status {measured.returncode}: {lines[-1].strip() if lines else 'no message'}"
    progress(f"{method}, {depth} sections FAILED, {reason}\n{measured.stderr[-4000:]}")
    return {"method": method, "depth": depth, "MB": mb, "failed": reason}


COLUMNS = ["method", "sections", "MB", "s", "MB/s", "files", "MB out", "peak temp files", "peak temp MB",
           "peak RSS main MB", "peak RSS worker MB", "CPU s"]


def table(rows: list[dict]) -> list[str]:
    """Markdown table of the rows, then each stage row's ratios to the lab recipe and the floor
    of the same depth."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        if "failed" in r:
            cells = [r["method"], str(r["depth"]), f"{r['MB']:.0f}", "FAILED"] + ["-"] * (len(COLUMNS) - 4)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [r["method"], str(r["depth"]), f"{r['MB']:.0f}", f"{r['seconds']:.1f}", f"{r['MB/s']:.1f}",
                 str(r["files"]), f"{r['bytes'] / 1e6:.1f}", str(r["temp_files"]), f"{r['temp_bytes'] / 1e6:.1f}",
                 f"{r['rss_main'] / 1e6:.0f}", f"{r['rss_worker'] / 1e6:.0f}", f"{r['cpu']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for depth in sorted({r["depth"] for r in rows}):
        same = {r["method"]: r for r in rows if r["depth"] == depth}
        for r in rows:
            if r["depth"] == depth and "failed" in r:
                lines.append(f"- {depth} sections, {r['method']} FAILED ({r['failed']})")
        for name in ("stage", "stage --sharded"):
            if name in same:
                s = same[name]
                broken = [m for m in (name, "lab recipe", "floor") if "failed" in same.get(m, {"failed": 1})]
                if broken:
                    lines.append(f"- {depth} sections, {name}: no ratios ({', '.join(broken)} failed)")
                    continue
                lines.append(f"- {depth} sections, {name}: speed {same['lab recipe']['seconds'] / s['seconds']:.2f}x "
                             f"the lab recipe's (target >= 3x); time {s['seconds'] / same['floor']['seconds']:.2f}x "
                             f"the floor's (target <= 1.2x)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["lab", "floor"], required=True)
    parser.add_argument("--stack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--xy-um", type=float, default=0.325)
    parser.add_argument("--z-um", type=float, default=20.0)
    parser.add_argument("--chunk", default="256,256,16")
    args = parser.parse_args(argv)
    if args.child == "lab":
        result = lab_recipe(args.stack, args.out, args.workers, args.levels, args.xy_um, args.z_um)
    else:
        result = floor(args.stack, args.out, args.workers, tuple(int(v) for v in args.chunk.split(",")))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
