"""Orientation (rotation / flip / flop), canvas placement and the windowed clean path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.imaging.orient import (
    CleanGeometry, NoTissueError, Orientation, SectionTooLargeError, canvas_shape, clean_section,
    clean_window, orient, plan_clean, source_index_matrix, tissue_box,
)
from pipeline.imaging.tiles import array_reader, tile_grid
from tests.helpers_imaging import asymmetric_image

A = asymmetric_image((2, 3))  # [[0 1 2], [3 4 5]]


def test_flip_is_a_vertical_mirror_not_a_half_turn():
    assert orient(A, Orientation(flip=True)).tolist() == [[3, 4, 5], [0, 1, 2]]


def test_flop_is_a_horizontal_mirror():
    assert orient(A, Orientation(flop=True)).tolist() == [[2, 1, 0], [5, 4, 3]]


def test_rotation_is_counter_clockwise_quarter_turns():
    assert orient(A, Orientation(rotation=1)).tolist() == [[2, 5], [1, 4], [0, 3]]
    assert orient(A, Orientation(rotation=2)).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert orient(A, Orientation(rotation=3)).tolist() == [[3, 0], [4, 1], [5, 2]]


def test_flip_and_flop_together_equal_a_half_turn():
    both = orient(A, Orientation(flip=True, flop=True))
    assert np.array_equal(both, orient(A, Orientation(rotation=2)))
    assert not np.array_equal(orient(A, Orientation(flip=True)), both)


@pytest.mark.parametrize("rotation,flip,flop", list(itertools.product(range(4), [False, True], [False, True])))
def test_index_matrix_matches_orient(rotation, flip, flop):
    image = asymmetric_image((5, 7))
    o = Orientation(rotation, flip, flop)
    out = orient(image, o)
    matrix = source_index_matrix(image.shape, o)
    rows, cols = np.mgrid[0:out.shape[0], 0:out.shape[1]]
    src = matrix @ np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size, int)])
    assert np.array_equal(image[src[0], src[1]].reshape(out.shape), out)


def test_tissue_box_and_empty_mask():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert tissue_box(mask) == (2, 5, 3, 9)
    assert tissue_box(mask, margin=3) == (0, 8, 0, 12)
    with pytest.raises(NoTissueError):
        tissue_box(np.zeros((4, 4), bool))


def test_plan_clean_centres_and_refuses_oversized_sections():
    mask = np.zeros((40, 60), bool)
    mask[5:15, 10:40] = True  # 10 x 30 box
    geometry = plan_clean(mask, Orientation(rotation=1), canvas=(40, 20))
    assert geometry.placed_shape == (30, 10)
    assert geometry.offset == (5, 5)
    with pytest.raises(SectionTooLargeError, match="larger than the canvas"):
        plan_clean(mask, Orientation(rotation=0), canvas=(40, 20))


def test_canvas_fits_the_largest_rotated_box():
    assert canvas_shape([(10, 30), (25, 12)], margin_fraction=0.0, multiple=1) == (25, 30)
    h, w = canvas_shape([(10, 30)], margin_fraction=0.1, multiple=8)
    assert h % 8 == 0 and w % 8 == 0 and h >= 12 and w >= 36


def test_clean_section_masks_crops_orients_places():
    image = np.arange(1, 13 * 17 + 1, dtype=np.uint16).reshape(13, 17)
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[3:9, 4:14] = 255
    mask[3, 4] = 0  # a hole in the mask must read as zero
    o = Orientation(rotation=3, flip=True, flop=False)
    geometry = plan_clean(mask, o, canvas=(16, 12))
    out = clean_section(image, mask, geometry)
    expected_crop = np.where(mask > 0, image, 0)[3:9, 4:14]
    oy, ox = geometry.offset
    ph, pw = geometry.placed_shape
    assert np.array_equal(out[oy:oy + ph, ox:ox + pw], orient(expected_crop, o))
    assert out.sum() == orient(expected_crop, o).sum()  # nothing else on the canvas


@pytest.mark.parametrize("rotation,flip,flop", [(0, False, False), (1, True, False), (2, False, True), (3, True, True)])
def test_windowed_clean_equals_whole(rotation, flip, flop):
    rng = np.random.default_rng(rotation)
    image = rng.integers(1, 60000, size=(37, 53), dtype=np.uint16)
    mask = np.zeros(image.shape, np.uint8)
    mask[4:30, 9:50] = 1
    geometry = plan_clean(mask, Orientation(rotation, flip, flop), canvas=(64, 56))
    whole = clean_section(image, mask, geometry)
    tiled = np.zeros_like(whole)
    for y0, y1, x0, x1 in tile_grid(geometry.canvas, (16, 24)):
        tiled[y0:y1, x0:x1] = clean_window(geometry, array_reader(image), array_reader(mask), image.shape,
                                           image.dtype, y0, y1, x0, x1)
    assert np.array_equal(tiled, whole)


def test_scaled_geometry_is_the_thumbnail_geometry_upsampled():
    """Full-resolution clean of a block image equals the thumbnail clean upsampled by the factor,
    including a section whose size is not a multiple of the factor (padded with zero)."""
    factor = 4
    rng = np.random.default_rng(5)
    thumb = rng.integers(1, 1000, size=(9, 11), dtype=np.uint16)
    full = np.repeat(np.repeat(thumb, factor, 0), factor, 1)[:34, :42]  # last block partial
    thumb_mask = np.zeros(thumb.shape, np.uint8)
    thumb_mask[1:9, 2:11] = 1
    full_mask = np.repeat(np.repeat(thumb_mask, factor, 0), factor, 1)[:34, :42]
    o = Orientation(rotation=1, flip=False, flop=True)
    geometry = plan_clean(thumb_mask, o, canvas=(12, 12))
    small = clean_section(thumb, thumb_mask, geometry)
    big_geometry = geometry.scaled(factor)
    big = clean_window(big_geometry, array_reader(full), array_reader(full_mask), full.shape, full.dtype,
                       0, big_geometry.canvas[0], 0, big_geometry.canvas[1])
    expected = np.repeat(np.repeat(small, factor, 0), factor, 1)
    # the pixels past the full section's edge are zero in `big`: compare where the source exists
    covered = clean_window(big_geometry, array_reader(np.ones_like(full)), None, full.shape, full.dtype,
                           0, big_geometry.canvas[0], 0, big_geometry.canvas[1]) > 0
    assert np.array_equal(big[covered], expected[covered])
    assert not big[~covered].any()


def test_geometry_round_trips_through_dict():
    geometry = CleanGeometry(box=(1, 5, 2, 9), orientation=Orientation(3, True, False), canvas=(10, 12), offset=(2, 3))
    assert CleanGeometry.from_dict(geometry.to_dict()) == geometry


@pytest.mark.parametrize("rotation,flip,flop", [(0, False, False), (1, False, True), (2, True, False), (3, True, True)])
def test_source_to_canvas_matrix_follows_pixels(rotation, flip, flop):
    image = np.zeros((30, 40), np.uint16)
    image[8, 25] = 7  # one marked pixel inside the tissue box
    mask = np.zeros(image.shape, np.uint8)
    mask[5:20, 10:35] = 1
    geometry = plan_clean(mask, Orientation(rotation, flip, flop), canvas=(48, 48))
    out = clean_section(image, mask, geometry)
    y, x = np.argwhere(out == 7)[0]
    assert (geometry.source_to_canvas() @ [25, 8, 1])[:2] == pytest.approx([x, y])


def test_canvas_leaves_room_for_turning():
    plain = canvas_shape([(20, 60)], margin_fraction=0.0, multiple=1)
    turned = canvas_shape([(20, 60)], margin_fraction=0.0, multiple=1, turn_allowance_deg=15)
    assert plain == (20, 60)
    assert turned == (int(np.ceil(20 * np.cos(np.pi / 12) + 60 * np.sin(np.pi / 12))),
                      int(np.ceil(60 * np.cos(np.pi / 12) + 20 * np.sin(np.pi / 12))))
