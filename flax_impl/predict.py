"""Predict with JAX/Flax: ``python -m flax_impl.predict --workdir RUN [--checkpoint PATH]
[--top K] [--json] IMAGE...`` (the command is `core.predict`'s).

A torch_ref checkpoint (a run of the other stack, or --checkpoint naming a .pt file) is read with
torch and converted by `crossing` (`crossing.checkpoints.read_other_stack`). The model computes
in float32.
"""

from __future__ import annotations

if __name__ == "__main__":
    from flax_impl import cpu_setup as _cpu

    _cpu.configure()  # XLA:CPU's options, before anything below starts JAX

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from crossing import checkpoints as crossing
from flax_impl import augment, checkpoints
from flax_impl.models import build_model
from flax_impl.train import pick_devices
from core import predict
from core.recipe import Recipe

PROG = "python -m flax_impl.predict"


def load_variables(recipe: Recipe, checkpoint: str | None, workdir: Path, which: str = "model"):
    """({"params", "batch_stats"}, description) from a checkpoint of either stack; `which`: the
    model's weights or its EMA's."""
    kind, path = predict.find_checkpoint(workdir, checkpoint)
    note = " (its EMA)" if which == "ema" else ""
    if kind == "flax_impl":
        meta, variables = crossing.read_flax(path, which)
        predict.check_model(meta, recipe, str(path))
        return variables, f"{path}{note}"
    _, variables = crossing.read_other_stack(path, "flax_impl", recipe, which)
    return variables, f"{path} (a torch_ref checkpoint, converted){note}"


def logits_fn(variables, recipe: Recipe, device: str = "auto"):
    """uint8 NHWC images -> float32 logits, normalised as the evaluation does."""
    target = pick_devices(device)[0]
    model = build_model(recipe, jnp.float32)
    variables = jax.device_put(variables, target)

    @jax.jit
    def apply(v, images):
        x = augment.to_float_normalized(
            images, tuple(recipe.mean), tuple(recipe.std), None, jnp.float32
        )
        return model.apply(v, x, train=False)

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(apply(variables, jax.device_put(images, target)), np.float32)

    return run


def load(recipe: Recipe, checkpoint, workdir: Path, device="auto", which="model"):
    """core.predict's loader: (logits of uint8 images, description)."""
    variables, where = load_variables(recipe, checkpoint, workdir, which)
    return logits_fn(variables, recipe, device), where


def main(argv: list[str] | None = None) -> int:
    return predict.main(argv, PROG, load)


if __name__ == "__main__":
    checkpoints.exit_with(main())
