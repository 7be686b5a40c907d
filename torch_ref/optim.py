"""The optimizer and schedules for torch_ref: torch's own classes, called as the seeds call them.

`flax_impl.optim` builds the same optimizer from optax and reads the same schedules as tables
(`core.schedules`); the parity tests prove the two equal step for step.
"""

from __future__ import annotations

import torch

from core.recipe import Recipe, world_lr
from core.schedules import decay_groups_differ, stepped_per_epoch, weight_decay_of

NORMS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LocalResponseNorm,
)


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list:
    """The parameters, or, where some decay at another rate (`norm_weight_decay`,
    `bias_weight_decay`), torchvision's groups: "other", "norm", then "bias", each parameter in
    module order, empty groups left out. The rule itself is `core.schedules.weight_decay_of`."""
    if not decay_groups_differ(recipe):
        return list(model.parameters())  # one group: the layout every earlier checkpoint has
    groups = {"other": [], "norm": [], "bias": []}
    for module in model.modules():
        in_norm = isinstance(module, NORMS)
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" and recipe.bias_weight_decay is not None:
                groups["bias"].append(p)
            elif in_norm and recipe.norm_weight_decay is not None:
                groups["norm"].append(p)
            else:
                groups["other"].append(p)
    rate = {"other": recipe.weight_decay}
    rate["norm"] = weight_decay_of(recipe, True, "weight")
    rate["bias"] = recipe.bias_weight_decay
    return [{"params": ps, "weight_decay": rate[k]} for k, ps in groups.items() if ps]


def fused(recipe: Recipe, device: torch.device) -> bool:
    """Whether SGD runs fused (`fused_optimizer`; auto = on CUDA). Fused, one kernel updates every
    parameter and GradScaler hands it the scale and the overflow flag on the device, so an fp16
    step never waits for the GPU (unfused, GradScaler reads the flag with `.item()` each step).
    Off on a CPU by default: there the fused kernel rounds a few float32 updates differently
    (1 ulp) from the loop every parity number and checkpoint digest was measured with."""
    if recipe.fused_optimizer == "auto":
        return device.type == "cuda"
    return recipe.fused_optimizer == "on"


def make_optimizer(model: torch.nn.Module, recipe: Recipe, world_size: int) -> torch.optim.SGD:
    """torch.optim.SGD with coupled weight decay (per parameter group), at the scaled peak rate,
    fused where `fused` says so."""
    device = next(model.parameters()).device
    return torch.optim.SGD(
        param_groups(model, recipe),
        lr=world_lr(recipe, world_size),
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
        fused=fused(recipe, device) or None,
    )


def load_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict(state), keeping how this optimizer runs (fused or not, foreach):
    torch would take those from the checkpoint, which may have been written on another device
    (or before `fused_optimizer` existed)."""
    how = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, keep in zip(opt.param_groups, how, strict=True):
        group.update(keep)


def make_scheduler(
    opt: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int, world_size: int
):
    """torch's CosineAnnealingLR (stepped per epoch or per step; after torchvision's LinearLR
    warm-up through SequentialLR when `warmup_epochs` > 0) or OneCycleLR (stepped per step)."""
    sched = torch.optim.lr_scheduler
    if recipe.schedule in ("cosine_per_epoch", "cosine_per_step"):
        unit = 1 if recipe.schedule == "cosine_per_epoch" else steps_per_epoch
        total, warm = recipe.epochs * unit, recipe.warmup_epochs * unit
        if not warm:
            return sched.CosineAnnealingLR(opt, T_max=total)
        return sched.SequentialLR(
            opt,
            [
                sched.LinearLR(opt, start_factor=recipe.warmup_decay, total_iters=warm),
                sched.CosineAnnealingLR(opt, T_max=total - warm),
            ],
            milestones=[warm],
        )
    return sched.OneCycleLR(
        opt,
        max_lr=world_lr(recipe, world_size),
        epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=recipe.onecycle_pct_start,
        anneal_strategy=recipe.onecycle_anneal,
        cycle_momentum=True,
        base_momentum=recipe.onecycle_base_momentum,
        max_momentum=recipe.onecycle_max_momentum,
        div_factor=recipe.onecycle_div_factor,
        final_div_factor=recipe.onecycle_final_div_factor,
    )


class TableScheduler:
    """Sets the rate and momentum of step t from tables (float64, as computed in
    core): the LR range test's schedule. Stepped after each optimizer step; past the
    end of the tables it keeps their last values."""

    def __init__(self, opt: torch.optim.Optimizer, lr, momentum):
        self.opt, self.lr, self.momentum = opt, list(map(float, lr)), list(map(float, momentum))
        self.count = 0
        self._apply()

    def _apply(self) -> None:
        k = min(self.count, len(self.lr) - 1)
        for group in self.opt.param_groups:
            group["lr"] = self.lr[k]
            if "momentum" in group:
                group["momentum"] = self.momentum[k]

    def step(self) -> None:
        self.count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self._apply()


def for_recipe(
    model: torch.nn.Module, recipe: Recipe, steps_per_epoch: int, world_size: int, tables=None
):
    """(optimizer, scheduler, when) for a recipe; `when` is "epoch" or "step": call
    scheduler.step() after each epoch's evaluation, or after each optimizer step. `tables`
    (lr per step, momentum per step) replace the recipe's schedule (the LR range test)."""
    opt = make_optimizer(model, recipe, world_size)
    if tables is not None:
        return opt, TableScheduler(opt, *tables), "step"
    sched = make_scheduler(opt, recipe, steps_per_epoch, world_size)
    return opt, sched, "epoch" if stepped_per_epoch(recipe) else "step"
