"""The LR range test computes the same curve in both stacks (parity level 1, float64).

Both stacks train from the same weights (torch's, converted) on the same augmented batches with
the range test's rates in place of the recipe's schedule (`optim.for_recipe(tables=...)`, the
path `torch_ref.lr_find` and `flax_impl.lr_find` use), and the losses go through the one
`core.lr_find.Curve`. The rates rise from 1e-3 to 1 in five steps, so the optimizer
moves the weights a lot: a rate applied one step late, the momentum of the recipe's schedule
instead of the test's, or weight decay missing would move the losses by far more than 1e-10.

Bound: 1e-10 relative on raw and smoothed losses, the float64 level of the short runs
(test_short_runs.py: measured 8e-12 to 2e-11 over 5 steps; rounding grows ~10x per step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from core import lr_find, readers, sampling
from testkit import samples
from parity_tests import short_runs
from torch_ref.models import build_model as build_torch

STEPS = 5


@pytest.fixture(scope="module")
def curves():
    from configs import get_config

    recipe = get_config("fashion_mnist").replace(batch_size=16)
    images, labels = samples.patterned_images(160, 28, 1, 10, seed=1)
    split = readers.ArraySplit(images, labels, 10)
    t = lr_find.RangeTest(1e-3, 1.0, STEPS, "exp", 0.05, 5.0, 0, 0)
    lrs = lr_find.lr_schedule(t)
    tables = (lrs, np.full(STEPS, recipe.momentum))
    torch.manual_seed(recipe.seed)
    state_dict = build_torch(recipe).state_dict()
    spe = sampling.steps_in_epoch(len(split), recipe.batch_size, recipe.drop_last)
    batches = short_runs.make_batches(recipe, split, STEPS)
    t64 = short_runs.run_torch(recipe, batches, state_dict, spe, dtype=torch.float64, tables=tables)
    with jax.enable_x64(True):
        f64 = short_runs.run_flax(recipe, batches, state_dict, spe, jnp.float64, tables=tables)
    out = []
    for losses in (t64, f64):
        c = lr_find.Curve(t)
        for lr, loss in zip(lrs, losses):
            assert c.add(lr, loss)
        out.append(c)
    return out


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_curves_agree_at_level_1(curves):
    torch_curve, flax_curve = curves
    assert torch_curve.lrs == flax_curve.lrs
    assert rel(flax_curve.raw, torch_curve.raw) < 1e-10
    assert rel(flax_curve.smoothed, torch_curve.smoothed) < 1e-10


def test_the_rates_moved_the_weights(curves):
    """The check above means something only if the steps changed the loss well beyond 1e-10:
    the last loss differs from the first by more than 1e-3 relative."""
    raw = curves[0].raw
    assert abs(raw[-1] - raw[0]) / raw[0] > 1e-3
