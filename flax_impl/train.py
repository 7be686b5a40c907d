"""Train a recipe with JAX/Flax: ``python -m flax_impl.train --recipe NAME [--workdir DIR] [k=v ...]``.

The same command line, console output and workdir record as torch_ref (framework_free.cli,
console, records); `train_and_evaluate(recipe, workdir)` does the work. One process drives every
local device: the train step is jitted once over a `Mesh` of all devices, the state replicated and
each global batch split over the mesh (BatchNorm statistics are therefore over the global batch).
Several hosts: call `jax.distributed.initialize()` first (see README); each process then feeds its
rows of every global batch.

`batch_size` means what it means for torch_ref: per accelerator (per GPU), so the global batch is
batch_size x the number of GPUs/TPUs; on CPUs it is batch_size per process, split over however many
CPU devices there are. Mixed precision is bf16 compute with float32 parameters (``amp=bf16``, the
default on GPU/TPU); there is no fp16 loss scaling here.

Checkpoints are Orbax's: ``WORKDIR/checkpoints/last/<step>`` (the latest `KEEP_LAST` kept) and
``WORKDIR/checkpoints/best/<step>``; a rerun resumes from the latest, exactly.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_impl import checkpoints, data, optim, steps
from flax_impl.models import build_model
from framework_free import cli, console, schedules
from framework_free.errors import CorruptData, UserError, report
from framework_free.loop import EpochLoop
from framework_free.preemption import EXIT_PREEMPTED, Preempted, StopOnSignal
from framework_free.recipe import Recipe
from framework_free.records import RunRecord

STACK = "flax_impl"
PROG = "python -m flax_impl.train"


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def compute_dtype(recipe: Recipe, platform: str):
    if recipe.amp == "fp16":
        raise UserError("flax_impl has no fp16 loss scaling; use amp=bf16 (bf16 compute, "
                        "float32 parameters) or amp=off")
    if recipe.amp == "bf16" or (recipe.amp == "auto" and platform != "cpu"):
        return jnp.bfloat16
    return jnp.float32


def replicas(devices) -> int:
    """Data-parallel replicas in torch_ref's sense: accelerators, or processes on CPU."""
    return len(devices) if devices[0].platform != "cpu" else jax.process_count()


def aug_config(recipe: Recipe) -> dict:
    return {"pad": recipe.crop_padding, "mean": tuple(recipe.mean), "std": tuple(recipe.std)}


def _libraries() -> dict:
    import flax
    import optax
    import orbax.checkpoint as ocp

    return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
            else jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax-checkpoint": getattr(ocp, "__version__", "unknown"), "numpy": np.__version__}


def _device_name(devices) -> str:
    d = devices[0]
    return f"{len(devices)} x {getattr(d, 'device_kind', d.platform)} ({d.platform})"


