"""Test harness: generated data sets and images in the real on-disk formats, and the chaos
checks (kill and signal a trainer at every pause point). No part of the library."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run
STACKS = ["torch_ref", "flax_impl"]  # the two stacks, as the tests parametrize over them
# Overrides the stacks' training tests share. REGULARISED: Cutout, MixUp or CutMix (one per
# batch) and label smoothing, every draw from the data plan. TODAY: today's training side, a
# per-step cosine after a one-epoch warm-up (a stop at step 5 of 6 lands inside it), no decay on
# BatchNorm and another rate on biases (parameter groups; decay masks), a model EMA updated
# every second step, and each step in two micro-batches (gradient accumulation). AUGMENTED:
# today's augmentation side, TrivialAugment on every image, Random Erasing on half of them and
# each image three times in a row in the epoch's order (repeated augmentation)
REGULARISED = [
    "cutout_holes=1",
    "cutout_length=8",
    "mixup_alpha=0.4",
    "cutmix_alpha=1.0",
    "label_smoothing=0.1",
]
TODAY = [
    "schedule=cosine_per_step",
    "warmup_epochs=1",
    "weight_decay=5e-4",
    "norm_weight_decay=0",
    "bias_weight_decay=1e-4",
    "ema_decay=0.99",
    "ema_every_steps=2",
    "grad_accum_steps=2",
]
# ImageNet's recipes made small for the tests: resnet18 at 32 pixels (from a resize to 36) on
# the three classes of samples.write_image_folder stands in for resnet50 at 224
SMALL_IMAGENET = ["model=resnet18", "num_classes=3", "image_size=32", "eval_resize=36"]
AUGMENTED = ["trivial_augment=true", "random_erasing=0.5", "repeated_augmentation=3"]


def smoke_recipe(name: str, data_dir, *overrides: str):
    """Recipe `name` at ``--size smoke`` with ``key=value`` overrides, reading `data_dir`."""
    from configs import get_config
    from core.recipe import apply_overrides

    r = apply_overrides(get_config(name, "smoke"), list(overrides))
    return r.replace(data_dir=str(data_dir))
