"""framework_free.pil_transforms against torchvision's own transforms, on real JPEG files."""

import numpy as np
import pytest
import torch

from framework_free import pil_transforms as pt, testing

T = pytest.importorskip("torchvision.transforms")
TF = pytest.importorskip("torchvision.transforms.functional")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = testing.write_image_folder(tmp_path_factory.mktemp("jpegs"), classes=2,
                                      per_class=(3, 1), size=(61, 45))
    return sorted(str(p) for p in root.rglob("*.JPEG"))


def test_eval_transform_is_torchvisions(jpegs):
    """Resize(256) + CenterCrop(224), scaled down to Resize(36) + CenterCrop(32): same pixels."""
    ref = T.Compose([T.Resize(36), T.CenterCrop(32)])
    for path in jpegs:
        img = pt.load_image(path)
        assert np.array_equal(pt.eval_image(img, 36, 32), np.asarray(ref(img)))


def test_resized_crop_is_torchvisions_given_the_same_box(jpegs):
    rng = np.random.default_rng(0)
    for path in jpegs:
        img = pt.load_image(path)
        top, left, h, w = pt.random_resized_crop_params(rng, *img.size)
        want = np.asarray(TF.resized_crop(img, top, left, h, w, [32, 32]))
        assert np.array_equal(np.asarray(pt.resized_crop(img, top, left, h, w, 32)), want)


def test_crop_box_distribution_follows_torchvisions_rule():
    """The same algorithm as RandomResizedCrop.get_params: area fraction in [0.08, 1], aspect
    ratio in [3/4, 4/3] (up to rounding of the sides), box inside the image."""
    rng = np.random.default_rng(1)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = pt.random_resized_crop_params(rng, 400, 300)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        fractions.append(h * w / (400 * 300))
        ratios.append(w / h)
    assert 0.075 <= min(fractions) and max(fractions) <= 1.0
    assert 0.7 <= min(ratios) and max(ratios) <= 1.4
    # torchvision's own draws, for comparison of the mean box size: a box's area fraction has a
    # standard deviation of ~0.27 around ~0.5, so each mean of 2000 draws is good to ~1.2% and
    # their difference to ~1.7%; 5% is three of those, while another scale range (e.g. 0.25-1)
    # moves the mean by ~20%
    torch.manual_seed(1)
    img = torch.zeros(3, 300, 400)
    theirs = [np.prod(T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])[2:])
              / (400 * 300) for _ in range(2000)]
    assert abs(np.mean(fractions) - np.mean(theirs)) < 0.05 * np.mean(theirs)


def test_fallback_is_the_central_crop():
    class NeverFits:  # every try draws an impossible box, as for very thin images
        def uniform(self, lo, hi):
            return hi

        def integers(self, lo, hi):
            raise AssertionError("not reached")

    for width, height in ((1000, 10), (10, 1000), (300, 300)):
        ours = pt.random_resized_crop_params(NeverFits(), width, height, scale=(50.0, 50.0))
        theirs = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [50.0, 50.0],
                                                [3 / 4, 4 / 3])
        assert ours == tuple(theirs)