class Trainer(EpochLoop):
    """The state of one run and the loop over it. `run()` trains to the end or raises."""

    def __init__(self, recipe: Recipe, workdir: str | Path, devices=None):
        self.recipe = recipe
        self.devices = list(devices or jax.devices())
        self.is_main = jax.process_index() == 0
        self.dtype = compute_dtype(recipe, self.devices[0].platform)
        self.replicas = replicas(self.devices)
        self.global_batch = recipe.batch_size * self.replicas
        eval_batch = recipe.eval_batch_size * self.replicas
        for name, size in (("batch_size", self.global_batch), ("eval_batch_size", eval_batch)):
            if size % len(self.devices):
                raise UserError(f"a global batch of {size} does not split over "
                                f"{len(self.devices)} devices; make {name} a multiple of "
                                f"{len(self.devices)}")
        self.record = RunRecord(workdir, STACK, recipe, self.is_main)
        self.resuming = self.record.check()
        where = (jax.process_index(), jax.process_count())
        self.train_batches = data.build_train(recipe, self.global_batch, *where)
        self.eval_batches = data.build_eval(recipe, eval_batch, *where)
        self.steps_per_epoch = self.train_batches.steps
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.train_batches.num_examples} training images make no full "
                            f"batch of {self.global_batch}; lower batch_size or set "
                            "drop_last=false")
        self.model = build_model(recipe, self.dtype)
        self.tx, _, _ = optim.for_recipe(recipe, self.steps_per_epoch, self.replicas)
        self.lr_table, _ = schedules.for_recipe(recipe, self.steps_per_epoch, self.replicas)
        self.mesh = steps.make_mesh(self.devices)
        self.steps = steps.Steps(self.model, self.tx, aug_config(recipe), self.mesh, self.dtype)
        shape = (recipe.image_size, recipe.image_size, recipe.in_channels)
        state = steps.create_state(self.model, self.tx, jax.random.PRNGKey(recipe.seed), shape)
        self.state = self.steps.replicate(state)
        self.train_source = self._source(self.train_batches)
        self.eval_source = self._source(self.eval_batches)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc = -1.0
        self.epoch_sums = np.zeros(3)  # loss sum, correct, count of this epoch so far
        self.window = np.zeros(2)  # loss sum and count since the last log line
        self.stop_requested = False
        self._pending: list = []  # metrics of steps not yet fetched from the devices
        self.stop_after_step: int | None = None
        self.ckpt = checkpoints.Checkpoints(self.record.checkpoint_dir, recipe)
        if self.resuming:
            self._restore()
        self.record.start(_libraries(), _device_name(self.devices))
        self.record.rewind(self.global_step)

    def _source(self, batches):
        if batches.arrays is None:
            return None
        return self.steps.replicate(batches.arrays)

    # --- checkpoints -------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "best_acc": self.best_acc,
                "epoch_sums": self.epoch_sums.tolist(), "window": self.window.tolist()}

    def _restore(self) -> None:
        found = self.ckpt.restore_latest(self.state)
        if found is None:
            return
        self.state, meta, path = found
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.global_step, self.best_acc = meta["global_step"], meta["best_acc"]
        self.epoch_sums = np.asarray(meta["epoch_sums"], np.float64)
        self.window = np.asarray(meta["window"], np.float64)
        if self.is_main:
            console.say(f"resumed from {path} at epoch {self.epoch + 1}, step "
                        f"{self.step_in_epoch} of {self.steps_per_epoch} (global step "
                        f"{self.global_step})")

    def save(self, best: bool) -> None:
        self.ckpt.save(self.global_step, self.state, self.meta(), best=best)

    # --- the loop ------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        if self.stop_after_step is not None and self.global_step >= self.stop_after_step:
            self.stop_requested = True
        if jax.process_count() == 1:
            return self.stop_requested
        from jax.experimental import multihost_utils  # all processes stop at the same step

        flags = multihost_utils.process_allgather(np.asarray([self.stop_requested]))
        return bool(np.any(flags))

    def state_digest(self) -> str:
        """SHA-256 of params, batch_stats and optimizer state: equal digests, identical state."""
        h = hashlib.sha256()
        leaves = jax.device_get(jax.tree_util.tree_leaves(
            (self.state.params, self.state.batch_stats, self.state.opt_state)))
        for leaf in leaves:
            h.update(np.ascontiguousarray(leaf).tobytes())
        return h.hexdigest()[:16]

    def _drain(self, pending: list) -> None:
        """Fetch the metrics of the steps since the last drain (one device sync) and add them up."""
        if not pending:
            return
        first_step = self.global_step - len(pending)
        fetched = jax.device_get(pending)
        for k, m in enumerate(fetched):
            if not m["finite"]:
                raise NonFiniteLoss(
                    f"the training loss became NaN or inf at global step {first_step + k} (epoch "
                    f"{self.epoch + 1}); the last good checkpoint in {self.ckpt.root} is kept. "
                    "Lower lr, or use amp=off if bf16 overflowed, then rerun")
            loss, correct, count = float(m["loss"]), float(m["correct"]), float(m["count"])
            self.epoch_sums += (loss * count, correct, count)
            self.window += (loss * count, count)
        pending.clear()

    def run_epoch(self) -> dict:
        try:
            return self._run_epoch()
        except CorruptData:
            # the data failed between two steps: the state is that of the last completed step
            self._drain(self._pending)
            self.save(best=False)
            raise

    def _run_epoch(self) -> dict:
        r = self.recipe
        bar = console.progress(self.steps_per_epoch, self.step_in_epoch,
                               f"epoch {self.epoch + 1}/{r.epochs}", self.is_main)
        pending = self._pending = []
        t0, seen = time.perf_counter(), 0
        for batch in self.train_batches.epoch(self.epoch, self.step_in_epoch):
            lr = float(self.lr_table[min(self.global_step, len(self.lr_table) - 1)])
            self.state, metrics = self.steps.train(self.state, batch, self.train_source)
            pending.append(metrics)
            if self.global_step == 0 and self.is_main:
                console.say(console.first_batch_line(float(metrics["loss"]), r.num_classes))
            self.global_step += 1
            self.step_in_epoch += 1
            seen += int(batch["mask"].sum())
            bar.update(1)
            if self.global_step % r.log_every_steps == 0:
                self._drain(pending)
                wl, wn = self.window
                bar.set_postfix_str(f"loss {wl / wn:.4f} lr {lr:.4g}")
                self.record.log(step=self.global_step, epoch=self.epoch + 1,
                                train_loss_window=wl / wn, lr=lr)
                self.window[:] = 0
            if self.step_in_epoch < self.steps_per_epoch:
                if self._should_stop():
                    self._drain(pending)
                    self.save(best=False)
                    raise Preempted(self.global_step)
                if r.checkpoint_every_steps and self.global_step % r.checkpoint_every_steps == 0:
                    self._drain(pending)
                    self.save(best=False)
        self._drain(pending)
        bar.close()
        train_time = time.perf_counter() - t0
        loss_sum, correct, count = self.epoch_sums
        metrics = {"step": self.global_step, "epoch": self.epoch + 1,
                   "train_loss": loss_sum / count, "train_acc": correct / count,
                   "lr": float(self.lr_table[self.global_step - 1])}
        metrics.update(evaluate(self.steps, self.state, self.eval_batches, self.eval_source))
        metrics["epoch_time"] = time.perf_counter() - t0
        metrics["train_images_per_s"] = seen * jax.process_count() / max(train_time, 1e-9)
        return metrics

    # --- the parts EpochLoop.run needs -----------------------------------------------------
    def clear_epoch_sums(self) -> None:
        self.epoch_sums[:] = 0

    def stop_at_epoch_end(self) -> bool:
        return self._should_stop()

    def describe(self) -> str:
        r = self.recipe
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))
        return (f"{r.recipe}: {r.model} ({n_params:,} parameters) on "
                f"{_device_name(self.devices)}, {np.dtype(self.dtype).name} compute; "
                f"{self.train_batches.num_examples} train / {self.eval_batches.num_examples} "
                f"test images; {r.epochs} epochs of {self.steps_per_epoch} steps; "
                f"workdir {self.record.workdir}")


