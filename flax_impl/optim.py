"""The optimizer: optax's chain doing what torch.optim.SGD does, with torch's schedules.

torch.optim.SGD(lr, momentum, nesterov, weight_decay) per step, with g the gradient:

    g <- g + weight_decay * p          (coupled weight decay, before momentum; the rate per
                                        parameter as torch_ref's parameter groups set it)
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

from collections.abc import Mapping

import jax
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


def decay_rates(params, recipe: Recipe):
    """Each parameter's coupled weight decay, a tree like `params`, by the one rule both stacks
    use (`core.schedules.weight_decay_of`): a BatchNorm is a module holding a ``scale``."""

    def walk(node):
        if isinstance(node, (list, tuple)):  # a plain list of arrays (no modules): the rest
            return type(node)(
                walk(v) if isinstance(v, Mapping) else recipe.weight_decay for v in node
            )
        norm = "scale" in node
        return {
            k: walk(v) if isinstance(v, Mapping) else schedules.weight_decay_of(recipe, norm, k)
            for k, v in node.items()
        }

    return walk(params)


def weight_decay_parts(recipe: Recipe) -> list:
    """The decay steps of the chain: one add_decayed_weights on every parameter (one rate), or one
    masked add per distinct non-zero rate, the masks disjoint, so each parameter still gets the
    one ``g + rate * p`` torch's parameter group gives it."""
    if not schedules.decay_groups_differ(recipe):
        return [optax.add_decayed_weights(recipe.weight_decay)] if recipe.weight_decay else []
    rates = {recipe.weight_decay, recipe.norm_weight_decay, recipe.bias_weight_decay}
    parts = []
    for rate in sorted(r for r in rates if r):

        def mask(params, rate=rate):
            return jax.tree_util.tree_map(lambda r: r == rate, decay_rates(params, recipe))

        parts.append(optax.add_decayed_weights(rate, mask=mask))
    return parts


def torch_sgd(lr, momentum, nesterov: bool, weight_decay) -> optax.GradientTransformation:
    """torch.optim.SGD as an optax chain; `lr` and `momentum` are floats or schedules;
    `weight_decay` a rate, or the decay steps of `weight_decay_parts`."""
    parts = []
    if isinstance(weight_decay, list):
        parts.extend(weight_decay)
    elif weight_decay:
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
    return torch_sgd(lr, momentum, recipe.nesterov, weight_decay_parts(recipe)), lr, momentum
