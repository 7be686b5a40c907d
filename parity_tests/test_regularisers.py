"""Seed 002's regularisers (core.regularisers) are applied identically in both stacks.

- Cutout's mask equals a direct implementation of seed 002's ``CutOut`` loop on the same centres
  (even length; exact: zeros and ones).
- torch_ref's MixUp and CutMix equal ``torchvision.transforms.v2.MixUp`` / ``CutMix`` given the same
  lam, box and partners. torchvision pairs row i with row i - 1 (``roll(1, 0)``); our partners are a
  permutation, so the comparison passes our draws with partner = roll(arange(B), 1). Exact in
  float32: the same products of the same float32-rounded lam and 1 - lam, summed in either order.
- torch_ref's loss with label smoothing and mixing equals torch's own soft-target cross-entropy on
  torchvision's mixed one-hot labels, and a plain float64 reference (1e-12: one log-sum-exp).
- Level 1: on float64 inputs, flax_impl's regularised batch equals torch_ref's exactly (the same
  selects and one multiply-add per pixel) and its loss within 1e-12 relative (log-softmax summed
  in another order).
- Level 2: a short run of the cifar10 recipe with Cutout, MixUp, CutMix and label smoothing, from
  the same weights on the same draws: first step within 1e-6 and five float64 steps within 1e-10,
  the bounds and reasons of test_short_runs.
- Planted traps the checks catch: lam not corrected after CutMix's clipping, smoothing applied to
  evaluation, and partners drawn without the step's key.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from configs import get_config
from flax_impl import augment as flax_augment, data as flax_data, steps as flax_steps
from core import readers, regularisers as reg
from testkit import samples
from core.errors import UserError
from core.recipe import apply_overrides
from parity_tests import short_runs
from torch_ref import augment as torch_augment, steps as torch_steps


# --- NumPy references (float64), the definitions written plainly, loop by loop ---------------


def reference_cutout_mask(holes: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, h, w) 0/1 mask, one square at a time, as seed 002's loop writes it."""
    mask = np.ones((holes.shape[0], h, w))
    for b, rows in enumerate(holes):
        for y0, y1, x0, x1 in rows:
            mask[b, y0:y1, x0:x1] = 0
    return mask


def reference_apply(x: np.ndarray, d: reg.Draws) -> np.ndarray:
    """Cutout then the mix on an NHWC batch (float64)."""
    h, w = x.shape[1:3]
    x = x * reference_cutout_mask(d.holes, h, w)[..., None]
    xp = x[d.partner]
    if d.kind == reg.MIXUP:
        return d.lam * x + d.one_minus_lam * xp
    if d.kind == reg.CUTMIX:
        y0, y1, x0, x1 = d.box
        out = x.copy()
        out[:, y0:y1, x0:x1] = xp[:, y0:y1, x0:x1]
        return out
    return x


