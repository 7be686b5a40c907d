"""LR range test with PyTorch: ``python -m torch_ref.lr_find --recipe NAME [flags] [k=v ...]``.

The test itself (schedule, smoothing, stopping, suggestion, files) is
`core.lr_find`; this is torch's backend for it, the trainer's own with the range
test's rates in place of the recipe's schedule.
"""

from __future__ import annotations

if __name__ == "__main__":  # a stop request while the libraries load ends it with one line
    from core import preemption as _early

    _early.install_early()

import sys

import configs
from core import lr_find
from torch_ref.train import TorchBackend

PROG = "python -m torch_ref.lr_find"


def factory(recipe, device: str = "auto"):
    """make(checkpoint_dir, train, tables) -> TorchBackend on `device`."""
    return lambda ckpt_dir, train, tables: TorchBackend(recipe, ckpt_dir, device, train, tables)


def main(argv: list[str] | None = None) -> int:
    return lr_find.main(argv, PROG, "torch_ref", configs, factory)


if __name__ == "__main__":
    sys.exit(main())
