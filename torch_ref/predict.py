"""Predict with PyTorch: ``python -m torch_ref.predict --workdir RUN [--checkpoint PATH]
[--top K] [--json] IMAGE...`` (the command is `core.predict`'s).

A flax_impl checkpoint (a run of the other stack, or --checkpoint naming one) is read with Orbax
and converted by `crossing` (`crossing.checkpoints.read_other_stack`; Orbax and JAX are
imported for that only, flax_impl never).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from core import predict
from core.recipe import Recipe
from torch_ref import augment, checkpoints, distributed
from torch_ref.models import build_model

PROG = "python -m torch_ref.predict"


def load_model(recipe: Recipe, checkpoint, workdir: Path, device="auto", which="model"):
    """(eval-mode model on its device, description) from a checkpoint of either stack (a path, or
    None for the run's best); `which`: the model's weights or its EMA's."""
    kind, path = predict.find_checkpoint(workdir, checkpoint)
    if kind == "torch_ref":
        state = checkpoints.load(path)
        predict.check_model(state, recipe, str(path))
        weights, note = predict.torch_weights(state, which, path), ""
    else:
        from crossing import checkpoints as crossing

        _, weights = crossing.read_other_stack(path, "torch_ref", recipe, which)
        note = " (a flax_impl checkpoint, converted)"
    if which == "ema":
        note += " (its EMA)"
    model = build_model(recipe)
    model.load_state_dict(weights)
    model = model.to(distributed.pick_device(device)).eval()
    return model, f"{path}{note}"


def logits_fn(model: torch.nn.Module, recipe: Recipe):
    """uint8 NHWC images -> float32 logits, normalised as the evaluation does."""
    device = next(model.parameters()).device
    mean = torch.tensor(recipe.mean, device=device)
    std = torch.tensor(recipe.std, device=device)

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        x = augment.to_float_normalized(
            torch.from_numpy(images).to(device), mean, std, recipe.channels_last
        )
        return model(x).float().cpu().numpy()

    return run


def load(recipe: Recipe, checkpoint, workdir: Path, device="auto", which="model"):
    """core.predict's loader: (logits of uint8 images, description)."""
    model, where = load_model(recipe, checkpoint, workdir, device, which)
    return logits_fn(model, recipe), where


def main(argv: list[str] | None = None) -> int:
    return predict.main(argv, PROG, load)


if __name__ == "__main__":
    sys.exit(main())
