"""The synthetic sample brain: real CZI slides whose content and placement are known exactly."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from pipeline.imaging import phantom
from pipeline.layout import THUMBNAIL_FACTOR
from pipeline.readers import open_slide
from pipeline.sample import (
    MAX_ROTATION_DEG,
    MIN_ROTATION_DEG,
    SIZES,
    SampleTruth,
    build_sample,
    build_sample_tiffs,
    plan_sections,
)
from tests.helpers_czi import subblocks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SampleTruth:
    return build_sample(tmp_path_factory.mktemp("sample"), animal="TINY", seed=3, size="tiny")


def _truth_files(truth: SampleTruth) -> dict[str, bytes]:
    return {p.relative_to(truth.truth_dir).as_posix(): p.read_bytes() for p in sorted(truth.truth_dir.rglob("*")) if p.is_file()}


def _scene_pixels(truth: SampleTruth) -> list[list[np.ndarray]]:
    out = []
    for s in truth.sections:
        with open_slide(truth.layout.czi_dir / s.slide_file) as reader:
            scene = reader.info().scenes[s.scene_index]
            out.append([reader.read_region(s.scene_index, c, 0, 0, scene.width, scene.height) for c in (1, 2)])
    return out


def test_same_seed_same_truth_bytes_and_pixels(tiny, tmp_path):
    again = build_sample(tmp_path / "again", animal="TINY", seed=3, size="tiny")
    first, second = _truth_files(tiny), _truth_files(again)
    assert first.keys() == second.keys() and "truth.json" in first
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]
    for a, b in zip(_scene_pixels(tiny), _scene_pixels(again)):
        for ca, cb in zip(a, b):
            np.testing.assert_array_equal(ca, cb)
    other = build_sample(tmp_path / "other", animal="TINY", seed=4, size="tiny")
    assert json.loads((other.truth_dir / "truth.json").read_text())["sections"] != json.loads(first["truth.json"])["sections"]
    assert not np.array_equal(_scene_pixels(other)[2][0], _scene_pixels(tiny)[2][0])


def test_rebuild_keeps_a_complete_sample_unless_forced(tiny):
    mtimes = [p.stat().st_mtime_ns for p in tiny.slide_paths]
    assert build_sample(tiny.data_root, animal="TINY", seed=3, size="tiny") == tiny
    assert [p.stat().st_mtime_ns for p in tiny.slide_paths] == mtimes


def test_slides_are_multi_scene_two_channel_zstd_mosaics(tiny):
    per_slide = Counter(s.slide_file for s in tiny.sections)
    assert len(per_slide) == len(tiny.slides) >= 2 and all(n >= 2 for n in per_slide.values())
    for path in tiny.slide_paths:
        assert path.parent == tiny.layout.czi_dir and path.name.startswith("TINY_slide")
        with open_slide(path) as reader:
            info = reader.info()
        assert len(info.scenes) == per_slide[path.name]
        assert info.pixel_size_um == pytest.approx((SIZES["tiny"].pixel_size_um,) * 2)
        assert info.objective and info.magnification == 10.0 and info.acquisition_date is not None
        for scene in info.scenes:
            assert [c.name for c in scene.channels] == list(phantom.CHANNELS)
            assert (scene.dtype, scene.samples_per_pixel, scene.z_planes) == ("uint16", 1, 1)
        tiles = Counter((b.dims["S"], b.dims["C"]) for b in subblocks(path))
        assert set(tiles) == {(s, c) for s in range(len(info.scenes)) for c in (0, 1)}
        assert min(tiles.values()) >= 2  # every scene channel is a mosaic of several tiles (M index)
        assert {b.compression for b in subblocks(path)} == {6}  # zstd1


def test_pixel_size_is_stored_in_metres(tiny):
    from pylibCZIrw import czi as pyczi

    with pyczi.open_czi(str(tiny.slide_paths[0])) as czi:
        distances = czi.metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
    x = next(d for d in distances if d["@Id"] == "X")
    assert float(x["Value"]) == pytest.approx(SIZES["tiny"].pixel_size_um * 1e-6)


def test_scene_placement_matches_truth(tiny):
    for s in tiny.sections:
        with open_slide(tiny.layout.czi_dir / s.slide_file) as reader:
            scene = reader.info().scenes[s.scene_index]
        assert (scene.x, scene.y) == s.scene_origin and (scene.height, scene.width) == s.scene_shape
        assert scene.x > 1000 and scene.y > 1000  # slide coordinates far from 0, as a scanner writes them


def test_render_reproduces_the_written_pixels(tiny):
    for s, written in zip(tiny.sections, _scene_pixels(tiny)):
        for ours, theirs in zip(tiny.render(s.position), written):
            np.testing.assert_array_equal(ours, theirs)
        for channel in (1, 2):
            np.testing.assert_array_equal(tiny.section_pixels(s.position, channel), written[channel - 1])
    assert tiny.section_count == len(tiny.sections) and tiny.dtype == "uint16"


def test_truth_transforms_in_range_and_self_consistent(tiny):
    spec = SIZES["tiny"]
    assert [s.position for s in tiny.sections] == list(range(len(tiny.sections)))
    depths = [s.depth for s in tiny.sections]
    assert depths == sorted(depths)
    for s in tiny.sections:
        assert MIN_ROTATION_DEG <= abs(s.rotation_deg) <= MAX_ROTATION_DEG
        assert abs(s.shift_px[0]) <= spec.max_shift_px[0] and abs(s.shift_px[1]) <= spec.max_shift_px[1]
        m = np.asarray(s.phantom_to_scene)
        assert m[0, 0] == pytest.approx(math.cos(s.rotation_rad)) and m[1, 0] == pytest.approx(math.sin(s.rotation_rad))
        # the phantom frame's centre lands on the scene centre plus the shift
        fc = np.array([(tiny.frame_shape[1] - 1) / 2, (tiny.frame_shape[0] - 1) / 2, 1.0])
        sc = np.array([(s.scene_shape[1] - 1) / 2, (s.scene_shape[0] - 1) / 2])
        np.testing.assert_allclose(m @ fc, sc + np.asarray(s.shift_px), atol=1e-9)


def test_footprints_match_the_unrotated_slice_moved_by_the_true_transform(tiny):
    """The truth means what it says: warping the phantom slice by phantom_to_scene gives the footprint."""
    spec = SIZES["tiny"]
    ph = phantom.make_phantom(tiny.seed)
    for s in tiny.sections:
        full = tiny.footprint(s.position)
        assert full.dtype == bool and full.shape == s.scene_shape and full.sum() == s.tissue_area_px > 0
        frame, _ = phantom.render_expected(ph, s.depth, tiny.frame_shape, spec.unit_px, tiny.frame_shape)
        moved = cv2.warpAffine(
            frame.astype(np.uint8), np.asarray(s.phantom_to_scene), (s.scene_shape[1], s.scene_shape[0]), flags=cv2.INTER_NEAREST
        ).astype(bool)
        iou = (moved & full).sum() / (moved | full).sum()
        assert iou > 0.98, (s.position, iou)
        # touching the scene border would mean the section was cut off
        assert not (full[0].any() or full[-1].any() or full[:, 0].any() or full[:, -1].any())


def test_thumbnail_footprints_are_area_downsampled_masks(tiny):
    for s in tiny.sections:
        thumb = tiny.footprint(s.position, thumbnail=True)
        h, w = s.scene_shape
        assert thumb.dtype == bool and thumb.shape == (-(-h // THUMBNAIL_FACTOR), -(-w // THUMBNAIL_FACTOR))
        assert thumb.any()
        area = thumb.sum() * THUMBNAIL_FACTOR**2
        assert abs(area - s.tissue_area_px) < 0.1 * s.tissue_area_px
        expected = tiny.phantom_thumbnail(s.position, 1)
        assert expected.shape == (tiny.frame_shape[0] // THUMBNAIL_FACTOR, tiny.frame_shape[1] // THUMBNAIL_FACTOR)
        assert expected.max() > 0


def test_it_looks_like_tissue(tiny):
    """Sharp bright tissue on a dark slide, ventricle holes mid-brain, channels with different
    patterns, and debris specks around the tissue but never on it."""
    middle = tiny.sections[len(tiny.sections) // 2]
    ch1, ch2 = tiny.render(middle.position)
    tissue = tiny.footprint(middle.position)
    inside, outside = np.median(ch1[tissue]), np.median(ch1[~tissue])
    assert inside > 5 * outside
    # a sharp edge: pixels just inside vs just outside the boundary differ like tissue vs glass
    ring_in = tissue & ~ndimage.binary_erosion(tissue, iterations=2)
    ring_out = ndimage.binary_dilation(tissue, iterations=2) & ~tissue
    assert np.median(ch1[ring_in]) > 4 * np.median(ch1[ring_out])
    holes, count = ndimage.label(ndimage.binary_fill_holes(tissue) & ~tissue)
    assert count >= 2  # lateral ventricles (and the midline fissure opens to the outside)
    r = np.corrcoef(ch1[tissue].astype(float), ch2[tissue].astype(float))[0, 1]
    assert r < 0.5
    for s in tiny.sections:
        assert s.debris, f"section {s.position} has no debris"
        ch1, _ = tiny.render(s.position)
        fp = tiny.footprint(s.position)
        for d in s.debris:
            x, y = int(round(d["x"])), int(round(d["y"]))
            if 0 <= y < fp.shape[0] and 0 <= x < fp.shape[1]:
                assert not fp[y, x]


def test_tiff_variant_reads_back_with_pixel_size_and_names(tmp_path, tiny):
    paths = build_sample_tiffs(tmp_path / "tiffs", seed=3, size="tiny", count=2, prefix="TINY")
    assert [p.name for p in paths] == ["TINY_001.ome.tif", "TINY_002.ome.tif"]
    for path, s in zip(paths, tiny.sections):
        with open_slide(path) as reader:
            info = reader.info()
            scene = info.scenes[0]
            assert info.pixel_size_um == pytest.approx((SIZES["tiny"].pixel_size_um,) * 2)
            assert [c.name for c in scene.channels] == list(phantom.CHANNELS)
            for c, expected in enumerate(tiny.render(s.position), start=1):
                np.testing.assert_array_equal(reader.read_region(0, c, 0, 0, scene.width, scene.height), expected)


def test_default_small_plan_matches_the_brief():
    plans = plan_sections("DEMO", 0, "small")
    assert len(plans) == 40 and len({p.slide_file for p in plans}) == 5
    h, w = SIZES["small"].scene_shape
    assert 64 <= w / THUMBNAIL_FACTOR <= 100
    assert plans[0].slide_file == "DEMO_slide01.czi" and plans[-1].slide_file == "DEMO_slide05.czi"
    assert plans == plan_sections("DEMO", 0, "small")


@pytest.mark.slow
def test_build_small_default(small_sample):
    truth = small_sample  # build_sample(root) with the defaults (tests/conftest.py)
    assert len(truth.sections) == 40 and truth.animal == "DEMO" and truth.size == "small"
    again = SampleTruth.load(truth.data_root, "DEMO")
    assert again == truth
    for path in truth.slide_paths:
        with open_slide(path) as reader:
            assert len(reader.info().scenes) == sum(s.slide_file == path.name for s in truth.sections)
    s = truth.sections[17]
    with open_slide(Path(truth.layout.czi_dir / s.slide_file)) as reader:
        band = reader.read_region(s.scene_index, 2, 0, 1344, s.scene_shape[1], 128)  # across a tile seam
    np.testing.assert_array_equal(band, truth.render(s.position)[1][1344:1472])


def test_hard_plan_has_large_rotations_mirrored_and_damaged_sections():
    plans = plan_sections("DEMO", 0, "hard")
    spec = SIZES["hard"]
    count = len(plans)
    assert count == 24 and plans == plan_sections("DEMO", 0, "hard")
    rotations = np.abs([p.rotation_deg for p in plans])
    assert rotations.max() <= spec.max_rotation_deg == 45.0 and rotations.max() > 40
    assert max(abs(a.rotation_deg - b.rotation_deg) for a, b in zip(plans, plans[1:])) > 60  # relative turns too
    mirrored = [p.position for p in plans if p.mirrored]
    kinds = Counter(c["kind"] for p in plans for c in p.cuts)
    assert len(mirrored) == 2 and kinds == {"tear": 2, "missing": 2}
    damaged = sorted(mirrored + [p.position for p in plans if p.cuts])
    assert count // 2 not in damaged and 0 not in damaged and count - 1 not in damaged
    assert all(b - a > 1 for a, b in zip(damaged, damaged[1:]))
    for p in plans:  # a mirrored section's matrix mirrors; the others are rotations
        assert np.linalg.det(np.asarray(p.phantom_to_scene)[:, :2]) == pytest.approx(-1.0 if p.mirrored else 1.0)
    # the standard sample is unchanged by the hard one's options
    assert not any(p.mirrored or p.cuts for p in plan_sections("DEMO", 0, "small"))
    # the scenes hold a section turned by 45 degrees
    frame = phantom.render_expected(phantom.make_phantom(0), 0.1, spec.frame_shape, spec.unit_px, spec.frame_shape)[0]
    yy, xx = np.nonzero(frame)
    half_diagonal = np.hypot(xx - xx.mean(), yy - yy.mean()).max()
    assert 2 * half_diagonal + 2 * max(spec.max_shift_px) < min(spec.scene_shape)


def test_cuts_and_mirroring_change_the_footprint_as_planned():
    ph = phantom.make_phantom(0)
    shape, unit = (96, 128), 64.0
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    whole = phantom.render_footprint(ph, 0.1, identity, shape, unit, shape)
    missing = phantom.Cut("missing", angle=0.0, offset=0.35)  # everything right of u = 0.35 is gone
    broken = phantom.render_footprint(ph, 0.1, identity, shape, unit, shape, cuts=(missing,))
    u = (np.arange(shape[1]) - (shape[1] - 1) / 2) / unit
    assert not broken[:, u > 0.40].any()
    assert (broken[:, u < 0.28] != whole[:, u < 0.28]).mean() < 0.01  # boundaries interpolated from 4x coarse fields
    assert 0.05 < 1 - broken.sum() / whole.sum() < 0.3
    tear = phantom.Cut("tear", angle=0.0, offset=0.2, width=0.04)  # a slit to the right from u = 0.2
    torn = phantom.render_footprint(ph, 0.1, identity, shape, unit, shape, cuts=(tear,))
    v = (np.arange(shape[0]) - (shape[0] - 1) / 2) / unit
    slit = np.ix_(np.abs(v) < 0.02, u > 0.25)
    assert whole[slit].mean() > 0.8 and not torn[slit].any()
    assert (torn[np.abs(v) > 0.1] != whole[np.abs(v) > 0.1]).mean() < 0.01
    mirror = phantom.phantom_to_scene(0.0, (0.0, 0.0), shape, shape, mirrored=True)
    assert np.array_equal(phantom.render_footprint(ph, 0.1, mirror, shape, unit, shape), np.fliplr(whole))
