"""Neuroglancer in real headless Chromium draws what slidepipe publishes and Apache serves.

What is asserted, on pixels only:
- through `neuroglancer.Viewer` (its own Python server) with the generated state set to one
  screen pixel per voxel and the identity window (0, 255), the data-only screenshot taken after
  every visible chunk loaded contains the source section *exactly* (every pixel equal), centred,
  and it is the requested section, not a neighbour; likewise an RGB (3-channel) layer, every
  colour channel exact, and OME-Zarr stores (NGFF 0.5 / zarr v3 and 0.4 / zarr v2);
- negative controls: the same render against an Apache without `Content-Encoding: gzip`, or
  without CORS, never yields that picture (Neuroglancer cannot decode or may not read the chunks);
- the offline client served by the same Apache under /v/<token>/, opened with the generated
  link, draws the section with the generated (data-derived) window: correlation > 0.99 and a mean
  difference under 1.5 grey levels against the windowed source, no "Disconnected" notice; with
  the offline script blocked, the notice does appear (so the script is what silences it);
- the stack with its left half zero in (32, 32, 1) chunks, whose all-zero chunks have no file
  (Apache answers 404): drawn exactly, the zeros as zeros, not as the panel's grey background;
- the same stack published `--sharded` (.shard files read in byte ranges): drawn exactly through
  `neuroglancer.Viewer`, and by the offline client, from Apache;
- the exact-pixel render and the offline client also with the built-in fallback server
  (apache.fallback) in Apache's place (the tests marked `apache` are the Apache-only ones).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from apache.launcher import ApacheServer, create_server
from pipeline.layout import AnimalLayout
from tests.helpers_browser import (asymmetric_section, best_match, chromium_driver, one_to_one, page_screenshot,
                                   render_with_python_viewer, require_apache, require_chromium, servable_dir, windowed,
                                   write_plain_omezarr)
from web.state import build_state, link_for, offline_client_url

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]
SERVERS = [pytest.param("apache", marks=pytest.mark.apache), "fallback"]

ANIMAL = "DK1"
HEIGHT, WIDTH, DEPTH = 96, 128, 3
SIZE = (256, 192)          # screenshot size (w, h): the section fits with a grey margin
SHOWN = 1                  # the section the tests look at


@pytest.fixture(scope="module")
def published():
    """A 3-section stack published by the neuroglancer stage's writer (gzip chunks)."""
    require_chromium()
    with servable_dir() as served:
        yield _publish(served / "data")


@pytest.fixture(scope="module")
def published_sharded():
    """The same stack published with --sharded (igneous's .shard files, read in byte ranges)."""
    require_chromium()
    require_apache()
    with servable_dir() as served:
        root, volume = _publish(served / "data", sharded=True)
        assert any(root.rglob("*.shard")) and not any(root.rglob("*.gz"))
        yield root, volume


