"""Today's augmentation in both stacks on whole batches: TrivialAugment (core.trivial_augment),
Random Erasing (core.regularisers) and repeated augmentation (core.sampling).

Both stacks take the draws from the data plan and run TrivialAugment through the same host code,
so their uint8 images and erasing boxes are equal: flax_impl's batch, normalised and erased by
torch_ref's code, is torch_ref's batch bit for bit. flax_impl's own normalisation is XLA's
compilation of the same formula, which rounds differently (a division turned into a product):
within 8 float32 ulps of 1.0 over the smallest std, as test_data_plan.py bounds it (measured
3.6e-7, one ulp of the values). Random
Erasing is compared with torchvision's own RandomErasing: its box drawn by torchvision's
get_params fed the same random numbers, and the pixels by torchvision's erase on that box.
"""

from __future__ import annotations

import itertools
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomErasing

from core import regularisers as reg, sampling
from flax_impl import augment as flax_augment, data as flax_data
from torch_ref import augment as torch_augment, data as torch_data
from torch_ref.distributed import Dist
import testkit

STEPS = 3  # of 6 an epoch (96 images at batch 16)
# the three at once, on the Fashion-MNIST-shaped session data set, with 2 DataLoader workers
ALL_ON = ["trivial_augment=true", "random_erasing=0.5", "repeated_augmentation=2"]


@pytest.fixture(scope="module")
def recipe(fashion_dir):
    sizes = ["batch_size=16", "train_subset=0", "num_workers=2"]
    return testkit.smoke_recipe("fashion_mnist", fashion_dir, *sizes, *ALL_ON)


def torch_batches(r):
    train = torch_data.build_train(r, "cpu", Dist())
    return [x.numpy().transpose(0, 2, 3, 1) for x, _, _ in itertools.islice(train.epoch(0), STEPS)]


def flax_batches(r):
    train = flax_data.build_train(r, r.batch_size)
    out = []
    for sp in itertools.islice(train.plan.epoch(0), STEPS):
        b = train.batch(sp)
        x = flax_augment.to_float_normalized(jnp.asarray(b["images"]), r.mean, r.std)
        x, *_ = flax_augment.regularise(x, jnp.asarray(b["labels"]), b)
        out.append((np.asarray(x), b))
    return out


def test_every_pipeline_and_both_stacks_make_the_same_batches(recipe):
    """torch_ref's in-memory path (host TrivialAugment, then its batched crop skipped), its
    DataLoader path (PIL images in 2 worker processes) and flax_impl's in-memory path: the same
    normalised, erased batches, bit for bit."""
    fast = torch_batches(recipe)
    loader = torch_batches(recipe.replace(pipeline="dataloader"))
    theirs = flax_batches(recipe)
    mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
    atol = 8 * np.finfo(np.float32).eps / min(recipe.std)  # see the module docstring
    for a, b, (c, fb) in zip(fast, loader, theirs):
        np.testing.assert_array_equal(a, b)
        x = torch_augment.to_float_normalized(torch.from_numpy(fb["images"]), mean, std, False)
        d = reg.Draws(
            np.zeros((len(x), 0, 4), np.int32),
            reg.NONE,
            1.0,
            np.zeros(4, np.int32),
            np.arange(len(x), dtype=np.int32),
            fb["erase"],
        )
        x, _ = torch_augment.regularise(x, torch.from_numpy(fb["labels"]), d)
        np.testing.assert_array_equal(a, x.numpy().transpose(0, 2, 3, 1))
        np.testing.assert_allclose(c, a, rtol=0, atol=atol)
    erased = [b["erase"] for _, b in theirs]
    assert any((e[:, 1] > e[:, 0]).any() for e in erased)  # some images were erased


def test_the_comparison_sees_trivial_augment_and_erasing(recipe):
    """The equality above is not vacuous: without TrivialAugment the first batch differs, and
    so it does without Random Erasing."""
    first = torch_batches(recipe)[0]
    plain = torch_batches(recipe.replace(trivial_augment=False))[0]
    unerased = torch_batches(recipe.replace(random_erasing=0.0))[0]
    assert not np.array_equal(first, plain) and not np.array_equal(first, unerased)


