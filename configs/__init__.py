"""The recipes, one file each, read by both torch_ref and flax_impl.

`get_config(name, size="full")` returns the validated `core.recipe.Recipe` of a recipe;
each module `configs/<name>.py` has a `get_config(size)` that calls `configs.base.base` with the
fields that differ from the defaults, each with its source.

"seed 000" in the comments is the tutorial "A from-scratch CIFAR-10 ResNet in PyTorch" (cifar10);
"seed 002" is "Training ResNet from Scratch: From First Principles to Multi-GPU ImageNet"
(cifar100, imagenet, and their regularised variants cifar100_mmda and imagenet_mixcut);
imagenet_v2 is torchvision's second-generation ResNet-50 recipe.
"""

from __future__ import annotations

import importlib

from core.errors import UserError
from core.recipe import Recipe

RECIPES = (
    "cifar10",
    "cifar100",
    "imagenet",
    "fashion_mnist",
    "cifar100_mmda",
    "imagenet_mixcut",
    "imagenet_v2",
    "fashion_mnist_v2",
)


def get_config(name: str, size: str = "full") -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return importlib.import_module(f"configs.{name}").get_config(size)
