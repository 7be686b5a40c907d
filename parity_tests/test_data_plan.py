"""One data plan (core.sampling): both stacks make the same batches.

torch_ref and flax_impl take every step's examples and random draws from the same plan and only
load, decode and place data themselves. On an ImageNet-layout folder of real JPEG files, torch's
DataLoader workers (2 processes) and flax_impl's decoding threads must therefore produce the same
uint8 crops (RandomResizedCrop box and flip per image) and carry the same colour-jitter draws, and
the normalised, jittered batch each stack feeds its model must agree to float32 rounding. The
comparison is exact for the uint8 images (the same PIL calls on the same files). The float batch
goes through three jitter blends (each rounded once per framework, fused differently by XLA) and
a grey mean summed in another order: a few float32 ulps of values in [0, 1]. The bound is 8 ulps
of 1.0 (9.5e-7) scaled by normalisation's 1/std (at most 1/0.224): 4.3e-6; measured 1.2e-6 (about
2 ulps). A wrong jitter factor, order or crop moves pixels by 1e-2 or more.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_impl import augment as flax_augment, data as flax_data
from torch_ref import augment as torch_augment, data as torch_data
from torch_ref.distributed import Dist
import testkit

STEPS = 3


@pytest.fixture(scope="module")
def recipe(imagefolder_dir):
    return testkit.smoke_recipe(
        "imagenet",
        imagefolder_dir,
        *testkit.SMALL_IMAGENET,
        "batch_size=4",
        "train_subset=0",
        "num_workers=2",
    )


def torch_batches(recipe, epoch):
    """torch_ref's DataLoader batches of an epoch, uint8 as its workers return them."""
    train = torch_data.build_train(recipe, "cpu", Dist())
    train.sampler.set_epoch(epoch)
    out = []
    for (x, y), sp in zip(train.loader, train.plan.epoch(epoch)):
        out.append((x.numpy(), y.numpy(), sp.local_params))
        if len(out) == STEPS:
            return out
    return out


@pytest.mark.parametrize("epoch", [0, 1])
def test_imagenet_batches_are_the_same_in_both_stacks(recipe, epoch):
    flax_train = flax_data.build_train(recipe, recipe.batch_size)
    theirs = [flax_train.batch(sp) for sp, _ in zip(flax_train.plan.epoch(epoch), range(STEPS))]
    ours = torch_batches(recipe, epoch)
    assert len(ours) == len(theirs) == STEPS
    mean = torch.tensor(recipe.mean)
    std = torch.tensor(recipe.std)
    for (x, y, params), fb in zip(ours, theirs):
        assert np.array_equal(x, fb["images"])  # the same crops of the same files
        assert np.array_equal(y, fb["labels"])
        assert np.array_equal(params.jitter, fb["jitter"])
        assert np.array_equal(params.jitter_order, fb["jitter_order"])
        want = (
            torch_augment.to_float_normalized(torch.from_numpy(x), mean, std, False, params, True)
            .numpy()
            .transpose(0, 2, 3, 1)
        )
        got = np.asarray(
            flax_augment.to_float_normalized(
                jnp.asarray(x),
                tuple(recipe.mean),
                tuple(recipe.std),
                (jnp.asarray(fb["jitter"]), jnp.asarray(fb["jitter_order"])),
                jnp.float32,
            )
        )
        atol = 8 * np.finfo(np.float32).eps / min(recipe.std)  # see the module docstring
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_the_comparison_sees_another_epochs_draws(recipe):
    """The check above can fail: batches of another epoch (other order, boxes, flips) differ."""
    flax_train = flax_data.build_train(recipe, recipe.batch_size)
    other = flax_train.batch(next(iter(flax_train.plan.epoch(1))))
    x, _, _ = torch_batches(recipe, 0)[0]
    assert not np.array_equal(x, other["images"])


def test_train_and_test_resolutions_apart_are_the_same_in_both_stacks(recipe):
    """FixRes: train_crop and eval_crop set apart from image_size (here 24 and 28 from a resize
    to 36). Both stacks' training crops and evaluation images are the same uint8 arrays, at the
    sizes asked for."""
    r = recipe.replace(train_crop=24, eval_crop=28)
    flax_train = flax_data.build_train(r, r.batch_size)
    first = flax_train.batch(next(iter(flax_train.plan.epoch(0))))
    x, y, _ = torch_batches(r, 0)[0]
    assert x.shape[1:3] == (24, 24)
    assert np.array_equal(x, first["images"]) and np.array_equal(y, first["labels"])
    torch_eval = torch_data.build_eval(r, "cpu", Dist())
    n = torch_eval.num_examples
    ours = np.stack([torch_eval.dataset[i][0].numpy() for i in range(n)])
    theirs = np.concatenate([b["images"][b["mask"] > 0] for b in flax_data.build_eval(r, 4)])
    assert ours.shape[1:3] == (28, 28)
    assert np.array_equal(ours, theirs)


def test_imagenet_batches_with_trivial_augment_are_the_same_in_both_stacks(recipe):
    """TrivialAugment after RandomResizedCrop + flip, in torch_ref's 2 DataLoader workers and in
    flax_impl's decoding threads: the same uint8 images (the same host code on the same draws),
    and not those of the recipe without it."""
    r = recipe.replace(trivial_augment=True)
    flax_train = flax_data.build_train(r, r.batch_size)
    theirs = [flax_train.batch(sp) for sp, _ in zip(flax_train.plan.epoch(0), range(STEPS))]
    ours = torch_batches(r, 0)
    plain = torch_batches(recipe, 0)
    for (x, y, _), fb, (x0, _, _) in zip(ours, theirs, plain):
        assert np.array_equal(x, fb["images"]) and np.array_equal(y, fb["labels"])
    assert not all(np.array_equal(x, x0) for (x, _, _), (x0, _, _) in zip(ours, plain))
