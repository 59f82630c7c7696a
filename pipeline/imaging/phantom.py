"""A brain-like 3-D phantom and the rendering of its coronal sections as they lie on a slide.

Pure functions, no files: `pipeline.sample` writes what these render. The phantom is analytic in
normalised coordinates (u right, v down/ventral, w anterior->posterior, the widest section about
u in [-0.86, 0.86]), so any section can be rendered at any pixel size and rotation without a
3-D voxel volume. Smooth quantities (anatomy, intensities) are evaluated on a grid 4x coarser
than the output and interpolated; the tissue boundary is the zero level of an interpolated smooth
field, so it stays sharp at full resolution. Cell-like speckle, fibre texture, read noise and
debris are drawn at full resolution from the section's own random generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

COARSE = 4
"""Smooth fields are computed on every 4th pixel and linearly interpolated."""

CHANNELS = ("DAPI", "GFP")
BACKGROUND = (110.0, 70.0)
READ_NOISE = (5.0, 4.0)  # camera read noise; kept low so the slides compress like real scans


@dataclass(frozen=True)
class Nucleus:
    """An ellipsoidal brain region with its own brightness in each channel."""

    u: float
    v: float
    w: float
    ru: float
    rv: float
    rw: float
    gain1: float
    gain2: float


@dataclass(frozen=True)
class Phantom:
    seed: int
    nuclei: tuple[Nucleus, ...]
    outline_phases: tuple[float, ...]
    texture: np.ndarray  # (2, nw, nv, nu) smooth 3-D fields with std ~1, one per channel


def make_phantom(seed: int) -> Phantom:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    nuclei = []
    for _ in range(12):
        nuclei.append(
            Nucleus(
                u=float(rng.uniform(-0.55, 0.55)),
                v=float(rng.uniform(-0.25, 0.35)),
                w=float(rng.uniform(-0.8, 0.8)),
                ru=float(rng.uniform(0.04, 0.11)),
                rv=float(rng.uniform(0.03, 0.09)),
                rw=float(rng.uniform(0.15, 0.4)),
                gain1=float(rng.choice([rng.uniform(0.55, 0.8), rng.uniform(1.3, 1.8)])),
                gain2=float(rng.uniform(0.6, 3.5)),
            )
        )
    phases = tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 8))
    noise = rng.standard_normal((2, 40, 40, 56))
    texture = np.stack([ndimage.gaussian_filter(n, 2.0, mode="nearest") for n in noise])
    texture /= texture.std(axis=(1, 2, 3), keepdims=True)
    return Phantom(seed=seed, nuclei=tuple(nuclei), outline_phases=phases, texture=texture.astype(np.float32))


def section_depths(count: int) -> np.ndarray:
    """Normalised depth w of each of `count` evenly spaced coronal sections."""
    return np.linspace(-0.85, 0.85, count)


def _size_profile(w: float) -> float:
    """Sections shrink towards both poles, the anterior one faster (olfactory end)."""
    return float(np.clip(1.0 - ((w - 0.08) / 1.02) ** 2, 0.0, 1.0) ** 0.4)


def _bump(x: float, half_width: float, centre: float = 0.0) -> float:
    return float(np.clip(1.0 - ((x - centre) / half_width) ** 2, 0.0, 1.0) ** 0.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class Cut:
    """Damage to one section, in normalised phantom coordinates (u right, v down).

    kind "missing": the piece beyond the line u cos(angle) + v sin(angle) = offset is gone (a
    corner broken off when mounting). kind "tear": a slit of half-width `width` along the
    direction `angle`, from `offset` outwards to the edge.
    """

    kind: str
    angle: float
    offset: float
    width: float = 0.0

    def level(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """> 0 where the cut removes tissue."""
        along = u * np.cos(self.angle) + v * np.sin(self.angle)
        if self.kind == "missing":
            return along - self.offset
        if self.kind == "tear":
            across = -u * np.sin(self.angle) + v * np.cos(self.angle)
            return np.minimum(self.width - np.abs(across), along - self.offset)
        raise ValueError(f"unknown cut kind {self.kind!r} (missing, tear)")


def section_fields(ph: Phantom, u: np.ndarray, v: np.ndarray, w: float, cuts: tuple[Cut, ...] = ()) -> dict[str, np.ndarray]:
    """Smooth fields of the section at depth w, at the points (u, v).

    'outer' < 1 inside the brain outline, 'level' < 0 on tissue (outline minus ventricles, the
    midline fissure and any `cuts`), 'ch1' and 'ch2' the expected tissue intensities before
    texture and noise.
    """
    s = _size_profile(w)
    a = 0.86 * s * (1 + 0.04 * w)
    b = 0.58 * s * (1 - 0.06 * w)
    v0 = 0.02
    du = u / a
    dv = (v - v0) / b
    dv = np.where(dv < 0, dv * 1.1, dv)  # flatter dorsal surface
    r = np.sqrt(du * du + dv * dv)
    theta = np.arctan2(dv, du)
    p = ph.outline_phases
    wobble = (
        1.0
        + 0.05 * np.cos(2 * theta + p[0] + 0.8 * w)
        + 0.035 * np.cos(3 * theta + p[1] - 0.6 * w)
        + 0.02 * np.cos(5 * theta + p[2] + 1.5 * w)
        + 0.012 * np.cos(8 * theta + p[3])
    )
    # ventral midline notch (between the hemispheres' ventral bulges)
    wobble = wobble - 0.06 * np.exp(-(((theta - np.pi / 2) / 0.12) ** 2))
    outer = r / wobble

    holes = np.full(u.shape, np.inf, dtype=np.float64)
    vent = _bump(w, 0.55, 0.05)
    if vent > 0:
        for side in (-1.0, 1.0):
            cu, cv = side * 0.17 * s, v0 - 0.1 * s
            x, y = u - cu, v - cv
            tilt = side * 0.35
            xr = x * np.cos(tilt) + y * np.sin(tilt)
            yr = -x * np.sin(tilt) + y * np.cos(tilt)
            holes = np.minimum(holes, np.sqrt((xr / (0.035 * s * vent)) ** 2 + (yr / (0.13 * s * vent)) ** 2))
    third = _bump(w, 0.4, 0.1)
    if third > 0:
        holes = np.minimum(holes, np.sqrt((u / (0.012 * s * third)) ** 2 + ((v - v0 - 0.22 * s) / (0.11 * s * third)) ** 2))
    aqueduct = _bump(w, 0.18, 0.68)
    if aqueduct > 0:
        holes = np.minimum(holes, np.hypot(u / (0.025 * s * aqueduct), (v - v0 + 0.02) / (0.025 * s * aqueduct)))
    # interhemispheric fissure: a groove widening towards the dorsal surface
    groove = 0.04 * s * np.clip((-dv - 0.45) / 0.55, 0.0, 1.0) + 1e-9
    holes = np.minimum(holes, np.abs(u) / groove)
    level = np.maximum(outer - 1.0, 1.0 - holes)
    for cut in cuts:
        level = np.maximum(level, cut.level(u, v))

    cortex = np.clip((outer - 0.7) / 0.3, 0.0, 1.0) * _sigmoid(-(dv - 0.35) / 0.12)
    layers = 0.5 + 0.5 * np.cos(outer * 2 * np.pi * 6)
    band = np.exp(-(((outer - 0.9) / 0.03) ** 2)) * _sigmoid(-(dv - 0.35) / 0.12)
    cc_r = np.sqrt((u / (0.42 * s)) ** 2 + ((v - v0 + 0.04 * s) / (0.3 * s)) ** 2)
    cc = np.exp(-(((cc_r - 1.0) / 0.09) ** 2)) * _sigmoid(-(v - v0 + 0.02 * s) / 0.02) * _bump(w, 0.65)
    hip_r = np.sqrt(((np.abs(u) - 0.3 * s) / (0.16 * s)) ** 2 + ((v - v0 + 0.01) / (0.1 * s)) ** 2)
    hip = np.exp(-(((hip_r - 1.0) / 0.15) ** 2)) * _bump(w, 0.35, 0.45)

    ch1 = 1400.0 * (1 + 0.55 * cortex * (0.75 + 0.25 * layers)) * (1 - 0.45 * cc) * (1 + 0.6 * hip)
    ch2 = 350.0 * (1 + 3.0 * cc) * (1 + 1.2 * band) * (1 + 1.5 * hip)
    for n in ph.nuclei:
        depth = 1.0 - ((w - n.w) / n.rw) ** 2
        if depth <= 0:
            continue
        scale = np.sqrt(depth)
        q = ((u - n.u * s) / (n.ru * s * scale)) ** 2 + ((v - n.v * s) / (n.rv * s * scale)) ** 2
        g = np.exp(-(q**2))
        ch1 = ch1 * (1 + (n.gain1 - 1) * g)
        ch2 = ch2 * (1 + (n.gain2 - 1) * g)
    t1, t2 = _texture_at(ph, u, v, w)
    ch1 = ch1 * (1 + 0.12 * t1)
    ch2 = ch2 * (1 + 0.2 * t2)
    return {"outer": outer, "level": level, "ch1": ch1, "ch2": ch2}


def _texture_at(ph: Phantom, u: np.ndarray, v: np.ndarray, w: float) -> tuple[np.ndarray, np.ndarray]:
    _, nw, nv, nu = ph.texture.shape
    coords = np.stack(
        [
            np.full(u.shape, (w + 1) / 2 * (nw - 1)),
            np.clip((v + 1) / 2, 0, 1) * (nv - 1),
            np.clip((u + 1) / 2, 0, 1) * (nu - 1),
        ]
    )
    return tuple(ndimage.map_coordinates(ph.texture[c], coords, order=1, mode="nearest") for c in range(2))


# --- geometry ------------------------------------------------------------------------------
def phantom_to_scene(rotation: float, shift: tuple[float, float], frame_shape, scene_shape, mirrored: bool = False) -> np.ndarray:
    """2x3 matrix taking phantom-frame pixel (x, y) to scene pixel: s = R(rotation) F (p - c_p) + c_s + shift.

    Pixel coordinates are (x right, y down) at pixel centres, so a positive rotation turns the
    section clockwise as displayed. F mirrors left-right (x -> -x about the frame centre) when
    the section was mounted face down, else it is the identity.
    """
    c, s = np.cos(rotation), np.sin(rotation)
    rot = np.array([[c, -s], [s, c]])
    if mirrored:
        rot = rot @ np.diag([-1.0, 1.0])
    cp = np.array([(frame_shape[1] - 1) / 2, (frame_shape[0] - 1) / 2])
    cs = np.array([(scene_shape[1] - 1) / 2, (scene_shape[0] - 1) / 2])
    offset = cs + np.asarray(shift, float) - rot @ cp
    return np.hstack([rot, offset[:, None]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    lin = np.linalg.inv(matrix[:, :2])
    return np.hstack([lin, (-lin @ matrix[:, 2])[:, None]])


def _coarse_fields(ph: Phantom, w: float, scene_to_phantom: np.ndarray, shape, unit_px: float, frame_shape,
                   cuts: tuple[Cut, ...] = ()):
    """Fields at the centres of the 4x4 blocks of a (h, w) output; (u, v) from the affine map."""
    h, wd = shape
    ys = COARSE * np.arange(h // COARSE) + (COARSE - 1) / 2
    xs = COARSE * np.arange(wd // COARSE) + (COARSE - 1) / 2
    gx, gy = np.meshgrid(xs, ys)
    px = scene_to_phantom[0, 0] * gx + scene_to_phantom[0, 1] * gy + scene_to_phantom[0, 2]
    py = scene_to_phantom[1, 0] * gx + scene_to_phantom[1, 1] * gy + scene_to_phantom[1, 2]
    u = (px - (frame_shape[1] - 1) / 2) / unit_px
    v = (py - (frame_shape[0] - 1) / 2) / unit_px
    return section_fields(ph, u, v, w, cuts)


def _upsample(field: np.ndarray, shape) -> np.ndarray:
    return cv2.resize(field.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _check_shape(shape) -> None:
    if shape[0] % COARSE or shape[1] % COARSE:
        raise ValueError(f"output shape {shape} must be a multiple of {COARSE}")


def render_footprint(ph: Phantom, w: float, matrix: np.ndarray, shape, unit_px: float, frame_shape,
                     cuts: tuple[Cut, ...] = ()) -> np.ndarray:
    """Tissue mask (bool) of the section mapped into an output of `shape` by `matrix` (phantom->output)."""
    _check_shape(shape)
    fields = _coarse_fields(ph, w, invert_affine(matrix), shape, unit_px, frame_shape, cuts)
    return _upsample(fields["level"], shape) < 0


def render_expected(ph: Phantom, w: float, shape, unit_px: float, frame_shape,
                    cuts: tuple[Cut, ...] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unrotated section in its phantom frame: footprint and expected intensity per channel
    (no cell texture, no noise, no debris) — the reference later accuracy tests compare to."""
    _check_shape(shape)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    fields = _coarse_fields(ph, w, identity, shape, unit_px, frame_shape, cuts)
    tissue = _upsample(fields["level"], shape) < 0
    return tissue, [_upsample(fields[k], shape) * tissue for k in ("ch1", "ch2")]


