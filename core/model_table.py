"""The ResNets both stacks build: one table of depths, block kinds and stage widths.

`torch_ref.models` and `flax_impl.models` build their networks from these rows, the recipe schema
takes its model names from them, and the parity checks iterate over them, so a model added here
exists everywhere at once.

CIFAR family (He et al. 2015, section 4.2): a 3x3 stem with 16 channels, then three stages of n
basic blocks at 16/32/64 channels, depth 6n+2.
ImageNet family (torchvision's layout): basic blocks (18, 34) or bottlenecks with expansion 4
(50, 101, 152), four stages at 64/128/256/512 planes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str  # "cifar" | "imagenet"
    block: str  # "basic" | "bottleneck"
    stages: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # planes per stage (a bottleneck outputs 4x)

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)


def _cifar(depth: int) -> Spec:
    n = (depth - 2) // 6
    return Spec("cifar", "basic", (n, n, n), CIFAR_WIDTHS)


MODELS: dict[str, Spec] = {
    **{f"resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110)},
    "resnet18": Spec("imagenet", "basic", (2, 2, 2, 2), IMAGENET_WIDTHS),
    "resnet34": Spec("imagenet", "basic", (3, 4, 6, 3), IMAGENET_WIDTHS),
    "resnet50": Spec("imagenet", "bottleneck", (3, 4, 6, 3), IMAGENET_WIDTHS),
    "resnet101": Spec("imagenet", "bottleneck", (3, 4, 23, 3), IMAGENET_WIDTHS),
    "resnet152": Spec("imagenet", "bottleneck", (3, 8, 36, 3), IMAGENET_WIDTHS),
}
CIFAR_MODELS = tuple(name for name, s in MODELS.items() if s.family == "cifar")
IMAGENET_MODELS = tuple(name for name, s in MODELS.items() if s.family == "imagenet")


def stride(stage: int, block: int) -> int:
    """Every stage after the first halves the resolution in its first block."""
    return 2 if stage > 0 and block == 0 else 1
