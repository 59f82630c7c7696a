"""Throughput of the OME-Zarr converter against a plain ome-zarr-py write of the same array.

Both sides write NGFF 0.5 (Zarr v3), the same chunk shape, the same number of levels (xy halved
per level, z kept: the z voxel is 20x the xy voxel). The comparable baseline is ome-zarr-py with
`local_mean` (a block mean, like our `mean`); its default `resize` (skimage, anti-aliased) is
printed too, as what a plain `write_image` call costs. Each writer runs in its own process,
measured in the same run, so load on the machine hits all alike:
  ours          TIFF folder -> store (reads the TIFFs itself, slab by slab)
  ome-zarr-py   numpy array already in memory -> store (`ome_zarr.writer.write_image`); the time
                to read the TIFFs into that array is printed separately.
MB/s = level-0 bytes / wall seconds. Peak RSS is each process's VmHWM.

    python bench/omezarr.py [--depth 32 --height 1536 --width 1536 --chunk 128,128,16 --nlevels 5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def make_stack(folder: Path, depth: int, height: int, width: int, seed: int = 0) -> int:
    """Tissue-like uint16 sections (smooth structure, noise, zero background), zlib-tiled TIFFs as
    the align stage writes them; returns the stack's bytes."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.45 * width)) ** 2 < 1
    folder.mkdir(parents=True, exist_ok=True)
    for z in range(depth):
        base = 9000 + 4000 * np.sin(yy / 37.0 + z / 5) * np.cos(xx / 53.0 - z / 7)
        plane = (base + rng.normal(0, 300, size=base.shape)).clip(0, 65535).astype(np.uint16)
        plane[~inside] = 0
        tifffile.imwrite(folder / f"{z:04d}.tif", plane, tile=(512, 512), compression="zlib",
                         compressionargs={"level": 1})
    return depth * height * width * 2


def child_ours(src: Path, out: Path, chunk_xyz: str, nlevels: int, threads: int | None,
               max_gb: float | None) -> dict:
    import ome_zarr_models.v05.image  # noqa: F401  (imports before the clock, as for ome-zarr-py)

    from pipeline.publish import validate_omezarr  # noqa: F401
    from pipeline.publish.omezarr import main, warm_imports

    warm_imports()
    args = [str(src), str(out), "--chunk-size", chunk_xyz, "--nlevels", str(nlevels),
            "--resolution-xy", "1", "--resolution-z", "20"]
    if threads:
        args += ["--threads", str(threads)]
    if max_gb:
        args += ["--max-gb", str(max_gb)]
    start = time.perf_counter()
    if main(args) != 0:
        raise SystemExit("conversion failed")
    return {"seconds": time.perf_counter() - start}


def child_omezarrpy(src: Path, out: Path, chunk_xyz: str, nlevels: int, method: str) -> dict:
    import tifffile
    import zarr
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    x, y, z = (int(v) for v in chunk_xyz.split(","))
    start = time.perf_counter()
    paths = sorted(src.glob("*.tif"))
    volume = np.stack([tifffile.imread(p) for p in paths])
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    group = zarr.open_group(str(out), mode="w")
    write_image(volume, group, scale_factors=[2 ** i for i in range(1, nlevels)], method=Methods(method),
                axes="zyx", storage_options={"chunks": (z, y, x)}, scale={"z": 20.0, "y": 1.0, "x": 1.0},
                axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})
    return {"seconds": time.perf_counter() - start, "read_seconds": read_seconds}


BASELINES = {"omezarrpy": "local_mean", "omezarrpy-default": "resize"}


def run_child(kind: str, src: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--src", str(src), "--out", str(out),
           "--chunk", args.chunk, "--nlevels", str(args.nlevels)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_gb:
        cmd += ["--max-gb", str(args.max_gb)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store_files(store: Path) -> tuple[int, int]:
    files = [p for p in store.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--chunk", default="128,128,16", help="X,Y,Z chunk shape (both writers)")
    parser.add_argument("--nlevels", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="our converter's threads (default: all cores)")
    parser.add_argument("--max-gb", type=float, default=None, help="our converter's memory cap")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two writers this many times")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--child", choices=["ours", *BASELINES], help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "ours":
            result = child_ours(args.src, args.out, args.chunk, args.nlevels, args.threads, args.max_gb)
        else:
            result = child_omezarrpy(args.src, args.out, args.chunk, args.nlevels, BASELINES[args.child])
        result["peak_rss"] = peak_rss()
        print(json.dumps(result))
        return 0

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-omezarr-"))
    try:
        src = work / "tif"
        nbytes = make_stack(src, args.depth, args.height, args.width)
        mb = nbytes / 1e6
        print(f"stack: {args.depth} x {args.height} x {args.width} uint16 = {mb:.0f} MB, chunk {args.chunk} (x,y,z), "
              f"{args.nlevels} levels, NGFF 0.5" + (f", ours capped at --max-gb {args.max_gb}" if args.max_gb else ""))
        rows: dict[str, list] = {"ours": [], **{k: [] for k in BASELINES}}
        for _ in range(args.repeat):
            for kind in rows:
                out = work / f"{kind}.ome.zarr"
                shutil.rmtree(out, ignore_errors=True)
                result = run_child(kind, src, out, args)
                result["files"], result["bytes"] = store_files(out)
                rows[kind].append(result)
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in rows.items()}
        labels = {"ours": "ours, mean (TIFF -> store)", "omezarrpy": "ome-zarr-py local_mean (array -> store)",
                  "omezarrpy-default": "ome-zarr-py resize (array -> store)"}
        for kind, r in best.items():
            extra = f"  (+ {r['read_seconds']:.2f} s to read the TIFFs)" if "read_seconds" in r else ""
            print(f"{labels[kind]:41s} {r['seconds']:7.2f} s {mb / r['seconds']:7.1f} MB/s  peak RSS "
                  f"{r['peak_rss'] / 1e6:5.0f} MB  {r['files']} files {r['bytes'] / 1e6:.0f} MB{extra}")
        ours = best["ours"]["seconds"]
        for kind in BASELINES:
            r = best[kind]
            print(f"ratio ours / {labels[kind].split(' (')[0]} (MB/s): {r['seconds'] / ours:.2f}x, "
                  f"{(r['seconds'] + r['read_seconds']) / ours:.2f}x counting its TIFF read")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
