"""Train a recipe with JAX/Flax: ``python -m flax_impl.train --recipe NAME [--workdir DIR] [k=v
...]``.

The loop, its cadences, records and checkpoint contents are the run driver's
(`core.driver`), as for torch_ref; this module is JAX's side of it, `FlaxBackend`. One
process drives every local device: the step (flax_impl.steps) is jitted over a `Mesh` of them,
the state replicated and each global batch split over the mesh, so BatchNorm's statistics are
over the global batch. Several hosts: `--coordinator-address`, `--num-processes`, `--process-id`
or `--distributed auto` (flax_impl.multihost; see README).

`batch_size` means what it means for torch_ref: per accelerator, so the global batch is
batch_size x the number of GPUs/TPUs; on CPUs it is batch_size per process, split over the CPU
devices. Mixed precision is bf16 compute with float32 parameters (``amp=bf16``, the default on
GPU/TPU); there is no fp16 loss scaling here.
"""

from __future__ import annotations

if __name__ == "__main__":  # a stop request while the libraries load is honoured, not a traceback
    from core import preemption as _early
    from flax_impl import cpu_setup as _cpu

    _early.install_early()
    _cpu.configure()  # XLA:CPU's options, before anything below starts JAX

import functools
import hashlib
import os
from pathlib import Path

import jax
import numpy as np

import configs
from flax_impl import checkpoints, cpu_setup, data, multihost, optim, steps
from flax_impl.models import build_model
from core import driver, prefetch, schedules
from core.driver import NonFiniteLoss
from core.errors import UserError
from core.preemption import EXIT_PREEMPTED, Preempted
from core.recipe import Recipe

STACK = "flax_impl"
PROG = "python -m flax_impl.train"


def pick_devices(device: str = "auto"):
    """All devices JAX sees, or its CPU devices (--device cpu)."""
    cpu_setup.check()
    if device == "cuda" and jax.devices()[0].platform == "cpu":
        raise UserError("--device cuda asked for, but JAX sees no GPU; use --device cpu")
    return jax.devices("cpu") if device == "cpu" else jax.devices()


