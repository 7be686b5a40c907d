"""torch_ref checkpoints: one file holds the run's arrays and what the driver says about the run.

A checkpoint is a dict saved with `torch.save` and read back with ``weights_only=True`` (no pickled
code): the driver's meta (core.driver: the run's identity, where to resume, the best
accuracy, the epoch's sums), the model's state_dict (never the DDP wrapper's), and the optimizer,
scheduler and GradScaler states. Writes are atomic (`core.files.atomic_write`): a
crash leaves the previous file intact.

    WORKDIR/checkpoints/last.pt       the latest (epoch ends, periodic saves, the one written on
    stop)
    WORKDIR/checkpoints/previous.pt   the `last` before it: resuming falls back to it when last.pt
                                      cannot be read
    WORKDIR/checkpoints/best.pt       the one with the best test accuracy so far
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from core.errors import UnusableCheckpoint, UserError
from core.files import atomic_write, fsync_dir

FORMAT = "torch_ref/1"
LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"


def save(path: Path, state: dict) -> None:
    """Serialise in memory, then write: torch's zip writer reports a full disk as an unrelated
    RuntimeError, a plain write as the OSError (ENOSPC) it is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def save_last(folder: Path, state: dict) -> None:
    """Write last.pt, keeping the one it replaces as previous.pt. The new file is complete
    before either rename, so a crash or a full disk leaves last.pt (or, between the two
    renames, previous.pt) holding the latest complete state."""
    last, previous, staged = folder / LAST, folder / PREVIOUS, folder / "last.pt.new"
    save(staged, state)  # a staged file older than this one (a crash's) is replaced here
    if last.exists():
        os.replace(last, previous)
    os.replace(staged, last)
    fsync_dir(folder)


def resume_candidates(folder: Path) -> list[Path]:
    """Newest first (those that exist): a staged last a crash left before its renames, last,
    previous, best."""
    return [folder / n for n in ("last.pt.new", LAST, PREVIOUS, BEST) if (folder / n).exists()]


def remove_partial_writes(folder: Path) -> int:
    """Delete temporary files a killed process left behind (never a complete checkpoint)."""
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint; UnusableCheckpoint if it is truncated, corrupt or not ours."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}; train first or pass --checkpoint") from None
    except IsADirectoryError:
        raise UserError(
            f"{path} is a folder, not a torch_ref checkpoint file such as "
            "WORKDIR/checkpoints/best.pt"
        ) from None
    except (OSError, MemoryError, torch.OutOfMemoryError):
        raise  # the disk or the memory, not the file: never a reason to fall back
    except Exception as err:  # truncated zip, bad pickle, foreign content
        raise UnusableCheckpoint(
            f"checkpoint {path} is truncated, corrupt or not a torch_ref "
            f"checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UnusableCheckpoint(f"{path} is not a {FORMAT} checkpoint")
    return state


def default_for_eval(folder: Path) -> Path:
    """The best checkpoint of a run, else its last."""
    return folder / BEST if (folder / BEST).exists() else folder / LAST
