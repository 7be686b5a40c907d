"""Learning-rate and momentum schedules, per optimizer step, in float64 NumPy.

These are the closed forms of what torch's schedulers produce when the seeds call them:

- `cosine_per_epoch`: ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch (seed 000), so the
  rate is constant within an epoch: lr(e) = base * (1 + cos(pi e / T)) / 2, written as
  base * cos^2(pi e / 2T), the same value without the cancellation of 1 + cos near the end.
- `onecycle`: ``OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor,
  final_div_factor, base_momentum, max_momentum)`` stepped per step, with torch's phase boundaries:
  the warm-up ends at step ``pct_start * total - 1`` (a float) and the anneal at ``total - 1``. The
  momentum moves opposite to the rate. (optax's onecycle helpers place the boundaries one step
  later; the difference reaches several percent of the rate.)

flax_impl turns these into float32 tables indexed by the step, so the rate it applies is torch's
value rounded once to float32.
"""

from __future__ import annotations

import numpy as np

from core.recipe import Recipe, world_lr


def _anneal(kind: str, start, end, pct):
    if kind == "cos":
        c = np.cos(np.pi * pct / 2)
        return end + (start - end) * c * c  # = end + (start - end) (1 + cos(pi pct)) / 2
    return (end - start) * pct + start


def cosine_per_epoch(base_lr: float, epochs: int, steps_per_epoch: int, eta_min: float = 0.0):
    """(lr, momentum=None) per step for CosineAnnealingLR(T_max=epochs) stepped each epoch."""
    epoch = np.arange(epochs * steps_per_epoch) // steps_per_epoch
    c = np.cos(np.pi * epoch / (2 * epochs))
    return eta_min + (base_lr - eta_min) * c * c


def onecycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
):
    """(lr, momentum) per step as torch's OneCycleLR (two phases) produces them."""
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    end_up = float(pct_start * total_steps) - 1
    end_down = float(total_steps - 1)
    s = np.arange(total_steps, dtype=np.float64)
    up = s <= end_up
    pct_up = s / end_up if end_up > 0 else np.ones_like(s)
    pct_down = (s - end_up) / (end_down - end_up)
    lr = np.where(
        up, _anneal(anneal, initial, max_lr, pct_up), _anneal(anneal, max_lr, minimum, pct_down)
    )
    mom = np.where(
        up,
        _anneal(anneal, max_momentum, base_momentum, pct_up),
        _anneal(anneal, base_momentum, max_momentum, pct_down),
    )
    return lr, mom


def stepped_per_epoch(recipe: Recipe) -> bool:
    """When a torch scheduler steps: once per epoch, after the epoch's evaluation (the cosine
    schedule, as seed 000 calls it), or after every optimizer step (OneCycle). The one place
    this rule is written; the tables above already encode it."""
    return recipe.schedule == "cosine_per_epoch"


def for_recipe(recipe: Recipe, steps_per_epoch: int, world_size: int):
    """(lr per step, momentum per step) arrays of length epochs * steps_per_epoch."""
    total = recipe.epochs * steps_per_epoch
    peak = world_lr(recipe, world_size)
    if recipe.schedule == "cosine_per_epoch":
        return (
            cosine_per_epoch(peak, recipe.epochs, steps_per_epoch),
            np.full(total, recipe.momentum),
        )
    return onecycle(
        peak,
        total,
        recipe.onecycle_pct_start,
        recipe.onecycle_anneal,
        recipe.onecycle_div_factor,
        recipe.onecycle_final_div_factor,
        recipe.onecycle_base_momentum,
        recipe.onecycle_max_momentum,
    )
