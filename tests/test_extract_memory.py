"""extract reads a large scene in bands: the worker's peak memory does not grow with the scene."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

HEIGHT, WIDTH, TILE = 24576, 32768, 2048  # one uint16 scene of 1536 MB
BOUND_MB = 700  # libraries ~200 MB + a 1024-row band (64 MB) and its copies; far below the scene


def tile_pattern(y0: int, x0: int) -> np.ndarray:
    yy, xx = np.mgrid[y0:y0 + TILE, x0:x0 + TILE].astype(np.uint32)
    return ((yy * 3 + xx * 5 + (xx // 97) * (yy // 89)) % 65521).astype(np.uint16)


@pytest.mark.slow
def test_large_scene_extract_peak_rss(tmp_path):
    from pylibCZIrw import czi as pyczi

    czi = tmp_path / "big_slide01.czi"
    with pyczi.create_czi(str(czi), exist_ok=True, compression_options="zstd1:ExplicitLevel=1") as writer:
        for y in range(0, HEIGHT, TILE):
            for x in range(0, WIDTH, TILE):
                writer.write(tile_pattern(y, x), location=(1000 + x, 2000 + y), plane={"C": 0}, scene=0)
        writer.write_metadata(scale_x=0.325e-6, scale_y=0.325e-6)
    tif = tmp_path / "out" / "big.tif"
    # Sample the child's RSS from a thread: ru_maxrss would include the parent's pages (kept across exec).
    script = textwrap.dedent(f"""
        import json, threading, time, psutil
        peak = [0]
        def watch():
            me = psutil.Process()
            while True:
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.02)
        threading.Thread(target=watch, daemon=True).start()
        from pipeline.stages.extract import extract_section
        extract_section({str(czi)!r}, 0, 1, 0, {str(tif)!r}, {str(tmp_path / 'out' / 'thumb.tif')!r}, None)
        time.sleep(0.1)
        print(json.dumps({{"peak_mb": peak[0] / 2**20}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    peak_mb = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    scene_mb = HEIGHT * WIDTH * 2 / 2**20
    print(f"\nextract of a {WIDTH}x{HEIGHT} uint16 scene ({scene_mb:.0f} MB): peak RSS {peak_mb:.0f} MB")
    assert peak_mb < BOUND_MB, f"peak RSS {peak_mb:.0f} MB for a {scene_mb:.0f} MB scene: not read in bands"
    import zarr

    with tifffile.TiffFile(tif) as handle:
        assert handle.pages[0].shape == (HEIGHT, WIDTH) and handle.pages[0].is_tiled
        written = zarr.open(handle.aszarr(), mode="r")
        for y, x in [(0, 0), (10240, 20480), (HEIGHT - TILE, WIDTH - TILE)]:
            assert np.array_equal(written[y:y + TILE, x:x + TILE], tile_pattern(y, x))
    assert tifffile.imread(tmp_path / "out" / "thumb.tif").shape == (HEIGHT // 32, WIDTH // 32)
