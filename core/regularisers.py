"""Seed 002's regularisers, drawn once for both stacks: Cutout, MixUp, CutMix, label smoothing.

Every random number comes from (seed, epoch, step) through `draw`, on a stream of its own, so a
resumed run draws the same ones and a recipe without these regularisers draws exactly what it drew
before they existed. The stacks apply the draws to the normalised float batch on the device
(torch_ref.augment.regularise, flax_impl.augment.regularise) and weight the loss by `lam`:

- **Cutout** (`cutout_holes`, `cutout_length`): each hole is a square of side `length` whose
  centre pixel (y, x) is uniform over the image; rows ``y - length // 2`` up to (not including)
  ``y - length // 2 + length``, clipped at the border, and the same for columns. The normalised
  image is zeroed there. For an even length this is seed 002's ``CutOut`` loop exactly; for an odd
  length seed 002's squares are one pixel short (``y + length // 2`` as the end), these are not.
- **MixUp** (`mixup_alpha`): one ``lam ~ Beta(alpha, alpha)`` per batch; each row is mixed with a
  partner row, ``lam * x + (1 - lam) * x[partner]``, and the loss is
  ``lam * CE(y) + (1 - lam) * CE(y[partner])`` (seed 002's ``mixup_data``).
- **CutMix** (`cutmix_alpha`): ``lam ~ Beta(alpha, alpha)``, a box centred on a uniform pixel with
  half-sides ``int(0.5 * sqrt(1 - lam) * W)`` and ``... * H``, clipped at the border, is pasted
  from the partner; ``lam`` becomes the share of the image that stayed, ``1 - box area / (H W)``
  (the box actually pasted after clipping; Yun et al., as torchvision.transforms.v2.CutMix).
- With both on, each batch uses CutMix with probability `mix_switch_prob`, else MixUp (timm's
  switch_prob); with one on, every batch uses it.
- **Random Erasing** (`random_erasing` = probability p): torchvision's ``RandomErasing(p)`` as
  its classification recipe uses it, scale (0.02, 0.33), ratio (0.3, 3.3), value 0: with
  probability p, up to ten tries of an area share uniform in scale and a log-uniform aspect
  ratio, ``h = round(sqrt(area * ratio))``, ``w = round(sqrt(area / ratio))``; the first that
  fits strictly inside the image is placed uniformly and set to 0 on the normalised image
  (the value itself, not a product: 0.0 where torchvision writes 0.0); none fits: unchanged. On
  its own stream, drawn per image in the global batch's order.
- **Label smoothing** (`label_smoothing`): the targets of
  ``torch.nn.functional.cross_entropy(label_smoothing=eps)``, ``(1 - eps) * onehot + eps / K``,
  in both CE terms. Evaluation never smooths, mixes or cuts.

Partners: each row's partner is drawn by a random permutation *within its replica's share* of the
global batch (a DDP process in torch_ref, a device's rows in flax_impl on GPUs, the whole batch on
one CPU process), so mixing never needs another process's images and the same seed mixes the same
pairs in both stacks and at any process count with the same replicas. A permutation may pair a row
with itself, as seed 002's ``randperm`` does.

Train accuracy under mixing counts a prediction as right when it names the label with the larger
weight: ``y`` when ``lam >= 0.5``, else ``y[partner]``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from core.recipe import Recipe
from core.shares import group_bounds

_REGULARISE = 0xB1E  # stream tag, apart from sampling's order/augment/image streams
_ERASE = 0xE2A5E  # Random Erasing's own stream: recipes without it draw what they drew before
ERASE_SCALE, ERASE_RATIO, ERASE_TRIES = (0.02, 0.33), (0.3, 3.3), 10  # torchvision's defaults

NONE, MIXUP, CUTMIX = 0, 1, 2


def enabled(r: Recipe) -> bool:
    """Whether a recipe trains with any of Cutout, MixUp, CutMix or Random Erasing (label
    smoothing needs no draws)."""
    return bool(r.cutout_holes or r.mixup_alpha or r.cutmix_alpha or r.random_erasing)


@dataclasses.dataclass(frozen=True)
class Draws:
    """One step's draws for the global batch (rows in global-batch order)."""

    holes: np.ndarray  # (B, holes, 4) int32: y0, y1, x0, x1 of each Cutout square, clipped
    kind: int  # NONE | MIXUP | CUTMIX
    lam: float  # weight of each row's own label (CutMix: after clipping); 1.0 when NONE
    box: np.ndarray  # (4,) int32: y0, y1, x0, x1 of CutMix's box; zeros otherwise
    partner: np.ndarray  # (B,) int32: the global-batch row each row is mixed with
    erase: np.ndarray | None = None  # (B, 4) int32: y0, y1, x0, x1 of Random Erasing; 0s: none

    @property
    def one_minus_lam(self) -> float:
        """1 - lam, in float64 on the host: both stacks multiply by this same number."""
        return 1.0 - self.lam

    def local(self, start: int, stop: int) -> "Draws":
        """A process's rows [start, stop): partners become local rows (they lie inside)."""
        partner = self.partner[start:stop] - start
        if len(partner) and (partner.min() < 0 or partner.max() >= stop - start):
            raise ValueError("a partner outside the share: the share is not a replica's")
        erase = None if self.erase is None else self.erase[start:stop]
        return dataclasses.replace(self, holes=self.holes[start:stop], partner=partner, erase=erase)