@dataclass(frozen=True)
class Debris:
    x: float
    y: float
    radius_major: float
    radius_minor: float
    angle_deg: float
    intensity: tuple[float, float]


def render_section(
    ph: Phantom,
    w: float,
    matrix: np.ndarray,
    shape,
    unit_px: float,
    frame_shape,
    rng: np.random.Generator,
    pixel_scale: float = 1.0,
    cuts: tuple[Cut, ...] = (),
) -> tuple[list[np.ndarray], np.ndarray, list[Debris]]:
    """One section as it lies on the slide: uint16 channels, its tissue footprint, its debris.

    `matrix` maps phantom-frame pixels to output pixels; `pixel_scale` is how many output pixels
    one pixel of the small sample spans (cells and debris keep their physical size). `matrix`
    may mirror (a section mounted face down); `cuts` remove torn or missing pieces.
    """
    _check_shape(shape)
    h, wd = shape
    fields = _coarse_fields(ph, w, invert_affine(matrix), shape, unit_px, frame_shape, cuts)
    tissue = _upsample(fields["level"], shape) < 0
    smooth = [_upsample(fields["ch1"], shape), _upsample(fields["ch2"], shape)]

    # cells: sparse points blurred to ~10 um blobs; their mean is 1 so anatomy keeps its level
    density = 0.04 / pixel_scale**2
    points = (rng.random((h, wd), dtype=np.float32) < density).astype(np.float32)
    cells = cv2.GaussianBlur(points, (0, 0), 1.1 * pixel_scale) * np.float32(1.0 / density)
    # fibres: white noise blurred along x, scaled to unit standard deviation. Uniform noise is
    # used throughout because it is 4x cheaper to draw than normal noise; after blurring (fibres)
    # or quantisation (read noise) the difference does not matter for a phantom.
    sx, sy = 3.0 * pixel_scale, 0.7 * pixel_scale
    fibres = cv2.GaussianBlur(rng.random((h, wd), dtype=np.float32), (0, 0), sigmaX=sx, sigmaY=sy)
    fibres -= np.float32(0.5)
    fibres *= np.float32(2.0 * np.sqrt(np.pi * sx * sy) * np.sqrt(12.0))
    textures = [0.65 + 0.35 * cells, 1.0 + 0.25 * fibres]

    channels = []
    for c in range(2):
        image = smooth[c] * textures[c]
        image *= tissue
        noise = rng.random((h, wd), dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(READ_NOISE[c] * np.sqrt(12.0))
        image += noise
        image += np.float32(BACKGROUND[c])
        channels.append(image)

    debris = _draw_debris(channels, tissue, rng, pixel_scale)
    out = []
    for image in channels:
        np.clip(image, 0, 65535, out=image)
        out.append(np.rint(image).astype(np.uint16))
    return out, tissue, debris


def _draw_debris(channels: list[np.ndarray], tissue: np.ndarray, rng: np.random.Generator, pixel_scale: float) -> list[Debris]:
    """Bright specks of dust on the glass, never touching the tissue."""
    h, w = tissue.shape
    placed: list[Debris] = []
    for _ in range(int(rng.integers(8, 22))):
        major = float(np.exp(rng.uniform(np.log(2.0), np.log(30.0)))) * pixel_scale
        minor = major / float(rng.uniform(1.0, 3.0))
        angle = float(rng.uniform(0, 180))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        i1 = float(rng.uniform(2500, 9000))
        i2 = i1 * float(rng.uniform(0.3, 1.0))
        reach = int(np.ceil(major)) + 2
        x0, x1 = max(int(x) - reach, 0), min(int(x) + reach + 1, w)
        y0, y1 = max(int(y) - reach, 0), min(int(y) + reach + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.ellipse(patch, ((x - x0, y - y0), (2 * major, 2 * minor), angle), 1, -1)
        hit = patch.astype(bool)
        if not hit.any() or (hit & tissue[y0:y1, x0:x1]).any():
            continue
        channels[0][y0:y1, x0:x1][hit] += np.float32(i1)
        channels[1][y0:y1, x0:x1][hit] += np.float32(i2)
        placed.append(Debris(x, y, major, minor, angle, (i1, i2)))
    return placed
