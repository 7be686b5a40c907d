"""Train a recipe with PyTorch: ``python -m torch_ref.train --recipe NAME [--workdir DIR] [k=v
...]``.

The loop, its cadences, records and checkpoint contents are the run driver's
(`core.driver`); this module is torch's side of it, `TorchBackend`. Under ``torchrun
--nproc_per_node=N`` the same command runs data-parallel (DDP): each process takes its share of
every global batch, rank 0 alone prints and writes.
"""

from __future__ import annotations

if __name__ == "__main__":  # a stop request while the libraries load is honoured, not a traceback
    from core import preemption as _early

    _early.install_early()

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import configs
from core import driver, schedules
from core.driver import NonFiniteLoss
from core.errors import UserError
from core.preemption import EXIT_PREEMPTED, Preempted
from core.recipe import Recipe
from torch_ref import checkpoints, data, distributed, optim, steps
from torch_ref.models import build_model

STACK = "torch_ref"
PROG = "python -m torch_ref.train"
FP16_MAX_SKIPS = 25  # fp16: GradScaler skips overflowing steps; this many in a row is divergence


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


class TorchBackend:
    """torch's side of the run driver (core.driver.Backend)."""

    framework, checkpoint_format = STACK, checkpoints.FORMAT

    def __init__(
        self,
        recipe: Recipe,
        checkpoint_dir: Path,
        device: str = "auto",
        train: bool = True,
        tables=None,
    ):
        self.recipe, self.ckpt_dir = recipe, Path(checkpoint_dir)
        self.device = distributed.pick_device(device)
        self.dist = distributed.from_environment(self.device.type)
        self.is_main, self.num_processes = self.dist.is_main, self.dist.world_size
        self.replicas = self.dist.world_size
        self.per_process_metrics = True
        seed_everything(recipe.seed, recipe.deterministic)
        if train:
            self.train_batches = data.build_train(recipe, self.device, self.dist)
            self.steps_per_epoch = self.train_batches.steps
            self.num_train = self.train_batches.num_examples
        self.eval_batches = data.build_eval(recipe, self.device, self.dist)
        self.num_eval = self.eval_batches.num_examples
        model = build_model(recipe)
        if recipe.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise UserError(
                    "sync_bn needs CUDA (torch's SyncBatchNorm refuses CPU modules); "
                    "set sync_bn=false to normalise per process on CPU"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        self.amp_dtype = steps.autocast_dtype(recipe, self.device)
        self.nonfinite_steps_allowed = FP16_MAX_SKIPS if self.amp_dtype == torch.float16 else 0
        self.ema = None  # --eval-only loads the weights it is asked for into the model
        if not train:
            return
        self.ema = make_ema(self.model, recipe, self.dist.world_size)
        self.optimizer, self.scheduler, self.scheduler_steps = optim.for_recipe(
            self.model, recipe, self.steps_per_epoch, self.dist.world_size, tables
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.forward = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward_loss = self.graphed = None
        if recipe.compile:  # static shapes: one graph per batch shape (torch_ref.steps)
            check_compile_backend(recipe.compile_backend)
            self.forward_loss = steps.compiled_forward_and_loss(
                self.forward, self.amp_dtype, recipe.label_smoothing, recipe.compile_backend
            )
        if recipe.cuda_graphs:
            self.graphed = self._graphed_step()
        if self.is_main:
            checkpoints.remove_partial_writes(self.ckpt_dir)

    def _graphed_step(self):
        """cuda_graphs=true: what it needs beyond the recipe's own checks (torch_ref.graphs)."""
        from torch_ref import graphs

        if self.device.type != "cuda":
            raise UserError(
                f"cuda_graphs needs a CUDA device (this run is on {self.device.type}); "
                "set cuda_graphs=false"
            )
        if self.dist.enabled:
            raise UserError("cuda_graphs runs in one process; set cuda_graphs=false under torchrun")
        if not optim.fused(self.recipe, self.device):
            raise UserError("cuda_graphs needs the fused optimizer: set fused_optimizer=auto or on")
        return graphs.GraphedStep(
            self.model, self.optimizer, self.scaler, self.amp_dtype, self.recipe.label_smoothing
        )

    # --- what the opening line and environment.json say ------------------------------------
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    def describe(self) -> str:
        return f"{self.device_name()} x {self.dist.world_size} process(es)"

    def libraries(self) -> dict:
        import torchvision

        return {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- training ----------------------------------------------------------------------------
    def batches(self, epoch: int, start_step: int):
        self.model.train()
        return self.train_batches.epoch(epoch, start_step)

    def train_step(self, batch):
        x, targets, n_global = batch
        # DDP averages gradients over processes; weight each share by its size so the result is
        # the mean over the global batch even when the last batch splits unevenly.
        weight = targets.numel() * self.dist.world_size / n_global
        if self.graphed is not None:
            loss, correct = self.graphed(x, targets)
        else:
            loss, correct = steps.train_step(
                self.forward,
                self.optimizer,
                self.scaler,
                self.amp_dtype,
                x,
                targets,
                weight,
                self.recipe.label_smoothing,
                self.recipe.micro_batch if self.recipe.grad_accum_steps > 1 else 0,
                self.forward_loss,
            )
        if self.scheduler_steps == "step":
            self.scheduler.step()
        return loss, correct, targets.numel()

    def fetch(self, handles: list) -> driver.StepMetrics:
        values = (
            torch.stack(
                [torch.stack((loss.double(), correct.double())) for loss, correct, _ in handles]
            )
            .cpu()
            .numpy()
        )
        counts = [n for _, _, n in handles]
        return driver.StepMetrics.of(values[:, 0], values[:, 1], counts, np.isfinite(values[:, 0]))

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if not self.dist.enabled:
            return np.asarray(values, np.float64)
        # a copy: all_reduce works in place, and torch.as_tensor would share the caller's array
        # (the driver's running sums, which a checkpoint's meta reads mid-epoch)
        t = torch.tensor(np.array(values, np.float64), device=self.device)
        return self.dist.all_sum(t).cpu().numpy()

    def any_process(self, flag: bool) -> bool:
        return bool(self.all_sum(np.array([float(flag)]))[0] > 0)

    def ema_update(self, restart: bool) -> None:
        self.ema.update_parameters(self.model)
        if restart:  # torchvision's reference during its warm-up epochs
            self.ema.restart()

    def _weights(self, weights: str) -> torch.nn.Module:
        if weights == "ema":
            if self.ema is None:
                raise UserError("--weights ema needs a run with a model EMA (ema_decay > 0)")
            return self.ema.module
        return self.model

    def evaluate(self, between=None, weights: str = "model") -> tuple:
        return steps.evaluate(
            self._weights(weights),
            self.eval_batches,
            self.dist,
            self.amp_dtype,
            self.device,
            self.recipe.num_classes,
            between,
        )

    def end_epoch(self) -> None:
        if self.scheduler_steps == "epoch":
            self.scheduler.step()

    def digest(self) -> str:
        h = hashlib.sha256()
        for key, value in self.model.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        for state in self.optimizer.state_dict()["state"].values():
            buf = state.get("momentum_buffer")
            if buf is not None:
                h.update(buf.detach().cpu().contiguous().numpy().tobytes())
        if self.ema is not None:  # with a model EMA, it is state too
            for key, value in self.ema.state_dict().items():
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, meta: dict, best: bool) -> None:
        if self.is_main:
            state = {
                **meta,
                "model_state": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            if self.ema is not None:
                state["model_ema"] = self.ema.state_dict()
            if best:  # best before last: see core.driver.Run.run
                checkpoints.save(self.ckpt_dir / checkpoints.BEST, state)
            checkpoints.save_last(self.ckpt_dir, state)
        self.dist.barrier()

    def checkpoint_bytes(self) -> int:
        ema = list(self.ema.state_dict().values()) if self.ema is not None else []
        tensors = (
            list(self.model.state_dict().values())
            + ema
            + [
                b
                for s in self.optimizer.state_dict()["state"].values()
                for b in s.values()
                if torch.is_tensor(b)
            ]
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def _load(self, path: Path, check) -> dict:
        state = checkpoints.load(path, map_location=self.device)
        check(state, str(path))
        self.model.load_state_dict(state["model_state"])
        if self.ema is not None and "model_ema" in state:
            self.ema.load_state_dict(state["model_ema"])
        return state

    def resume_candidates(self) -> list[str]:
        return [str(p) for p in checkpoints.resume_candidates(self.ckpt_dir)]

    def restore(self, where: str, check) -> dict:
        state = self._load(Path(where), check)
        optim.load_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state

    def restore_for_eval(self, path, check, weights: str = "model"):
        from core import predict

        if path and Path(path).is_dir():  # a flax_impl step folder: converted
            from crossing import checkpoints as crossing

            _, folder = predict.find_checkpoint(self.ckpt_dir.parent, path)
            meta, state = crossing.read_other_stack(folder, "torch_ref", self.recipe, weights)
            self.model.load_state_dict(state)
            return meta, f"{folder} (converted from flax_impl)"
        path = Path(path) if path else checkpoints.default_for_eval(self.ckpt_dir)
        state = checkpoints.load(path, map_location=self.device)
        check(state, str(path))
        self.model.load_state_dict(predict.torch_weights(state, weights, path))
        return state, str(path)

    def close(self) -> None:
        self.dist.close()


def check_compile_backend(name: str) -> None:
    """A name torch.compile knows, or a UserError now (torch would raise at the first step)."""
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend(name)
    except Exception:  # torch's InvalidBackend, or an import error inside the backend
        known = ", ".join(torch._dynamo.list_backends(exclude_tags=()))
        raise UserError(
            f"compile_backend={name!r} is not a torch.compile backend; use one of: {known}"
        )


def make_ema(model: nn.Module, recipe: Recipe, world_size: int):
    """The model EMA (recipes with ema_decay > 0), as torchvision's reference keeps it: torch's
    AveragedModel over the parameters and the buffers (BatchNorm's statistics too), each update
    a lerp towards the model by 1 - decay (get_ema_multi_avg_fn), the decay adjusted for the
    world size, batch size, update interval and epochs (core.schedules.ema_decay)."""
    if not recipe.ema_decay:
        return None
    from torch_ref.ema import EMA  # AveragedModel without its host sync per update

    return EMA(model, schedules.ema_decay(recipe, world_size))


def backend_factory(recipe: Recipe, device: str = "auto", tables=None) -> driver.Factory:
    """make(checkpoint_dir, train) -> TorchBackend on `device` (auto, cpu, cuda); `tables`
    (lr, momentum per step) replace the recipe's schedule."""
    return lambda ckpt_dir, train: TorchBackend(recipe, ckpt_dir, device, train, tables)


def train_and_evaluate(
    recipe: Recipe, workdir: str | Path, device: str = "auto", stop_after_step: int | None = None
) -> dict:
    """core.driver.train_and_evaluate with this stack (resumes; may raise Preempted)."""
    return driver.train_and_evaluate(
        backend_factory(recipe, device),
        recipe,
        workdir,
        STACK,
        stop_after_step,
        distributed.rank_from_environment() == 0,
    )


def evaluate_checkpoint(
    recipe: Recipe,
    workdir: str | Path,
    path: str | None = None,
    device: str = "auto",
    weights: str = "model",
) -> dict:
    """--eval-only: `path`, or the workdir's best checkpoint (else its last), evaluated (its
    model's weights, or its EMA's)."""
    return driver.evaluate_checkpoint(
        backend_factory(recipe, device), recipe, workdir, path, weights
    )


COMMAND = driver.Stack(
    PROG, STACK, configs, train_and_evaluate, evaluate_checkpoint, peer_lost=distributed.peer_lost
)


def main(argv: list[str] | None = None) -> int:
    return driver.main(argv, COMMAND)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "train_and_evaluate",
    "evaluate_checkpoint",
    "backend_factory",
    "TorchBackend",
    "main",
    "Preempted",
    "NonFiniteLoss",
    "EXIT_PREEMPTED",
]
