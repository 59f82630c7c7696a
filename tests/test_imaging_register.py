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


# --------------------------------------------------------------------------- coarse rotation search
def _cleaned_pair(degrees, tx=4.0, ty=-3.0, mirrored=False, seed=3):
    """A cleaned-like section (zero outside the tissue) and a copy turned by `degrees` (any size)."""
    image, footprint = phantom_section((96, 128), seed=seed)
    fixed = np.where(footprint, image, 0).astype(np.uint16)
    truth = rigid_matrix(np.deg2rad(degrees), tx, ty, canvas_center(fixed.shape))
    source = np.fliplr(fixed) if mirrored else fixed
    moving = warp_affine(source, np.linalg.inv(truth), fixed.shape)
    return fixed, moving, truth, footprint


@pytest.mark.parametrize("degrees", [28.7, 120.0, -170.0])
def test_large_rotations_are_found(degrees):
    """The old method (Elastix from a centre-of-gravity start) found only rotations near 0."""
    fixed, moving, truth, footprint = _cleaned_pair(degrees)
    result = register_pair(fixed, moving, backend="elastix")
    rms = _rms(result.matrix(), truth, footprint)
    error = (np.rad2deg(result.rotation) - degrees + 180) % 360 - 180
    print(f"{degrees} deg: coarse start {np.rad2deg(result.start['start_rotation']):.1f}, found "
          f"{np.rad2deg(result.rotation):.3f} deg, RMS {rms:.3f} px")
    assert abs(error) < 0.2 and rms < 0.2


def test_coarse_start_reports_a_mirrored_section_without_applying_it():
    from pipeline.imaging.rotation_search import coarse_start

    fixed, moving, _, _ = _cleaned_pair(35.0)
    plain = coarse_start(fixed, moving, mirror=True)
    assert not plain.looks_mirrored and abs(np.rad2deg(plain.rotation) - 35.0) <= 3.0
    fixed, flipped, _, _ = _cleaned_pair(35.0, mirrored=True)
    found = coarse_start(fixed, flipped, mirror=True)
    print(f"NCC as mounted {found.score:.3f}, mirrored {found.mirrored_score:.3f} (unmirrored pair: "
          f"{plain.score:.3f} / {plain.mirrored_score:.3f})")
    assert found.looks_mirrored
    assert np.linalg.det(found.matrix[:2, :2]) > 0  # reported, never applied
    assert coarse_start(fixed, flipped).mirrored_score is None  # only searched when asked
    result = register_pair(fixed, flipped, backend="simpleitk", detect_flips=True)
    assert result.start["looks_mirrored"] is True and np.isclose(np.linalg.det(result.matrix()[:2, :2]), 1.0)


def test_hypotheses_include_the_metric_over_the_fixed_tissue():
    """A corner of the fixed section is missing (17% of its tissue): the registration as is lets
    the outline pull the match; a hypothesis with the metric over the fixed tissue only is not
    pulled. The result itself is the first hypothesis; the stack chooses among them."""
    fixed, moving, truth, footprint = _cleaned_pair(20.0, seed=5)
    yy, xx = np.mgrid[0:fixed.shape[0], 0:fixed.shape[1]]
    cut = (xx - 0.9 * yy) > 50
    fixed = np.where(cut, 0, fixed).astype(fixed.dtype)
    kept = footprint & ~cut
    result = register_pair(fixed, moving, backend="elastix", hypotheses=True)
    center = canvas_center(fixed.shape)
    errors = [(h["kind"], h["start_rank"], _rms(rigid_matrix(h["rotation"], h["xshift"], h["yshift"], center), truth, kept))
              for h in result.hypotheses]
    print(f"fixed section missing {cut[footprint].mean():.0%} of its tissue: RMS px by hypothesis (kind, coarse peak): "
          + ", ".join(f"{k} {r}: {e:.2f}" for k, r, e in errors))
    assert np.allclose(rigid_matrix(result.hypotheses[0]["rotation"], result.hypotheses[0]["xshift"],
                                    result.hypotheses[0]["yshift"], center), result.matrix())
    assert {"as is", "fixed tissue", "from start"} <= {k for k, _, _ in errors}
    assert errors[0][2] > 1.0  # as is: pulled by the outline
    assert min(e for k, _, e in errors if k == "fixed tissue") < 0.3


def test_a_similarity_fit_turns_a_section_of_another_size_right():
    """Towards a pole the next section is smaller: the moving section is the fixed one shrunk to
    0.8 about its tissue centroid and turned 25 degrees. From a start 3 degrees off, the
    similarity fit finds the turn and the scale; its rigid part takes the fixed tissue centroid
    where the truth does."""
    from pipeline.imaging.register import similarity_fit

    fixed, _, _, footprint = _cleaned_pair(0.0)
    center = canvas_center(fixed.shape)
    yy, xx = np.nonzero(fixed)
    centroid = np.array([xx.mean(), yy.mean()])
    turn = rigid_matrix(np.deg2rad(25.0), 3.0, -2.0, center)
    shrink = np.array([[0.8, 0, 0.2 * centroid[0]], [0, 0.8, 0.2 * centroid[1]], [0, 0, 1.0]])  # about the centroid
    truth = turn @ shrink  # fixed -> moving
    moving = warp_affine(fixed, np.linalg.inv(truth), fixed.shape)
    start = rigid_matrix(np.deg2rad(28.0), 3.0, -2.0, center)
    fit = similarity_fit(fixed, moving, start, backend="elastix")
    rigid = rigid_matrix(fit["rotation"], fit["xshift"], fit["yshift"], center)
    error = np.rad2deg(fit["rotation"]) - 25.0
    moved = np.linalg.norm((rigid @ [*centroid, 1.0])[:2] - (truth @ [*centroid, 1.0])[:2])
    print(f"similarity fit of a section shrunk to 0.8: turn {error:+.3f} deg off, scale {fit['scale']:.4f}, "
          f"centroid {moved:.3f} px off")
    assert abs(error) < 0.3 and fit["scale"] == pytest.approx(0.8, abs=0.01) and moved < 0.3
    assert fit["kind"] == "similarity" and np.allclose(np.array(fit["similarity"])[:2, :2], truth[:2, :2], atol=0.01)
