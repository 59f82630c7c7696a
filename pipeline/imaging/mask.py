"""Tissue masks from channel-1 thumbnails by classical image processing, and the editable overlay.

No model weights: a smoothed Otsu threshold with morphology finds the section, and component
rules throw away debris specks and slide-edge artefacts. A model-based masker can be plugged in
later through the `Masker` protocol (none is shipped).

Overlay colour convention (what a user edits in a paint program):
a pixel is tissue when its green value exceeds both its red and its blue value by at least
`OVERLAY_MARGIN` (48). The overlay written by `mask_overlay` shows the section in grey, tinted
green where the mask is on. To add tissue, paint pure green (0, 255, 0); to remove tissue, paint
any grey, black or white (R = G = B). Save as TIFF or PNG (lossless), same size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage as ndi

from pipeline.errors import SlidepipeError
from pipeline.imaging.display import to_display_uint8

OVERLAY_MARGIN = 48
_TINT = 100  # green added inside the mask: G - R = G - B ~ 100, well above the margin


@runtime_checkable
class Masker(Protocol):
    """Anything that turns a channel-1 thumbnail into a boolean tissue mask of the same size."""

    name: str

    def __call__(self, thumbnail: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        """Parameters that change the output (they enter the stage's fingerprints)."""
        ...


@dataclass(frozen=True)
class MaskParams:
    smooth_sigma: float = 2.0
    """Gaussian sigma in thumbnail pixels before thresholding (tissue texture must not split)."""
    threshold_scale: float = 1.0
    """Multiplies the Otsu threshold (< 1 keeps dimmer tissue)."""
    close_radius: int = 3
    open_radius: int = 2
    """Closing joins tissue pieces; opening removes thin debris and bridges to it."""
    fill_holes: bool = True
    """Ventricles and tears inside the section stay in the mask (their pixels are kept as they are)."""
    min_component_fraction: float = 0.05
    """A component is kept when its area is at least this fraction of the largest one."""
    min_area_fraction: float = 0.002
    """Components smaller than this fraction of the image are debris even if they are the largest."""
    edge_band_fraction: float = 0.04
    """Elongated components touching the image border and thinner than this fraction of the
    image's short side are slide-edge / coverslip artefacts."""
    min_contrast: float = 5.0
    """(mean tissue - mean background) / std background of the normalised image, classes from the
    smoothed threshold: below it the threshold split noise, and the section has no tissue."""
    polarity: str = "auto"
    """'bright' (fluorescence: tissue brighter than background), 'dark' (brightfield), or 'auto':
    dark when the median of the image border is brighter than the median of the image."""


class ClassicalMasker:
    """Threshold + morphology masker (the default)."""

    name = "classical"

    def __init__(self, params: MaskParams | None = None):
        self.params = params or MaskParams()

    def __call__(self, thumbnail: np.ndarray) -> np.ndarray:
        return tissue_mask(thumbnail, self.params)

    def describe(self) -> dict:
        return {"masker": self.name, **asdict(self.params)}


def _grey(image: np.ndarray) -> np.ndarray:
    data = image.astype(np.float32, copy=False)
    if data.ndim == 3:
        data = data.mean(axis=2)
    if data.ndim != 2:
        raise SlidepipeError(f"a thumbnail must be 2-D (or 2-D with samples), got shape {image.shape}")
    return data


def _tissue_is_dark(grey: np.ndarray) -> bool:
    """Brightfield slides are bright where there is no tissue: look at the image border."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(np.median(border)) > float(np.median(grey))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a 256-bin histogram that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low[:-1] * weight_high[:-1] * (mean_low[:-1] - mean_high[:-1]) ** 2
    return float(centres[int(np.argmax(between))])


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius


def tissue_mask(thumbnail: np.ndarray, params: MaskParams | None = None) -> np.ndarray:
    """Boolean tissue mask of a channel-1 thumbnail; all False when no tissue is found."""
    params = params or MaskParams()
    grey = _grey(thumbnail)
    height, width = grey.shape
    dark = params.polarity == "dark" or (params.polarity == "auto" and _tissue_is_dark(grey))
    lo, hi = np.percentile(grey, [0.5, 99.5])
    if hi <= lo:
        return np.zeros((height, width), bool)
    norm = np.clip((grey - lo) / (hi - lo), 0.0, 1.0)
    if dark:
        norm = 1.0 - norm
    smooth = ndi.gaussian_filter(norm, params.smooth_sigma) if params.smooth_sigma > 0 else norm
    threshold = otsu_threshold(smooth) * params.threshold_scale
    binary = smooth > threshold
    if not binary.any() or binary.all():
        return np.zeros((height, width), bool)
    # judged on the unsmoothed image: smoothing blurs the tissue edge into the background class
    background = norm[~binary]
    contrast = (norm[binary].mean() - background.mean()) / max(float(background.std()), 1e-6)
    if contrast < params.min_contrast:
        return np.zeros((height, width), bool)
    if params.close_radius > 0:
        binary = ndi.binary_closing(np.pad(binary, params.close_radius), _disk(params.close_radius))
        binary = binary[params.close_radius:-params.close_radius, params.close_radius:-params.close_radius]
    if params.fill_holes:
        binary = ndi.binary_fill_holes(binary)
    if params.open_radius > 0:
        binary = ndi.binary_opening(binary, _disk(params.open_radius))
    return _keep_tissue_components(binary, params)


def _keep_tissue_components(binary: np.ndarray, params: MaskParams) -> np.ndarray:
    labels, count = ndi.label(binary)
    if count == 0:
        return binary
    height, width = binary.shape
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    areas[0] = 0
    slices = ndi.find_objects(labels)
    band = params.edge_band_fraction * min(height, width)
    keep = np.zeros(count + 1, bool)
    for index, region in enumerate(slices, start=1):
        if areas[index] < params.min_area_fraction * height * width:
            continue
        rows, cols = region
        h, w = rows.stop - rows.start, cols.stop - cols.start
        touches = rows.start == 0 or cols.start == 0 or rows.stop == height or cols.stop == width
        elongated = max(h, w) >= 4 * min(h, w)
        if touches and elongated and min(h, w) <= band:
            continue
        keep[index] = True
    if not keep.any():
        return np.zeros_like(binary)
    largest = areas[keep].max()
    keep &= areas >= params.min_component_fraction * largest
    return keep[labels]


def mask_overlay(thumbnail: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 image of the section in grey, tinted green where the mask is on (see module doc)."""
    grey = to_display_uint8(_grey(thumbnail)).astype(np.int16)
    on = mask.astype(bool)
    dim = (grey * 6) // 10
    red = np.where(on, dim, grey)
    green = np.where(on, np.minimum(dim + _TINT, 255), grey)
    return np.stack([red, green, red], axis=-1).astype(np.uint8)


def mask_from_overlay(overlay: np.ndarray) -> np.ndarray:
    """Boolean mask read back from a (possibly hand-edited) overlay: green-dominant pixels."""
    if overlay.ndim != 3 or overlay.shape[2] < 3:
        raise SlidepipeError(f"a mask overlay must be an RGB image, got shape {overlay.shape}")
    rgb = overlay[..., :3].astype(np.int32)
    if overlay.dtype == np.uint16:
        rgb //= 257
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (green - np.maximum(red, blue)) >= OVERLAY_MARGIN


def upsample_mask_window(mask: np.ndarray, factor: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of the thumbnail mask upsampled nearest-neighbour by `factor`.

    Full-resolution pixel (r, c) takes thumbnail pixel (r // factor, c // factor): the block the
    area-average thumbnail was made from. The result is as binary as the input (no halos), and
    any window can be made on its own, so full-resolution masks are written strip by strip.
    """
    if y1 <= y0 or x1 <= x0:
        return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), mask.dtype)
    ty0, ty1 = y0 // factor, (y1 - 1) // factor + 1
    tx0, tx1 = x0 // factor, (x1 - 1) // factor + 1
    if ty1 > mask.shape[0] or tx1 > mask.shape[1]:
        raise SlidepipeError(
            f"window rows {y0}:{y1}, cols {x0}:{x1} lies outside the thumbnail mask "
            f"{mask.shape[1]} x {mask.shape[0]} scaled by {factor}"
        )
    block = mask[ty0:ty1, tx0:tx1]
    big = np.repeat(np.repeat(block, factor, axis=0), factor, axis=1)
    oy, ox = y0 - ty0 * factor, x0 - tx0 * factor
    return big[oy:oy + (y1 - y0), ox:ox + (x1 - x0)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)
