"""The model EMA, as torchvision's reference keeps it, without a host sync per update.

torch's `AveragedModel` keeps its count `n_averaged` on the host (a buffer made without a
device) and, on every update, copies it to the device of each group of parameters it averages
(float32, then int64 for BatchNorm's step count): on a GPU each copy is a blocking transfer that
waits for the steps queued before it. The EMA function torchvision uses (`get_ema_multi_avg_fn`)
never reads that count. `EMA` is the same class with the same state (`n_averaged`, `module.*`),
whose update passes the count as it is and decides "first update: copy" from a host-side mirror;
the averaging itself is torch's, called as torch calls it (its grouping by device and dtype, the
lerp), so the numbers are the same bits.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype


class EMA(AveragedModel):
    """AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) with a
    host mirror of `n_averaged`, read from the device once per load."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.count = 0  # == int(self.n_averaged), kept on the host

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        mine = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.count == 0:
            for averaged, current in zip(mine, theirs, strict=True):
                averaged.copy_(current)
        else:
            groups = _group_tensors_by_device_and_dtype([mine, theirs])
            for (averaged, current), _ in groups.values():
                self.multi_avg_fn(averaged, current, self.n_averaged)
        self.n_averaged += 1
        self.count += 1

    def restart(self) -> None:
        """Count from zero: the next update copies the model (torchvision's warm-up epochs)."""
        self.n_averaged.fill_(0)
        self.count = 0

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.count = int(self.n_averaged)
        return result
