"""core.trivial_augment's numpy look-up-table operations (Posterize, Solarize, AutoContrast,
Equalize) against the PIL calls they replace, on images made to reach every branch of
ImageOps' table building: constant bands, two values, narrow ranges, mostly-black images, a
constant band beside a noisy one, and Equalize tables whose entries pass 255 (which PIL's
Image.point clips). parity_tests/test_trivial_augment.py compares the whole of `apply` with
torchvision itself on real images; this covers the corners those images do not reach."""

from __future__ import annotations

import numpy as np
from PIL import Image

from core import trivial_augment as ta

LUT_OPS = [ta.OPS.index(op) for op in ("Posterize", "Solarize", "AutoContrast", "Equalize")]


def _corner_images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        shape = (*rng.integers(1, 33, 2), 1 if k % 2 else 3)
        kind = k % 6
        if kind == 0:
            img = rng.integers(0, 256, shape)
        elif kind == 1:
            img = np.full(shape, rng.integers(0, 256))
        elif kind == 2:
            img = rng.choice(rng.integers(0, 256, 2), shape)
        elif kind == 3:
            low = rng.integers(0, 250)
            img = rng.integers(low, low + rng.integers(1, 6), shape)
        elif kind == 4:
            img = rng.choice([0, 255, rng.integers(0, 256)], shape, p=[0.9, 0.05, 0.05])
        else:
            img = rng.integers(0, 256, shape)
            img[..., 0] = 7
        yield img.astype(np.uint8)


def test_the_numpy_table_operations_equal_pil_on_every_branch():
    checked = 0
    for image in _corner_images(300):
        pil = (
            Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image)
        )
        for op in LUT_OPS:
            for bin_index in (0, 7, 15, 30):
                want = np.asarray(ta.apply_pil(pil, op, bin_index, False)).reshape(image.shape)
                got = ta.apply(image, op, bin_index, False)
                assert got.dtype == np.uint8
                np.testing.assert_array_equal(got, want, err_msg=f"{ta.OPS[op]} bin {bin_index}")
                checked += 1
    assert checked == 300 * 4 * 4


def test_equalize_tables_past_255_are_clipped_as_pil_clips_them():
    # a histogram whose last present value is rare: (step // 2 + count below) // step > 255
    image = np.zeros((20, 20, 1), np.uint8)
    image[:, :10] = 3
    image[0, 0] = 200
    table = ta._equalize_lut(np.bincount(image.ravel(), minlength=256))
    assert table[image].max() > 255  # the case is reached
    pil = np.asarray(ta.apply_pil(Image.fromarray(image[..., 0], "L"), LUT_OPS[3], 0, False))
    np.testing.assert_array_equal(ta.apply(image, LUT_OPS[3], 0, False)[..., 0], pil)