def evaluate(step_fns: steps.Steps, state, batches, source) -> dict:
    """Loss and accuracy over the whole test split: padded batches, each image counted once."""
    sums = [step_fns.evaluate(state, batch, source) for batch in batches]
    fetched = jax.device_get(sums)
    loss_sum = sum(float(m["loss_sum"]) for m in fetched)
    correct = sum(float(m["correct"]) for m in fetched)
    count = sum(float(m["count"]) for m in fetched)
    if int(count) != batches.num_examples:  # cannot happen unless padding is broken
        raise RuntimeError(f"evaluated {int(count)} images, the split has {batches.num_examples}")
    return {"test_loss": loss_sum / count, "test_acc": correct / count, "test_count": int(count)}


def train_and_evaluate(recipe: Recipe, workdir: str | Path, devices=None,
                       stop_after_step: int | None = None) -> dict:
    """Train `recipe` in `workdir` (resuming what is there) and return the last metrics.

    Raises `Preempted` after writing a checkpoint when SIGTERM/SIGINT arrives (or, for tests,
    after global step `stop_after_step`); calling again with the same arguments resumes.
    """
    trainer = Trainer(recipe, workdir, devices)
    trainer.stop_after_step = stop_after_step
    try:
        with StopOnSignal(trainer, announce=trainer.is_main):
            return trainer.run()
    finally:
        trainer.ckpt.close()


