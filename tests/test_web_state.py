"""The Neuroglancer state and link builder (web.state) and the display-window maths."""

from __future__ import annotations

import json
import urllib.parse

import numpy as np
import pytest

from pipeline.imaging.contrast import histogram_of, window_from_histogram
from pipeline.layout import AnimalLayout
from tests.helpers_browser import asymmetric_section, write_gzip_layer
from web.state import (PUBLIC_NEUROGLANCER, ViewerStateError, animals_with_published_data, build_state, link_for,
                       offline_client_url, write_links)

BASE = "http://127.0.0.1:8123"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("state") / "data"
    layout = AnimalLayout(root, "DK1")
    volume = np.stack([asymmetric_section(40, 60, seed=s) for s in range(5)])
    write_gzip_layer(layout.precomputed_layer(1, False), volume, voxel_nm=(325, 325, 20000), mips=2)
    write_gzip_layer(layout.precomputed_layer(2, False), volume // 2, voxel_nm=(325, 325, 20000))
    write_gzip_layer(layout.precomputed_layer(1, True), volume[:, ::8, ::8], voxel_nm=(10400, 10400, 20000))
    (root / "EMPTY" / "www").mkdir(parents=True)
    return root


def test_window_from_histogram_quantiles():
    values = np.concatenate([np.zeros(5000, np.uint8), np.arange(1, 201, dtype=np.uint8).repeat(10)])
    counts, edges = histogram_of(values, np.uint8)
    assert counts.size == 256 and edges[0] == 0 and edges[-1] == 256
    lo, hi = window_from_histogram(counts, edges, 0.05, 0.95)
    # zeros (background) are left out: 5 % of 1..200 is value 10, 95 % is value 190
    assert (lo, hi) == (11.0, 191.0)
    lo_all, _ = window_from_histogram(counts, edges, 0.05, 0.95, ignore_zero=False)
    assert lo_all == 0.0
    with pytest.raises(ValueError):
        window_from_histogram(np.zeros(4), np.arange(5))
    with pytest.raises(ValueError):
        window_from_histogram(np.ones(4), np.arange(4))


def test_state_has_every_channel_in_nm_centred(root):
    state = build_state(root, "DK1", BASE, windows={1: (5, 200), 2: (3, 120)})
    assert [layer["name"] for layer in state["layers"]] == ["C1", "C2"]
    assert state["layers"][0]["source"] == f"precomputed://{BASE}/DK1/neuroglancer_data/C1"
    assert state["layers"][1]["source"] == f"precomputed://{BASE}/DK1/neuroglancer_data/C2"
    assert state["dimensions"] == {"x": [325.0, "nm"], "y": [325.0, "nm"], "z": [20000.0, "nm"]}
    assert state["position"] == [30.0, 20.0, 2.5]
    assert state["layers"][0]["shaderControls"]["normalized"]["range"] == [5.0, 200.0]
    assert state["layers"][1]["shaderControls"]["normalized"]["range"] == [3.0, 120.0]
    # two channels: coloured and added, like a fluorescence overlay
    assert all(layer["blend"] == "additive" and "emitRGB(color" in layer["shader"] for layer in state["layers"])
    assert state["crossSectionScale"] > 0
    json.dumps(state)


def test_thumbnail_layers_and_channel_choice(root):
    state = build_state(root, "DK1", BASE, downsample=True, windows={1: (0, 255)})
    assert [layer["source"] for layer in state["layers"]] == [f"precomputed://{BASE}/DK1/neuroglancer_data/C1T"]
    assert state["dimensions"]["x"] == [10400.0, "nm"]
    assert "emitGrayscale" in state["layers"][0]["shader"]
    # the zoom counts the smallest voxel size per pixel: the section (8 x 5 voxels of 10.4 um)
    # fills most of a 600 x 300 xy panel, whole
    shown_nm = state["crossSectionScale"] * 10400.0
    assert 0.5 < max(8 * 10400 / (shown_nm * 600), 5 * 10400 / (shown_nm * 300)) <= 1
    only_two = build_state(root, "DK1", BASE, channels=[2], windows={2: (0, 100)})
    assert [layer["name"] for layer in only_two["layers"]] == ["C2"]


def test_window_published_with_the_layer_then_from_data(root):
    """The window publish_layer records in the provenance wins; the histogram stage's counts (of
    the sections before clean, e.g. before --normalise) are not used (issue 13.3)."""
    layout = AnimalLayout(root, "DK1")
    combined = layout.histogram_data(1, False, None)
    combined.parent.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(256, np.int64)
    counts[[0, 50, 100, 150]] = [10_000, 100, 100, 100]
    np.savez(combined, counts=counts)
    provenance = layout.precomputed_layer(1, False) / "provenance"
    before = provenance.read_text()
    prov = json.loads(before)
    prov["processing"].append({"method": {"task": "slidepipe.precomputed", "window": [12.0, 230.0]}})
    provenance.write_text(json.dumps(prov))
    try:
        state = build_state(root, "DK1", BASE, channels=[1])
        assert state["layers"][0]["shaderControls"]["normalized"]["range"] == [12.0, 230.0]
    finally:
        provenance.write_text(before)
    # no recorded window: from the voxels of the smallest level, not from the stored histogram
    state = build_state(root, "DK1", BASE, channels=[1])
    lo, hi = state["layers"][0]["shaderControls"]["normalized"]["range"]
    combined.unlink()
    assert 10 <= lo < 60 and 180 < hi <= 251


def test_omezarr_layer_source_v2_and_v3(tmp_path):
    import zarr

    layout = AnimalLayout(tmp_path, "DK2")
    for zarr_format, downsample in ((3, False), (2, True)):
        store = layout.omezarr(1, downsample)
        group = zarr.open_group(str(store), mode="w", zarr_format=zarr_format)
        group.create_array("0", data=np.stack([asymmetric_section(32, 48, seed=s) for s in range(4)]))
        group.create_array("1", data=np.stack([asymmetric_section(16, 24, seed=s) for s in range(4)]))
        multiscales = [{"axes": [{"name": "z", "type": "space", "unit": "micrometer"},
                                 {"name": "y", "type": "space", "unit": "micrometer"},
                                 {"name": "x", "type": "space", "unit": "micrometer"}],
                        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [20, 0.5, 0.5]}]},
                                     {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [20, 1, 1]}]}]}]
        if zarr_format == 3:
            group.attrs["ome"] = {"version": "0.5", "multiscales": [dict(m, version="0.5") for m in multiscales]}
        else:
            group.attrs["multiscales"] = [dict(m, version="0.4") for m in multiscales]
    v3 = build_state(tmp_path, "DK2", BASE, layer_source="omezarr", downsample=False)
    assert v3["layers"][0]["source"] == f"zarr3://{BASE}/DK2/omezarr/C1.ome.zarr"
    assert v3["dimensions"] == {"x": [500.0, "nm"], "y": [500.0, "nm"], "z": [20000.0, "nm"]}
    assert v3["position"] == [23.5, 15.5, 2.0]  # NGFF pixel centres sit on integer coordinates
    lo, hi = v3["layers"][0]["shaderControls"]["normalized"]["range"]
    assert 0 < lo < hi <= 256
    auto = build_state(tmp_path, "DK2", BASE, windows={1: (0, 255)})  # nothing precomputed: the OME-Zarr
    assert auto["layers"][0]["source"] == v3["layers"][0]["source"]
    v2 = build_state(tmp_path, "DK2", BASE, layer_source={1: layout.omezarr(1, True)}, windows={1: (1, 2)})
    assert v2["layers"][0]["source"] == f"zarr2://{BASE}/DK2/omezarr/C1T.ome.zarr"


