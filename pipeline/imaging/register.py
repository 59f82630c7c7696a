"""Rigid registration of one section onto its neighbour (Elastix, or SimpleITK as a fallback).

Both backends run translation first, then rigid (Euler: rotation + translation), with Mattes
mutual information over a multi-resolution pyramid. Gradient methods only find the rotation
near their start, so by default a coarse search over all rotations comes first
(`pipeline.imaging.rotation_search`): the moving image is resampled once with the best start,
on a canvas padded so that turning it loses no tissue, the fine registration refines that, and
the two are composed into the one reported transform. The result follows the convention of
`pipeline.imaging.transforms`: it maps fixed-image points to moving-image points,
``aligned(p) = moving(T(p))``, and is reported as (rotation [rad], xshift, yshift [px]) about
the centre of the fixed image. `similarity_fit` refines a start near the answer with rotation
+ isotropic scale (sections of different size, the align stage's second pass). Elastix's
parameter maps are package files
(`pipeline/imaging/elastix/*.txt`) so a run can record exactly what it used.

`import itk` takes ~10 s in a fresh process, so it is imported on first use and kept for the
life of the process; `preload` does it before a pool of workers is forked, so they share it.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi

from pipeline.errors import SlidepipeError
from pipeline.imaging.transforms import canvas_center, rigid_matrix, rigid_parameters, translation_matrix

ELASTIX_DIR = Path(__file__).with_name("elastix")
PARAMETER_FILES = (ELASTIX_DIR / "translation.txt", ELASTIX_DIR / "rigid.txt")
"""Applied in this order; each map starts from the result of the previous one."""
FROM_START_FILES = (ELASTIX_DIR / "translation_from_start.txt", ELASTIX_DIR / "rigid.txt")
"""A further hypothesis (Elastix only): the translation stage keeps the coarse start instead of
re-starting from the centres of gravity."""
RECORDED_FILES = (*PARAMETER_FILES, FROM_START_FILES[0])
"""Every map `register_pair` may use (recorded in the run, hashed into the pairs' fingerprints)."""
SIMILARITY_FILES = (ELASTIX_DIR / "similarity.txt",)
"""`similarity_fit`: rotation + isotropic scale + shift from a start near the answer (a translation
stage first, as in `FROM_START_FILES`, changed no fit on the hard sample by more than 0.1 degrees
but one damaged section's, and cost twice the time)."""
"""Every map the align stage may use (recorded in the run, hashed into the fingerprints)."""

SITK_SETTINGS = {
    "histogram_bins": 32, "sampling_percentage": 0.99, "seed": 1234, "learning_rate": 2.0,
    "shrink_factors": [4, 2, 1], "smoothing_sigmas": [2.0, 1.0, 0.0],
    "translation_iterations": 200, "rigid_iterations": 300,
}
"""The fallback's settings (recorded by the align stage like the Elastix maps). Random samples of
~all pixels: on the sample brain's 80 px thumbnails 25% sampling doubled the error, and sampling
every pixel in grid order (no randomness) made one pair diverge."""

STARTS = 1
"""Fine registrations per pair, from the best distinct coarse candidates. More than one did not
help on the hard sample (the choice between them by NCC picked half-turns as often as it fixed
them), so one, the best."""

HYPOTHESIS_STARTS = 3
HYPOTHESIS_MARGIN = 0.15
"""With `hypotheses`, the coarse peaks (of the best HYPOTHESIS_STARTS) whose NCC is within this of
the best are refined too: on the hard sample a right turn scored 0.14 against a half turn's 0.24
(a section with a piece missing). The metric over the fixed tissue only is the other hypothesis:
a piece missing from the fixed section then no longer pulls the outline match (measured on the
hard sample: 22->23 -7.5 -> +0.1 degrees off, 16->18 6.0 -> 0.1), while it made pairs whose
moving section is the damaged one worse (21->23: 1.9 -> 12.1); so neither is always right, and the
choice is left to the consistency of the stack (`pose_graph.choose_hypotheses`)."""

PIXELS_PER_SAMPLE = 4
"""Elastix draws at most one random sample per this many pixels of the fixed image (the maps'
NumberOfSpatialSamples, 2048, is the cap for larger images). On an image of fewer pixels than
samples (the tiny sample's 40 x 48 px padded thumbnails: 1920 px) the samples re-draw the same
pixels, interpolated between them: they cost time (every iteration evaluates each) and add no
information. Thumbnails of 90 x 90 px (8192 px padded) and more keep all 2048 (the standard and
hard samples' 108 x 132 / 128 x 136 px, a real brain's ~1400 x 1100 px)."""

_itk = None


@dataclass(frozen=True)
class RigidResult:
    rotation: float
    """Radians (see `transforms` for the direction)."""
    xshift: float
    yshift: float
    """Pixels of the registered images."""
    metric: float
    """Final metric value of the last stage (negative mutual information: lower is better)."""
    iterations: int
    """Optimizer iterations over all stages and resolutions."""
    backend: str
    center: tuple[float, float]
    """(x, y) centre of rotation: the centre of the fixed image."""
    scale: float = 1.0
    """Isotropic scale about `center` (only a similarity fit's is not 1)."""
    start: dict | None = None
    """The coarse search's report (`CoarseStart.describe()`), when it ran."""
    hypotheses: tuple[dict, ...] = ()
    """With `register_pair(hypotheses=True)`: every refined candidate, this result first:
    {rotation, xshift, yshift, score (NCC), start_rank, kind: "as is", "fixed tissue" (the metric
    over the fixed section's tissue only) or "from start" (`FROM_START_FILES`)}."""

    def matrix(self) -> np.ndarray:
        matrix = rigid_matrix(self.rotation, self.xshift, self.yshift, self.center)
        if self.scale != 1.0:
            c = np.asarray(self.center, dtype=np.float64)
            matrix[:2, :2] *= self.scale
            matrix[:2, 2] = c + (self.xshift, self.yshift) - matrix[:2, :2] @ c
        return matrix

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.scale == 1.0:
            del data["scale"]
        data["center"] = list(self.center)
        if data["start"] is None:
            del data["start"]
        data["hypotheses"] = list(self.hypotheses)
        if not data["hypotheses"]:
            del data["hypotheses"]
        return data


def elastix_available() -> bool:
    """itk-elastix is installed (checked from the package metadata: importing itk is slow)."""
    try:
        metadata.version("itk-elastix")
    except metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("itk") is not None


def _load_itk():
    global _itk
    if _itk is None:
        import itk  # noqa: PLC0415 - deliberately lazy (slow import)

        _itk = itk
    return _itk


def preload(backend: str) -> None:
    """Load the backend's libraries in this process (Elastix: itk's lazily loaded modules, ~8 s
    of CPU), so that worker processes forked afterwards share them instead of each loading its
    own copy (the align stage calls this before it forks its pool)."""
    if backend == "elastix":
        _load_itk().ParameterObject  # noqa: B018 - the attribute makes itk load Elastix and what it needs
    elif backend == "simpleitk":
        import SimpleITK  # noqa: F401, PLC0415


def parameter_texts(files: Sequence[Path] = PARAMETER_FILES) -> dict[str, str]:
    """File name -> content of the parameter maps (for the run's record and the fingerprints)."""
    return {Path(f).name: Path(f).read_text() for f in files}


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    fixed_mask: np.ndarray | None = None,
    backend: str = "auto",
    parameter_files: Sequence[Path] = PARAMETER_FILES,
    threads: int | None = None,
    search: bool = True,
    detect_flips: bool = False,
    starts: int = STARTS,
    hypotheses: bool = False,
) -> RigidResult:
    """Rigid transform taking `fixed` coordinates to `moving` coordinates (same-size images).

    `search`: start from the best of all rotations (see the module), refining the `starts` best
    distinct candidates and keeping the result that matches best; `detect_flips`: also score the
    mirrored moving image and report it in `start` (never applied); `hypotheses`: also refine
    the coarse peaks that scored within HYPOTHESIS_MARGIN of the best, and every start again with
    the fixed section's tissue as the metric's mask and (Elastix) without the centre-of-gravity
    restart, and return them all (`RigidResult.hypotheses`, the result itself first) for the
    pose solve to choose the consistent ones.
    """
    if fixed.shape[:2] != moving.shape[:2]:
        raise SlidepipeError(f"fixed {fixed.shape} and moving {moving.shape} images differ in size")
    fixed_f, moving_f = _as_float(fixed, "fixed"), _as_float(moving, "moving")
    if backend == "auto":
        backend = "elastix" if elastix_available() else "simpleitk"
    if backend not in ("elastix", "simpleitk"):
        raise SlidepipeError(f"unknown registration backend {backend!r} (elastix, simpleitk, auto)")
    if not search:
        return _fine(backend, fixed_f, moving_f, fixed_mask, parameter_files, threads)
    from pipeline.imaging.rotation_search import coarse_start, match_score

    start = coarse_start(fixed_f, moving_f, mirror=detect_flips, candidates=max(starts, HYPOTHESIS_STARTS if hypotheses else 1))
    pad = _padding(fixed_f.shape)
    mask_p = None if fixed_mask is None else np.pad(fixed_mask, pad)
    center = canvas_center(fixed_f.shape)

    def refine(initial, mask, files=parameter_files):
        total, fine = _refine_from(backend, fixed_f, moving_f, initial, mask, files, threads)
        return match_score(fixed_f, moving_f, total), total, fine

    initials = (start.matrix, *start.alternatives)
    best = None
    for rank, initial in enumerate(initials[:starts]):
        score, total, fine = refine(initial, mask_p)
        if best is None or score > best[0]:
            best = (score, rank, total, fine)
    score, rank, total, fine = best
    rotation, xshift, yshift = rigid_parameters(total, center)
    report = {**start.describe(), "final_score": score, "start_rank": rank, "starts_tried": min(starts, len(initials))}
    found = []
    if hypotheses:
        found.append(_hypothesis(total, center, score, rank, "as is"))
        # the coarse peaks that scored nearly as well, and each start again over the fixed tissue only
        ranks = [0] + [k + 1 for k, s in enumerate(start.alternative_scores) if s >= start.score - HYPOTHESIS_MARGIN]
        tissue = np.pad(ndi.binary_erosion(fixed_f > 0, iterations=1), pad) if mask_p is None else mask_p
        variants = [(None, parameter_files, "as is"), (tissue, parameter_files, "fixed tissue")]
        if backend == "elastix":
            variants.append((None, FROM_START_FILES, "from start"))
        for k in ranks:
            for mask, files, kind in variants:
                if (k, kind) == (rank, "as is"):
                    continue
                try:
                    h_score, h_total, _ = refine(initials[k], mask, files)
                except SlidepipeError:  # e.g. too few samples in a tiny section's mask: one hypothesis less
                    continue
                found.append(_hypothesis(h_total, center, h_score, k, kind))
    return replace(fine, rotation=rotation, xshift=xshift, yshift=yshift, center=center, start=report,
                   hypotheses=tuple(found))


