"""Batched augmentation on uint8 tensors: crop with zero padding, flip, colour jitter, normalise.

The whole batch is transformed at once with tensor ops on whatever device holds the data; the
random choices come from `core.sampling.augment_params`. The crop and flip reproduce
torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` pixel for pixel given the
same
offsets; colour jitter follows torchvision's tensor implementation of ``ColorJitter`` (brightness,
contrast and saturation blends in a per-image random order, clamped to [0, 1]).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from core import regularisers as reg
from core.sampling import AugmentParams

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def crop_flip(
    images: torch.Tensor, pad: int, crop_y: torch.Tensor, crop_x: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Random-crop (after zero padding by `pad`) and mirror a uint8 NHWC batch; same size out."""
    b, h, w, _ = images.shape
    if pad:
        images = F.pad(images, (0, 0, pad, pad, pad, pad))  # pads W then H of an NHWC tensor
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = crop_y[:, None] + ar_h  # (B, h)
    cols = crop_x[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (B, w)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter(brightness, contrast, saturation) on a float NCHW batch in [0, 1].

    factors: (B, 3) blend factors; order: (B, 3) permutation of (0=brightness, 1=contrast,
    2=saturation) per image.
    """
    # Each of torchvision's three adjustments is a blend f * x + (1 - f) * other, clamped to
    # [0, 1]: brightness with other = 0, contrast with the mean of the grey image, saturation with
    # the grey image. Choosing `other` per image and blending once costs a third of blending three
    # ways and selecting, with the same numbers (f * x + (1 - f) * 0.0 is exactly f * x).
    grey_input = x.shape[1] == 1
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, position : position + 1]).view(-1, 1, 1, 1).to(x.dtype)
        grey = _gray(x)
        other = torch.where(
            op == 0, 0.0, torch.where(op == 1, grey.mean(dim=(1, 2, 3), keepdim=True), grey)
        )
        blended = (f * x + (1 - f) * other).clamp_(0, 1)
        # torchvision leaves a one-channel image's saturation alone
        x = torch.where(op == 2, x, blended) if grey_input else blended
    return x


def to_float_normalized(
    images_nhwc: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    channels_last: bool,
    params: AugmentParams | None = None,
    jitter: bool = False,
    dtype=torch.float32,
) -> torch.Tensor:
    """uint8 NHWC -> float NCHW (float32, or `dtype` for float64 proofs) in the model's memory
    format, jittered if asked, normalised."""
    x = images_nhwc.permute(0, 3, 1, 2).to(dtype).div_(255.0)  # channels_last strides for free
    mean, std = mean.to(dtype), std.to(dtype)
    if jitter and params is not None:
        factors = torch.as_tensor(params.jitter, device=x.device)
        order = torch.as_tensor(params.jitter_order, device=x.device)
        x = color_jitter(x, factors, order)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


class Targets(NamedTuple):
    """What the loss needs: labels, and under MixUp/CutMix the partners' labels and the weights
    (1.0 and 0.0 without mixing). lam and 1 - lam are float64 host numbers from the draws."""

    y: torch.Tensor
    partner_y: torch.Tensor | None = None
    lam: float = 1.0
    one_minus_lam: float = 0.0

    def numel(self) -> int:
        return self.y.numel()

    def rows(self, part: slice) -> "Targets":
        """These targets for rows `part` of the batch (a micro-batch)."""
        partner = None if self.partner_y is None else self.partner_y[part]
        return Targets(self.y[part], partner, self.lam, self.one_minus_lam)

    def dominant(self) -> torch.Tensor:
        """The label with the larger weight: what train accuracy counts."""
        return self.y if self.partner_y is None or self.lam >= 0.5 else self.partner_y


def _box_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(..., 4) boxes y0, y1, x0, x1 -> (..., h, w) bool, True inside."""
    rows = torch.arange(h, device=box.device)
    cols = torch.arange(w, device=box.device)
    inside_r = (rows >= box[..., 0:1]) & (rows < box[..., 1:2])
    inside_c = (cols >= box[..., 2:3]) & (cols < box[..., 3:4])
    return inside_r[..., :, None] & inside_c[..., None, :]


def regularise(x: torch.Tensor, y: torch.Tensor, d: reg.Draws | None) -> tuple:
    """Cutout and Random Erasing, then MixUp or CutMix, on a normalised float NCHW batch (any
    memory format), with this process's draws (core.regularisers). Returns (x, Targets)."""
    if d is None:
        return x, Targets(y)
    _, _, h, w = x.shape
    if d.holes.shape[1]:
        holes = torch.from_numpy(d.holes).to(x.device)
        cut = _box_mask(holes, h, w).any(1)  # (B, h, w)
        x = x * (~cut)[:, None].to(x.dtype)  # seed 002: img * mask
    if d.erase is not None:  # Random Erasing: torchvision writes the value 0 into the box
        erased = _box_mask(torch.from_numpy(d.erase).to(x.device), h, w)  # (B, h, w)
        x = torch.where(erased[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
    if d.kind == reg.NONE:
        return x, Targets(y)
    partner = torch.from_numpy(d.partner).to(x.device, torch.long)
    xp = x[partner]
    if d.kind == reg.MIXUP:
        x = x * d.lam + xp * d.one_minus_lam
    else:
        inside = _box_mask(torch.from_numpy(d.box).to(x.device), h, w)
        x = torch.where(inside, xp, x)
    return x, Targets(y, y[partner], d.lam, d.one_minus_lam)
