"""One training step and the evaluation, in PyTorch (flax_impl.steps is the JAX counterpart).

Per step: forward and loss (label smoothing, MixUp/CutMix weights) under `torch.autocast` (fp16 +
GradScaler on CUDA by default, bf16 on
request), backward, SGD step. Nothing here waits for the GPU: the loss and the count of correct
predictions come back as device tensors, which the run driver reads at log intervals.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.recipe import Recipe
from torch_ref.augment import Targets
from torch_ref.distributed import Dist


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA unless the recipe says otherwise (seed 000's AMP), bf16 when asked."""
    if recipe.amp == "fp16" or (recipe.amp == "auto" and device.type == "cuda"):
        return torch.float16
    if recipe.amp == "bf16":
        return torch.bfloat16
    return None


def train_loss(logits: torch.Tensor, t: Targets, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy with torch's own label smoothing; under MixUp/CutMix
    lam * CE(y) + (1 - lam) * CE(y[partner]) (core.regularisers)."""
    return _mixed(*_cross_entropies(logits, t.y, t.partner_y, smoothing), t)


def _cross_entropies(logits, y, partner_y, smoothing):
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    other = (
        None if partner_y is None else F.cross_entropy(logits, partner_y, label_smoothing=smoothing)
    )
    return loss, other


def _mixed(loss, other, t: Targets):
    return loss if other is None else loss * t.lam + other * t.one_minus_lam


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """The loss is computed in float32 under mixed precision, in float64 for a float64 model."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _forward_and_losses(forward, amp_dtype, x, y, partner_y, smoothing):
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(x)
        return (logits, *_cross_entropies(_at_least_float32(logits), y, partner_y, smoothing))


def forward_and_loss(
    forward: nn.Module, amp_dtype, x: torch.Tensor, targets: Targets, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss)."""
    logits, loss, other = _forward_and_losses(
        forward, amp_dtype, x, targets.y, targets.partner_y, smoothing
    )
    return logits, _mixed(loss, other, targets)


def compiled_forward_and_loss(forward: nn.Module, amp_dtype, smoothing: float, backend: str):
    """forward_and_loss with the forward and the cross-entropies compiled for static shapes
    (`dynamic=False`; the backward with them, through AOTAutograd): one graph per batch shape, so
    the epoch's short last batch adds one graph instead of turning the batch dimension dynamic
    (torch's default, which then runs less specialised kernels for every batch). MixUp's weights,
    a new float each step, stay outside the graph (torch would guard on their values and
    recompile every step): the two cross-entropies come out, and are mixed as in eager mode."""

    @torch.compile(dynamic=False, backend=backend)
    def losses(x, y, partner_y):
        return _forward_and_losses(forward, amp_dtype, x, y, partner_y, smoothing)

    def run(x: torch.Tensor, targets: Targets):
        logits, loss, other = losses(x, targets.y, targets.partner_y)
        return logits, _mixed(loss, other, targets)

    return run


def train_step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype,
    x: torch.Tensor,
    targets: Targets,
    weight: float,
    smoothing: float = 0.0,
    micro: int = 0,
    forward_loss=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; (loss, correct) as device tensors. `weight` scales this process's
    loss before DDP averages gradients (see TorchBackend.train_step). Under mixing a prediction
    is correct when it names the label with the larger weight.

    `micro` > 0 (gradient accumulation): the rows go through in micro-batches of `micro` rows
    (a short last batch in as many as it fills), each backward adding its share (rows / all
    rows) of the mean loss's gradient, so the step is the whole batch's but for BatchNorm, whose
    statistics (and running buffers) are each micro-batch's; under DDP only the last backward
    all-reduces.

    `forward_loss(x, targets)` -> (logits, loss), when given, replaces forward_and_loss (the
    compiled one, `compile=true`). Nothing here reads a device value."""
    if forward_loss is None:

        def forward_loss(x, t):
            return forward_and_loss(forward, amp_dtype, x, t, smoothing)

    if micro and micro < x.shape[0]:
        return _accumulated_step(
            forward, optimizer, scaler, forward_loss, x, targets, weight, micro
        )
    logits, loss = forward_loss(x, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * weight if weight != 1 else loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == targets.dominant()).sum()


def _accumulated_step(forward, optimizer, scaler, forward_loss, x, targets, weight, micro):
    import contextlib

    n = x.shape[0]
    starts = range(0, n, micro)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for j, start in enumerate(starts):
        part = slice(start, min(start + micro, n))
        share = (part.stop - part.start) / n
        t = targets.rows(part)
        last = j == len(starts) - 1
        quiet = forward.no_sync() if hasattr(forward, "no_sync") and not last else None
        with quiet or contextlib.nullcontext():
            logits, loss = forward_loss(x[part], t)
            scaler.scale(loss * (share * weight)).backward()
        total = total + loss.detach() * share
        correct = correct + (logits.detach().argmax(1) == t.dominant()).sum()
    scaler.step(optimizer)
    scaler.update()
    return total, correct


@torch.no_grad()
def evaluate(
    model: nn.Module, batches, dist: Dist, amp_dtype, device, num_classes: int, between=None
) -> tuple:
    """(loss sum, correct, count, confusion) over the whole test split, summed over processes;
    confusion[true, predicted] counts images (int64, num_classes x num_classes). `between()`
    runs before each batch (the driver's stop check)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    pairs = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for x, y in batches:
        if between is not None:
            between()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        pred = logits.argmax(1)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (pred == y).sum()
        sums[2] += y.numel()
        # index_put_ rather than bincount, which waits for the GPU to size its output
        pairs.index_put_((y * num_classes + pred,), torch.ones_like(y), accumulate=True)
    # float64 carries integer counts exactly up to 2**53
    pairs = dist.all_sum(pairs.double()).round().long()
    return (*dist.all_sum(sums).tolist(), pairs.reshape(num_classes, num_classes).cpu().numpy())
