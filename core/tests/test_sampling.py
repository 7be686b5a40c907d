"""The data plan's repeated augmentation (RASampler's definition) and the new draws' streams."""

import numpy as np
import pytest

from configs import get_config
from core import sampling


def rasampler_lists(order_perm: np.ndarray, repetitions: int, replicas: int) -> list[np.ndarray]:
    """What torchvision's RASampler (references/classification/sampler.py, from DeiT) yields for
    each rank, restated from its definition for a given shuffled order: each index repeated
    `repetitions` times in a row, padded from its start to a multiple of the replicas, rank r
    taking every replicas-th entry from r, cut to floor(N // 256 * 256 / replicas)."""
    n = len(order_perm)
    rep = np.repeat(order_perm, repetitions)
    per_rank = -(-n * repetitions // replicas)
    rep = np.concatenate([rep, rep[: per_rank * replicas - len(rep)]])
    selected = n // 256 * 256 // replicas
    return [rep[r::replicas][:selected] for r in range(replicas)]


@pytest.mark.parametrize("n, batch, reps", [(1000, 64, 4), (600, 32, 3), (517, 16, 2)])
def test_two_processes_see_what_rasampler_deals_them(n, batch, reps):
    """Over 2 processes: each rank's epoch is RASampler's list for that rank on the same order,
    except its length: RASampler cuts the epoch to a multiple of 256 images, the plan keeps the
    data set's length (its short last batch is trained as any other, and the steps per epoch,
    so the schedule, stay those of the run without repetitions)."""
    r = get_config("cifar10").replace(repeated_augmentation=reps, seed=3)
    perm = sampling.epoch_permutation(n, r.seed, 5)
    theirs = rasampler_lists(perm, reps, 2)
    plans = [sampling.TrainPlan(r, n, batch, world_size=2, rank=k) for k in (0, 1)]
    ours = [np.concatenate([sp.slice.local_indices for sp in p.epoch(5)]) for p in plans]
    assert plans[0].steps == sampling.steps_in_epoch(n, 2 * batch, False, 2)  # as without
    assert len(ours[0]) + len(ours[1]) == n
    for k in (0, 1):
        m = min(len(ours[k]), len(theirs[k]))
        np.testing.assert_array_equal(ours[k][:m], theirs[k][:m])
        assert len(theirs[k]) == n // 256 * 256 // 2  # RASampler's rounding, which we leave out
    # about 1/reps of the distinct images, each `reps` times, the copies on different ranks
    distinct = np.unique(np.concatenate(ours))
    assert len(distinct) == -(-n // reps)
    counts = np.bincount(np.concatenate(ours), minlength=n)
    assert counts.max() == reps and (counts[distinct] < reps).sum() <= 1  # one cut short at most
    on0, on1 = np.bincount(ours[0], minlength=n), np.bincount(ours[1], minlength=n)
    whole = counts == reps
    assert (on0[whole] > 0).all() and (on1[whole] > 0).all()  # copies spread over both ranks


def test_a_resumed_epoch_continues_the_same_order_and_draws():
    r = get_config("cifar10").replace(
        repeated_augmentation=3, trivial_augment=True, random_erasing=0.5
    )
    plan = sampling.TrainPlan(r, 300, 32)
    whole = list(plan.epoch(2))
    later = list(plan.epoch(2, start_step=4))
    for a, b in zip(whole[4:], later):
        np.testing.assert_array_equal(a.slice.global_indices, b.slice.global_indices)
        np.testing.assert_array_equal(a.trivial, b.trivial)
        np.testing.assert_array_equal(a.regularisers.erase, b.regularisers.erase)


def test_each_copy_gets_its_own_draws_and_recipes_without_the_keys_draw_what_they_drew():
    base = get_config("cifar10")
    r = base.replace(repeated_augmentation=2, trivial_augment=True)
    sp = sampling.TrainPlan(r, 256, 64).step(0, 0)
    idx = sp.slice.global_indices
    assert (idx[0::2] == idx[1::2]).all()  # copies side by side on one process
    assert not (sp.trivial[0::2] == sp.trivial[1::2]).all()  # ... each with its own choices
    assert not (sp.params.crop_y[0::2] == sp.params.crop_y[1::2]).all()
    plain = sampling.TrainPlan(base, 256, 64).step(0, 0)
    assert plain.trivial is None and plain.regularisers is None
    with_ta = sampling.TrainPlan(base.replace(trivial_augment=True), 256, 64).step(0, 0)
    np.testing.assert_array_equal(plain.slice.global_indices, with_ta.slice.global_indices)
    for field in ("crop_y", "crop_x", "flip", "jitter"):  # TrivialAugment has its own stream
        np.testing.assert_array_equal(getattr(plain.params, field), getattr(with_ta.params, field))
    assert (
        sampling.TrainPlan(base.replace(repeated_augmentation=1), 256, 64)
        .step(0, 0)
        .slice.global_indices.tolist()
        == plain.slice.global_indices.tolist()
    )  # 1 = off
