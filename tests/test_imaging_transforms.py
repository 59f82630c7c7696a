"""Rigid transform matrices, composition to the middle section, thumbnail -> full scaling, warping."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.imaging.tiles import array_reader
from pipeline.imaging.transforms import (
    canvas_center, compose_to_reference, rigid_matrix, rigid_parameters, scale_transform, translation_matrix,
)
from pipeline.imaging.warp import warp_affine, warp_tiles, warp_window
from tests.helpers_imaging import phantom_section


def test_rigid_parameters_round_trip():
    center = (159.5, 119.5)
    matrix = rigid_matrix(0.3, -4.25, 7.5, center)
    assert rigid_parameters(matrix, center) == pytest.approx((0.3, -4.25, 7.5))
    # the centre moves by the shift only
    assert (matrix @ [*center, 1])[:2] == pytest.approx([center[0] - 4.25, center[1] + 7.5])


def test_positive_rotation_turns_content_counter_clockwise_on_screen():
    image = np.zeros((41, 41), np.float32)
    image[20, 30] = 1.0  # a dot right of the centre
    out = warp_affine(image, rigid_matrix(np.pi / 2, 0, 0, canvas_center(image.shape)), image.shape)
    y, x = np.unravel_index(np.argmax(out), out.shape)
    assert (y, x) == (10, 20)  # above the centre: a counter-clockwise quarter turn as displayed


def test_compose_to_reference_recovers_absolute_transforms():
    rng = np.random.default_rng(0)
    center = (50.0, 40.0)
    absolute = [rigid_matrix(rng.uniform(-0.2, 0.2), *rng.uniform(-10, 10, 2), center) for _ in range(7)]
    pairwise = [None] + [absolute[i] @ np.linalg.inv(absolute[i - 1]) for i in range(1, 7)]
    reference = 3
    composed = compose_to_reference(pairwise, reference)
    assert np.allclose(composed[reference], np.eye(3))
    for i in range(7):
        assert np.allclose(composed[i], absolute[i] @ np.linalg.inv(absolute[reference]), atol=1e-12)


def test_scale_transform_maps_thumbnail_pixel_centres_exactly():
    factor = 32
    thumb_shape, full_shape = (30, 40), (960, 1280)
    thumb = rigid_matrix(0.1, 3.0, -2.0, canvas_center(thumb_shape))
    full = scale_transform(thumb, factor, factor)
    # same rotation; the translation is scaled and the centre of rotation lands on the full centre
    assert rigid_parameters(full, canvas_center(full_shape)) == pytest.approx((0.1, 3.0 * factor, -2.0 * factor))
    s = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]])
    point = np.array([7.0, 11.0, 1.0])
    assert full @ (s @ point) == pytest.approx(s @ (thumb @ point))


def test_warp_integer_translation_is_exact():
    image = np.arange(1, 121, dtype=np.uint16).reshape(10, 12)
    out = warp_affine(image, translation_matrix(2, 3), image.shape)
    assert np.array_equal(out[:7, :10], image[3:, 2:])
    assert not out[7:].any() and not out[:, 10:].any()


def test_nearest_keeps_masks_binary():
    mask = np.zeros((50, 60), np.uint8)
    mask[10:40, 15:45] = 255
    out = warp_affine(mask, rigid_matrix(0.2, 1.5, -2.5, canvas_center(mask.shape)), mask.shape, nearest=True)
    assert set(np.unique(out)) == {0, 255}


@pytest.mark.parametrize("angle", [0.05, 0.7, 1.9])
def test_tiled_warp_equals_whole(angle):
    image, _ = phantom_section((150, 230), seed=1)
    matrix = rigid_matrix(angle, 9.3, -4.7, canvas_center(image.shape))
    output_shape = (170, 210)
    whole = warp_affine(image, matrix, output_shape)
    tiled = np.zeros_like(whole)
    for (y0, y1, x0, x1), tile in warp_tiles(array_reader(image), image.shape, image.dtype, matrix, output_shape, (32, 48)):
        tiled[y0:y1, x0:x1] = tile
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    print(f"angle {angle}: max difference {diff.max()} (of {image.max()}), differing pixels {np.count_nonzero(diff)}")
    assert diff.max() <= 2  # OpenCV rounds coordinates to 1/32 px: a window offset may round the other way
    assert np.count_nonzero(diff) < 0.01 * diff.size


def test_warp_window_outside_the_source_is_zero():
    image = np.full((20, 20), 7, np.uint16)
    out = warp_window(array_reader(image), image.shape, image.dtype, translation_matrix(500, 0), 0, 10, 0, 10)
    assert out.shape == (10, 10) and not out.any()
