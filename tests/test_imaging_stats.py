"""Histograms, intensity normalisation and pair similarity metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SlidepipeError
from pipeline.imaging.histogram import histogram_summary, masked_histogram, real_bit_depth
from pipeline.imaging.metrics import pair_metrics
from pipeline.imaging.normalise import apply_stretch, stretch_limits
from pipeline.imaging.transforms import translation_matrix
from pipeline.imaging.warp import warp_affine
from tests.helpers_imaging import phantom_section


def test_masked_histogram_counts_only_the_mask_and_adds_up_over_strips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, size=(60, 70), dtype=np.uint16)  # 12-bit data in uint16
    mask = rng.random((60, 70)) > 0.3
    counts = masked_histogram(image, mask)
    assert counts.size == 65536 and counts.sum() == mask.sum()
    assert np.array_equal(counts, np.bincount(image[mask], minlength=65536))
    strips = sum(masked_histogram(image[r:r + 16], mask[r:r + 16]) for r in range(0, 60, 16))
    assert np.array_equal(strips, counts)
    assert real_bit_depth(counts) == 12
    summary = histogram_summary(counts)
    assert summary["pixels"] == mask.sum() and summary["bit_depth"] == 12 and summary["max"] < 4096


def test_histogram_rejects_float_and_mismatched_masks():
    with pytest.raises(SlidepipeError):
        masked_histogram(np.zeros((3, 3), np.float32))
    with pytest.raises(SlidepipeError, match="does not match"):
        masked_histogram(np.zeros((3, 3), np.uint8), np.ones((2, 3), bool))


def test_stretch_uses_tissue_percentiles():
    image, footprint = phantom_section((100, 120), seed=0)
    low, high = stretch_limits(image, footprint, 1, 99)
    background = np.median(image[~footprint])
    assert low > background  # the background did not pull the low limit down
    out = apply_stretch(image, low, high)
    assert out.dtype == np.uint16
    tissue = out[footprint]
    assert np.mean(tissue == 65535) == pytest.approx(0.01, abs=0.01)
    assert np.mean(tissue == 0) == pytest.approx(0.01, abs=0.01)
    with pytest.raises(SlidepipeError):
        stretch_limits(image, np.zeros_like(footprint))


def test_metrics_drop_when_alignment_is_off():
    image, _ = phantom_section((120, 160), seed=2)
    aligned = pair_metrics(image, image)
    shifted = pair_metrics(image, warp_affine(image, translation_matrix(6, 4), image.shape))
    print(aligned, shifted)
    assert aligned["ncc"] == pytest.approx(1.0)
    assert shifted["ncc"] < aligned["ncc"] - 0.1
    assert shifted["mutual_information"] < aligned["mutual_information"]
    assert aligned["overlap_fraction"] == pytest.approx(1.0)


def test_metrics_without_overlap_are_nan():
    a = np.zeros((10, 10), np.uint16)
    b = np.zeros((10, 10), np.uint16)
    a[:5] = 100
    b[5:] = 100
    result = pair_metrics(a, b)
    assert result["overlap_pixels"] == 0 and np.isnan(result["ncc"]) and np.isnan(result["mutual_information"])


def test_accumulated_metrics_equal_whole_image_metrics():
    from pipeline.imaging.metrics import PairAccumulator, overlap_range

    a, _ = phantom_section((120, 160), seed=3)
    b = warp_affine(a, translation_matrix(1.5, -2), a.shape)
    whole = pair_metrics(a, b)
    accumulator = PairAccumulator(*overlap_range(a, b))
    for y0 in range(0, 120, 25):
        accumulator.add(a[y0:y0 + 25], b[y0:y0 + 25])
    strips = accumulator.result()
    assert strips["overlap_pixels"] == whole["overlap_pixels"]
    assert strips["ncc"] == pytest.approx(whole["ncc"], abs=1e-9)
    assert strips["mutual_information"] == pytest.approx(whole["mutual_information"], abs=1e-9)
    # the NCC is Pearson's r of the overlap
    where = (a != 0) & (b != 0)
    assert whole["ncc"] == pytest.approx(np.corrcoef(a[where].astype(float), b[where].astype(float))[0, 1], abs=1e-9)