def similarity_fit(fixed: np.ndarray, moving: np.ndarray, start: np.ndarray, *, backend: str = "auto",
                   threads: int | None = None) -> dict:
    """A rotation + isotropic scale + shift fit of `moving` onto `fixed` started from `start` (a
    rigid fixed -> moving matrix near the answer: the align stage's first pose solve), and its
    rigid part: the fit's rotation, and the shift that takes the fixed tissue centroid where the
    fit takes it. Neighbouring sections near a pole differ in size (the hard sample's first
    section has 0.64 of its neighbour's tissue area); a rigid fit of the smaller outline into the
    larger one turns it to wherever the two overlap best (measured 3.1 degrees off there, and as
    far off at 2, 4 and 8 times the thumbnail's resolution), a similarity fit takes the size
    change up in its scale (0.7 degrees off). The scale itself is not used: sections are not resized. Returns {rotation,
    xshift, yshift (the rigid part, about the canvas centre), scale, similarity (the 3x3 fit),
    score (NCC of the rigid part, as `match_score`), kind: "similarity", backend}."""
    from pipeline.imaging.rotation_search import match_score

    fixed_f, moving_f = _as_float(fixed, "fixed"), _as_float(moving, "moving")
    if backend == "auto":
        backend = "elastix" if elastix_available() else "simpleitk"
    total, _ = _refine_from(backend, fixed_f, moving_f, np.asarray(start, dtype=np.float64), None, SIMILARITY_FILES,
                            threads, similarity=True)
    center = canvas_center(fixed_f.shape)
    _, scale, _, _ = similarity_parameters(total, center)
    yy, xx = np.nonzero(fixed_f)
    centroid = np.array([xx.mean(), yy.mean()])
    rigid = np.eye(3)
    rigid[:2, :2] = total[:2, :2] / scale
    rigid[:2, 2] = total[:2, :2] @ centroid + total[:2, 2] - rigid[:2, :2] @ centroid
    rotation, xshift, yshift = rigid_parameters(rigid, center)
    return {"rotation": rotation, "xshift": xshift, "yshift": yshift, "scale": scale,
            "similarity": [[float(v) for v in row] for row in total], "score": match_score(fixed_f, moving_f, rigid),
            "kind": "similarity", "backend": backend}


