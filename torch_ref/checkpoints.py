"""torch_ref checkpoints: one file holds the run's arrays and what the driver says about the run.

A checkpoint is a dict saved with `torch.save` and read back with ``weights_only=True`` (no pickled
code): the driver's meta (framework_free.driver: the run's identity, where to resume, the best
accuracy, the epoch's sums), the model's state_dict (never the DDP wrapper's), and the optimizer,
scheduler and GradScaler states. Writes are atomic (`framework_free.records.atomic_write`): a
crash leaves the previous file intact.

    WORKDIR/checkpoints/last.pt   the latest (epoch ends, periodic saves, the one written on stop)
    WORKDIR/checkpoints/best.pt   the one with the best test accuracy so far
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework_free.errors import UserError
from framework_free.records import atomic_write

FORMAT = "torch_ref/1"
LAST, BEST = "last.pt", "best.pt"


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda fh: torch.save(state, fh))


def remove_partial_writes(folder: Path) -> int:
    """Delete temporary files a killed process left behind (never a complete checkpoint)."""
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint; UserError (naming the fix) if it is truncated, corrupt or not ours."""
    fix = f"delete {path} to start over, or pass another --workdir"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}; train first or pass --checkpoint") from None
    except Exception as err:  # truncated zip, bad pickle, foreign content
        raise UserError(f"checkpoint {path} is truncated, corrupt or not a torch_ref checkpoint "
                        f"({type(err).__name__}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} checkpoint; {fix}")
    return state


def default_for_eval(folder: Path) -> Path:
    """The best checkpoint of a run, else its last."""
    return folder / BEST if (folder / BEST).exists() else folder / LAST
