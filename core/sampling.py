"""The data plan: which examples each process sees at each step, and every random draw.

Both stacks take their batches from here (`TrainPlan`), so that the same seed gives the same
batches in torch_ref and flax_impl, on one process or many, with any number of loader workers or
threads, and after a resume in the middle of an epoch. The stacks only load, decode and place
data; nothing they draw themselves shapes a batch.

Order: epoch e shuffles the training set with a permutation drawn from (seed, e). Step s of the
epoch takes the global batch ``perm[s*G:(s+1)*G]`` (G = per-process batch x world size) and process
r takes its r-th share of it. So one process on the global batch sees exactly the union of what the
processes see, and a run resumed at step s continues the same order: no example is seen twice or
skipped within the epoch. The last global batch of an epoch may be partial (``drop_last=False``);
it is split as evenly as possible over the processes (their shares differ by at most one), and
nothing is padded or duplicated, unlike torch's DistributedSampler.

Repeated augmentation (`repeated_augmentation` = k > 1, torchvision's RASampler from DeiT):
the epoch's order is the permutation with each example repeated k times in a row, cut back to
the data set's length, so an epoch has the steps it has without it and sees about 1/k of the
distinct examples, each k times with its own draws (torchvision also cuts each epoch down to
a multiple of 256 examples; here the last partial batch is trained as any other, so the schedule's
steps per epoch stay as they are). Each global batch is then dealt round-robin to the `deal`
processes (RASampler's ``indices[rank::num_replicas]``), so the copies of an example land on
different processes: process r's whole epoch is ``order[r::deal]``, RASampler's list for rank r
up to its 256-rounding.

Augmentation: the random numbers of step s (crop offsets, flips, colour-jitter factors and order)
are drawn for the whole global batch from (seed, epoch, step) and sliced like the examples. The
per-image draws of PIL-side transforms (RandomResizedCrop's box and its flip) come from a generator
of (seed, epoch, step, position in the global batch), so a DataLoader worker or a decoding thread
makes the same image whichever of them handles it. None of it depends on how many processes or
workers run or on what ran before, so a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from core import regularisers, trivial_augment
from core.errors import UserError
from core.shares import share
from core.recipe import Recipe
from core.regularisers import Draws

# stream tags: the uses never share random numbers
_ORDER, _AUGMENT, _IMAGE, _TRIVIAL = 0x5EED0, 0xA06, 0xC0, 0x7A1


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _ORDER, epoch])
    return rng.permutation(num_examples)


def epoch_order(num_examples: int, seed: int, epoch: int, repetitions: int = 0) -> np.ndarray:
    """The examples of an epoch in training order: the epoch's permutation, or with
    `repetitions` k > 1 each of its examples k times in a row, cut to `num_examples`."""
    perm = epoch_permutation(num_examples, seed, epoch)
    if repetitions <= 1:
        return perm
    return np.repeat(perm, repetitions)[:num_examples]


def deal(indices: np.ndarray, processes: int) -> np.ndarray:
    """A global batch reordered so that process r's contiguous share (`share`) holds
    ``indices[r::processes]``: repeated augmentation's round-robin dealing."""
    if processes <= 1:
        return indices
    return np.concatenate([indices[r::processes] for r in range(processes)])


def trivial_draws(seed: int, epoch: int, step: int, batch: int) -> np.ndarray:
    """TrivialAugment's (op, bin, sign) for each image of a global batch (core.trivial_augment)."""
    return trivial_augment.draw(np.random.default_rng([seed, _TRIVIAL, epoch, step]), batch)


def steps_in_epoch(
    num_examples: int, global_batch: int, drop_last: bool, world_size: int = 1
) -> int:
    """Steps per epoch. A last partial batch too small to give every process one example is
    dropped."""
    full, rest = divmod(num_examples, global_batch)
    return full + (0 if drop_last or rest < world_size else 1)


@dataclasses.dataclass(frozen=True)
class StepSlice:
    """Where one process's examples sit inside the global batch of a step."""

    global_indices: np.ndarray  # dataset indices of the whole global batch, in order
    start: int  # this process's share is global_indices[start:stop]
    stop: int

    @property
    def local_indices(self) -> np.ndarray:
        return self.global_indices[self.start : self.stop]

    @property
    def global_size(self) -> int:
        return len(self.global_indices)


def step_slice(
    perm: np.ndarray, step: int, batch_size: int, world_size: int, rank: int
) -> StepSlice:
    global_batch = batch_size * world_size
    idx = perm[step * global_batch : (step + 1) * global_batch]
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


