"""Coarse global rigid search: the start from which the fine registration (Elastix) refines.

Elastix, like any gradient method, only finds the rotation near its start: from a
centre-of-gravity start a pair turned by 28.7 degrees was registered as 11.0 degrees. So before
it, every rotation is tried: the moving section is turned about its tissue centroid onto the
fixed section's tissue centroid in steps of `step_deg` over the whole circle, each candidate is
scored by the normalised cross-correlation of the two (smoothed) images over the union of their
tissue, and the best one is refined in 1 degree steps. The translation of each candidate comes
from the centroids; the fine registration then corrects it (a torn piece moves a centroid by a
few pixels, not enough to matter at this stage).

Optionally (`mirror=True`) the mirrored moving section is searched too: a section mounted face
down matches its neighbour better mirrored. This is *reported* (`CoarseStart.mirrored_score`)
and never applied: a rigid transform cannot express a mirror, and whether to flip a section is
the user's decision.

Pure functions on thumbnails (a few ms per candidate on 100 x 100 px), same transform convention
as `pipeline.imaging.transforms` (the matrix maps fixed-image points to moving-image points).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.imaging.transforms import canvas_center, rigid_parameters

COARSE_STEP_DEG = 6.0
FINE_STEP_DEG = 1.0
SMOOTH_SIGMA = 1.0
"""Thumbnail pixels: the score should reward overlapping anatomy, not pixel noise."""


@dataclass(frozen=True)
class CoarseStart:
    matrix: np.ndarray
    """3x3, fixed -> moving pixel coordinates (never mirrored)."""
    rotation: float
    """Radians, about the canvas centre (as `transforms.rigid_parameters`)."""
    score: float
    """NCC of the best unmirrored candidate (-1..1)."""
    mirrored_score: float | None = None
    """NCC of the best mirrored candidate, when it was searched."""
    mirrored_rotation: float | None = None
    alternatives: tuple[np.ndarray, ...] = ()
    """Further starts (local maxima of the score, best first) when more than one was asked for."""
    alternative_scores: tuple[float, ...] = ()
    """NCC of each alternative."""

    @property
    def looks_mirrored(self) -> bool:
        """The mirrored section fits its neighbour clearly better than the section as mounted."""
        return self.mirrored_score is not None and self.mirrored_score > self.score + MIRROR_MARGIN

    def describe(self) -> dict:
        data = {"start_rotation": float(self.rotation), "start_score": float(self.score)}
        if self.mirrored_score is not None:
            data.update(mirrored_score=float(self.mirrored_score), mirrored_rotation=float(self.mirrored_rotation),
                        looks_mirrored=bool(self.looks_mirrored))
        return data


MIRROR_MARGIN = 0.05
"""How much better (NCC) the mirrored fit must be to report a section as mirrored."""


def _prepare(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 3:
        data = data.mean(axis=2)
    if data.ndim != 2:
        raise SlidepipeError(f"{name} image must be 2-D, got shape {image.shape}")
    tissue = data > 0
    if tissue.sum() < 4:
        raise SlidepipeError(f"{name} image has no tissue (all zero): nothing to register")
    yy, xx = np.nonzero(tissue)
    centroid = np.array([xx.mean(), yy.mean()])
    smooth = cv2.GaussianBlur(data, (0, 0), SMOOTH_SIGMA)
    return smooth, tissue, centroid


def candidate_matrix(angle: float, fixed_centroid, moving_centroid, mirrored: bool = False) -> np.ndarray:
    """p -> c_m + F R(angle) (p - c_f): turn about the fixed centroid onto the moving one (F mirrors x)."""
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]])
    if mirrored:
        linear = np.diag([-1.0, 1.0]) @ linear
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = np.asarray(moving_centroid, float) - linear @ np.asarray(fixed_centroid, float)
    return matrix


def _ncc(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else -1.0


def _score(fixed, fixed_tissue, moving, moving_tissue, matrix) -> float:
    shape = fixed.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(moving, matrix[:2], (shape[1], shape[0]), flags=flags, borderValue=0)
    warped_tissue = cv2.warpAffine(moving_tissue.astype(np.uint8), matrix[:2], (shape[1], shape[0]),
                                   flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0).astype(bool)
    return _ncc(fixed, warped, fixed_tissue | warped_tissue)


REFINE_SHIFT = True

PEAKS_REFINED = 3
"""The sweep's best peaks refined before choosing: on the hard sample the best refined candidate
was often the sweep's second peak (a 6 degree grid misses narrow maxima)."""
SMALL_TURN_PREFERENCE = 0.05
"""NCC given up at a half turn, (1 - cos angle) / 2 of it in between: near-symmetric outlines
score a half-turned fit almost as well as the right one, and neighbouring sections are more
often mounted alike than upside down. A real half turn still wins when it fits clearly better.
Measured (coarse stage): half-turned starts 3 -> 1 of 38 pairs on the hard sample, 4 -> 1 of 9 on
the tiny one, none on the standard sample either way."""


