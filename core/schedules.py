"""The optimizer's numbers: learning-rate and momentum schedules, per optimizer step, in float64
NumPy, and each parameter's weight decay.

The schedules are the closed forms of what torch's schedulers produce when the recipes call them:

- `cosine_per_epoch`: ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch (seed 000), so the
  rate is constant within an epoch: lr(e) = base * (1 + cos(pi e / T)) / 2, written as
  base * cos^2(pi e / 2T), the same value without the cancellation of 1 + cos near the end.
- `cosine_per_step`: the same curve stepped after every optimizer step (T = the run's steps).
- a warm-up (``warmup_epochs`` W > 0, either cosine) is torchvision's
  ``SequentialLR([LinearLR(start_factor=warmup_decay, total_iters=W), CosineAnnealingLR(T_max=
  T - W)], milestones=[W])``: lr(e) = base * (d + (1 - d) e / W) for e < W, then the cosine over
  the T - W units left, counted in epochs or (W x steps per epoch) steps as the cosine steps.
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
    """lr per step for CosineAnnealingLR(T_max=epochs) stepped each epoch."""
    epoch = np.arange(epochs * steps_per_epoch) // steps_per_epoch
    c = np.cos(np.pi * epoch / (2 * epochs))
    return eta_min + (base_lr - eta_min) * c * c


def warmup_cosine(base_lr: float, units: int, warmup: int, decay: float) -> np.ndarray:
    """lr per unit (epoch or step) of LinearLR(decay, total_iters=warmup) then
    CosineAnnealingLR(T_max=units - warmup), chained by SequentialLR at `warmup`."""
    u = np.arange(units, dtype=np.float64)
    if not warmup:
        c = np.cos(np.pi * u / (2 * units))
        return base_lr * c * c
    c = np.cos(np.pi * (u - warmup) / (2 * (units - warmup)))
    rising = base_lr * (decay + (1 - decay) * u / warmup)
    return np.where(u < warmup, rising, base_lr * c * c)


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
    """When a torch scheduler steps: once per epoch, after the epoch's evaluation (the per-epoch
    cosine, as seed 000 calls it), or after every optimizer step (the per-step cosine, OneCycle).
    The one place this rule is written; the tables above already encode it."""
    return recipe.schedule == "cosine_per_epoch"


def for_recipe(recipe: Recipe, steps_per_epoch: int, world_size: int):
    """(lr per step, momentum per step) arrays of length epochs * steps_per_epoch."""
    total = recipe.epochs * steps_per_epoch
    peak = world_lr(recipe, world_size)
    if recipe.schedule == "cosine_per_epoch":
        if not recipe.warmup_epochs:  # the seeds' form, kept as it was
            lr = cosine_per_epoch(peak, recipe.epochs, steps_per_epoch)
        else:
            warm, decay = recipe.warmup_epochs, recipe.warmup_decay
            lr = np.repeat(warmup_cosine(peak, recipe.epochs, warm, decay), steps_per_epoch)
        return lr, np.full(total, recipe.momentum)
    if recipe.schedule == "cosine_per_step":
        warm = recipe.warmup_epochs * steps_per_epoch
        lr = warmup_cosine(peak, total, warm, recipe.warmup_decay)
        return lr, np.full(total, recipe.momentum)
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


def weight_decay_of(recipe: Recipe, in_norm: bool, name: str) -> float:
    """The coupled weight decay of one parameter, by torchvision's ``set_weight_decay`` rule: a
    bias (BatchNorm's included) takes `bias_weight_decay` when that is set; otherwise a BatchNorm
    weight or bias takes `norm_weight_decay` when that is set; everything else `weight_decay`.
    `in_norm`: the parameter belongs to a BatchNorm; `name`: its own name (``weight``, ``bias``,
    flax's ``scale`` or ``kernel``)."""
    if name == "bias" and recipe.bias_weight_decay is not None:
        return recipe.bias_weight_decay
    if in_norm and recipe.norm_weight_decay is not None:
        return recipe.norm_weight_decay
    return recipe.weight_decay


def decay_groups_differ(recipe: Recipe) -> bool:
    """Whether any parameter may decay at a rate other than `weight_decay` (else one group)."""
    return any(
        v is not None and v != recipe.weight_decay
        for v in (recipe.norm_weight_decay, recipe.bias_weight_decay)
    )


def ema_decay(recipe: Recipe, replicas: int) -> float:
    """The model EMA's decay per update, adjusted as torchvision's reference adjusts it so that
    it does not depend on the other settings: alpha = (1 - ema_decay) x (replicas x batch_size x
    ema_every_steps / epochs), capped at 1, and the decay is 1 - alpha (a decay of 0 makes the
    EMA a copy of the model)."""
    adjust = replicas * recipe.batch_size * recipe.ema_every_steps / recipe.epochs
    alpha = min(1.0, (1.0 - recipe.ema_decay) * adjust)
    return 1.0 - alpha


def ema_updates_after(recipe: Recipe, step_in_epoch: int) -> bool:
    """Whether the EMA is updated after the optimizer step of index `step_in_epoch` (0-based,
    within its epoch): every `ema_every_steps` steps from the epoch's first, as torchvision's
    ``i % model_ema_steps == 0``."""
    return bool(recipe.ema_decay) and step_in_epoch % recipe.ema_every_steps == 0


def ema_restarts(recipe: Recipe, epoch: int) -> bool:
    """Whether an update in `epoch` (0-based) is followed by a restart: during the warm-up the
    EMA's count goes back to 0 after each update, so the next update copies the model, as
    torchvision's reference does."""
    return epoch < recipe.warmup_epochs