def _padding(shape) -> int:
    """Padding on each side so that a started moving image keeps all its tissue, whatever the turn."""
    return int(np.ceil(0.25 * max(shape[:2])))


def _refine_from(backend, fixed, moving, initial, padded_mask, files, threads, similarity: bool = False
                 ) -> tuple[np.ndarray, RigidResult]:
    """The fine registration started from `initial` (fixed -> moving, 3x3): the moving image is
    resampled once with it on a padded canvas (`_padding`; `padded_mask` is the fixed mask padded
    so), the fine registration refines that, and the two are composed: (matrix, fine result)."""
    pad = _padding(fixed.shape)
    shift = translation_matrix(pad, pad)  # canvas -> padded coordinates
    fixed_p = np.pad(fixed, pad)
    start_padded = shift @ initial @ np.linalg.inv(shift)
    moving_p = cv2.warpAffine(np.pad(moving, pad), start_padded[:2], (fixed_p.shape[1], fixed_p.shape[0]),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0)
    fine = _fine(backend, fixed_p, moving_p, padded_mask, files, threads, similarity=similarity)
    # fixed(p) ~ started(F p) = moving(S F p), in padded coordinates; back to the canvas
    return np.linalg.inv(shift) @ start_padded @ fine.matrix() @ shift, fine