def augment_params(
    seed: int,
    epoch: int,
    step: int,
    batch: int,
    pad: int,
    hflip: bool,
    jitter: tuple[float, float, float],
) -> AugmentParams:
    """Draw the augmentation of one global batch from (seed, epoch, step)."""
    rng = np.random.default_rng([seed, _AUGMENT, epoch, step])
    crop = rng.integers(0, 2 * pad + 1, size=(2, batch)) if pad else np.zeros((2, batch), np.int64)
    flip = rng.random(batch) < 0.5 if hflip else np.zeros(batch, bool)
    lo = np.maximum(0.0, 1.0 - np.asarray(jitter, np.float64))
    hi = 1.0 + np.asarray(jitter, np.float64)
    factors = rng.uniform(lo, hi, size=(batch, 3)).astype(np.float32)
    order = np.argsort(rng.random((batch, 3)), axis=1)
    return AugmentParams(crop[0], crop[1], flip, factors, order)


def image_rng(seed: int, epoch: int, step: int, position: int) -> np.random.Generator:
    """The generator of one image's PIL-side draws: `position` is its place in the global batch."""
    return np.random.default_rng([seed, _IMAGE, epoch, step, position])


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything random about one step: its examples, their augmentation, per-image generators."""

    seed: int
    epoch: int
    step: int
    slice: StepSlice
    params: AugmentParams  # for the whole global batch, in its order
    regularisers: Draws | None = None  # Cutout/MixUp/CutMix/erasing draws (core.regularisers)
    trivial: np.ndarray | None = None  # (B, 3) TrivialAugment's op, bin, sign; None = off

    @property
    def local_trivial(self) -> np.ndarray | None:
        """This process's rows of TrivialAugment's draws."""
        return None if self.trivial is None else self.trivial[self.slice.start : self.slice.stop]

    @property
    def local_regularisers(self) -> Draws | None:
        """This process's rows of the regularisers' draws, partners as local rows."""
        if self.regularisers is None:
            return None
        return self.regularisers.local(self.slice.start, self.slice.stop)

    @property
    def local_params(self) -> AugmentParams:
        """This process's share of the batch-level draws."""
        return self.params[self.slice.start : self.slice.stop]

    def image_rng(self, position: int) -> np.random.Generator:
        return image_rng(self.seed, self.epoch, self.step, position)


class TrainPlan:
    """The training side of the data plan for one process.

    `batch_size` is per replica and `world_size` the replicas that split each global batch
    between processes (torch_ref under DDP); a stack that feeds the whole global batch from one
    process passes the global batch and world_size 1 and takes its rows itself.
    """

    def __init__(
        self,
        recipe: Recipe,
        num_examples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        mix_groups: int | None = None,
        deal: int | None = None,
    ):
        """`deal`: the processes repeated augmentation deals each global batch to (None: the
        world size; a stack that feeds the global batch from each process passes their count)."""
        self.recipe, self.num_examples = recipe, num_examples
        self.deal = world_size if deal is None else deal
        # MixUp/CutMix partners stay inside each replica's share of the global batch
        self.mix_groups = world_size if mix_groups is None else mix_groups
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.global_batch = batch_size * world_size
        self.steps = steps_in_epoch(num_examples, self.global_batch, recipe.drop_last, world_size)
        if self.steps < 1:
            raise UserError(
                f"{num_examples} training images make no full batch of "
                f"{self.global_batch}; lower batch_size or set drop_last=false"
            )
        # RandomResizedCrop draws its box (and flip) per image; the batch-level draws then carry
        # the colour jitter only
        rrc = recipe.random_resized_crop
        self._pad = 0 if rrc else recipe.crop_padding
        self._flip = recipe.hflip and not rrc

    def step(self, epoch: int, step: int, perm: np.ndarray | None = None) -> StepPlan:
        r = self.recipe
        if perm is None:
            perm = epoch_order(self.num_examples, r.seed, epoch, r.repeated_augmentation)
        sl = step_slice(perm, step, self.batch_size, self.world_size, self.rank)
        if r.repeated_augmentation > 1 and self.deal > 1:
            sl = StepSlice(deal(sl.global_indices, self.deal), sl.start, sl.stop)
        params = augment_params(
            r.seed, epoch, step, sl.global_size, self._pad, self._flip, r.color_jitter
        )
        draws = None
        if regularisers.enabled(r):
            draws = regularisers.draw(
                r, epoch, step, sl.global_size, self.mix_groups, r.train_size, r.train_size
            )
        trivial = None
        if r.trivial_augment:
            trivial = trivial_draws(r.seed, epoch, step, sl.global_size)
        return StepPlan(r.seed, epoch, step, sl, params, draws, trivial)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StepPlan]:
        r = self.recipe
        perm = epoch_order(self.num_examples, r.seed, epoch, r.repeated_augmentation)
        for step in range(start_step, self.steps):
            yield self.step(epoch, step, perm)