def _torchvision_erasing_box(draws: np.random.Generator, p: float, h: int, w: int):
    """torchvision's RandomErasing(p, value=0) forward on an h x w image, its random numbers
    (torch.rand, uniform_, randint) answered from `draws` in the order it asks for them."""

    def rand(*shape, **_):
        return torch.tensor([draws.random()])

    class Empty:
        def __init__(self, *_, **__):
            pass

        def uniform_(self, lo, hi):
            return torch.tensor([draws.uniform(float(lo), float(hi))])

    def randint(lo, hi, size=None, **_):
        return torch.tensor([int(draws.integers(lo, hi))])

    img = torch.ones(1, h, w)
    seen = {}

    def erase(image, i, j, eh, ew, v, inplace=False):
        seen["box"] = (i, i + eh, j, j + ew)
        return image

    with (
        mock.patch("torch.rand", rand),
        mock.patch("torch.empty", Empty),
        mock.patch("torch.randint", randint),
        mock.patch("torchvision.transforms.functional.erase", erase),
    ):
        RandomErasing(p=p, value=0)(img)
    if "box" not in seen or seen["box"] == (0, h, 0, w):  # no erase, or no box fitted
        return (0, 0, 0, 0)
    return seen["box"]


def test_erasing_boxes_are_torchvisions_on_the_same_random_numbers():
    """torchvision's get_params (its ten tries, its rounding, its strict fit) fed the numbers
    our generator draws gives our boxes. torchvision takes the log of the ratio bounds in
    float32; ours are float64, so a box side could differ where sqrt(area x ratio) lies within
    ~1e-7 of a half: none of these 2,000 draws does."""
    mismatches = 0
    for k, (h, w) in itertools.product(range(500), [(28, 28), (32, 32), (24, 40), (8, 8)]):
        ours = reg.erase_box(np.random.default_rng([k, h, w]), 0.7, h, w)
        theirs = _torchvision_erasing_box(np.random.default_rng([k, h, w]), 0.7, h, w)
        mismatches += tuple(int(v) for v in ours) != tuple(theirs)
    assert mismatches == 0


def test_erased_pixels_are_torchvisions_erase_on_the_same_box(recipe):
    r = recipe.replace(cutout_holes=0, mixup_alpha=0.0, cutmix_alpha=0.0)
    d = reg.draw(r, 0, 1, 64, 1, 28, 28)
    assert (d.erase[:, 1] > d.erase[:, 0]).sum() > 10
    x = torch.randn(64, 1, 28, 28)
    ours, _ = torch_augment.regularise(x, torch.zeros(64, dtype=torch.long), d)
    for i, (y0, y1, x0, x1) in enumerate(d.erase):
        want = TF.erase(x[i], int(y0), int(x0), int(y1 - y0), int(x1 - x0), torch.tensor(0.0))
        assert torch.equal(ours[i], want)
        # the value 0 itself, as torchvision writes it (a product with 0 would leave -0.0)
        assert not torch.signbit(ours[i, :, y0:y1, x0:x1]).any()


def test_two_processes_deal_the_copies_alike_in_both_stacks(recipe):
    """Repeated augmentation over 2 processes: torch_ref's ranks (DDP) and flax_impl's
    processes take the same rows of each global batch, and consecutive copies of an image go
    to different processes."""
    r = recipe.replace(trivial_augment=False, random_erasing=0.0)
    for rank in (0, 1):
        torch_plan = sampling.TrainPlan(r, 96, 8, world_size=2, rank=rank)
        flax_train = flax_data.InMemoryTrain(
            flax_data.load_in_memory(r, True), r, 16, process_index=rank, process_count=2
        )
        for tsp, fsp in zip(torch_plan.epoch(0), flax_train.plan.epoch(0)):
            rows = flax_train.batch(fsp)["index"]
            np.testing.assert_array_equal(tsp.slice.local_indices, rows)
    order = sampling.epoch_order(96, r.seed, 0, 2)
    first = sampling.TrainPlan(r, 96, 8, world_size=2, rank=0).step(0, 0)
    assert set(first.slice.local_indices) == set(order[0:16:2])  # one copy of each of 8
