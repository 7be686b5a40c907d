"""CIFAR-100 with seed 002's "MMDA" regularisers: the cifar100 recipe plus Cutout and MixUp.

    python -m torch_ref.train --recipe cifar100_mmda
    python -m flax_impl.train --recipe cifar100_mmda

Seed 002 (section 04, "Data Augmentation Strategy") adds to its PMDA transforms (crop + flip) a
``CutOut(n_holes=1, length=16)`` on the normalised tensor and ``mixup_data(x, y, alpha=0.2)`` in the
training loop. Everything else is the cifar100 recipe (configs/cifar100.py).
"""

from configs import cifar100


def get_config(size: str = "full"):
    return cifar100.get_config(size).replace(
        recipe="cifar100_mmda",
        cutout_holes=1,  # seed 002: CutOut(n_holes=1, length=16)
        cutout_length=16,
        mixup_alpha=0.2,  # seed 002: mixup_data(x, y, alpha=0.2)
    )
