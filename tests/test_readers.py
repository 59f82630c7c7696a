"""Slide readers: CZI (pylibCZIrw) and TIFF/OME-TIFF, against files written here and real ZEN files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import SlideReadError
from pipeline.readers import find_gaps, natural_sorted_tiffs, open_slide
from tests.helpers_czi import REAL_CZI_DIR, corrupt_scene, corrupt_subblock, subblocks, write_czi

# --- synthetic CZI ---------------------------------------------------------------------------
SCENE0 = ((1000, 500), (500, 700))  # origin (x, y), shape (h, w): 2 x 3 tiles of 256 with overlap
SCENE1 = ((-300, 3000), (380, 520))  # negative origin


def _image(shape, seed: int) -> np.ndarray:
    """Smooth structure plus noise: compressible (so corruption is detectable) yet never constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = 20000 + 15000 * np.sin(xx / 37.0 + seed) * np.cos(yy / 23.0)
    return (smooth + rng.integers(0, 64, shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("czi") / "synthetic.czi"
    truth = {}
    scenes = []
    for s, (origin, shape) in enumerate((SCENE0, SCENE1)):
        channels = [_image(shape, 10 * s + c) for c in range(2)]
        truth[s] = channels
        scenes.append((origin, channels))
    write_czi(path, scenes, tile=256, overlap=16, channel_names={0: "DAPI", 1: "GFP"})
    return path, truth


def test_czi_info_scenes_channels_pixel_size(synthetic):
    path, _ = synthetic
    with open_slide(path) as reader:
        info = reader.info()
    assert info.path == path
    assert len(info.scenes) == 2  # pylibCZIrw writes no scene list in the XML: found via libCZI
    for scene, ((x, y), (h, w)) in zip(info.scenes, (SCENE0, SCENE1)):
        assert (scene.x, scene.y, scene.width, scene.height) == (x, y, w, h)
        assert [(c.index, c.name) for c in scene.channels] == [(1, "DAPI"), (2, "GFP")]
        assert (scene.dtype, scene.samples_per_pixel, scene.z_planes) == ("uint16", 1, 1)
    assert info.pixel_size_um == pytest.approx((0.325, 0.325))
    assert info.acquisition_date is None and info.objective is None


def test_czi_whole_scenes_pixel_exact(synthetic):
    path, truth = synthetic
    with open_slide(path) as reader:
        for scene in reader.info().scenes:
            for c in (1, 2):
                got = reader.read_region(scene.index, c, 0, 0, scene.width, scene.height)
                assert got.dtype == np.uint16 and got.shape == (scene.height, scene.width)
                np.testing.assert_array_equal(got, truth[scene.index][c - 1])


def test_czi_bands_and_regions_across_tile_seams(synthetic):
    path, truth = synthetic
    rng = np.random.default_rng(0)
    with open_slide(path) as reader:
        # a full-width band whose rows straddle the seam at y = 240..256
        band = reader.read_region(0, 2, 0, 200, 700, 100)
        np.testing.assert_array_equal(band, truth[0][1][200:300])
        for _ in range(20):
            s = int(rng.integers(0, 2))
            sc = reader.info().scenes[s]
            w, h = int(rng.integers(1, sc.width)), int(rng.integers(1, sc.height))
            x, y = int(rng.integers(0, sc.width - w + 1)), int(rng.integers(0, sc.height - h + 1))
            got = reader.read_region(s, 1, x, y, w, h)
            np.testing.assert_array_equal(got, truth[s][0][y : y + h, x : x + w])


def test_czi_region_outside_scene_or_unknown_channel_is_an_error(synthetic):
    path, _ = synthetic
    with open_slide(path) as reader:
        with pytest.raises(SlideReadError, match="outside the scene"):
            reader.read_region(0, 1, 600, 0, 200, 10)
        with pytest.raises(SlideReadError, match="no channel 3"):
            reader.read_region(0, 3, 0, 0, 10, 10)
        with pytest.raises(SlideReadError, match="no scene 3"):
            reader.read_region(2, 1, 0, 0, 10, 10)
        with pytest.raises(SlideReadError, match="no z plane 1"):
            reader.read_region(0, 1, 0, 0, 10, 10, z=1)


def test_czi_reads_only_tiles_that_intersect_the_region(synthetic, tmp_path):
    """A corrupt bottom-right tile breaks the regions that touch it, and only those."""
    path = tmp_path / "one_bad_tile.czi"
    path.write_bytes(synthetic[0].read_bytes())
    _, truth = synthetic
    (x0, y0), _ = SCENE0
    bad = next(
        b for b in subblocks(path)
        if b.dims.get("S") == 0 and b.dims.get("C") == 0 and b.dims["X"] - x0 >= 480 and b.dims["Y"] - y0 >= 240
    )
    corrupt_subblock(path, bad)
    with open_slide(path) as reader:
        top = reader.read_region(0, 1, 0, 0, 700, 200)
        np.testing.assert_array_equal(top, truth[0][0][:200])
        np.testing.assert_array_equal(reader.read_region(0, 2, 0, 0, 700, 500), truth[0][1])  # other channel
        with pytest.raises(SlideReadError) as failure:
            reader.read_region(0, 1, 0, 300, 700, 100)
    message = str(failure.value)
    assert str(path) in message and "scene 1" in message and "decode" in message


def test_czi_scene_that_fails_to_decode_names_file_and_scene(synthetic, tmp_path):
    path = tmp_path / "bad_scene.czi"
    path.write_bytes(synthetic[0].read_bytes())
    corrupt_scene(path, scene=1, channel=0)
    with open_slide(path) as reader:
        info = reader.info()  # metadata is still readable
        np.testing.assert_array_equal(reader.read_region(0, 1, 0, 0, 700, 500), synthetic[1][0][0])
        with pytest.raises(SlideReadError, match=r"scene 2 channel 1.*cannot decode"):
            reader.read_region(1, 1, 0, 0, info.scenes[1].width, info.scenes[1].height)


def test_czi_gray8_z_planes(tmp_path):
    rng = np.random.default_rng(1)
    planes = [[rng.integers(0, 255, (300, 400), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    path = write_czi(tmp_path / "z.czi", [((5, 7), [])], z_planes=[planes], tile=160, overlap=8)
    with open_slide(path) as reader:
        scene = reader.info().scenes[0]
        assert (scene.dtype, scene.z_planes, len(scene.channels)) == ("uint8", 3, 2)
        for c in (1, 2):
            for z in range(3):
                np.testing.assert_array_equal(reader.read_region(0, c, 0, 0, 400, 300, z=z), planes[c - 1][z])


def test_czi_bgr24_comes_back_as_rgb(tmp_path):
    """libCZI keeps colour in B, G, R memory order (as pylibCZIrw writes it); we return R, G, B."""
    rng = np.random.default_rng(2)
    bgr = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    bgr[..., 0] = 7  # blue plane constant: a swap is visible
    path = write_czi(tmp_path / "rgb.czi", [((0, 0), [bgr])], tile=128, overlap=8)
    with open_slide(path) as reader:
        scene = reader.info().scenes[0]
        assert (scene.dtype, scene.samples_per_pixel) == ("uint8", 3)
        rgb = reader.read_region(0, 1, 10, 20, 250, 150)
    assert rgb.shape == (150, 250, 3)
    np.testing.assert_array_equal(rgb, bgr[20:170, 10:260, ::-1])
    assert (rgb[..., 2] == 7).all()


@pytest.mark.parametrize("stored", [0.325e-6, 0.325])
def test_czi_pixel_size_in_metres_or_micrometres(tmp_path, stored):
    """ZEN stores metres; a writer that followed pylibCZIrw's docstring stored micrometres."""
    path = write_czi(tmp_path / "scale.czi", [((0, 0), [np.ones((64, 64), np.uint16)])], scale_x=stored, scale_y=stored)
    with open_slide(path) as reader:
        assert reader.info().pixel_size_um == pytest.approx((0.325, 0.325))


def test_czi_bad_files_raise_slide_read_error_naming_the_file(synthetic, tmp_path):
    empty = tmp_path / "empty.czi"
    empty.write_bytes(b"")
    half = tmp_path / "half.czi"
    data = synthetic[0].read_bytes()
    half.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.czi"
    noise.write_bytes(np.random.default_rng(3).bytes(4096))
    missing = tmp_path / "missing.czi"
    for path, reason in ((empty, "empty file"), (half, "truncated"), (noise, "not a CZI file"), (missing, "does not exist")):
        with pytest.raises(SlideReadError) as failure:
            with open_slide(path) as reader:
                reader.info()
        assert str(path) in str(failure.value) and reason in str(failure.value)
        assert failure.value.path == str(path)
    with pytest.raises(SlideReadError, match="unsupported slide format"):
        open_slide(tmp_path / "notes.txt")


# --- real ZEN files --------------------------------------------------------------------------
def _real(name: str) -> Path:
    path = REAL_CZI_DIR / name
    if not path.is_file():
        pytest.skip(f"real CZI test file {path} is absent")
    return path


def _aics_plane(path: Path, **dims) -> np.ndarray:
    """The same plane through aicspylibczi, an independent reader (mosaics stitched by it)."""
    import aicspylibczi

    czi = aicspylibczi.CziFile(str(path))
    dims = {k: v for k, v in dims.items() if k in czi.dims}
    if czi.is_mosaic():
        return np.squeeze(czi.read_mosaic(scale_factor=1.0, **dims))
    return np.squeeze(czi.read_image(**dims)[0])


REAL_FILES = {
    # name: (x, y, width, height, dtype, samples, channels, z planes, pixel size um)
    "mosaic_test.czi": (0, 0, 1756, 624, "uint16", 1, 1, 1, 1.0833),
    "s_1_t_1_c_1_z_1.czi": (39856, 39272, 475, 325, "uint16", 1, 1, 1, 1.0833),
    "RGB-8bit.czi": (0, 0, 924, 624, "uint8", 3, 1, 1, 1.0833),
    "tiles_z.czi": (-127, -128, 510, 512, "uint8", 1, 2, 2, 0.8303),
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_czi_geometry_and_metadata(name):
    x, y, w, h, dtype, spp, n_channels, n_z, pixel = REAL_FILES[name]
    with open_slide(_real(name)) as reader:
        info = reader.info()
    assert len(info.scenes) == 1
    scene = info.scenes[0]
    assert (scene.x, scene.y, scene.width, scene.height) == (x, y, w, h)
    assert (scene.dtype, scene.samples_per_pixel, len(scene.channels), scene.z_planes) == (dtype, spp, n_channels, n_z)
    assert info.pixel_size_um == pytest.approx((pixel, pixel), abs=1e-4)
    assert info.objective and info.magnification in (10.0, 20.0, 40.0)
    assert info.acquisition_date is not None


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_czi_pixels_equal_an_independent_reader(name):
    path = _real(name)
    with open_slide(path) as reader:
        scene = reader.info().scenes[0]
        for channel in scene.channels:
            for z in range(scene.z_planes):
                ours = reader.read_region(0, channel.index, 0, 0, scene.width, scene.height, z=z)
                theirs = _aics_plane(path, C=channel.index - 1, Z=z)
                if scene.samples_per_pixel == 3:
                    theirs = theirs[..., ::-1]  # aicspylibczi returns libCZI's B, G, R order
                assert ours.shape == theirs.shape
                np.testing.assert_array_equal(ours, theirs)
                # a band at an offset is the same pixels as the whole scene's
                bx, by = scene.width // 3, scene.height // 4
                band = reader.read_region(0, channel.index, bx, by, scene.width - bx, scene.height // 2, z=z)
                np.testing.assert_array_equal(band, ours[by : by + scene.height // 2, bx:])


def test_real_truncated_czi_is_an_error(tmp_path):
    source = _real("mosaic_test.czi")
    cut = tmp_path / "mosaic_test.czi"
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match="truncated") as failure:
        with open_slide(cut) as reader:
            reader.info()
    assert str(cut) in str(failure.value)


# --- TIFF ------------------------------------------------------------------------------------
def test_ome_tiff_channels_pixel_size_and_tiled_bands(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.integers(0, 60000, (2, 700, 900), dtype=np.uint16)
    path = tmp_path / "section_001.ome.tif"
    tifffile.imwrite(
        path, data, ome=True, tile=(256, 256), compression="zlib",
        metadata={"axes": "CYX", "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm",
                  "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm", "Channel": {"Name": ["NTB", "CY3"]}},
    )
    with open_slide(path) as reader:
        info = reader.info()
        scene = info.scenes[0]
        assert len(info.scenes) == 1 and (scene.x, scene.y, scene.width, scene.height) == (0, 0, 900, 700)
        assert [(c.index, c.name) for c in scene.channels] == [(1, "NTB"), (2, "CY3")]
        assert (scene.dtype, scene.samples_per_pixel, scene.z_planes) == ("uint16", 1, 1)
        assert info.pixel_size_um == pytest.approx((0.325, 0.5))
        for c in (1, 2):
            np.testing.assert_array_equal(reader.read_region(0, c, 0, 240, 900, 40), data[c - 1, 240:280])
            np.testing.assert_array_equal(reader.read_region(0, c, 0, 0, 900, 700), data[c - 1])


def test_tiled_tiff_reads_only_tiles_that_intersect_the_region(tmp_path):
    yy, xx = np.mgrid[0:1024, 0:1024]
    data = ((xx * 7 + yy * 3) % 4096).astype(np.uint16)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, data, tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]  # bottom-right tile
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x00" * count)
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 1, 0, 0, 1024, 512), data[:512])
        np.testing.assert_array_equal(reader.read_region(0, 1, 0, 768, 768, 256), data[768:, :768])
        with pytest.raises(SlideReadError, match="cannot decode") as failure:
            reader.read_region(0, 1, 0, 768, 1024, 256)
    assert str(path) in str(failure.value)


def test_plain_tiff_resolution_tags_rgb_and_no_pixel_size(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    with_tags = tmp_path / "rgb.tif"
    tifffile.imwrite(with_tags, rgb, photometric="rgb", resolution=(1e4 / 0.46, 1e4 / 0.46), resolutionunit="CENTIMETER")
    with open_slide(with_tags) as reader:
        info = reader.info()
        assert info.pixel_size_um == pytest.approx((0.46, 0.46))
        assert (info.scenes[0].samples_per_pixel, info.scenes[0].dtype) == (3, "uint8")
        np.testing.assert_array_equal(reader.read_region(0, 1, 10, 5, 100, 50), rgb[5:55, 10:110])
    inches = tmp_path / "inch.tif"
    tifffile.imwrite(inches, rgb[..., 0], resolution=(25400 / 2.0, 25400 / 2.0), resolutionunit="INCH")
    with open_slide(inches) as reader:
        assert reader.info().pixel_size_um == pytest.approx((2.0, 2.0))
    imagej = tmp_path / "imagej.tif"  # ImageJ: unit tag "none", the unit in its description
    tifffile.imwrite(imagej, rgb[..., 0], imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "micron"})
    with open_slide(imagej) as reader:
        assert reader.info().pixel_size_um == pytest.approx((0.65, 0.65))
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, rgb[..., 0])
    with open_slide(bare) as reader:
        assert reader.info().pixel_size_um is None
        assert [c.name for c in reader.info().scenes[0].channels] == ["C1"]


def test_tiff_z_stack_time_axis_and_page_channels(tmp_path):
    rng = np.random.default_rng(6)
    stack = rng.integers(0, 255, (3, 2, 64, 80), dtype=np.uint8)  # Z, C, Y, X
    path = tmp_path / "zc.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZCYX"})
    with open_slide(path) as reader:
        scene = reader.info().scenes[0]
        assert (scene.z_planes, len(scene.channels)) == (3, 2)
        np.testing.assert_array_equal(reader.read_region(0, 2, 0, 0, 80, 64, z=2), stack[2, 1])
    series = tmp_path / "tc.ome.tif"  # a time axis is a choice (t=), not an error
    tifffile.imwrite(series, stack[:2], ome=True, metadata={"axes": "TCYX"})
    with open_slide(series) as reader:
        scene = reader.info().scenes[0]
        assert (scene.time_points, scene.z_planes, len(scene.channels)) == (2, 1, 2)
        np.testing.assert_array_equal(reader.read_region(0, 2, 0, 0, 80, 64, t=1), stack[1, 1])
    pages = tmp_path / "pages.tif"
    tifffile.imwrite(pages, stack[0])  # two plain pages: one channel each
    with open_slide(pages) as reader:
        assert len(reader.info().scenes[0].channels) == 2
        np.testing.assert_array_equal(reader.read_region(0, 2, 0, 0, 80, 64), stack[0, 1])


def test_bad_tiffs_raise_slide_read_error(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff at all" * 10)
    for path in (empty, junk):
        with pytest.raises(SlideReadError) as failure:
            open_slide(path)
        assert str(path) in str(failure.value)


def test_natural_sort_and_gaps(tmp_path):
    for name in ("s_10.tif", "s_2.tif", "s_1.TIFF", "s_4.ome.tif", "notes.txt", ".hidden_3.tif", "s_5.tmp-99.tif"):
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in natural_sorted_tiffs(tmp_path)]
    assert names == ["s_1.TIFF", "s_2.tif", "s_4.ome.tif", "s_10.tif"]
    assert find_gaps(natural_sorted_tiffs(tmp_path)) == [3, 5, 6, 7, 8, 9]
    assert find_gaps([Path("a_001.tif"), Path("a_002.tif"), Path("a_004.tif")]) == [3]
    # constant numbers (animal id, channel) do not confuse it: the varying one is the section
    series = [Path(f"DK39_ID_0001_slide{n:03d}_S1_C1.tif") for n in (1, 2, 3, 5)]
    assert find_gaps(series) == [4]
    assert find_gaps([Path("a.tif"), Path("b.tif")]) == []
    assert find_gaps([Path("a_7.tif")]) == []


# --- time series and damaged page directories ------------------------------------------------
def test_czi_time_series_reads_the_chosen_time_point(tmp_path):
    frames = [_image((150, 200), 50 + t) for t in range(3)]
    path = write_czi(tmp_path / "t.czi", [((4, 9), [])], time_points=[[frames]], tile=128, overlap=8)
    with open_slide(path) as reader:
        scene = reader.info().scenes[0]
        assert (scene.time_points, scene.z_planes) == (3, 1)
        for t in range(3):
            np.testing.assert_array_equal(reader.read_region(0, 1, 0, 0, 200, 150, t=t), frames[t])
        with pytest.raises(SlideReadError, match="no time point 3"):
            reader.read_region(0, 1, 0, 0, 200, 150, t=3)


def _damage(path: Path, page: int, tag_name: str, how: str) -> None:
    import struct

    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[tag_name]
        fmt = {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        entry, values = tag.offset, tag.valueoffset + struct.calcsize(fmt)  # the second strip
    with open(path, "r+b") as handle:
        if how == "drop":  # the tag's code becomes an unknown one: the page has no such tag
            handle.seek(entry)
            handle.write(struct.pack("<H", 65000))
        else:
            handle.seek(values)
            handle.write(struct.pack("<" + fmt, {"zero": 0, "beyond": 10**8}[how]))


@pytest.mark.parametrize("tag_name, how, reason", [
    ("StripOffsets", "zero", "strip 1 has no data"),
    ("StripByteCounts", "zero", "strip 1 has no data"),
    ("StripOffsets", "beyond", "lies beyond the end of the file"),
    ("StripOffsets", "drop", "0 strip offsets and 4 byte counts for 4 strips"),
])
def test_damaged_tiff_page_directory_is_an_error_not_zeros(tmp_path, tag_name, how, reason):
    """tifffile reads a strip without offset or byte count as zeros (and only logs it)."""
    data = np.random.default_rng(8).integers(1, 60000, (2, 200, 100), dtype=np.uint16)
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, data, rowsperstrip=64, metadata=None)
    _damage(path, 1, tag_name, how)
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 1, 0, 0, 100, 200), data[0])  # page 1 is fine
        with pytest.raises(SlideReadError) as failure:
            reader.read_region(0, 2, 0, 0, 100, 10)
    message = str(failure.value)
    assert message.startswith(f"{path}: channel 2 z 0: page 2 is damaged: ") and reason in message, message