def test_links_round_trip_and_are_stored(root):
    state = build_state(root, "DK1", BASE, windows={1: (0, 255), 2: (0, 255)})
    offline = link_for(state, offline_client_url(BASE))
    public = link_for(state, PUBLIC_NEUROGLANCER)
    assert offline.startswith(f"{BASE}/v/slidepipe/#!") and public.startswith(PUBLIC_NEUROGLANCER + "#!")
    for link in (offline, public):
        fragment = link.split("#!", 1)[1]
        assert " " not in fragment and "#" not in fragment and '"' not in fragment
        assert json.loads(urllib.parse.unquote(fragment)) == state
    links = write_links(root, "DK1", BASE, windows={1: (0, 255), 2: (0, 255)})
    layout = AnimalLayout(root, "DK1")
    assert json.loads(layout.viewer_links().read_text()) == links
    assert json.loads(layout.viewer_state().read_text()) == state
    assert links["offline"] == offline


def test_rgb_layer_gets_an_rgb_shader(tmp_path):
    from cloudvolume import CloudVolume

    layer = AnimalLayout(tmp_path, "BF").precomputed_layer(1, False)
    info = CloudVolume.create_new_info(num_channels=3, layer_type="image", data_type="uint8", encoding="raw",
                                       resolution=[400, 400, 20000], voxel_offset=[0, 0, 0],
                                       chunk_size=[16, 16, 1], volume_size=[16, 16, 2])
    cv = CloudVolume(f"file://{layer}", info=info, compress="gzip", progress=False)
    cv.commit_info()
    state = build_state(tmp_path, "BF", BASE, windows={1: (0, 255)})
    assert "emitRGB(vec3(toNormalized(getDataValue(0))" in state["layers"][0]["shader"]


def test_nothing_published_is_a_clear_error(root):
    with pytest.raises(ViewerStateError, match="nothing published"):
        build_state(root, "EMPTY", BASE)
    assert animals_with_published_data(root) == ["DK1"]


def test_zoom_fits_when_sections_are_thinner_than_pixels(tmp_path):
    """Thumbnails of the sample brain: 104 um pixels, 20 um sections. Neuroglancer's zoom counts
    the smallest voxel size (z here) per screen pixel."""
    layer = AnimalLayout(tmp_path, "TH").precomputed_layer(1, True)
    write_gzip_layer(layer, np.stack([asymmetric_section(48, 80, seed=s) for s in range(4)]),
                     voxel_nm=(104000, 104000, 20000))
    state = build_state(tmp_path, "TH", BASE, windows={1: (0, 255)})
    shown_nm = state["crossSectionScale"] * 20000.0
    assert 0.5 < max(80 * 104000 / (shown_nm * 600), 48 * 104000 / (shown_nm * 300)) <= 1