def evaluate_checkpoint(recipe: Recipe, workdir: str | Path, path: str | None = None) -> dict:
    """--eval-only: evaluate the workdir's best checkpoint (else the latest), or `path`."""
    devices = jax.devices()
    dtype = compute_dtype(recipe, devices[0].platform)
    n = replicas(devices)
    eval_batches = data.build_eval(recipe, recipe.eval_batch_size * n, jax.process_index(),
                                   jax.process_count())
    model = build_model(recipe, dtype)
    tx, _, _ = optim.for_recipe(recipe, 1, n)
    step_fns = steps.Steps(model, tx, aug_config(recipe), steps.make_mesh(devices), dtype)
    shape = (recipe.image_size, recipe.image_size, recipe.in_channels)
    template = step_fns.replicate(steps.create_state(model, tx, jax.random.PRNGKey(0), shape))
    ckpt = checkpoints.Checkpoints(Path(workdir) / "checkpoints", recipe)
    state, meta, where = ckpt.restore_for_eval(template, path)
    ckpt.close()  # (not after a failed restore: closing then makes TensorStore's threads noisy)
    source = None if eval_batches.arrays is None else step_fns.replicate(eval_batches.arrays)
    metrics = evaluate(step_fns, state, eval_batches, source)
    if jax.process_index() == 0:
        console.say(f"{where}: test loss {metrics['test_loss']:.4f} acc "
                    f"{100 * metrics['test_acc']:.2f}% on {metrics['test_count']} images "
                    f"(epoch {meta['epoch']}, step {meta['global_step']})")
    return metrics


def _quiet_closed_loop_errors() -> None:
    """After a failed Orbax restore, TensorStore callbacks may still fire into Orbax's closed
    asyncio loop from other threads and print "Event loop is closed" tracebacks; they carry no
    information (the failure was already reported in one line). Drop exactly those."""
    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def on_thread(args):
        if not closed_loop(args.exc_value):
            thread_hook(args)

    def on_unraisable(args):
        if not closed_loop(args.exc_value):
            unraisable_hook(args)

    threading.excepthook, sys.unraisablehook = on_thread, on_unraisable


def main(argv: list[str] | None = None) -> int:
    _quiet_closed_loop_errors()
    try:
        args, recipe = cli.parse(argv, PROG, STACK)
        if recipe is None:
            cli.print_keys()
            return 0
        if args.device == "cuda" and jax.devices()[0].platform == "cpu":
            raise UserError("--device cuda asked for, but JAX sees no GPU; use --device cpu")
        devices = jax.devices("cpu") if args.device == "cpu" else None
        if args.eval_only:
            evaluate_checkpoint(recipe, args.workdir, args.checkpoint)
        else:
            train_and_evaluate(recipe, args.workdir, devices)
        return 0
    except UserError as err:
        return report(err, PROG)
    except Preempted as stop:
        print(f"stopped after global step {stop}; checkpoint written, run the same command to "
              f"resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    code = main()
    if code:
        # After an error, skip the interpreter's teardown: Orbax/TensorStore threads otherwise
        # print tracebacks about a closed event loop. Nothing is pending: saves are synchronous.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["train_and_evaluate", "evaluate_checkpoint", "evaluate", "Trainer", "main",
           "Preempted", "EXIT_PREEMPTED", "NonFiniteLoss"]
