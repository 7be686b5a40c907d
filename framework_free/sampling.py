"""Which examples each process sees at each step, and the random augmentation parameters.

Both stacks take their batches from here, so that the same seed gives the same batches in torch_ref
and flax_impl, on one process or many, and after a resume in the middle of an epoch.

Order: epoch e shuffles the training set with a permutation drawn from (seed, e). Step s of the
epoch takes the global batch ``perm[s*G:(s+1)*G]`` (G = per-process batch x world size) and process
r takes its r-th share of it. So one process on the global batch sees exactly the union of what the
processes see, and a run resumed at step s continues the same order: no example is seen twice or
skipped within the epoch. The last global batch of an epoch may be partial (``drop_last=False``);
it is split as evenly as possible over the processes (their shares differ by at most one), and
nothing is padded or duplicated, unlike torch's DistributedSampler.

Augmentation: the random numbers of step s (crop offsets, flips, colour-jitter factors and order)
are drawn for the whole global batch from (seed, epoch, step) and sliced like the examples. They do
not depend on how many processes run or on what ran before, so a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_ORDER, _AUGMENT = 0x5EED0, 0xA06  # stream tags: the two uses never share random numbers


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _ORDER, epoch])
    return rng.permutation(num_examples)


def steps_in_epoch(num_examples: int, global_batch: int, drop_last: bool, world_size: int = 1) -> int:
    """Steps per epoch. A last partial batch too small to give every process one example is dropped."""
    full, rest = divmod(num_examples, global_batch)
    return full + (0 if drop_last or rest < world_size else 1)


def share(count: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s share of `count` items, split as evenly as possible."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclasses.dataclass(frozen=True)
class StepSlice:
    """Where one process's examples sit inside the global batch of a step."""

    global_indices: np.ndarray  # dataset indices of the whole global batch, in order
    start: int  # this process's share is global_indices[start:stop]
    stop: int

    @property
    def local_indices(self) -> np.ndarray:
        return self.global_indices[self.start:self.stop]

    @property
    def global_size(self) -> int:
        return len(self.global_indices)


def step_slice(perm: np.ndarray, step: int, batch_size: int, world_size: int, rank: int) -> StepSlice:
    global_batch = batch_size * world_size
    idx = perm[step * global_batch:(step + 1) * global_batch]
    if len(idx) == global_batch:
        start = rank * batch_size
        return StepSlice(idx, start, start + batch_size)
    start, stop = share(len(idx), world_size, rank)
    return StepSlice(idx, start, stop)


def eval_shard(num_examples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous range of test examples process `rank` evaluates: each example exactly once."""
    return share(num_examples, world_size, rank)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Random choices for a batch, applied by each framework's batched augmentation."""

    crop_y: np.ndarray  # (B,) int: top offset into the zero-padded image, 0..2*pad
    crop_x: np.ndarray  # (B,) int
    flip: np.ndarray  # (B,) bool: mirror left-right after the crop
    jitter: np.ndarray  # (B, 3) float32: brightness, contrast, saturation factors (1 = unchanged)
    jitter_order: np.ndarray  # (B, 3) int: the order the three adjustments are applied in

    def __getitem__(self, sl: slice) -> "AugmentParams":
        return AugmentParams(*(getattr(self, f.name)[sl] for f in dataclasses.fields(self)))


def augment_params(seed: int, epoch: int, step: int, batch: int, pad: int, hflip: bool,
                   jitter: tuple[float, float, float]) -> AugmentParams:
    """Draw the augmentation of one global batch from (seed, epoch, step)."""
    rng = np.random.default_rng([seed, _AUGMENT, epoch, step])
    crop = rng.integers(0, 2 * pad + 1, size=(2, batch)) if pad else np.zeros((2, batch), np.int64)
    flip = rng.random(batch) < 0.5 if hflip else np.zeros(batch, bool)
    lo = np.maximum(0.0, 1.0 - np.asarray(jitter, np.float64))
    hi = 1.0 + np.asarray(jitter, np.float64)
    factors = rng.uniform(lo, hi, size=(batch, 3)).astype(np.float32)
    order = np.argsort(rng.random((batch, 3)), axis=1)
    return AugmentParams(crop[0], crop[1], flip, factors, order)