def _hypothesis(matrix, center, score, rank, kind) -> dict:
    rotation, xshift, yshift = rigid_parameters(matrix, center)
    return {"rotation": rotation, "xshift": xshift, "yshift": yshift, "score": float(score), "start_rank": int(rank),
            "kind": kind}


def _fine(backend, fixed, moving, fixed_mask, parameter_files, threads, moving_mask=None, similarity=False) -> RigidResult:
    """Elastix with `parameter_files`, or SimpleITK (translation, then rigid or, with `similarity`,
    rotation + isotropic scale)."""
    if backend == "elastix":
        return _register_elastix(fixed, moving, fixed_mask, parameter_files, threads, moving_mask)
    return _register_simpleitk(fixed, moving, fixed_mask, threads, moving_mask, similarity)


def _as_float(image: np.ndarray, name: str) -> np.ndarray:
    data = image.astype(np.float32)
    if data.ndim == 3:
        data = data.mean(axis=2)
    if data.ndim != 2:
        raise SlidepipeError(f"{name} image must be 2-D, got shape {image.shape}")
    if not np.any(data):
        raise SlidepipeError(f"{name} image is empty (all zero): nothing to register")
    return np.ascontiguousarray(data)


# ------------------------------------------------------------------------------------ elastix
_ITERATION_ROW = re.compile(r"^\d+\t", re.MULTILINE)
_FINAL_METRIC = re.compile(r"Final metric value\s*=\s*(\S+)")


def _register_elastix(fixed, moving, fixed_mask, parameter_files, threads, moving_mask=None) -> RigidResult:
    itk = _load_itk()
    parameters = itk.ParameterObject.New()
    for path in parameter_files:
        if not Path(path).is_file():
            raise SlidepipeError("Elastix parameter map is missing", path)
        parameters.AddParameterFile(str(path))
    for index in range(parameters.GetNumberOfParameterMaps()):
        cap = parameters.GetParameter(index, "NumberOfSpatialSamples")
        if cap:
            parameters.SetParameter(index, "NumberOfSpatialSamples", str(spatial_samples(int(cap[0]), fixed.size)))
    kwargs = {}
    if fixed_mask is not None:
        kwargs["fixed_mask"] = itk.GetImageFromArray(np.ascontiguousarray(fixed_mask.astype(np.uint8)))
    if moving_mask is not None:
        kwargs["moving_mask"] = itk.GetImageFromArray(np.ascontiguousarray(moving_mask.astype(np.uint8)))
    if threads:
        kwargs["number_of_threads"] = int(threads)
    with tempfile.TemporaryDirectory(prefix="slidepipe-elastix-") as workdir:
        try:
            _, result = itk.elastix_registration_method(
                itk.GetImageFromArray(fixed), itk.GetImageFromArray(moving), parameter_object=parameters,
                log_to_console=False, log_to_file=True, output_directory=workdir, **kwargs,
            )
        except Exception as exc:  # elastix reports failures as RuntimeError with its log text
            raise SlidepipeError(f"Elastix registration failed: {str(exc).strip().splitlines()[-1:]}") from exc
        log_text = (Path(workdir) / "elastix.log").read_text(errors="replace")
    # Elastix composes the maps: T(p) = T_last(...T_first(p)); each map in its own centre.
    matrix = np.eye(3)
    for index in range(result.GetNumberOfParameterMaps()):
        matrix = _map_matrix(dict(result.GetParameterMap(index))) @ matrix
    center = canvas_center(fixed.shape)
    rotation, scale, xshift, yshift = similarity_parameters(matrix, center)
    metrics = _FINAL_METRIC.findall(log_text)
    return RigidResult(
        rotation=rotation, xshift=xshift, yshift=yshift,
        metric=float(metrics[-1]) if metrics else float("nan"),
        iterations=len(_ITERATION_ROW.findall(log_text)), backend="elastix", center=center, scale=scale,
    )


