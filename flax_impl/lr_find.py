"""LR range test with JAX/Flax: ``python -m flax_impl.lr_find --recipe NAME [flags] [k=v ...]``.

The test itself (schedule, smoothing, stopping, suggestion, files) is
`core.lr_find`; this is JAX's backend for it, the trainer's own with the range test's
rates in place of the recipe's schedule (float32 tables, as in training).
"""

from __future__ import annotations

if __name__ == "__main__":  # a stop request while the libraries load ends it with one line
    from core import preemption as _early
    from flax_impl import cpu_setup as _cpu

    _early.install_early()
    _cpu.configure()  # XLA:CPU's options, before anything below starts JAX

import configs
from flax_impl import checkpoints
from flax_impl.train import FlaxBackend, pick_devices
from core import lr_find

PROG = "python -m flax_impl.lr_find"


def factory(recipe, device: str = "auto"):
    """make(checkpoint_dir, train, tables) -> FlaxBackend on the devices `device` picks."""
    devices = pick_devices(device)
    return lambda ckpt_dir, train, tables: FlaxBackend(recipe, ckpt_dir, devices, train, tables)


def main(argv: list[str] | None = None) -> int:
    checkpoints.quiet_closed_loop_errors()
    return lr_find.main(argv, PROG, "flax_impl", configs, factory)


if __name__ == "__main__":
    checkpoints.exit_with(main())
