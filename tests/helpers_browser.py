"""Helpers for the serving and viewing tests: real Apache, real headless Chromium.

Other test modules (e.g. the OME-Zarr browser test) use these: `require_apache()`,
`require_chromium()`, `servable(tmp_path)`, `write_gzip_layer(...)`, `asymmetric_section(...)`,
`chromium_driver(...)`, `neuroglancer_viewer(...)` and `screenshot_data(...)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    """Skip locally; fail in CI, where every system program must be installed."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: missing system programs fail the run)")
    pytest.skip(reason)


def require_apache() -> None:
    from apache.launcher import ApacheError, find_apache

    try:
        find_apache()
    except ApacheError as exc:
        _missing(str(exc))


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> None:
    if chromium_binary() is None:
        _missing("chromium not installed: apt-get install chromium")
    if not os.access(CHROMEDRIVER, os.X_OK) and shutil.which("chromedriver") is None:
        _missing("chromedriver not installed: apt-get install chromium-driver")


def servable(path: Path) -> Path:
    """Let Apache's workers (www-data when the tests run as root) enter `path`.

    pytest makes its temp directories 0700; only directories inside the system temp dir are
    given o+x (enter, not list), nothing else on the machine is touched.
    """
    path = Path(path).resolve()
    temp_root = Path(tempfile.gettempdir()).resolve()
    for directory in [path, *path.parents]:
        if directory == temp_root or temp_root not in directory.parents:
            break
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    return path


def asymmetric_section(height: int = 96, width: int = 128, seed: int = 7) -> np.ndarray:
    """A uint8 section no flip, rotation or transpose maps onto itself: a gradient, an off-centre
    bright block, an L-shaped bar and noise (values 10..250, no zeros)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = 40 + (120 * xx / max(width - 1, 1)) + (40 * yy / max(height - 1, 1))
    image[height // 8: height // 3, width // 10: width // 3] = 240
    image[height // 2:, width - width // 5: width - width // 8] = 15
    image[height - height // 6:, width // 4: width - width // 5] = 15
    image += rng.integers(-8, 9, size=image.shape)
    return np.clip(image, 10, 250).astype(np.uint8)


def write_gzip_layer(layer_dir: Path, volume_zyx: np.ndarray, voxel_nm=(325.0, 325.0, 20000.0),
                     chunk=(64, 64, 1), mips: int = 1) -> Path:
    """A Neuroglancer precomputed image layer written by cloud-volume on file:// with gzip chunks
    (`<chunk>.gz` files), plus `mips - 1` 2x2x1 averaged levels, as the neuroglancer stage does."""
    from cloudvolume import CloudVolume

    from pipeline.imaging.downsample import downsample_area

    volume_zyx = np.asarray(volume_zyx)
    z, y, x = volume_zyx.shape[:3]
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type=str(volume_zyx.dtype), encoding="raw",
        resolution=[int(v) if float(v).is_integer() else float(v) for v in voxel_nm], voxel_offset=[0, 0, 0], chunk_size=list(chunk), volume_size=[x, y, z])
    layer_dir = Path(layer_dir)
    layer_dir.mkdir(parents=True, exist_ok=True)
    url = f"file://{layer_dir}"
    cv = CloudVolume(url, info=info, compress="gzip", progress=False)
    level = volume_zyx
    for mip in range(1, mips):
        cv.add_scale([2 ** mip, 2 ** mip, 1], chunk_size=list(chunk))
    cv.commit_info()
    cv.commit_provenance()
    for mip in range(mips):
        if mip:
            level = np.stack([downsample_area(section, 2) for section in level])
        out = CloudVolume(url, mip=mip, compress="gzip", progress=False)
        out[:, :, :] = np.ascontiguousarray(level.transpose(2, 1, 0))
    return layer_dir


@contextlib.contextmanager
def chromium_driver(width: int = 1000, height: int = 800) -> Iterator["object"]:
    """Debian's chromedriver driving headless Chromium with a fresh profile (WebGL2 works with
    these flags: SwiftShader renders in software)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = chromium_binary()
    if binary:
        options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="slidepipe-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def best_match(screenshot: np.ndarray, section: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Correlation of `section` with the best-aligned equally sized window of `screenshot`
    (grey, 1:1 pixels), found by exhaustive integer search with FFT cross-correlation."""
    import cv2

    shot = screenshot.astype(np.float32)
    template = section.astype(np.float32)
    if shot.shape[0] < template.shape[0] or shot.shape[1] < template.shape[1]:
        return 0.0, (0, 0)
    scores = cv2.matchTemplate(shot, template, cv2.TM_CCOEFF_NORMED)
    scores = np.nan_to_num(scores, nan=0.0)
    _, best, _, where = cv2.minMaxLoc(scores)
    return float(best), (int(where[1]), int(where[0]))