def spatial_samples(cap: int, pixels: int) -> int:
    """Random samples per Elastix iteration on a fixed image of `pixels` (see PIXELS_PER_SAMPLE)."""
    return max(1, min(cap, pixels // PIXELS_PER_SAMPLE))


def similarity_parameters(matrix: np.ndarray, center) -> tuple[float, float, float, float]:
    """(rotation, scale, xshift, yshift) of a rotation + isotropic scale + shift about `center`
    (scale 1 for a rigid matrix; `transforms.rigid_parameters` otherwise)."""
    linear = np.asarray(matrix, dtype=np.float64)[:2, :2]
    scale = float(np.sqrt(abs(np.linalg.det(linear))))
    if abs(scale - 1.0) < 1e-9:
        return (rigid_parameters(matrix, center)[0], 1.0, *rigid_parameters(matrix, center)[1:])
    c = np.asarray(center, dtype=np.float64)
    shift = np.asarray(matrix, dtype=np.float64)[:2, 2] - c + linear @ c
    return float(np.arctan2(linear[1, 0], linear[0, 0])), scale, float(shift[0]), float(shift[1])


def _map_matrix(parameter_map: dict) -> np.ndarray:
    kind = parameter_map["Transform"][0]
    values = [float(v) for v in parameter_map["TransformParameters"]]
    if kind == "TranslationTransform":
        return translation_matrix(values[0], values[1])
    if kind in ("EulerTransform", "SimilarityTransform"):
        center = tuple(float(v) for v in parameter_map["CenterOfRotationPoint"])
        scale, (angle, tx, ty) = (values[0], values[1:]) if kind == "SimilarityTransform" else (1.0, values)
        return RigidResult(angle, tx, ty, 0.0, 0, "elastix", center, scale=scale).matrix()
    raise SlidepipeError(f"unsupported Elastix transform {kind!r} in the parameter maps (translation, Euler, "
                         "similarity only)")


# ---------------------------------------------------------------------------------- SimpleITK
def _register_simpleitk(fixed, moving, fixed_mask, threads, moving_mask=None, similarity=False) -> RigidResult:
    import SimpleITK as sitk

    s = SITK_SETTINGS
    fixed_image, moving_image = sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving)
    mask_image = None if fixed_mask is None else sitk.GetImageFromArray(fixed_mask.astype(np.uint8))
    moving_mask_image = None if moving_mask is None else sitk.GetImageFromArray(moving_mask.astype(np.uint8))
    iterations = [0]

    def method(iterations_max: int, initial, scales_from_shift: bool):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s["histogram_bins"])
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(s["sampling_percentage"], s["seed"])
        if mask_image is not None:
            reg.SetMetricFixedMask(mask_image)
        if moving_mask_image is not None:
            reg.SetMetricMovingMask(moving_mask_image)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=s["learning_rate"], minStep=1e-4, numberOfIterations=iterations_max, gradientMagnitudeTolerance=1e-8)
        if scales_from_shift:
            reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(s["shrink_factors"])
        reg.SetSmoothingSigmasPerLevel(s["smoothing_sigmas"])
        reg.SetInitialTransform(initial, inPlace=True)
        if threads:
            reg.SetNumberOfThreads(int(threads))
        reg.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
        return reg

    # translation, started by matching the centres of mass (as Elastix's CenterOfGravity does)
    start = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler2DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    translation = sitk.TranslationTransform(2, sitk.Euler2DTransform(start).GetTranslation())
    method(s["translation_iterations"], translation, False).Execute(fixed_image, moving_image)
    center = canvas_center(fixed.shape)
    if similarity:
        rigid = sitk.Similarity2DTransform(1.0, 0.0, translation.GetOffset(), center)
    else:
        rigid = sitk.Euler2DTransform(center, 0.0, translation.GetOffset())
    reg = method(s["rigid_iterations"], rigid, True)
    reg.Execute(fixed_image, moving_image)
    angle = rigid.GetAngle()
    tx, ty = rigid.GetTranslation()
    scale = float(rigid.GetScale()) if similarity else 1.0
    rotation, scale, xshift, yshift = similarity_parameters(
        RigidResult(angle, tx, ty, 0.0, 0, "simpleitk", tuple(rigid.GetCenter()), scale=scale).matrix(), center)
    return RigidResult(rotation=rotation, xshift=xshift, yshift=yshift, metric=float(reg.GetMetricValue()),
                       iterations=iterations[0], backend="simpleitk", center=center, scale=scale)