def reference_loss(
    logits: np.ndarray, labels: np.ndarray, d: reg.Draws | None, smoothing: float
) -> float:
    """Mean over the batch of lam * CE_eps(y) + (1 - lam) * CE_eps(y[partner])."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    k = logits.shape[1]

    def ce(y):
        target = np.full_like(logp, smoothing / k)
        target[np.arange(len(y)), y] += 1.0 - smoothing
        return -(target * logp).sum(1)

    if d is None or d.kind == reg.NONE:
        return float(ce(labels).mean())
    return float((d.lam * ce(labels) + d.one_minus_lam * ce(labels[d.partner])).mean())


B, H, W, C, K = 12, 16, 16, 3, 10
ALL_ON = [
    "cutout_holes=2",
    "cutout_length=6",
    "mixup_alpha=0.4",
    "cutmix_alpha=1.0",
    "label_smoothing=0.1",
]


def recipe(*extra):
    return apply_overrides(get_config("cifar10"), ["image_size=16", *extra])


def batch64(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, H, W, C)), rng.integers(0, K, B), rng.normal(size=(B, K))


def kind_draws(kind: str, step: int = 0) -> reg.Draws:
    """Draws of a recipe with one mix (and Cutout), so each kind is tested on its own."""
    extra = {"mixup": ["mixup_alpha=0.4"], "cutmix": ["cutmix_alpha=1.0"], "none": []}[kind]
    return reg.draw(recipe("cutout_holes=2", "cutout_length=6", *extra), 0, step, B, 1, H, W)


def torch_apply(x_nhwc, y, d):
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    x, t = torch_augment.regularise(x, torch.from_numpy(y), d)
    return x.permute(0, 2, 3, 1).numpy(), t


def flax_apply(x_nhwc, y, d):
    batch = {k: jnp.asarray(v) for k, v in flax_data.regulariser_rows(None, d).items()}
    x, partner_y, lam, rest = flax_augment.regularise(jnp.asarray(x_nhwc), jnp.asarray(y), batch)
    return np.asarray(x), (np.asarray(partner_y), np.asarray(lam), np.asarray(rest))


# --- the draws ------------------------------------------------------------------------------------


def test_draws_come_from_seed_epoch_step_alone():
    r = recipe(*ALL_ON)
    a, b = reg.draw(r, 1, 5, B, 2, H, W), reg.draw(r, 1, 5, B, 2, H, W)
    for f in dataclasses.fields(reg.Draws):
        assert np.array_equal(getattr(a, f.name), getattr(b, f.name))
    other = reg.draw(r, 1, 6, B, 2, H, W)
    assert not np.array_equal(a.partner, other.partner) or a.lam != other.lam
    # partners stay inside each replica's share: rows 0-5 and 6-11 for two replicas
    assert sorted(a.partner[:6]) == list(range(6)) and sorted(a.partner[6:]) == list(range(6, 12))


def test_cutmix_lam_is_the_share_left_after_clipping():
    for step in range(20):
        d = kind_draws("cutmix", step)
        y0, y1, x0, x1 = d.box
        # the same two float64 operations on the same integers: equal to the last bit or two
        assert d.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W), abs=1e-15)


def test_no_regulariser_draws_nothing_and_changes_no_existing_draw():
    from core import sampling

    r = get_config("cifar10")
    assert not reg.enabled(r) and sampling.TrainPlan(r, 500, 64).step(0, 0).regularisers is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("mixup_alpha=-0.2", "mixup_alpha must be 0 (off) or positive"),
        ("cutmix_alpha=-1", "cutmix_alpha must be 0 (off) or positive"),
        (
            "cutout_holes=1,cutout_length=40",
            "cutout_length must be 1 to the training image's 32 pixels",
        ),
        ("cutout_length=0", "cutout_length must be at least 1"),
        ("label_smoothing=1", "label_smoothing must be in [0, 1)"),
        ("cutout_holes=-1", "cutout_holes must be 0 or more"),
        ("mix_switch_prob=1.5", "mix_switch_prob must be in [0, 1]"),
    ],
)
def test_bad_values_are_user_errors(override, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        apply_overrides(get_config("cifar10"), override.split(","))


def test_a_long_cutout_length_is_fine_while_cutout_is_off():
    assert apply_overrides(get_config("cifar10"), ["image_size=8"]).cutout_length == 16


# --- Cutout against seed 002's loop --------------------------------------------------------------


def seed_cutout_mask(cy, cx, length, h, w):
    """seed 002's CutOut.__call__, with its centres given instead of drawn."""
    masks = []
    for ys, xs in zip(cy, cx):
        mask = torch.ones(h, w)
        for y, x in zip(ys, xs):
            y1, y2 = max(0, y - length // 2), min(h, y + length // 2)
            x1, x2 = max(0, x - length // 2), min(w, x + length // 2)
            mask[y1:y2, x1:x2] = 0
        masks.append(mask.numpy())
    return np.stack(masks)


def test_cutout_equals_seed_002s_loop():
    rng = np.random.default_rng(3)
    cy, cx = rng.integers(0, H, (B, 3)), rng.integers(0, W, (B, 3))
    holes = reg.cutout_boxes(cy, cx, 8, H, W)
    assert np.array_equal(reference_cutout_mask(holes, H, W), seed_cutout_mask(cy, cx, 8, H, W))
    d = reg.Draws(holes, reg.NONE, 1.0, np.zeros(4, np.int32), np.arange(B, dtype=np.int32))
    x, y, _ = batch64()
    expected = x * seed_cutout_mask(cy, cx, 8, H, W)[..., None]
    assert np.array_equal(torch_apply(x, y, d)[0], expected)
    with jax.enable_x64(True):
        assert np.array_equal(flax_apply(x, y, d)[0], expected)


# --- MixUp and CutMix against torchvision ---------------------------------------------------------


def rolled(d: reg.Draws) -> reg.Draws:
    """torchvision's pairing: row i with row i - 1."""
    return dataclasses.replace(d, partner=np.roll(np.arange(B), 1).astype(np.int32))


def mix_against_torchvision(kind: str, monkeypatch, lam: float = 0.8, centre=(5, 14)) -> dict:
    """torch_ref's MixUp/CutMix against torchvision's, fed our lam (and CutMix's centre) through
    torchvision's own make_params; returns what differs (all zero when they agree)."""
    x32, y, logits64 = batch64()
    x32 = x32.astype(np.float32)
    logits = torch.from_numpy(logits64)
    none = np.zeros((B, 0, 4), np.int32)
    if kind == "mixup":
        tv = v2.MixUp(alpha=0.4, num_classes=K)
        params = {"lam": lam}
        d = reg.Draws(none, reg.MIXUP, lam, np.zeros(4, np.int32), np.arange(B, dtype=np.int32))
    else:
        tv = v2.CutMix(alpha=1.0, num_classes=K)
        cy, cx = centre
        box, corrected = reg.cutmix_box(lam, cy, cx, H, W)
        d = reg.Draws(none, reg.CUTMIX, corrected, box, np.arange(B, dtype=np.int32))
        # torchvision draws lam from its Beta and the centre with randint(W), then randint(H)
        centre_draws = iter([torch.tensor([cx]), torch.tensor([cy])])
        fixed = type("FixedBeta", (), {"sample": lambda self, shape: torch.tensor(lam)})()
        with monkeypatch.context() as m:
            m.setattr(tv, "_dist", fixed)
            m.setattr(torch, "randint", lambda *a, **k: next(centre_draws))
            params = tv.make_params([torch.zeros(B, C, H, W)])
    d = rolled(d)
    # float64 one-hot labels (torchvision keeps a float label's dtype), so that the comparison
    # of losses is not that of float32-rounded weights
    labels = F.one_hot(torch.from_numpy(y), K).double()
    params.update(labels=labels, batch_size=B)
    images = torch.from_numpy(x32).permute(0, 3, 1, 2).contiguous()
    theirs = tv.transform(images, params).permute(0, 2, 3, 1).numpy()
    ours, targets = torch_apply(x32, y, d)
    soft = tv.transform(labels, params)  # torchvision's mixed labels
    want = F.cross_entropy(logits, soft).item()
    got = torch_steps.train_loss(logits, targets).item()
    gaps = {"pixels": float(np.abs(ours - theirs).max()), "loss": abs(got - want) / want}
    if kind == "cutmix":
        y0, y1, x0, x1 = (int(v) for v in d.box)
        gaps["box"] = float(params["box"] != (x0, y0, x1, y1))
        gaps["lam"] = abs(params["lam_adjusted"] - d.lam)
    return gaps


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_equals_torchvision(kind, monkeypatch):
    # exact pixels (the same float32 products); loss 1e-12 relative (one log-sum-exp, float64)
    gaps = mix_against_torchvision(kind, monkeypatch)
    assert gaps["pixels"] == 0 and gaps["loss"] <= 1e-12, gaps
    assert gaps.get("box", 0) == 0 and gaps.get("lam", 0) == 0, gaps


def test_smoothed_mixed_loss_equals_torch_and_the_reference():
    """With smoothing, torch_ref calls torch's own cross_entropy(label_smoothing) on both labels;
    it must equal the soft-target definition written out in float64 (1e-12: one log-sum-exp)."""
    x, y, logits = batch64()
    for kind in ("none", "mixup", "cutmix"):
        d = kind_draws(kind)
        _, targets = torch_apply(x, y, d)
        got = torch_steps.train_loss(torch.from_numpy(logits), targets, 0.1).item()
        ref = reference_loss(logits, y, d, 0.1)
        assert abs(got - ref) <= 1e-12 * ref, kind


# --- level 1: flax_impl against torch_ref on float64 ----------------------------------------------


@pytest.mark.parametrize("kind", ["none", "mixup", "cutmix"])
def test_flax_equals_torch_in_float64(kind):
    x, y, logits = batch64()
    d = kind_draws(kind)
    assert d.kind == {"none": reg.NONE, "mixup": reg.MIXUP, "cutmix": reg.CUTMIX}[kind]
    ours, targets = torch_apply(x, y, d)
    assert np.array_equal(ours, reference_apply(x, d))
    with jax.enable_x64(True):
        theirs, (partner_y, lam, rest) = flax_apply(x, y, d)
        mix = (
            None
            if kind == "none"
            else (jnp.asarray(partner_y), jnp.asarray(lam), jnp.asarray(rest))
        )
        flax_loss = float(
            flax_steps.train_loss(jnp.asarray(logits), jnp.asarray(y), jnp.ones(B), 0.1, mix)
        )
    assert np.array_equal(theirs, ours)
    torch_loss = torch_steps.train_loss(torch.from_numpy(logits), targets, 0.1).item()
    assert abs(flax_loss - torch_loss) <= 1e-12 * torch_loss


# --- level 2: a short run with everything on ------------------------------------------------------


RUN_RECIPE = apply_overrides(get_config("cifar10").replace(batch_size=32), ALL_ON)
RUN_STEPS = 12  # of 20 per epoch (640 images)


@pytest.fixture(scope="module")
def short_run():
    images, labels = samples.patterned_images(640, 32, 3, 10, seed=0)
    return short_runs.short_run(
        RUN_RECIPE, readers.ArraySplit(images, labels, 10), steps_count=RUN_STEPS
    )


def test_short_run_with_regularisers_agrees(short_run):
    kinds = {reg.draw(RUN_RECIPE, 0, s, 32, 1, 32, 32).kind for s in range(RUN_STEPS)}
    assert kinds == {reg.MIXUP, reg.CUTMIX}  # both mixes were exercised
    gaps = short_run.gaps(window=4)
    assert gaps["first_step_rel"] < 1e-6, gaps
    assert gaps["f64_steps"] == 5 and gaps["f64_max_rel"] < 1e-10, gaps


# --- traps ----------------------------------------------------------------------------------------


def test_trap_lam_not_corrected_after_clipping_is_caught(monkeypatch):
    """A CutMix that keeps the Beta draw's lam after clipping the box at the border."""

    def uncorrected(lam, cy, cx, h, w):
        box, _ = ORIGINAL_CUTMIX_BOX(lam, cy, cx, h, w)
        return box, lam

    monkeypatch.setattr(reg, "cutmix_box", uncorrected)
    gaps = mix_against_torchvision("cutmix", monkeypatch, lam=0.8, centre=(5, 14))
    assert gaps["lam"] > 1e-3 and gaps["loss"] > 1e-4, gaps


class Tiny(nn.Module):
    """A linear classifier: eval_step's loss without a ResNet's cost."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        return nn.Dense(K, param_dtype=jnp.float64)(x.reshape(len(x), -1))


def eval_loss_gap() -> float:
    """flax_impl's eval_step loss against torch's plain cross-entropy on the same logits."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (B, 4, 4, C), np.uint8)
    labels = rng.integers(0, K, B).astype(np.int32)
    aug = {"pad": 0, "mean": (0.5,) * C, "std": (0.25,) * C}
    with jax.enable_x64(True):
        model = Tiny()
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, C), jnp.float64))
        state = flax_steps.TrainState(jnp.zeros((), jnp.int32), variables["params"], {}, None)
        batch = {"images": images, "labels": labels, "mask": np.ones(B)}
        got = float(
            flax_steps.eval_step(state, batch, model=model, aug=aug, dtype=jnp.float64)["loss_sum"]
        )
        x, _ = flax_steps.prepare_inputs(batch, None, aug, jnp.float64)
        logits = np.array(model.apply(variables, x))
    want = F.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels).long(), reduction="sum"
    ).item()
    return abs(got - want) / want


