"""Model EMA: flax_impl's `steps.ema_step` against what torch_ref uses, torch's own
`AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`, driven by the same
update points (core.schedules) on the same training steps from the same weights.

Twelve float64 steps of the cifar10 recipe at batch 16 on generated CIFAR-shaped images (4 steps
an epoch), an update after every second step, a one-epoch warm-up (its updates restart the
average, so each of them, and the first one after it, copies the model), and a decay that
averages for real: 0.75 after torchvision's adjustment, where a small run's adjustment would
otherwise cap it to a copy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from configs import get_config
from core import readers, sampling, schedules
from crossing import weights as convert
from flax_impl import steps as flax_steps
from parity_tests import short_runs
from testkit import samples
from torch_ref.models import build_model as build_torch

STEPS, PER_EPOCH = 12, 4


def recipe():
    r = get_config("cifar10").replace(
        batch_size=16, epochs=4, warmup_epochs=1, ema_every_steps=2, ema_decay=0.999
    )
    adjust = r.batch_size * r.ema_every_steps / r.epochs  # torchvision's, world size 1
    return r.replace(ema_decay=1 - 0.25 / adjust)  # alpha 0.25: an adjusted decay of 0.75


def update_points(r) -> dict:
    """{step k: whether the update after it restarts the average}."""
    return {
        k: schedules.ema_restarts(r, k // PER_EPOCH)
        for k in range(STEPS)
        if schedules.ema_updates_after(r, k % PER_EPOCH)
    }


def trajectories(dtype):
    """After each update: torch's EMA, the torch model, flax_impl's EMA and flax_impl's model
    (both as torch names)."""
    r = recipe()
    decay, points = schedules.ema_decay(r, 1), update_points(r)
    images, labels = samples.patterned_images(PER_EPOCH * r.batch_size, 32, 3, 10, seed=0)
    split = readers.ArraySplit(images, labels, 10)
    assert sampling.steps_in_epoch(len(split), r.batch_size, r.drop_last) == PER_EPOCH
    batches = short_runs.make_batches(r, split, STEPS)
    torch.manual_seed(r.seed)
    state_dict = build_torch(r).state_dict()
    torch_ema, torch_model, flax_ema, flax_model, holder = [], [], [], [], {}

    def snapshot(module):
        return {n: v.detach().clone().numpy() for n, v in module.state_dict().items()}

    def torch_step(k, model):
        if "ema" not in holder:  # made after the first step; its first update copies anyway
            holder["ema"] = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
            )
        if k in points:
            holder["ema"].update_parameters(model)
            if points[k]:
                holder["ema"].n_averaged.fill_(0)
            torch_ema.append(snapshot(holder["ema"].module))
            torch_model.append(snapshot(model))

    update = jax.jit(lambda s, restart: flax_steps.ema_step(s, restart, decay=decay))

    def flax_step(k, state):
        if not isinstance(state, flax_steps.EmaTrainState):
            state = flax_steps.with_ema(state)
        if k in points:
            state = update(state, np.bool_(points[k]))
            ema = {"params": state.ema["params"], "batch_stats": state.ema["batch_stats"]}
            flax_ema.append(convert.flax_to_torch(jax.device_get(ema)))
            model = {"params": state.params, "batch_stats": state.batch_stats}
            flax_model.append(convert.flax_to_torch(jax.device_get(model)))
        return state

    tdt = torch.float64 if dtype == np.float64 else torch.float32
    jdt = jnp.float64 if dtype == np.float64 else jnp.float32
    short_runs.run_torch(r, batches, state_dict, PER_EPOCH, dtype=tdt, on_step=torch_step)
    short_runs.run_flax(r, batches, state_dict, PER_EPOCH, dtype=jdt, on_step=flax_step)
    return torch_ema, torch_model, flax_ema, flax_model


@pytest.fixture(scope="module")
def f64():
    with jax.enable_x64(True):
        return trajectories(np.float64)


def test_the_ema_trajectory_is_torchs_at_level_1(f64):
    """After each of the six updates, every averaged weight and BatchNorm statistic: flax_impl's
    EMA is no further from torch's than the two stacks' models have been from each other at the
    updates so far (the EMA is a weighted mean of those models, so its gap is at most their
    largest gap; 1% and 1e-14 of the array's size on top for the lerp's own roundings). And the
    gap is float64's, not float32's: under 1e-6 relative (float64 steps start ~1e-12 apart and
    drift ~10x a step, reaching 4.4e-8 on the smallest arrays by step 12 here, a machine with
    other kernels drifts otherwise; float32 would be ~1e-4). num_batches_tracked, by torch's
    integer rule, equal."""
    torch_ema, torch_model, flax_ema, flax_model = f64
    assert len(torch_ema) == len(flax_ema) == len(flax_model) == 6
    worst: dict = {}
    for t, f, tm, fm in zip(torch_ema, flax_ema, torch_model, flax_model):
        assert set(t) == set(f)
        for name, want in t.items():
            if name.endswith("num_batches_tracked"):
                assert int(f[name]) == int(want), name
                continue
            size = np.linalg.norm(want)
            worst[name] = max(worst.get(name, 0.0), np.linalg.norm(fm[name] - tm[name]))
            gap = np.linalg.norm(f[name] - want)
            assert gap <= 1.01 * worst[name] + 1e-14 * size, (name, gap, worst[name])
            assert gap < 1e-6 * size, (name, gap / size)


def test_copies_in_the_warmup_then_an_average(f64):
    """torchvision's semantics, seen in torch's own EMA (so the comparison above compares
    something): the warm-up's two updates and the first after it are copies of the model; the
    later three average (the EMA lags the model)."""
    torch_ema, torch_model, _, _ = f64
    assert list(update_points(recipe()).values()) == [True, True, False, False, False, False]
    name = "layer3.2.conv2.weight"
    for i in range(3):
        assert np.array_equal(torch_ema[i][name], torch_model[i][name])
    for i in range(3, 6):
        assert not np.allclose(torch_ema[i][name], torch_model[i][name], rtol=1e-6, atol=0)