@pytest.fixture(scope="module")
def published_background():
    """The stack with its left half zero (as after masking), in (32, 32, 1) chunks: the all-zero
    chunks have no file, so Apache answers 404 for them."""
    require_chromium()
    require_apache()
    with servable_dir() as served:
        root, volume = _publish(served / "data", chunk_size=(32, 32, 1), background_columns=WIDTH // 2)
        layer = AnimalLayout(root, ANIMAL).precomputed_layer(1, downsample=False)
        key = sorted(p for p in layer.iterdir() if p.is_dir())[0]
        assert len(list(key.glob("*.gz"))) == DEPTH * 3 * 2, "only the chunks of the right half are written"
        yield root, volume


def _publish(root: Path, sharded: bool = False, chunk_size=None, background_columns: int = 0):
    import tifffile

    from pipeline.publish.precomputed import publish_stack

    sources = root / "aligned"
    sources.mkdir(parents=True)
    sections = [asymmetric_section(HEIGHT, WIDTH, seed=z) for z in range(DEPTH)]
    for section in sections:
        section[:, :background_columns] = 0
    paths = []
    for z, section in enumerate(sections):
        paths.append(sources / f"{z:03d}.tif")
        tifffile.imwrite(paths[-1], section)
    layer = AnimalLayout(root, ANIMAL).precomputed_layer(1, downsample=False)
    publish_stack(paths, layer, xy_um=0.325, z_um=20.0, sharded=sharded,
                  **({"chunk_size": chunk_size} if chunk_size else {}))
    assert sharded or any(layer.rglob("*.gz")), "the writer is expected to store gzip chunks"
    return root, np.stack(sections)


@pytest.fixture
def driver():
    with chromium_driver() as running:
        yield running


def serving(kind: str, root: Path, **options):
    """A started-on-`with` Apache (needs apache2) or built-in fallback server on `root`."""
    if kind == "apache":
        require_apache()
    return create_server(kind, root, **options)


def python_viewer_render(driver, root: Path, timeout: float, kind: str = "apache", **options) -> np.ndarray | None:
    with serving(kind, root, **options) as server:
        state = build_state(root, ANIMAL, server.url, windows={1: (0, 255)})
        return render_with_python_viewer(driver, one_to_one(state, section=SHOWN), SIZE, timeout=timeout)


def assert_drawn_exactly_at_the_centre(grey: np.ndarray, volume: np.ndarray) -> tuple[int, int]:
    """The screenshot's channel `grey` holds section SHOWN of `volume` exactly (every pixel
    equal), centred (position = volume centre), and it is that section, not a neighbour; returns
    where it is drawn, (y, x)."""
    score, (y, x) = best_match(grey, volume[SHOWN])
    assert score > 0.999
    assert np.array_equal(grey[y:y + HEIGHT, x:x + WIDTH], volume[SHOWN])
    assert abs((y + HEIGHT / 2) - SIZE[1] / 2) <= 1 and abs((x + WIDTH / 2) - SIZE[0] / 2) <= 1
    for other in set(range(DEPTH)) - {SHOWN}:
        assert not np.array_equal(grey[y:y + HEIGHT, x:x + WIDTH], volume[other])
    return y, x


@pytest.mark.parametrize("kind", SERVERS)
def test_python_viewer_screenshot_equals_the_source_section(published, driver, kind):
    root, volume = published
    shot = python_viewer_render(driver, root, timeout=120, kind=kind)
    assert shot is not None, f"Neuroglancer did not finish loading the chunks served by {kind}"
    grey = shot[..., 0]
    assert np.array_equal(grey, shot[..., 1]) and np.array_equal(grey, shot[..., 2])
    assert_drawn_exactly_at_the_centre(grey, volume)


@pytest.mark.apache
def test_python_viewer_draws_the_sharded_layer_exactly(published_sharded, driver):
    """--sharded: Neuroglancer reads the shard index, minishard index and chunks from Apache in
    byte ranges and draws the section exactly."""
    root, volume = published_sharded
    shot = python_viewer_render(driver, root, timeout=120)
    assert shot is not None, "Neuroglancer did not finish loading the shards served by Apache"
    assert_drawn_exactly_at_the_centre(shot[..., 0], volume)


@pytest.mark.apache
def test_python_viewer_draws_a_layer_without_its_background_chunks_exactly(published_background, driver):
    """Chunks that are all zero are not written (delete_black_uploads); Apache answers 404 for
    them and Neuroglancer draws them as zeros: the section, half of it zero, is drawn exactly."""
    root, volume = published_background
    shot = python_viewer_render(driver, root, timeout=120)
    assert shot is not None, "Neuroglancer did not finish loading (a 404 chunk must count as loaded)"
    y, x = assert_drawn_exactly_at_the_centre(shot[..., 0], volume)
    assert not volume[SHOWN][:, :WIDTH // 2].any() and volume[SHOWN][:, WIDTH // 2:].all()
    # outside the volume the panel shows its own background: a zero drawn is not a chunk left out
    # (a chunk left undrawn would show it, grey 128, not the zeros asserted above)
    assert shot[y + HEIGHT // 2, x - 2, 0] == shot[0, 0, 0] == 128


@pytest.mark.apache
def test_offline_client_draws_the_sharded_layer(published_sharded, driver):
    root, volume = published_sharded
    assert np.array_equal(_published_section(root), volume[SHOWN])
    page, expected, score, (y, x), window = _offline_page(driver, root)
    drawn = page[y:y + HEIGHT, x:x + WIDTH].astype(np.float64)
    assert drawn.std() > 20, "blank data panel"
    assert score > 0.99
    assert np.abs(drawn[..., 0] - expected).mean() < 1.5
    assert not _visible_texts(driver, "Disconnected")


@pytest.mark.apache
@pytest.mark.parametrize("broken", [{"gzip_header": False}, {"cors": False}], ids=["no-gzip-header", "no-cors"])
def test_negative_control_without_required_headers_nothing_is_drawn(published, driver, broken):
    root, volume = published
    # The working server's render (the positive tests) finishes in 1-3 s; 10 s leaves it a wide
    # margin, so a section that is not drawn by then is not merely slow. (Each case waits all of
    # it when nothing is drawn.)
    shot = python_viewer_render(driver, root, timeout=10, **broken)
    if shot is None:
        return  # Neuroglancer never got decodable chunks: the positive test would fail here
    score, (y, x) = best_match(shot[..., 0], volume[SHOWN])
    assert score < 0.5, f"the section was drawn although the server is {broken}"


@pytest.mark.apache
def test_python_viewer_draws_rgb_brightfield_exactly(driver):
    """RGB sections are published as one 3-channel layer; the state's RGB shader shows each
    colour channel unchanged with the window (0, 255)."""
    import tifffile

    require_apache()
    from pipeline.publish.precomputed import publish_stack

    rgb = np.stack([np.stack([asymmetric_section(HEIGHT, WIDTH, seed=z), asymmetric_section(HEIGHT, WIDTH, seed=z + 10)[::-1],
                              255 - asymmetric_section(HEIGHT, WIDTH, seed=z + 20)], axis=-1) for z in range(DEPTH)])
    with servable_dir() as served:
        root = served / "data"
        (root / "aligned").mkdir(parents=True)
        paths = [root / "aligned" / f"{z:03d}.tif" for z in range(DEPTH)]
        for path, section in zip(paths, rgb):
            tifffile.imwrite(path, section, photometric="rgb")
        publish_stack(paths, AnimalLayout(root, "BF").precomputed_layer(1, downsample=False), xy_um=0.325, z_um=20.0)
        with ApacheServer(root) as server:
            state = build_state(root, "BF", server.url, windows={1: (0, 255)})
            shot = render_with_python_viewer(driver, one_to_one(state, section=SHOWN), SIZE, timeout=120)
    assert shot is not None
    score, (y, x) = best_match(shot[..., 0], rgb[SHOWN][..., 0])
    assert score > 0.999
    assert np.array_equal(shot[y:y + HEIGHT, x:x + WIDTH, :3], rgb[SHOWN])


@pytest.mark.apache
@pytest.mark.parametrize("zarr_format", [3, 2], ids=["ngff-0.5-zarr3", "ngff-0.4-zarr2"])
def test_python_viewer_draws_an_omezarr_layer_exactly(published, driver, zarr_format):
    """`layer_source="omezarr"`: the same section from an OME-Zarr store served by Apache."""
    require_apache()
    root, volume = published
    store = AnimalLayout(root, ANIMAL).omezarr(1, downsample=False)
    write_plain_omezarr(store, volume, zarr_format=zarr_format)
    try:
        with ApacheServer(root) as server:
            state = build_state(root, ANIMAL, server.url, layer_source="omezarr", windows={1: (0, 255)})
            assert state["layers"][0]["source"].startswith(f"zarr{zarr_format}://")
            shot = render_with_python_viewer(driver, one_to_one(state, section=SHOWN), SIZE, timeout=120)
    finally:
        import shutil

        shutil.rmtree(store)
    assert shot is not None, "Neuroglancer did not finish loading the OME-Zarr chunks served by Apache"
    assert_drawn_exactly_at_the_centre(shot[..., 0], volume)


def _visible_texts(driver, needle: str) -> list[str]:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.XPATH, f"//*[contains(text(), '{needle}')]")
    return [element.text for element in found if element.is_displayed()]


def _offline_page(driver, root: Path, block_offline_script: bool = False, kind: str = "apache"):
    """Open the generated offline link; poll the page until the section appears (or 60 s)."""
    with serving(kind, root) as server:
        state = build_state(root, ANIMAL, server.url, layout="xy")
        window = state["layers"][0]["shaderControls"]["normalized"]["range"]
        link = link_for(one_to_one(state, section=SHOWN), offline_client_url(server.url))
        if block_offline_script:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*slidepipe-offline.js"]})
        driver.get(link)
        deadline = time.monotonic() + 60
        expected = None
        while time.monotonic() < deadline:
            page = page_screenshot(driver)
            expected = windowed(_published_section(root), window)
            score, where = best_match(page[..., 0].astype(np.float32), expected.astype(np.float32))
            if score > 0.99:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # let a failed event-stream connection show its notice, if any
        return page, expected, score, where, window


def _published_section(root: Path) -> np.ndarray:
    from cloudvolume import CloudVolume

    layer = AnimalLayout(root, ANIMAL).precomputed_layer(1, downsample=False)
    cv = CloudVolume(f"file://{layer}", mip=0, progress=False, fill_missing=True)
    return np.asarray(cv[0:WIDTH, 0:HEIGHT, SHOWN:SHOWN + 1])[..., 0, 0].T


@pytest.mark.parametrize("kind", SERVERS)
def test_offline_client_draws_the_brain_without_notice(published, driver, kind):
    root, volume = published
    assert np.array_equal(_published_section(root), volume[SHOWN])
    page, expected, score, (y, x), window = _offline_page(driver, root, kind=kind)
    assert window[0] > 0 and window[1] < 255, "window should come from the data, not the dtype range"
    drawn = page[y:y + HEIGHT, x:x + WIDTH].astype(np.float64)
    assert drawn.std() > 20, "blank data panel"
    assert score > 0.99
    assert np.abs(drawn[..., 0] - expected).mean() < 1.5
    assert np.array_equal(drawn[..., 0], drawn[..., 1])
    assert driver.execute_script("return window.slidepipeOffline && window.slidepipeOffline.eventsUrl")
    assert not _visible_texts(driver, "Disconnected"), "the 'Disconnected from Python server' notice is visible"
    assert not _visible_texts(driver, "Python server")


@pytest.mark.apache
def test_offline_notice_appears_when_the_offline_script_is_blocked(published, driver):
    """Control for the test above: the client itself shows the notice; our script removes it."""
    root, _ = published
    page, expected, score, where, window = _offline_page(driver, root, block_offline_script=True)
    assert score > 0.99  # it still draws (state comes from the URL)
    deadline = time.monotonic() + 10
    while not _visible_texts(driver, "Disconnected from Python server") and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _visible_texts(driver, "Disconnected from Python server")
