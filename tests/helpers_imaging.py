"""Synthetic tissue-like images for the imaging tests (deterministic, small)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def phantom_section(shape=(240, 320), seed=0, dtype=np.uint16, peak=3000, noise=20.0, holes=True):
    """An elliptical 'section' with smooth texture, a ventricle-like hole and a sharp boundary.

    Returns (image, footprint) where footprint is the true tissue area (hole included, as a mask
    that fills holes would have it).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = h / 2 + rng.uniform(-5, 5), w / 2 + rng.uniform(-5, 5)
    ry, rx = h * 0.32, w * 0.33
    angle = np.deg2rad(15)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
    # wobbly outline so the shape has no symmetry
    theta = np.arctan2(v, u)
    radius = 1.0 + 0.08 * np.sin(3 * theta + 0.5) + 0.05 * np.cos(5 * theta)
    footprint = (u * u + v * v) <= radius**2 * (1 + 0.25 * (u > 0.3))
    texture = ndi.gaussian_filter(rng.normal(size=shape), 4)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-9)
    layers = 0.5 + 0.3 * np.sin(xx / 13.0 + yy / 29.0) + 0.4 * texture
    image = np.where(footprint, peak * np.clip(layers, 0.15, 1.2), 0.0)
    if holes:
        hole = ((xx - cx - 0.2 * rx) ** 2 + (yy - cy + 0.1 * ry) ** 2) < (0.12 * min(rx, ry)) ** 2
        image[hole] = peak * 0.02
    image = ndi.gaussian_filter(image, 0.7)
    image += rng.normal(0, noise, size=shape) + 3 * noise
    info = np.iinfo(dtype)
    return np.clip(image, info.min, info.max).astype(dtype), footprint


def add_debris(image, count=12, seed=1, radius=2, value=None):
    """Bright specks scattered over the background (dust, fluorescent debris)."""
    rng = np.random.default_rng(seed)
    out = image.copy()
    h, w = image.shape[:2]
    value = value if value is not None else int(image.max())
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(count):
        y, x = rng.integers(0, h), rng.integers(0, w)
        out[(yy - y) ** 2 + (xx - x) ** 2 <= radius * radius] = value
    return out


def asymmetric_image(shape=(5, 7)):
    """Distinct values everywhere: any wrong turn or mirror changes it."""
    return np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape)
