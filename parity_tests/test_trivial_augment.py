"""TrivialAugment Wide (core.trivial_augment) against torchvision's own TrivialAugmentWide, with
the same operation, magnitude and sign, on real Fashion-MNIST images and generated RGB images.

torchvision's class is run with its random draws fixed to ours (its three `torch.randint` calls
answered with our op, bin and sign), so what is compared is the whole forward: its magnitude
tables, its sign rule and its `_apply_op`, on PIL images (its PIL back end, what torchvision's
recipe feeds it) and on uint8 tensors (its tensor back end, which computes in float and rounds
otherwise; the bounds below are measured and say why they are that size).
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, TrivialAugmentWide

from core import readers
from core import trivial_augment as ta
from testkit import samples

ALL = list(itertools.product(range(len(ta.OPS)), range(ta.BINS), (0, 1)))


def torchvision_ta(img, op: int, bin_index: int, negative: int):
    """torchvision's TrivialAugmentWide (bilinear, as its recipe sets it) with its draws fixed."""
    answers = iter([torch.tensor([op]), torch.tensor([bin_index]), torch.tensor([negative])])
    with mock.patch("torch.randint", lambda *a, **k: next(answers)):
        return TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)(img)


def _images():
    grey = []
    if readers.fashion_mnist_present(readers.FASHION_MNIST_SYSTEM_DIR):
        split = readers.read_fashion_mnist(readers.FASHION_MNIST_SYSTEM_DIR, train=True)
        grey = [split.images[i] for i in (0, 1, 7)]
    else:  # the same shapes, generated
        grey = list(samples.patterned_images(3, 28, 1, 10, seed=0)[0])
    rgb = list(samples.patterned_images(2, 32, 3, 10, seed=1)[0])
    rng = np.random.default_rng(0)
    rgb.append(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))  # noise, not square
    return grey + rgb


IMAGES = _images()


def _pil(image):
    return Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image)


def test_the_magnitude_tables_are_torchvisions_to_the_bit():
    space = TrivialAugmentWide()._augmentation_space(ta.BINS)
    assert list(space) == list(ta.OPS)
    for op, (values, signed) in space.items():
        assert signed == (op in ta.SIGNED), op
        ours = ta.magnitudes(op)
        if values.ndim == 0:
            assert len(ours) == 1 and ours[0] == 0, op
        else:
            np.testing.assert_array_equal(ours, values.numpy(), err_msg=op)


@pytest.mark.parametrize("k", range(len(IMAGES)))
def test_every_operation_magnitude_and_sign_equals_torchvision_pil(k):
    """uint8-equal on every (op, bin, sign): 14 x 31 x 2 draws per image."""
    image = IMAGES[k]
    for op, bin_index, negative in ALL:
        want = np.asarray(torchvision_ta(_pil(image), op, bin_index, negative))
        got = ta.apply(image, op, bin_index, bool(negative))
        assert got.dtype == np.uint8 and got.shape == image.shape
        np.testing.assert_array_equal(
            got.reshape(want.shape), want, err_msg=f"{ta.OPS[op]} bin {bin_index} neg {negative}"
        )


def test_the_comparison_sees_a_wrong_sign_and_a_wrong_bin():
    """The test above can fail: a shear of the other sign, or one bin off, changes pixels."""
    image = IMAGES[0]
    want = np.asarray(torchvision_ta(_pil(image), 1, 20, 1))
    assert not np.array_equal(ta.apply(image, 1, 20, False)[..., 0], want)
    assert not np.array_equal(ta.apply(image, 1, 19, True)[..., 0], want)


def test_torchvisions_tensor_back_end_is_close_where_it_computes_alike():
    """torchvision's tensor back end on the same draws: the pixel-exact operations (identity,
    posterize, solarize, the integer translations) are equal; the others differ where the two
    back ends round or interpolate differently. Measured on these images: the colour factors
    and autocontrast within 1 grey level (PIL rounds a float blend to nearest, the tensor code
    its own way); rotations, shears and sharpness at edge pixels by more (grid_sample against
    PIL's own bilinear; PIL's sharpness leaves the border, the tensor one does too but blurs
    with another kernel), so those are bounded by the share of pixels that differ."""
    exact = {"Identity", "Posterize", "Solarize", "TranslateX", "TranslateY"}
    close = {"Brightness", "Color", "Contrast", "AutoContrast"}
    for image in IMAGES:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        for op, bin_index, negative in ALL[::7]:
            name = ta.OPS[op]
            theirs = torchvision_ta(tensor, op, bin_index, negative).numpy().transpose(1, 2, 0)
            ours = ta.apply(image, op, bin_index, bool(negative))
            diff = np.abs(theirs.astype(int) - ours.astype(int))
            if name in exact:
                assert diff.max() == 0, (name, bin_index, negative)
            elif name in close:
                assert diff.max() <= 1, (name, bin_index, negative, diff.max())
