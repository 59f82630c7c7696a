"""Tissue masks: accuracy on synthetic sections, debris and slide-edge rejection, overlays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.errors import SlidepipeError
from pipeline.imaging.mask import (
    ClassicalMasker, Masker, MaskParams, dice, mask_from_overlay, mask_overlay, tissue_mask, upsample_mask_window,
)
from tests.helpers_imaging import add_debris, phantom_section


@pytest.mark.parametrize("seed", range(3))
def test_mask_matches_footprint_and_drops_debris(seed):
    image, footprint = phantom_section((240, 320), seed=seed)
    dirty = add_debris(image, count=20, seed=seed + 10, radius=2)
    mask = tissue_mask(dirty)
    score = dice(mask, footprint)
    print(f"seed {seed}: Dice {score:.4f}")
    assert score >= 0.95
    specks = add_debris(np.zeros_like(image), count=20, seed=seed + 10, radius=2, value=1) > 0
    far = ndi.distance_transform_edt(~footprint) > 6  # specks touching the tissue are part of it
    outside = specks & far
    assert outside.any() and not (mask & outside).any()


def test_slide_edge_stripe_is_dropped_but_tissue_touching_the_border_is_kept():
    image, footprint = phantom_section((240, 320), seed=4)
    image[:, :5] = image.max()  # bright slide edge along the left border
    mask = tissue_mask(image)
    assert not mask[:, :5].any()
    assert dice(mask, footprint) >= 0.95
    cropped = image[:, 60:]  # tissue now touches the left border
    assert dice(tissue_mask(cropped), footprint[:, 60:]) >= 0.95


def test_brightfield_polarity_is_detected():
    image, footprint = phantom_section((240, 320), seed=2, dtype=np.uint8, peak=200, noise=3)
    brightfield = (255 - image).astype(np.uint8)
    assert dice(tissue_mask(brightfield), footprint) >= 0.95


def test_rgb_thumbnail():
    image, footprint = phantom_section((120, 160), seed=1, dtype=np.uint8, peak=200, noise=3)
    rgb = np.stack([255 - image] * 3, axis=-1)
    assert dice(tissue_mask(rgb), footprint) >= 0.95


def test_no_tissue_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    assert not tissue_mask(np.zeros((80, 90), np.uint16)).any()
    assert not tissue_mask(rng.normal(300, 20, (80, 90)).astype(np.uint16)).any()
    assert not tissue_mask(add_debris(np.full((200, 200), 50, np.uint16), count=8)).any()


def test_masker_protocol():
    masker = ClassicalMasker(MaskParams(smooth_sigma=1.5))
    assert isinstance(masker, Masker)
    assert masker.describe()["smooth_sigma"] == 1.5
    image, footprint = phantom_section((120, 160), seed=0)
    assert dice(masker(image), footprint) >= 0.95


def test_overlay_round_trip_and_hand_edits():
    image, footprint = phantom_section((120, 160), seed=3)
    mask = tissue_mask(image)
    overlay = mask_overlay(image, mask)
    assert overlay.dtype == np.uint8 and overlay.shape == image.shape + (3,)
    assert np.array_equal(mask_from_overlay(overlay), mask)
    edited = overlay.copy()
    edited[0:10, 0:10] = (0, 255, 0)  # paint tissue
    edited[mask.nonzero()[0][0], :] = (128, 128, 128)  # erase one row with grey
    back = mask_from_overlay(edited)
    assert back[0:10, 0:10].all()
    assert not back[mask.nonzero()[0][0]].any()
    rgba = np.concatenate([overlay, np.full(image.shape + (1,), 255, np.uint8)], axis=-1)
    assert np.array_equal(mask_from_overlay(rgba), mask)
    with pytest.raises(SlidepipeError):
        mask_from_overlay(image)


def test_upsampled_windows_tile_the_full_mask():
    rng = np.random.default_rng(0)
    thumb = rng.random((7, 9)) > 0.5
    factor = 8
    full = np.repeat(np.repeat(thumb, factor, 0), factor, 1)[:51, :70]  # section not a multiple of 8
    rebuilt = np.zeros_like(full)
    for y0 in range(0, 51, 13):
        y1 = min(y0 + 13, 51)
        rebuilt[y0:y1] = upsample_mask_window(thumb, factor, y0, y1, 0, 70)
    assert np.array_equal(rebuilt, full)
    assert np.array_equal(upsample_mask_window(thumb, factor, 5, 30, 17, 66), full[5:30, 17:66])
    with pytest.raises(SlidepipeError):
        upsample_mask_window(thumb, factor, 0, 8 * 8, 0, 10)


def test_dice():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_otsu_threshold_splits_two_populations():
    from pipeline.imaging.mask import otsu_threshold

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 6000), rng.normal(0.7, 0.05, 2000)])
    threshold = otsu_threshold(values)
    assert 0.1 < threshold < 0.7
    wrong = np.count_nonzero(values[:6000] > threshold) + np.count_nonzero(values[6000:] <= threshold)
    assert wrong < 0.01 * values.size
