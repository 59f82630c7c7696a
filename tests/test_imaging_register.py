"""Pairwise rigid registration recovers known transforms (Elastix and the SimpleITK fallback)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SlidepipeError
from pipeline.imaging.register import PARAMETER_FILES, parameter_texts, register_pair
from pipeline.imaging.transforms import canvas_center, rigid_matrix
from pipeline.imaging.warp import warp_affine
from tests.helpers_imaging import phantom_section

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")  # ITK's SWIG wrappers

CASES = [(3.0, 12.0, -7.0), (-8.0, -20.0, 15.0), (0.4, 1.3, -0.6)]


def _pair(seed, degrees, tx, ty, contrast=1.0):
    fixed, footprint = phantom_section((240, 320), seed=seed)
    truth = rigid_matrix(np.deg2rad(degrees), tx, ty, canvas_center(fixed.shape))
    moving = warp_affine(fixed, np.linalg.inv(truth), fixed.shape)  # so that moving(T p) = fixed(p)
    if contrast != 1.0:
        moving = np.clip(moving.astype(np.float64) * contrast, 0, 65535).astype(np.uint16)
    return fixed, moving, truth, footprint


def _rms(found, truth, footprint):
    yy, xx = np.nonzero(footprint)
    points = np.stack([xx, yy, np.ones_like(xx)]).astype(float)
    error = (found @ points - truth @ points)[:2]
    return float(np.sqrt((error**2).sum(axis=0).mean()))


@pytest.mark.parametrize("degrees,tx,ty", CASES)
def test_simpleitk_recovers_known_transforms(degrees, tx, ty):
    fixed, moving, truth, footprint = _pair(1, degrees, tx, ty)
    result = register_pair(fixed, moving, backend="simpleitk")
    rms = _rms(result.matrix(), truth, footprint)
    print(f"simpleitk {degrees, tx, ty}: rotation error {np.rad2deg(result.rotation) - degrees:+.4f} deg, RMS {rms:.4f} px, "
          f"{result.iterations} iterations")
    assert rms < 0.1
    assert result.backend == "simpleitk" and result.iterations > 0 and np.isfinite(result.metric)


def test_elastix_recovers_a_known_transform_under_a_contrast_change():
    fixed, moving, truth, footprint = _pair(2, *CASES[0], contrast=1.7)
    result = register_pair(fixed, moving, backend="elastix")
    rms = _rms(result.matrix(), truth, footprint)
    print(f"elastix: rotation {np.rad2deg(result.rotation):.4f} deg (truth {CASES[0][0]}), shift "
          f"({result.xshift:.3f}, {result.yshift:.3f}), RMS {rms:.4f} px, metric {result.metric:.3f}")
    assert rms < 0.1
    assert result.backend == "elastix" and result.iterations > 0 and result.metric < 0
    assert result.center == canvas_center(fixed.shape)


def test_parameter_maps_are_package_files():
    texts = parameter_texts()
    assert list(texts) == ["translation.txt", "rigid.txt"]
    assert '"EulerTransform"' in texts["rigid.txt"] and '"TranslationTransform"' in texts["translation.txt"]
    assert all(p.is_file() for p in PARAMETER_FILES)


def test_bad_inputs_are_reported():
    image, _ = phantom_section((60, 80), seed=0)
    with pytest.raises(SlidepipeError, match="differ in size"):
        register_pair(image, image[:50], backend="simpleitk")
    with pytest.raises(SlidepipeError, match="empty"):
        register_pair(image, np.zeros_like(image), backend="simpleitk")
    with pytest.raises(SlidepipeError, match="unknown registration backend"):
        register_pair(image, image, backend="ants")
