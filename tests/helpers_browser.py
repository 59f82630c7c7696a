"""Helpers for the serving and viewing tests: real Apache, real headless Chromium.

Other test modules (e.g. the OME-Zarr browser test) use these: `require_apache()`,
`require_chromium()`, `servable_dir()`, `write_gzip_layer(...)`, `asymmetric_section(...)`,
`chromium_driver(...)`, `neuroglancer_viewer(...)` and `screenshot_data(...)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def servable_dir(prefix: str = "slidepipe-www-") -> Iterator[Path]:
    """A fresh 0755 directory in the system temp dir, removed afterwards, for data Apache serves.

    Not tmp_path: when the tests run as root, Apache's workers run as www-data and cannot enter
    pytest's 0700 /tmp/pytest-of-root (which every new pytest session sets back to 0700).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def one_to_one(state: dict, section: int | None = None) -> dict:
    """A copy of a generated state set up for pixel comparison: one xy panel, one screen pixel
    per voxel, no axis lines, bounding boxes or scale bar drawn over the data; optionally on
    section `section` (z index)."""
    import copy

    state = copy.deepcopy(state)
    state.update(layout="xy", crossSectionScale=1, showAxisLines=False, showDefaultAnnotations=False,
                 showScaleBar=False)
    state.pop("selectedLayer", None)
    if section is not None:  # keep the state's offset within a section (0.5: precomputed, 0: OME-Zarr)
        from web.state import at_section

        state = at_section(state, section)
    return state


def data_screenshot(viewer, size: tuple[int, int], timeout: float) -> np.ndarray | None:
    """`viewer.screenshot(size)` (the data panel only, taken after every visible chunk loaded) as
    an RGBA array, or None when Neuroglancer could not finish loading within `timeout` seconds
    (it waits for chunks that fail to decode for ever, hence the timeout)."""
    import threading
    import time

    with viewer.config_state.txn() as s:
        s.show_ui_controls = False
        s.show_panel_borders = False
        s.viewer_size = list(size)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = threading.Event()
        result = []
        viewer.async_screenshot(lambda reply: (result.append(reply), done.set()))
        if not done.wait(max(0.0, deadline - time.monotonic())):
            return None
        shot = result[0].screenshot
        if (shot.width, shot.height) == tuple(size):
            return shot.image_pixels
    return None


def render_with_python_viewer(driver, state: dict, size: tuple[int, int] = (256, 192),
                              timeout: float = 60.0) -> np.ndarray | None:
    """Show `state` (JSON dict) in a `neuroglancer.Viewer` (its own Python server) opened in the
    selenium `driver`; return the data-only screenshot (RGBA) or None if it never finished."""
    import neuroglancer

    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    driver.get(viewer.get_viewer_url())
    return data_screenshot(viewer, size, timeout)


def page_screenshot(driver) -> np.ndarray:
    """The browser window as an RGB array (selenium's PNG)."""
    import cv2

    png = np.frombuffer(driver.get_screenshot_as_png(), dtype=np.uint8)
    return cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def windowed(section: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """What Neuroglancer's invlerp + emitGrayscale draws for `section` with display `window`."""
    lo, hi = window
    return np.clip((section.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255


def write_plain_omezarr(store: Path, volume_zyx: np.ndarray, voxel_um=(20.0, 0.325, 0.325), zarr_format: int = 3,
                        chunks=(1, 64, 64)) -> Path:
    """A one-level OME-Zarr (NGFF 0.5 for zarr v3, 0.4 for v2) written with zarr and metadata
    by hand: enough for viewer tests without the omezarr stage."""
    import zarr

    group = zarr.open_group(str(store), mode="w", zarr_format=zarr_format)
    group.create_array("0", data=np.asarray(volume_zyx), chunks=chunks)
    version = "0.5" if zarr_format == 3 else "0.4"
    multiscale = {"version": version, "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(voxel_um)}]}]}
    if zarr_format == 3:
        group.attrs["ome"] = {"version": version, "multiscales": [multiscale]}
    else:
        group.attrs["multiscales"] = [multiscale]
    return Path(store)
