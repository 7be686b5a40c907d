"""Gradient accumulation (`grad_accum_steps`): an optimizer step's batch in micro-batches.

- torch_ref against torch on the whole batch: with BatchNorm in eval mode (no batch statistics,
  so every row's loss is independent of the others), one accumulated step (4 micro-batches) and
  one step on the whole batch give the same parameters: float64 1e-12 relative (the same sum of
  gradients, added in four parts; ~1e-16 measured).
- both stacks at level 1: the cifar10 recipe at batch 16 in micro-batches of 4 on 40 generated
  images, so each epoch ends with a short batch of 8 (torch_ref: two micro-batches; flax_impl:
  the batch padded to 16, two micro-batches of padding that must change nothing), six float64
  steps over two epochs: each step's loss 1e-10 relative, as the plain short runs' float64 steps.
  The same run without accumulation differs (BatchNorm's statistics are each micro-batch's), so
  the comparison tells the two apart.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import get_config
from core import readers, sampling
from parity_tests import short_runs
from testkit import samples
from torch_ref import augment, optim as torch_optim, steps as torch_steps
from torch_ref.models import build_model as build_torch


def recipe(k: int):
    return get_config("cifar10").replace(batch_size=16, grad_accum_steps=k, epochs=2)


def test_an_accumulated_step_is_the_whole_batchs_with_batchnorm_in_eval_mode():
    r = recipe(4)
    torch.manual_seed(0)
    model = build_torch(r).double().eval()
    other = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(16, 3, 32, 32)))
    y = torch.tensor(rng.integers(0, 10, 16))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for m, micro in ((model, r.micro_batch), (other, 0)):
        opt, _, _ = torch_optim.for_recipe(m, r, steps_per_epoch=3, world_size=1)
        torch_steps.train_step(m, opt, scaler, None, x, augment.Targets(y), 1.0, 0.0, micro)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        rel = (a - b).norm() / b.norm()
        assert rel < 1e-12, (name, float(rel))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))  # it stepped


def losses(k: int):
    r = recipe(k)
    images, labels = samples.patterned_images(40, 32, 3, 10, seed=0)
    split = readers.ArraySplit(images, labels, 10)
    per_epoch = sampling.steps_in_epoch(len(split), r.batch_size, r.drop_last)
    assert per_epoch == 3
    batches = short_runs.make_batches(r, split, 6)
    assert [len(b.labels) for b in batches] == [16, 16, 8, 16, 16, 8]
    torch.manual_seed(0)
    state_dict = build_torch(r).state_dict()
    t = short_runs.run_torch(r, batches, state_dict, per_epoch, dtype=torch.float64)
    with jax.enable_x64(True):
        f = short_runs.run_flax(r, batches, state_dict, per_epoch, jnp.float64)
    return t, f


def test_both_stacks_accumulate_alike_at_level_1():
    t, f = losses(4)
    rel = np.abs(f - t) / np.abs(t)
    assert rel.max() < 1e-10, rel
    plain, _ = losses(1)
    assert np.abs(plain - t)[1:].max() > 1e-6 * np.abs(t).max()  # BatchNorm per micro-batch
