"""Area downsampling: exact block means, partial edges, and band-by-band == whole."""

import numpy as np
import pytest

from pipeline.imaging.downsample import downsample_area


def test_block_means_and_partial_edges():
    image = np.arange(5 * 7, dtype=np.uint16).reshape(5, 7)
    out = downsample_area(image, 4)
    assert out.shape == (2, 2)
    assert out[0, 0] == round(image[:4, :4].mean())
    assert out[1, 1] == round(image[4:, 4:].mean()), "a partial block averages only its own pixels"
    assert out.dtype == np.uint16


def test_rgb_and_float():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[:32, :, 2] = 100
    out = downsample_area(rgb, 32)
    assert out.shape == (2, 2, 3) and (out[..., 0] == 200).all() and out[0, 0, 2] == 100 and out[1, 0, 2] == 0
    f = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert np.allclose(downsample_area(f, 2), f.reshape(32, 2, 32, 2).mean(axis=(1, 3)))


@pytest.mark.parametrize("shape", [(4100, 900), (3000, 70000 // 16)])
def test_bands_equal_whole(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65535, shape, dtype=np.uint16)
    whole = downsample_area(image, 32)
    bands = np.concatenate([downsample_area(image[r:r + 1024], 32) for r in range(0, shape[0], 1024)])
    assert np.array_equal(whole, bands)
    reference = np.rint(np.pad(image.astype(float), [(0, -shape[0] % 32), (0, -shape[1] % 32)])
                        [: shape[0] // 32 * 32, : shape[1] // 32 * 32].reshape(shape[0] // 32, 32, shape[1] // 32, 32).mean(axis=(1, 3)))
    assert np.array_equal(whole[: shape[0] // 32, : shape[1] // 32], reference.astype(np.uint16))


def test_factor_one_and_invalid():
    a = np.ones((3, 3), np.uint8)
    assert downsample_area(a, 1) is not a and np.array_equal(downsample_area(a, 1), a)
    with pytest.raises(ValueError):
        downsample_area(a, 0)