class FlaxBackend:
    """JAX's side of the run driver (core.driver.Backend)."""

    framework, checkpoint_format = STACK, checkpoints.FORMAT
    per_process_metrics = False  # the jitted step's metrics cover the global batch
    nonfinite_steps_allowed = 0

    def __init__(
        self, recipe: Recipe, checkpoint_dir: Path, devices=None, train: bool = True, tables=None
    ):
        cpu_setup.check()
        if recipe.pipeline == "dataloader" and recipe.dataset != "imagenet":
            raise UserError(
                "pipeline=dataloader is torch_ref's DataLoader + PIL path; flax_impl "
                "augments in-memory sets inside its jitted step: drop the override"
            )
        self.recipe = recipe
        self.devices = list(devices or jax.devices())
        if not cpu_setup.splits(
            self.devices,
            recipe.batch_size * jax.process_count(),
            recipe.eval_batch_size * jax.process_count(),
        ):
            self.devices = self.devices[:1]  # the default host devices: one, not an error
        self.is_main = jax.process_index() == 0
        self.num_processes = jax.process_count()
        self.dtype = steps.compute_dtype(recipe, self.devices[0].platform)
        # data-parallel replicas in torch_ref's sense: accelerators, or processes on CPU
        self.replicas = (
            len(self.devices) if self.devices[0].platform != "cpu" else self.num_processes
        )
        batch, eval_batch = (
            recipe.batch_size * self.replicas,
            recipe.eval_batch_size * self.replicas,
        )
        for name, size in (("batch_size", batch), ("eval_batch_size", eval_batch)):
            if size % len(self.devices):
                raise UserError(
                    f"a global batch of {size} does not split over "
                    f"{len(self.devices)} devices; make {name} a multiple of "
                    f"{len(self.devices)}"
                )
        k = recipe.grad_accum_steps
        if (batch // k) % len(self.devices):
            raise UserError(
                f"micro-batches of {batch // k} (a global batch of {batch} / grad_accum_steps="
                f"{k}) do not split over {len(self.devices)} devices; make batch_size a "
                f"multiple of {k * len(self.devices)}"
            )
        where = (jax.process_index(), self.num_processes)
        pad = len(self.devices)  # a batch larger than the data is padded only to the data
        self.train_batches = (
            data.build_train(recipe, batch, *where, mix_groups=self.replicas, pad_multiple=pad)
            if train
            else None
        )
        self.steps_per_epoch = self.train_batches.steps if train else 1
        self.num_train = self.train_batches.num_examples if train else 0
        self.eval_batches = data.build_eval(recipe, eval_batch, *where, pad_multiple=pad)
        self.num_eval = self.eval_batches.num_examples
        self.model = build_model(recipe, self.dtype)
        tx, _, _ = optim.for_recipe(recipe, self.steps_per_epoch, self.replicas, tables=tables)
        aug = {"pad": recipe.crop_padding, "mean": tuple(recipe.mean), "std": tuple(recipe.std)}
        self.steps = steps.Steps(
            self.model,
            tx,
            aug,
            steps.make_mesh(self.devices),
            self.dtype,
            recipe.label_smoothing,
            recipe.grad_accum_steps,
        )
        shape = (recipe.train_size, recipe.train_size, recipe.in_channels)
        state = steps.create_state(self.model, tx, jax.random.PRNGKey(recipe.seed), shape)
        self.ema_update_placed = None
        if recipe.ema_decay:  # the model EMA (torch_ref: torch's AveragedModel)
            state = steps.with_ema(state)
            decay = schedules.ema_decay(recipe, self.replicas)
            self.ema_update_placed = jax.jit(
                functools.partial(steps.ema_step, decay=decay),
                donate_argnums=(0,),
                out_shardings=self.steps.replicated,
            )
        self.state = self.steps.replicate(state)
        self.train_source = self._source(self.train_batches)
        self.eval_source = self._source(self.eval_batches)
        self.ckpt = checkpoints.Checkpoints(checkpoint_dir)

    def _source(self, batches):
        arrays = getattr(batches, "arrays", None)
        return None if arrays is None else self.steps.replicate(arrays)

    # --- what the opening line and environment.json say ------------------------------------
    def device_name(self) -> str:
        d = self.devices[0]
        return f"{len(self.devices)} x {getattr(d, 'device_kind', d.platform)} ({d.platform})"

    def describe(self) -> str:
        return f"{self.device_name()}, {np.dtype(self.dtype).name} compute"

    def libraries(self) -> dict:
        import flax
        import optax
        import orbax.checkpoint as ocp

        return {
            "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
            "flax": flax.__version__,
            "optax": optax.__version__,
            "orbax-checkpoint": getattr(ocp, "__version__", "unknown"),
            "numpy": np.__version__,
            "xla_cpu": cpu_setup.summary(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        }

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))

    # --- training ----------------------------------------------------------------------------
    def batches(self, epoch: int, start_step: int):
        placed = (self.steps.put_batch(b) for b in self.train_batches.epoch(epoch, start_step))
        return prefetch.ahead(placed, self.recipe.device_prefetch)

    def train_step(self, batch):
        self.state, metrics = self.steps.train_placed(self.state, batch, self.train_source)
        return metrics

    def fetch(self, handles: list) -> driver.StepMetrics:
        got = jax.device_get(handles)
        return driver.StepMetrics.of(*([m[k] for m in got] for k in driver.StepMetrics._fields))

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64)  # metrics are global already

    def any_process(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))

    def ema_update(self, restart: bool) -> None:
        self.state = self.ema_update_placed(self.state, np.bool_(restart))

    def evaluate(self, between=None, weights: str = "model") -> tuple:
        state = self.state
        if weights == "ema":
            if self.ema_update_placed is None:
                raise UserError("--weights ema needs a run with a model EMA (ema_decay > 0)")
            state = steps.ema_view(state)
        out = []
        for batch in self.eval_batches:
            if between is not None:
                between()
            out.append(self.steps.evaluate(state, batch, self.eval_source))
        out = jax.device_get(out)
        c = self.recipe.num_classes
        confusion = np.zeros((c, c), np.int64)
        for m in out:
            real = np.asarray(m["real"], bool)
            np.add.at(confusion, (np.asarray(m["labels"])[real], np.asarray(m["pred"])[real]), 1)
        return (
            *(sum(float(m[k]) for m in out) for k in ("loss_sum", "correct", "count")),
            confusion,
        )

    def end_epoch(self) -> None:
        pass  # the schedules are tables indexed by the step

    def digest(self) -> str:
        h = hashlib.sha256()
        leaves = jax.device_get(
            jax.tree_util.tree_leaves(
                (
                    self.state.params,
                    self.state.batch_stats,
                    self.state.opt_state,
                    getattr(self.state, "ema", None),  # with a model EMA, it is state too
                )
            )
        )
        for leaf in leaves:
            h.update(np.ascontiguousarray(leaf).tobytes())
        return h.hexdigest()[:16]

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, meta: dict, best: bool) -> None:
        self.ckpt.save(meta["global_step"], self.state, meta, best=best)

    def resume_candidates(self) -> list[str]:
        return self.ckpt.resume_candidates()

    def restore(self, where: str, check) -> dict:
        self.state, meta = self.ckpt.restore(self.state, where, check)
        return meta

    def checkpoint_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.state))

    def restore_for_eval(self, path, check, weights: str = "model"):
        from crossing import checkpoints as crossing

        if path and Path(path).is_file():  # a torch_ref checkpoint file: converted
            meta, v = crossing.read_other_stack(path, "flax_impl", self.recipe, weights)
            where = f"{path} (converted from torch_ref)"
        else:
            # read as NumPy, without a template: a run's EMA, decay groups or other state that
            # this command's recipe does not repeat change the tree but not the model
            folder = self.ckpt.for_eval(path)
            meta, v = crossing.read_flax(folder, weights)
            check(meta, str(folder))
            where = str(folder)
        self.state = self.steps.replicate(
            self.state.replace(params=v["params"], batch_stats=v["batch_stats"])
        )
        return meta, where

    def close(self) -> None:
        self.ckpt.close()


