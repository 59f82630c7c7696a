"""Benchmark of precomputed publishing on a generated stack: throughput, files, memory, view cost.

    python bench/precomputed.py [--width 1536 --height 1536 --depth 64] [--chunk-size 256,256,16 ...]

For each final chunk size given it runs step 1 (one cloud-volume task per section into the raw
(64,64,1) layer), step 2 (igneous transfer + pyramid, gzip) and the verification, and prints
MB/s (of mip-0 bytes), file counts, bytes on disk and peak RSS. The baseline, measured in the
same run, is tifffile writing the same stack uncompressed (one file per section), so the ratios
mean something on any machine. "view" is what Neuroglancer must fetch to draw one 1024x1024
xy plane at mip 0 in the middle of the stack: the chunk files that plane intersects, as stored
(gzip) and decoded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.measure import tree_stats  # noqa: E402
from pipeline.publish import precomputed as pc  # noqa: E402


def synthetic_section(rng: np.random.Generator, height: int, width: int, dtype, rgb: bool) -> np.ndarray:
    """A section-like image: zero background around an elliptic slice of smooth 'tissue' with a
    little noise. It compresses like real sections do; white noise would not compress at all."""
    import cv2

    small = rng.random((max(2, height // 48), max(2, width // 48))).astype(np.float32)
    tissue = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) * 0.6 + 0.3
    tissue += rng.normal(0, 0.015, (height, width)).astype(np.float32)
    yy, xx = np.ogrid[:height, :width]
    inside = ((yy - height / 2) / (height * 0.42)) ** 2 + ((xx - width / 2) / (width * 0.45)) ** 2 <= 1
    top = np.iinfo(dtype).max
    grey = (np.clip(tissue, 0, 1) * inside * top).astype(dtype)
    if rgb:
        return np.stack([grey, (grey * 0.8).astype(dtype), (grey * 0.6).astype(dtype)], axis=-1)
    return grey


class PeakRSS:
    """Peak resident memory of this process and peak unique memory (USS) of any one child
    (step-1 and igneous workers), sampled every 50 ms. USS, because a forked child's RSS also
    counts the pages it still shares with this process."""

    def __init__(self):
        self.peak_self = 0
        self.peak_child = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self.peak_self = max(self.peak_self, me.memory_info().rss)
                for child in me.children(recursive=True):
                    try:
                        self.peak_child = max(self.peak_child, child.memory_full_info().uss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def view_cost(layer: Path, view: int = 1024) -> dict:
    """Chunk files (count, stored bytes, decoded bytes) behind one view x view xy plane, centred."""
    from pipeline.publish.validate import expected_chunks

    info = json.loads((layer / "info").read_text())
    scale = info["scales"][0]
    sx, sy, sz = scale["size"]
    x0, y0, z = max(0, sx // 2 - view // 2), max(0, sy // 2 - view // 2), sz // 2
    x1, y1 = min(sx, x0 + view), min(sy, y0 + view)
    itemsize = np.dtype(info["data_type"]).itemsize * info["num_channels"]
    count = stored = decoded = 0
    for chunk in expected_chunks(scale):
        (a, b, c), (d, e, f) = chunk.start, chunk.stop
        if a < x1 and d > x0 and b < y1 and e > y0 and c <= z < f:
            count += 1
            stored += (layer / scale["key"] / (chunk.name + ".gz")).stat().st_size
            decoded += int(np.prod(chunk.shape)) * itemsize
    shown = (x1 - x0) * (y1 - y0) * itemsize
    return {"chunks": count, "stored_MB": stored / 1e6, "decoded_MB": decoded / 1e6, "amplification": decoded / shown}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8")
    parser.add_argument("--rgb", action="store_true")
    parser.add_argument("--xy-um", type=float, default=0.325)
    parser.add_argument("--z-um", type=float, default=20.0)
    parser.add_argument("--chunk-size", action="append", default=None,
                        help="final chunk x,y,z; repeat to compare (default: 256,256,16 and 128,128,64)")
    parser.add_argument("--rechunk-chunk-size", default=",".join(map(str, pc.RECHUNKME_CHUNK)),
                        help="step-1 chunk x,y,z (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes for step 1 and for igneous")
    parser.add_argument("--sample", type=int, default=32, help="chunks per mip the verification decodes")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    chunks = [tuple(int(v) for v in c.split(",")) for c in (args.chunk_size or ["256,256,16", "128,128,64"])]
    rechunk = tuple(int(v) for v in args.rechunk_chunk_size.split(","))
    import cloudvolume  # noqa: F401  imported before timing: the figures exclude import time
    import igneous.task_creation  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="bench-precomputed-", dir=args.dir))
    dtype = np.dtype(args.dtype)
    try:
        rng = np.random.default_rng(0)
        sections_dir = work / "aligned"
        sections_dir.mkdir()
        import tifffile

        mb = 0.0
        baseline = 0.0
        paths = []
        for z in range(args.depth):
            plane = synthetic_section(rng, args.height, args.width, dtype, args.rgb)
            path = sections_dir / f"{z:03d}.tif"
            started = time.perf_counter()
            # Tiled like the pipeline's own section TIFFs, so region reads decode only what they need.
            tifffile.imwrite(path, plane, photometric="rgb" if args.rgb else "minisblack", tile=(512, 512))
            baseline += time.perf_counter() - started
            mb += plane.nbytes / 1e6
            paths.append(path)
        print(f"stack {args.width}x{args.height}x{args.depth} {dtype.name}{' RGB' if args.rgb else ''}: {mb:.1f} MB, "
              f"{args.workers} workers, voxel {args.xy_um} x {args.z_um} um")
        print(f"baseline tifffile write (raw, 512x512 tiles, 1 file/section): {mb / baseline:8.1f} MB/s")
        for chunk in chunks:
            src, dest = work / f"C1_{'x'.join(map(str, chunk))}_rechunkme", work / f"C1_{'x'.join(map(str, chunk))}"
            stack = pc.inspect_stack(paths)
            voxel = pc.voxel_size_nm(args.xy_um, args.z_um)
            with PeakRSS() as step1_rss:
                t0 = time.perf_counter()
                pc.create_rechunkme_layer(src, stack, voxel, chunk, chunk_size=rechunk)
                # As the stage does: one task per section in a pool of `workers` processes.
                with ProcessPoolExecutor(args.workers, mp_context=get_context("fork")) as pool:
                    jobs = [pool.submit(pc.write_rechunkme_section, str(src), str(p), z, stack.width, stack.height)
                            for z, p in enumerate(paths)]
                    jobs += [pool.submit(pc.write_padding_section, str(src), z)
                             for z in pc.padding_sections(src, len(paths))]
                    for job in jobs:
                        job.result()
                t1 = time.perf_counter()
            files1, bytes1 = tree_stats(src)
            with PeakRSS() as step2_rss:
                t2 = time.perf_counter()
                result = pc.publish_layer(src, dest, paths, chunk_size=chunk, workers=args.workers,
                                          sample=args.sample, keep_rechunkme=False)
                t3 = time.perf_counter()
            files2, bytes2 = tree_stats(dest)
            seconds = result["seconds"]
            step2 = seconds["total"]
            view = view_cost(dest)
            mips = len(result["mips"])
            print(f"\nfinal chunk {list(chunk)}: {mips} mips, factors {result['plan']['factors']}, padded to {result['plan']['size']}")
            print(f"  step 1 (1 task/section, raw {list(rechunk)}): {mb / (t1 - t0):8.1f} MB/s "
                  f"({(t1 - t0):.1f} s, {mb / (t1 - t0) / (mb / baseline):.2f}x baseline), {files1} files, "
                  f"{bytes1 / 1e6:.1f} MB, peak USS largest worker {step1_rss.peak_child / 1e6:.0f} MB")
            print(f"  step 2 (igneous transfer + pyramid, gzip): {mb / step2:8.1f} MB/s "
                  f"({step2:.1f} s, {mb / step2 / (mb / baseline):.2f}x baseline), {files2} files, "
                  f"{bytes2 / 1e6:.1f} MB on disk (mip 0 {result['mips'][0]['bytes'] / 1e6:.1f} MB), "
                  f"peak RSS main (incl. verify) {step2_rss.peak_self / 1e6:.0f} MB, USS largest worker {step2_rss.peak_child / 1e6:.0f} MB")
            print(f"    of which transfer {result['seconds']['transfer']:.1f} s; rounds "
                  + ", ".join(f"{r['kind']} mip {r['from_mip']}->{r['mips']} ({r['tasks']} tasks)" for r in result["rounds"]))
            print(f"  verify (every chunk file listed, budget {args.sample} decoded chunks/mip: checked "
                  f"{sum(result['verified'].values())}): {seconds['verify']:.1f} s; deleting the step-1 layer "
                  f"{seconds['delete_rechunkme']:.1f} s; whole publish_layer {t3 - t2:.1f} s")
            print(f"  view: a 1024x1024 xy plane at mip 0 reads {view['chunks']} chunk files, "
                  f"{view['stored_MB']:.1f} MB gzip, {view['decoded_MB']:.1f} MB decoded = "
                  f"{view['amplification']:.0f}x the voxels shown")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
