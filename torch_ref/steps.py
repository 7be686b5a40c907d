"""One training step and the evaluation, in PyTorch (flax_impl.steps is the JAX counterpart).

Per step: forward and loss under `torch.autocast` (fp16 + GradScaler on CUDA by default, bf16 on
request), backward, SGD step. Nothing here waits for the GPU: the loss and the count of correct
predictions come back as device tensors, which the run driver reads at log intervals.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework_free.recipe import Recipe
from torch_ref.distributed import Dist


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA unless the recipe says otherwise (seed 000's AMP), bf16 when asked."""
    if recipe.amp == "fp16" or (recipe.amp == "auto" and device.type == "cuda"):
        return torch.float16
    if recipe.amp == "bf16":
        return torch.bfloat16
    return None


def train_step(forward: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp_dtype, x: torch.Tensor, y: torch.Tensor,
               weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; (loss, correct) as device tensors. `weight` scales this process's
    loss before DDP averages gradients (see TorchBackend.train_step)."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * weight if weight != 1 else loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, batches, dist: Dist, amp_dtype, device) -> tuple:
    """(loss sum, correct, count) over the whole test split, summed over processes."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    return tuple(dist.all_sum(sums).tolist())