def test_eval_is_never_smoothed():
    assert eval_loss_gap() <= 1e-12  # one log-sum-exp in float64


def test_trap_smoothing_at_eval_is_caught(monkeypatch):
    smoothing_everywhere = functools.partial(ORIGINAL_CROSS_ENTROPY, smoothing=0.1)
    monkeypatch.setattr(
        flax_steps,
        "cross_entropy",
        lambda logits, labels, smoothing=0.0: smoothing_everywhere(logits, labels),
    )
    assert eval_loss_gap() > 1e-3


def partners_follow_the_step(draw=reg.draw) -> bool:
    """Each step of an epoch pairs the batch differently, and drawing again gives the same."""
    r = recipe("mixup_alpha=0.4")
    partners = [draw(r, 0, step, B, 1, H, W).partner for step in range(4)]
    again = [draw(r, 0, step, B, 1, H, W).partner for step in range(4)]
    distinct = all(not np.array_equal(a, b) for a, b in zip(partners, partners[1:]))
    return distinct and all(np.array_equal(a, b) for a, b in zip(partners, again))


def test_partners_follow_the_step():
    assert partners_follow_the_step()


def test_trap_partner_drawn_without_the_steps_key_is_caught():
    def planted(r, epoch, step, batch, groups, h, w):
        d = reg.draw(r, epoch, step, batch, groups, h, w)
        rng = np.random.default_rng([r.seed, epoch])  # the step left out of the key
        return dataclasses.replace(d, partner=rng.permutation(batch).astype(np.int32))

    assert not partners_follow_the_step(planted)


ORIGINAL_CUTMIX_BOX = reg.cutmix_box
ORIGINAL_CROSS_ENTROPY = flax_steps.cross_entropy
