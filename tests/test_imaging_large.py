"""A 20000 x 15000 uint16 section through full-resolution mask, clean and align in bounded memory.

The worker functions of the stages run in a child process whose peak RSS is measured (psutil
polling from here, and the kernel's high-water mark VmHWM reported by the child). The result must also
match the thumbnail path: the cleaned section exactly (clean only moves whole 32 x 32 blocks),
the aligned one within interpolation error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import tifffile

from pipeline.imaging.downsample import downsample_area
from pipeline.imaging.mask import tissue_mask
from pipeline.imaging.orient import Orientation, canvas_shape, clean_section, oriented_shape, plan_clean, tissue_box
from pipeline.imaging.transforms import canvas_center, rigid_matrix
from pipeline.imaging.warp import warp_affine
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.stages.section_files import TILE, open_windows, write_tiled

HEIGHT, WIDTH = 15000, 20000
SECTION_BYTES = HEIGHT * WIDTH * 2  # 600 MB
PEAK_RSS_BOUND = 256 * 2**20
"""The worker may hold 256 MiB at most (interpreter and libraries included): less than half of ONE
copy of the 572 MiB section. A naive version holds the section, its mask, a float copy and the
output at once (> 2 GiB). Measured here: ~125 MiB."""
BAND = 512


def _band(y0: int, y1: int, rng) -> np.ndarray:
    """Rows y0:y1 of a tissue-like section: textured ellipse on a dim noisy background."""
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(WIDTH, dtype=np.float32)[None, :]
    inside = ((xx - 0.52 * WIDTH) / (0.40 * WIDTH)) ** 2 + ((yy - 0.48 * HEIGHT) / (0.38 * HEIGHT)) ** 2 <= 1.0
    texture = 1800 + 700 * np.sin(xx / 211.0) * np.cos(yy / 157.0) + 400 * np.sin((xx + 2 * yy) / 1301.0)
    band = np.where(inside, texture, 60.0) + rng.integers(0, 40, size=inside.shape)
    return band.astype(np.uint16)


@pytest.mark.slow
def test_full_resolution_clean_and_align_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "section.tif"
    thumb_bands = []

    def tiles():  # one band is one row of TIFF tiles, so tiles come in the row-major order TIFF needs
        for y0 in range(0, HEIGHT, BAND):
            band = _band(y0, min(y0 + BAND, HEIGHT), rng)
            thumb_bands.append(downsample_area(band, THUMBNAIL_FACTOR))
            for x0 in range(0, WIDTH, TILE[1]):
                yield band[:, x0:x0 + TILE[1]]

    assert BAND == TILE[0] and BAND % THUMBNAIL_FACTOR == 0
    write_tiled(source, (HEIGHT, WIDTH), np.uint16, tiles())
    thumbnail = np.concatenate(thumb_bands)
    mask = tissue_mask(thumbnail)
    thumb_mask_path = tmp_path / "mask_thumbnail.tif"
    tifffile.imwrite(thumb_mask_path, (mask * 255).astype(np.uint8))
    orientation = Orientation(rotation=1, flip=True, flop=False)
    y0, y1, x0, x1 = tissue_box(mask)
    canvas = canvas_shape([oriented_shape((y1 - y0, x1 - x0), orientation)])
    geometry = plan_clean(mask, orientation, canvas)
    matrix = rigid_matrix(np.deg2rad(4.0), 7.3, -4.1, canvas_center(canvas))
    transform = tmp_path / "transform.json"
    transform.write_text(json.dumps({"matrix": matrix.tolist(), "canvas": list(canvas), "rotation": 0, "xshift": 0, "yshift": 0}))

    paths = {name: tmp_path / f"{name}.tif" for name in ("full_mask", "cleaned", "aligned")}
    script = textwrap.dedent(f"""
        import json
        from pipeline.stages.mask import full_mask
        from pipeline.stages.clean import clean_full
        from pipeline.stages.align import warp_full
        def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would carry pytest's over exec)
            with open("/proc/self/status") as status:
                line = next(l for l in status if l.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        report = {{"after_imports": peak()}}
        full_mask({str(thumb_mask_path)!r}, {str(paths['full_mask'])!r}, {HEIGHT}, {WIDTH})
        report["after_mask"] = peak()
        clean_full({str(source)!r}, {str(paths['full_mask'])!r}, {str(paths['cleaned'])!r}, {geometry.to_dict()!r}, {THUMBNAIL_FACTOR})
        report["after_clean"] = peak()
        warp_full({str(paths['cleaned'])!r}, {str(transform)!r}, {str(paths['aligned'])!r})
        report["after_align"] = peak()
        print(json.dumps(report))
    """)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    polled = 0
    watched = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            polled = max(polled, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = child.communicate()
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    mib = {k: round(v / 2**20) for k, v in report.items()}
    print(f"section {WIDTH} x {HEIGHT} uint16 = {SECTION_BYTES / 2**20:.0f} MiB, canvas {canvas[1] * 32} x {canvas[0] * 32}; "
          f"worker peak RSS {max(report.values()) / 2**20:.0f} MiB (high-water marks {mib}, psutil polled "
          f"{polled / 2**20:.0f} MiB), bound {PEAK_RSS_BOUND / 2**20:.0f} MiB; {time.perf_counter() - start:.0f} s")
    assert max(report["after_align"], polled) < PEAK_RSS_BOUND

    # the pixels agree with the thumbnail path
    cleaned_thumb = clean_section(thumbnail, mask, geometry)
    aligned_thumb = warp_affine(cleaned_thumb, matrix, canvas)
    for name, expected, exact in (("cleaned", cleaned_thumb, True), ("aligned", aligned_thumb, False)):
        with open_windows(paths[name]) as (read, shape, dtype):
            assert shape == (canvas[0] * THUMBNAIL_FACTOR, canvas[1] * THUMBNAIL_FACTOR) and dtype == np.uint16
            reduced = np.concatenate([downsample_area(read(r, min(r + 1024, shape[0]), 0, shape[1]), THUMBNAIL_FACTOR)
                                      for r in range(0, shape[0], 1024)])
        if exact:
            assert np.array_equal(reduced, expected)
            continue
        from scipy import ndimage as ndi
        import cv2

        inner = ndi.binary_erosion(expected > 0, iterations=2)
        relative = np.abs(reduced.astype(float) - expected)[inner] / expected[inner]
        shift = cv2.phaseCorrelate(expected.astype(np.float64), reduced.astype(np.float64))[0]
        print(f"aligned full vs thumbnail path: median relative difference {np.median(relative):.4f}, "
              f"95th percentile {np.percentile(relative, 95):.4f}, residual shift ({shift[0]:+.3f}, {shift[1]:+.3f}) px")
        assert np.median(relative) < 0.02 and np.percentile(relative, 95) < 0.1
        assert abs(shift[0]) < 0.1 and abs(shift[1]) < 0.1
