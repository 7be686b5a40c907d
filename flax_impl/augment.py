"""Batched augmentation in JAX: the same operations as torch_ref.augment, in NHWC.

Given the same `core.sampling.AugmentParams`, crop and flip give the very same uint8
pixels as torch_ref's path (and torchvision's RandomCrop + RandomHorizontalFlip); colour jitter and
normalisation are the same float formulas.
"""

from __future__ import annotations

import jax.numpy as jnp

from core import regularisers as reg

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def crop_flip(images, pad: int, crop_y, crop_x, flip):
    """Random-crop (after zero padding by `pad`) and mirror a uint8 NHWC batch; same size out."""
    b, h, w, _ = images.shape
    if pad:
        images = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ar_h, ar_w = jnp.arange(h), jnp.arange(w)
    rows = crop_y[:, None] + ar_h
    cols = crop_x[:, None] + jnp.where(flip[:, None], (w - 1) - ar_w, ar_w)
    return images[jnp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _gray(x):
    if x.shape[-1] == 1:
        return x
    return jnp.sum(x * jnp.asarray(GRAY, x.dtype), axis=-1, keepdims=True)


def color_jitter(x, factors, order):
    """torchvision's ColorJitter(brightness, contrast, saturation) on float NHWC in [0, 1]."""

    def blend(img, other, f):
        return jnp.clip(f * img + (1 - f) * other, 0, 1)

    for position in range(3):
        op = order[:, position].reshape(-1, 1, 1, 1)
        f = jnp.take_along_axis(factors, order[:, position : position + 1], axis=1)
        f = f.reshape(-1, 1, 1, 1).astype(x.dtype)
        bright = jnp.clip(f * x, 0, 1)
        contrast = blend(x, jnp.mean(_gray(x), axis=(1, 2, 3), keepdims=True), f)
        saturation = blend(x, _gray(x), f) if x.shape[-1] == 3 else x
        x = jnp.where(op == 0, bright, jnp.where(op == 1, contrast, saturation))
    return x


def to_float_normalized(images, mean, std, jitter=None, dtype=jnp.float32):
    """uint8 NHWC -> normalised float NHWC (jitter = (factors, order) or None), computed in
    float32, or in float64 when that is the compute dtype (the parity proofs)."""
    work = jnp.promote_types(dtype, jnp.float32)
    x = images.astype(work) / 255.0
    if jitter is not None:
        x = color_jitter(x, *jitter)
    x = (x - jnp.asarray(mean, work)) / jnp.asarray(std, work)
    return x.astype(dtype)


def _box_mask(box, h: int, w: int):
    """(..., 4) boxes y0, y1, x0, x1 -> (..., h, w) bool, True inside."""
    rows, cols = jnp.arange(h), jnp.arange(w)
    inside_r = (rows >= box[..., 0:1]) & (rows < box[..., 1:2])
    inside_c = (cols >= box[..., 2:3]) & (cols < box[..., 3:4])
    return inside_r[..., :, None] & inside_c[..., None, :]


def regularise(x, labels, batch: dict):
    """Cutout and Random Erasing, then MixUp or CutMix, on a normalised float NHWC batch:
    torch_ref.augment.regularise
    in JAX, on the draws a batch carries (core.regularisers). Every row carries its
    partner (a row of the global batch), lam and 1 - lam (1 and 0 when the batch mixes nothing),
    the mix kind and CutMix's box, so the arithmetic is row-wise and the batch may be sharded.
    Returns (x, partner labels, lam, 1 - lam)."""
    h, w = x.shape[1:3]
    holes = batch["holes"]
    if holes.shape[1]:
        cut = jnp.any(_box_mask(holes, h, w), axis=1)  # (B, h, w)
        x = x * (~cut)[..., None].astype(x.dtype)  # seed 002: img * mask
    if "erase" in batch:  # Random Erasing: torchvision writes the value 0 into the box
        x = jnp.where(_box_mask(batch["erase"], h, w)[..., None], jnp.zeros((), x.dtype), x)
    partner = batch["partner"]
    xp = x[partner]
    lam = batch["lam"].astype(x.dtype).reshape(-1, 1, 1, 1)
    rest = batch["one_minus_lam"].astype(x.dtype).reshape(-1, 1, 1, 1)
    kind = batch["mix_kind"].reshape(-1, 1, 1, 1)
    mixed = x * lam + xp * rest
    pasted = jnp.where(_box_mask(batch["box"], h, w)[..., None], xp, x)
    x = jnp.where(kind == reg.MIXUP, mixed, jnp.where(kind == reg.CUTMIX, pasted, x))
    return x, labels[partner], batch["lam"], batch["one_minus_lam"]
