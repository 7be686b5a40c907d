"""Test harness: generated data sets and images in the real on-disk formats, and the chaos
checks (kill and signal a trainer at every pause point). No part of the library."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run
STACKS = ["torch_ref", "flax_impl"]  # the two stacks, as the tests parametrize over them
# Overrides the stacks' training tests share. REGULARISED: Cutout, MixUp or CutMix (one per
# batch) and label smoothing, every draw from the data plan. TODAY: today's training side, a
# per-step cosine after a one-epoch warm-up (a stop at step 5 of 6 lands inside it), no decay on
# BatchNorm and another rate on biases (parameter groups; decay masks), a model EMA updated
# every second step, and each step in two micro-batches (gradient accumulation)
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
