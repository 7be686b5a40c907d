"""The optimizer: optax's chain doing what torch.optim.SGD does, with torch's schedules.

torch.optim.SGD(lr, momentum, nesterov, weight_decay) per step, with g the gradient:

    g <- g + weight_decay * p          (coupled weight decay, on every parameter, before momentum)
    b <- momentum_t * b + g            (b starts at 0, so the first step sets b = g, as torch does)
    u <- g + momentum_t * b if nesterov else b
    p <- p - lr_t * u

which is ``add_decayed_weights -> trace(decay=momentum_t, nesterov) ->
scale_by_learning_rate(lr_t)``.
The rate and momentum of step t are read from float32 tables of
`core.schedules` (torch's values, rounded once), so OneCycle's momentum cycling works
through `optax.inject_hyperparams`. The order matters: decaying the weights after the momentum
trace (decoupled, AdamW-style) is a different optimizer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from core import schedules
from core.recipe import Recipe


def table_schedule(values: np.ndarray, dtype=jnp.float32):
    """step -> values[step] (the last value past the end) as an optax schedule."""
    table = jnp.asarray(np.asarray(values), dtype=dtype)
    last = len(values) - 1

    def schedule(count):
        return table[jnp.minimum(count, last)]

    return schedule


def torch_sgd(lr, momentum, nesterov: bool, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD as an optax chain; `lr` and `momentum` are floats or schedules."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if callable(momentum) or momentum:
        parts.append(
            optax.inject_hyperparams(optax.trace, static_args=("nesterov",))(
                decay=momentum, nesterov=nesterov
            )
        )
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def for_recipe(
    recipe: Recipe, steps_per_epoch: int, world_size: int, dtype=jnp.float32, tables=None
):
    """(optax transformation, lr schedule, momentum schedule) for a recipe; `tables` (lr per
    step, momentum per step) replace the recipe's schedule (the LR range test)."""
    lr_values, mom_values = (
        tables if tables is not None else schedules.for_recipe(recipe, steps_per_epoch, world_size)
    )
    lr = table_schedule(lr_values, dtype)
    momentum = table_schedule(mom_values, dtype)
    return torch_sgd(lr, momentum, recipe.nesterov, recipe.weight_decay), lr, momentum