def cutout_boxes(cy: np.ndarray, cx: np.ndarray, length: int, h: int, w: int) -> np.ndarray:
    """(B, holes) centre rows and columns -> (B, holes, 4) squares y0, y1, x0, x1, clipped."""
    y0, x0 = cy - length // 2, cx - length // 2
    return np.stack(
        [
            np.clip(y0, 0, h),
            np.clip(y0 + length, 0, h),
            np.clip(x0, 0, w),
            np.clip(x0 + length, 0, w),
        ],
        axis=-1,
    ).astype(np.int32)


def cutmix_box(lam: float, cy: int, cx: int, h: int, w: int) -> tuple[np.ndarray, float]:
    """torchvision's CutMix box for `lam` and centre (cy, cx), and lam after clipping."""
    r = 0.5 * math.sqrt(1.0 - lam)
    rh, rw = int(r * h), int(r * w)
    y0, y1 = max(cy - rh, 0), min(cy + rh, h)
    x0, x1 = max(cx - rw, 0), min(cx + rw, w)
    return (np.array([y0, y1, x0, x1], np.int32), float(1.0 - (x1 - x0) * (y1 - y0) / (w * h)))


def erase_box(rng: np.random.Generator, p: float, h: int, w: int) -> np.ndarray:
    """One image's Random Erasing box (y0, y1, x0, x1), all zeros when it is left alone: a
    coin with chance p, then torchvision's RandomErasing.get_params on an h x w image."""
    if not rng.random() < p:
        return np.zeros(4, np.int32)
    area = h * w
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(ERASE_TRIES):
        erase_area = area * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh = int(round(math.sqrt(erase_area * aspect)))
        ew = int(round(math.sqrt(erase_area / aspect)))
        if eh < h and ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            return np.array([top, top + eh, left, left + ew], np.int32)
    return np.zeros(4, np.int32)


def draw(r: Recipe, epoch: int, step: int, batch: int, groups: int, h: int, w: int) -> Draws:
    """The regularisers' draws of one global batch of `batch` rows split over `groups` replicas,
    for images of h x w pixels. Fixed order: holes, then the mix choice, lam, CutMix's centre,
    then one permutation per replica."""
    rng = np.random.default_rng([r.seed, _REGULARISE, epoch, step])
    if r.cutout_holes:
        cy = rng.integers(0, h, size=(batch, r.cutout_holes))
        cx = rng.integers(0, w, size=(batch, r.cutout_holes))
        holes = cutout_boxes(cy, cx, r.cutout_length, h, w)
    else:
        holes = np.zeros((batch, 0, 4), np.int32)
    if r.mixup_alpha and r.cutmix_alpha:
        kind = CUTMIX if rng.random() < r.mix_switch_prob else MIXUP
    else:
        kind = MIXUP if r.mixup_alpha else CUTMIX if r.cutmix_alpha else NONE
    box = np.zeros(4, np.int32)
    lam = 1.0
    if kind == MIXUP:
        lam = float(rng.beta(r.mixup_alpha, r.mixup_alpha))
    elif kind == CUTMIX:
        lam = float(rng.beta(r.cutmix_alpha, r.cutmix_alpha))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        box, lam = cutmix_box(lam, cy, cx, h, w)
    partner = np.arange(batch, dtype=np.int32)
    if kind != NONE:
        for start, stop in group_bounds(batch, groups):
            partner[start:stop] = start + rng.permutation(stop - start)
    erase = None
    if r.random_erasing:
        er = np.random.default_rng([r.seed, _ERASE, epoch, step])
        erase = np.stack([erase_box(er, r.random_erasing, h, w) for _ in range(batch)])
    return Draws(holes, kind, lam, box, partner, erase)