def backend_factory(recipe: Recipe, devices=None, tables=None) -> driver.Factory:
    """make(checkpoint_dir, train) -> FlaxBackend on `devices` (default: all JAX sees);
    `tables` (lr, momentum per step) replace the recipe's schedule."""
    return lambda ckpt_dir, train: FlaxBackend(recipe, ckpt_dir, devices, train, tables)


def train_and_evaluate(
    recipe: Recipe, workdir: str | Path, devices=None, stop_after_step: int | None = None
) -> dict:
    """core.driver.train_and_evaluate with this stack (resumes; may raise Preempted)."""
    return driver.train_and_evaluate(
        backend_factory(recipe, devices),
        recipe,
        workdir,
        STACK,
        stop_after_step,
        jax.process_index() == 0,
    )


def evaluate_checkpoint(
    recipe: Recipe,
    workdir: str | Path,
    path: str | None = None,
    devices=None,
    weights: str = "model",
) -> dict:
    """--eval-only: `path`, or the workdir's best checkpoint (else its last), evaluated (its
    model's weights, or its EMA's)."""
    return driver.evaluate_checkpoint(
        backend_factory(recipe, devices), recipe, workdir, path, weights
    )


def _train(recipe: Recipe, workdir: str, device: str) -> dict:
    return train_and_evaluate(recipe, workdir, pick_devices(device))


def _evaluate(recipe: Recipe, workdir: str, path: str | None, device: str, weights: str) -> dict:
    return evaluate_checkpoint(recipe, workdir, path, pick_devices(device), weights)


COMMAND = driver.Stack(
    PROG,
    STACK,
    configs,
    _train,
    _evaluate,
    flags=multihost.add_flags,
    setup=multihost.initialize,
    peer_lost=multihost.peer_lost,
)


def main(argv: list[str] | None = None) -> int:
    checkpoints.quiet_closed_loop_errors()
    return driver.main(argv, COMMAND)


if __name__ == "__main__":
    checkpoints.exit_with(main())


__all__ = [
    "train_and_evaluate",
    "evaluate_checkpoint",
    "backend_factory",
    "FlaxBackend",
    "main",
    "Preempted",
    "EXIT_PREEMPTED",
    "NonFiniteLoss",
]
