"""flax_impl checkpoints with Orbax's CheckpointManager.

    WORKDIR/checkpoints/last/<global step>/   the latest KEEP_LAST checkpoints (epoch ends, periodic
                                              saves and the one written when stopped)
    WORKDIR/checkpoints/best/<global step>/   the one with the best test accuracy so far

Each holds two items: ``state`` (the TrainState pytree: step, params, batch_stats, opt_state)
and ``meta`` (the run driver's JSON, core.driver: what run it belongs to, where to
resume, the best accuracy, the epoch's running sums). Orbax writes into a temporary folder and
renames it when complete, so a checkpoint cut short by a crash is never offered for restoring.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import orbax.checkpoint as ocp

from core import preemption
from core.errors import UnusableCheckpoint, UserError

KEEP_LAST = 2
FORMAT = "flax_impl/2"  # 2: TrainState without its unused rng


class Checkpoints:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def _manager(self, kind: str) -> ocp.CheckpointManager:
        if kind not in self._managers:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=KEEP_LAST if kind == "last" else 1,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            )
            self._managers[kind] = ocp.CheckpointManager(
                self.root / kind, options=options, item_names=("state", "meta")
            )
        return self._managers[kind]

    def save(self, step: int, state, meta: dict, best: bool) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        kinds = ("best", "last") if best else ("last",)  # best first: see flax_impl.train.run
        for kind in kinds:
            manager = self._manager(kind)
            manager.reload()  # a resume may have moved an unreadable step folder away
            if step in manager.all_steps():  # written before a crash; the redo is identical
                manager.delete(step)
            preemption.pause("write")  # tests: a signal lands as the write begins
            manager.save(step, args=args, force=True)

    def _restore(self, kind: str, step: int, template, check):
        where = self.root / kind / str(step)
        manager = self._manager(kind)

        def read(args):
            try:
                return manager.restore(step, args=args)
            except (OSError, MemoryError):
                raise  # the disk or the memory, not the checkpoint: never a reason to fall back
            except Exception as err:  # truncated files, foreign trees, wrong shapes
                first = str(err).split("See full TensorStore details")[0].strip()
                first = first.splitlines()[0][:200] if first else ""
                raise UnusableCheckpoint(
                    f"checkpoint {where} cannot be restored ({type(err).__name__}: {first})"
                ) from None

        # the small JSON item first: a checkpoint of another run is named as such, not as a
        # tree that fails to match
        meta = dict(read(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        check(meta, str(where))
        state = read(ocp.args.Composite(state=ocp.args.StandardRestore(template)))["state"]
        return state, meta, where

    def resume_candidates(self) -> list[str]:
        """Newest first: the complete `last` steps, then the best one."""
        found = []
        for kind in ("last", "best"):
            if (self.root / kind).is_dir():
                found += [
                    str(self.root / kind / str(step))
                    for step in sorted(self._manager(kind).all_steps(), reverse=True)
                ]
        return found

    def restore(self, template, where: str, check):
        """(state, meta) of the checkpoint folder `where` (root/kind/step); check(meta, where)
        runs before the arrays are read."""
        p = Path(where)
        state, meta, _ = self._restore(p.parent.name, int(p.name), template, check)
        return state, meta

    def for_eval(self, path: str | None) -> Path:
        """The step folder --eval-only reads: `path`, else the best one, else the last."""
        if path is not None:
            p = Path(path).absolute()
            if not p.is_dir() or not p.name.isdigit() or not any(p.iterdir()):
                raise UserError(
                    f"--checkpoint {path} is not a flax_impl checkpoint (an Orbax "
                    "step folder such as WORKDIR/checkpoints/best/1234) nor a "
                    "torch_ref .pt file; pass one of those"
                )
            return p
        for kind in ("best", "last"):
            if (self.root / kind).is_dir():
                step = self._manager(kind).latest_step()
                if step is not None:
                    return self.root / kind / str(step)
        raise UserError(f"no checkpoint in {self.root}; train first or pass --checkpoint")

    def close(self) -> None:
        for m in self._managers.values():
            m.wait_until_finished()
            m.close()
        self._managers.clear()


def exit_with(code: int):
    """The end of a flax_impl command: after an error, skip the interpreter's teardown, where
    Orbax/TensorStore threads print tracebacks about a closed event loop (nothing is pending:
    saves are synchronous)."""
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def quiet_closed_loop_errors() -> None:
    """After a failed Orbax restore, TensorStore callbacks may still fire into Orbax's closed
    asyncio loop from other threads and print "Event loop is closed" tracebacks; they carry no
    information (the failure was already reported in one line). Drop exactly those."""

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    # Orbax logs a failure (a full disk in a writer thread, an unreadable metadata file) with
    # its traceback and then raises it to the caller, where the command reports it in one line
    # (or, resuming, falls back to an earlier checkpoint): drop Orbax's own error records
    logging.getLogger("absl").addFilter(
        lambda record: (
            not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)
        )
    )
    # and a second failing write of the same save surfaces as an unretrieved asyncio task
    logging.getLogger("asyncio").addFilter(
        lambda record: (
            not (
                "Task exception was never retrieved" in record.getMessage()
                and "orbax" in str(record.__dict__.get("future", "")) + record.getMessage()
            )
        )
    )
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda a: None if closed_loop(a.exc_value) else thread_hook(a)
    sys.unraisablehook = lambda a: None if closed_loop(a.exc_value) else unraisable_hook(a)
