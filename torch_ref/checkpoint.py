"""torch_ref checkpoints: one file holds everything that shapes the rest of the run.

A checkpoint is a dict saved with `torch.save` and read back with ``weights_only=True`` (no pickled
code): the model's state_dict (never the DDP wrapper's), optimizer, scheduler, GradScaler, the
torch RNG states, where to resume (epoch and step within it), the best accuracy so far, and what
run it belongs to (framework, recipe, model, the resolved config). Writes are atomic
(`framework_free.records.atomic_write`): a crash leaves the previous file intact.
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


def check_matches(state: dict, recipe, path: Path) -> None:
    """Refuse a checkpoint of another recipe or architecture."""
    want = (recipe.recipe, recipe.model, recipe.num_classes, recipe.in_channels)
    have = (state.get("recipe"), state.get("model"), state.get("num_classes"),
            state.get("in_channels"))
    if want != have:
        raise UserError(f"checkpoint {path} is for recipe/model/classes/channels {have}, this run "
                        f"is {want}; pass the matching --recipe or another --workdir")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