def preferred(score: float, angle: float) -> float:
    """The score the choice between candidates uses: NCC less the small-turn preference."""
    return score - SMALL_TURN_PREFERENCE * (1.0 - np.cos(angle)) / 2.0


def match_score(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray) -> float:
    """The search's score (NCC of the smoothed images over their joint tissue) of any transform:
    compares the results of fine registrations started from different candidates."""
    f, f_tissue, _ = _prepare(fixed, "fixed")
    m, m_tissue, _ = _prepare(moving, "moving")
    return _score(f, f_tissue, m, m_tissue, np.asarray(matrix, dtype=np.float64))


def _shifted(fixed, moving, moving_tissue, matrix) -> np.ndarray:
    """The candidate moved by the translation that best matches the fixed image (phase correlation)."""
    shape = fixed.shape
    warped = cv2.warpAffine(moving, matrix[:2], (shape[1], shape[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderValue=0)
    (dx, dy), _ = cv2.phaseCorrelate(fixed.astype(np.float64), warped.astype(np.float64))
    # warped content sits at +(dx, dy) from the fixed content: sample the moving image further on
    return matrix @ np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1.0]])


def _candidates(fixed, fixed_tissue, cf, moving, moving_tissue, cm, mirrored, step_deg, count):
    """The `count` best local maxima of the score over the whole circle, each refined in
    FINE_STEP_DEG steps: [(score, angle, matrix)], best first by `preferred`."""
    def evaluate(angle):
        matrix = candidate_matrix(angle, cf, cm, mirrored)
        if REFINE_SHIFT:
            matrix = _shifted(fixed, moving, moving_tissue, matrix)
        return _score(fixed, fixed_tissue, moving, moving_tissue, matrix), float(angle), matrix

    sweep = [evaluate(a) for a in np.deg2rad(np.arange(0.0, 360.0, step_deg))]
    scores = np.array([c[0] for c in sweep])
    peaks = [k for k in range(len(sweep)) if scores[k] >= scores[k - 1] and scores[k] >= scores[(k + 1) % len(sweep)]]
    peaks.sort(key=lambda k: -scores[k])
    found = []
    for k in peaks[: max(count, PEAKS_REFINED)]:
        best = sweep[k]
        for delta in np.deg2rad(np.arange(-step_deg + FINE_STEP_DEG, step_deg, FINE_STEP_DEG)):
            candidate = evaluate(sweep[k][1] + delta)
            if candidate[0] > best[0]:
                best = candidate
        found.append(best)
    found.sort(key=lambda c: -preferred(c[0], c[1]))
    return found[:count]


def coarse_start(fixed: np.ndarray, moving: np.ndarray, *, mirror: bool = False,
                 step_deg: float = COARSE_STEP_DEG, candidates: int = 1) -> CoarseStart:
    """Best rigid start over all rotations (and, with `mirror`, the mirrored score for a report);
    `candidates` > 1 also keeps the next best distinct starts (`alternatives`)."""
    if fixed.shape[:2] != moving.shape[:2]:
        raise SlidepipeError(f"fixed {fixed.shape} and moving {moving.shape} images differ in size")
    f, f_tissue, cf = _prepare(fixed, "fixed")
    m, m_tissue, cm = _prepare(moving, "moving")
    found = _candidates(f, f_tissue, cf, m, m_tissue, cm, False, step_deg, candidates)
    score, _, matrix = found[0]
    center = canvas_center(fixed.shape)
    rotation = rigid_parameters(matrix, center)[0]
    mirrored_score = mirrored_rotation = None
    if mirror:
        mirrored_score, mirrored_rotation, _ = _candidates(f, f_tissue, cf, m, m_tissue, cm, True, step_deg, 1)[0]
    return CoarseStart(matrix=matrix, rotation=rotation, score=score, mirrored_score=mirrored_score,
                       mirrored_rotation=mirrored_rotation, alternatives=tuple(c[2] for c in found[1:]),
                       alternative_scores=tuple(float(c[0]) for c in found[1:]))
