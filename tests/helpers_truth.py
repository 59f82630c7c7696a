"""Alignment measured against the sample brain's truth (`pipeline.sample` saved it), convention-free:
each section's transform is compared with the map from the reference's cleaned canvas to the
section's own cleaned canvas that the truth implies (phantom frame -> slide -> clean geometry).
Used by the accuracy tests and by bench/hard_align.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from pipeline.imaging.orient import Orientation, plan_clean
from pipeline.imaging.transforms import canvas_center, compose_to_reference, rigid_matrix
from pipeline.layout import THUMBNAIL_FACTOR, AnimalLayout, section_key
from pipeline.sample import SampleTruth


def truth_keys(truth: SampleTruth) -> list[str]:
    """Section keys in the sample's own order (which is the stack order: nothing is reordered)."""
    return [section_key(Path(s.slide_file).stem, s.scene_index) for s in truth.sections]


def truth_canvas_matrices(root: Path, animal: str = "DEMO") -> list[np.ndarray]:
    """Per section: phantom frame (full-res px) -> cleaned thumbnail canvas (thumbnail px). A
    mirrored section's matrix mirrors (determinant < 0)."""
    truth = SampleTruth.load(root, animal)
    layout = AnimalLayout(root, animal)
    f = THUMBNAIL_FACTOR
    full_to_thumb = np.array([[1 / f, 0, -(f - 1) / (2 * f)], [0, 1 / f, -(f - 1) / (2 * f)], [0, 0, 1]])
    n = truth_keys(truth)
    canvas = tifffile.imread(layout.cleaned(1, True, n[0])).shape
    matrices = []
    for s in truth.sections:
        geometry = plan_clean(tifffile.imread(layout.mask(n[s.position])) > 0, Orientation(), canvas)
        matrices.append(geometry.source_to_canvas() @ full_to_thumb @ np.vstack([np.array(s.phantom_to_scene), [0, 0, 1]]))
    return matrices


def tissue_points(image: np.ndarray) -> np.ndarray:
    """3 x N homogeneous (x, y, 1) of the non-zero pixels."""
    data = image.any(axis=2) if image.ndim == 3 else image != 0
    yy, xx = np.nonzero(data)
    return np.stack([xx, yy, np.ones_like(xx)]).astype(float)


def rms_distance(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    return float(np.sqrt(((a @ points - b @ points)[:2] ** 2).sum(axis=0).mean()))


def rotation_error_deg(found: np.ndarray, true: np.ndarray) -> float:
    """Angle of found o true^-1 (NaN when one of the two mirrors and the other does not: no
    rotation can match it; a pair solved on a section the user mirrored compares like any other)."""
    delta = found @ np.linalg.inv(true)
    if np.linalg.det(delta[:2, :2]) < 0:
        return float("nan")
    return float(np.rad2deg(np.arctan2(delta[1, 0], delta[0, 0])))


def alignment_errors(root: Path, animal: str = "DEMO") -> dict:
    """The align stage's outputs against the truth: every registered pair (k-1, k-2: rotation
    error of the registration and of the solved poses (what the stack uses), RMS px of the
    registration over the fixed section's tissue), and every section's composed transform onto
    the reference against the truth, over its aligned tissue (RMS px), with the same for the
    unaligned stack (identity) and for chaining the k-1 registrations. Mirrored sections (the
    truth's `mirrored`) cannot be matched by a rigid transform: they are listed apart."""
    truth = SampleTruth.load(root, animal)
    layout = AnimalLayout(root, animal)
    names = truth_keys(truth)
    true = truth_canvas_matrices(root, animal)
    canvas = tifffile.imread(layout.cleaned(1, True, names[0])).shape
    center = canvas_center(canvas)
    mirrored = {s.position for s in truth.sections if s.mirrored}
    count = len(names)
    composed = [np.array(json.loads(layout.section_transform(name).read_text())["matrix"]) for name in names]
    pairs = []
    k1 = [None]
    for i in range(1, count):
        for step in (1, 2):
            path = layout.pairwise_transform(names[i], step)
            if i < step or not path.is_file():
                continue
            data = json.loads(path.read_text())
            found = rigid_matrix(data["rotation"], data["xshift"], data["yshift"], center)
            expected = true[i] @ np.linalg.inv(true[i - step])
            points = tissue_points(tifffile.imread(layout.cleaned(1, True, names[i - step])))
            pairs.append({"fixed": i - step, "moving": i, "step": step, "mirrored": bool({i, i - step} & mirrored),
                          "rotation_error_deg": rotation_error_deg(found, expected),
                          "solved_rotation_error_deg": rotation_error_deg(
                              composed[i] @ np.linalg.inv(composed[i - step]), expected),
                          "rms_px": rms_distance(found, expected, points)})
            if step == 1:
                k1.append(found)
    reference = count // 2
    chained = compose_to_reference(k1, reference) if len(k1) == count else None
    sections = []
    for i in range(count):
        expected = true[i] @ np.linalg.inv(true[reference])
        points = tissue_points(tifffile.imread(layout.aligned(1, True, names[i])))
        sections.append({"position": i, "mirrored": i in mirrored,
                         "error_px": rms_distance(composed[i], expected, points),
                         "unaligned_px": rms_distance(np.eye(3), expected, points),
                         "chained_px": None if chained is None else rms_distance(chained[i], expected, points)})
    return {"reference": reference, "mirrored": sorted(mirrored), "pairs": pairs, "sections": sections}


def rms(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.sqrt(np.mean(np.square(values)))) if values else float("nan")
