"""Train a recipe with PyTorch: ``python -m torch_ref.train --recipe NAME [--workdir DIR] [k=v ...]``.

`main` only parses the command line; `train_and_evaluate(recipe, workdir)` does the work and can be
called from Python. Under ``torchrun --nproc_per_node=N`` the same command runs data-parallel (DDP):
each process takes its share of every global batch, rank 0 alone prints and writes.

Per step: forward and loss under `torch.autocast` (fp16 + GradScaler on CUDA by default, bf16 on
request), backward, SGD step, and the OneCycle scheduler step when the recipe uses it; the cosine
schedule steps once per epoch, as seed 000 does. Nothing in the step waits for the GPU: losses and
accuracies accumulate on the device and are read at log intervals and at the end of the epoch.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework_free import cli, console
from framework_free.errors import CorruptData, UserError, report
from framework_free.loop import EpochLoop
from framework_free.preemption import EXIT_PREEMPTED, Preempted, StopOnSignal
from framework_free.recipe import Recipe, world_lr
from framework_free.records import RunRecord
from torch_ref import checkpoint, data, distributed
from torch_ref.models import build_model

STACK = "torch_ref"
PROG = "python -m torch_ref.train"


STOP_CHECK_EVERY = 10  # under DDP, processes agree on stopping every this many steps
FP16_MAX_SKIPS = 25  # fp16: GradScaler skips overflowing steps; this many in a row is divergence


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.amp == "fp16" or (recipe.amp == "auto" and device.type == "cuda"):
        return torch.float16
    if recipe.amp == "bf16":
        return torch.bfloat16
    return None


def make_optimizer(model: nn.Module, recipe: Recipe, world_size: int) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=world_lr(recipe, world_size),
                           momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay)


def make_scheduler(opt, recipe: Recipe, steps_per_epoch: int, world_size: int):
    """torch's own schedulers, exactly as the seeds call them."""
    if recipe.schedule == "cosine_per_epoch":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=world_lr(recipe, world_size), epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch, pct_start=recipe.onecycle_pct_start,
        anneal_strategy=recipe.onecycle_anneal, cycle_momentum=True,
        base_momentum=recipe.onecycle_base_momentum, max_momentum=recipe.onecycle_max_momentum,
        div_factor=recipe.onecycle_div_factor, final_div_factor=recipe.onecycle_final_div_factor)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@torch.no_grad()
def evaluate(model: nn.Module, batches, dist: distributed.Dist, amp_dtype, device) -> dict:
    """Loss and accuracy over the whole test split: each image counted once across processes."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    loss_sum, correct, count = dist.all_sum(sums).tolist()
    if int(count) != batches.num_examples:  # cannot happen unless sharding is broken
        raise RuntimeError(f"evaluated {int(count)} images, the split has {batches.num_examples}")
    return {"test_loss": loss_sum / count, "test_acc": correct / count, "test_count": int(count)}


def _libraries() -> dict:
    import numpy
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version())}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


class Trainer(EpochLoop):
    """The state of one run and the loop over it. `run()` trains to the end or raises."""

    def __init__(self, recipe: Recipe, workdir: str | Path, device: str = "auto"):
        self.recipe = recipe
        self.device = distributed.pick_device(device)
        self.dist = distributed.from_environment(self.device.type)
        self.record = RunRecord(workdir, STACK, recipe, self.dist.is_main)
        self.resuming = self.record.check()
        seed_everything(recipe.seed, recipe.deterministic)
        self.train_batches = data.build_train(recipe, self.device, self.dist)
        self.eval_batches = data.build_eval(recipe, self.device, self.dist)
        self.steps_per_epoch = self.train_batches.steps
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.train_batches.num_examples} training images make no full "
                            f"batch of {recipe.batch_size} x {self.dist.world_size} processes; "
                            "lower batch_size or set drop_last=false")

        model = build_model(recipe)
        if recipe.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise UserError("sync_bn needs CUDA (torch's SyncBatchNorm refuses CPU modules); "
                                "set sync_bn=false to normalise per process on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        self.optimizer = make_optimizer(self.model, recipe, self.dist.world_size)
        self.scheduler = make_scheduler(self.optimizer, recipe, self.steps_per_epoch,
                                        self.dist.world_size)
        self.amp_dtype = autocast_dtype(recipe, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.forward = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if recipe.compile:
            self.forward = torch.compile(self.forward)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.stop_requested = False
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.stop_after_step: int | None = None  # tests: behave as if signalled after this step
        self.best_acc = -1.0
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.window = torch.zeros(2, dtype=torch.float64, device=self.device)  # since last log
        self.ckpt_dir = self.record.checkpoint_dir
        if self.dist.is_main:
            checkpoint.remove_partial_writes(self.ckpt_dir)
        if self.resuming and (self.ckpt_dir / checkpoint.LAST).exists():
            self._restore(self.ckpt_dir / checkpoint.LAST)
        self.record.start(_libraries(), _device_name(self.device))
        self.record.rewind(self.global_step)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        r = self.recipe
        return {
            "format": checkpoint.FORMAT, "framework": STACK, "recipe": r.recipe, "model": r.model,
            "num_classes": r.num_classes, "in_channels": r.in_channels, "config": r.to_dict(),
            "model_state": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_acc": self.best_acc, "epoch_sums": self.epoch_sums.cpu(),
            "window": self.window.cpu(),
        }

    def _restore(self, path: Path) -> None:
        state = checkpoint.load(path, map_location=self.device)
        checkpoint.check_matches(state, self.recipe, path)
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state({k: v for k, v in state["rng"].items()})
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_acc = state["global_step"], state["best_acc"]
        self.epoch_sums = state["epoch_sums"].to(self.device)
        self.window = state["window"].to(self.device)
        if self.dist.is_main:
            console.say(f"resumed from {path} at epoch {self.epoch + 1}, step "
                        f"{self.step_in_epoch} of {self.steps_per_epoch} (global step "
                        f"{self.global_step})")

    def save(self, best: bool) -> None:
        if self.dist.is_main:
            state = self.state_dict()
            if best:  # best before last: see run()
                checkpoint.save(self.ckpt_dir / checkpoint.BEST, state)
            checkpoint.save(self.ckpt_dir / checkpoint.LAST, state)
        self.dist.barrier()

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self, x, y, n_global: int):
        """One optimizer step; returns (loss, correct) as device tensors, without syncing."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        # DDP averages gradients over processes; weight each share by its size so the result is
        # the mean over the global batch even when the last batch splits unevenly.
        weight = y.numel() * self.dist.world_size / n_global
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight if weight != 1 else loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.recipe.schedule == "onecycle":
            self.scheduler.step()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def _should_stop(self) -> bool:
        if self.stop_after_step is not None and self.global_step >= self.stop_after_step:
            self.stop_requested = True
        if not self.dist.enabled:
            return self.stop_requested
        if self.global_step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(self.dist.all_sum(flag).item() > 0)  # all processes stop at the same step

    def _should_stop_now(self) -> bool:
        """At an epoch boundary (a checkpoint was just written): agree on stopping right away."""
        if self.stop_after_step is not None and self.global_step >= self.stop_after_step:
            self.stop_requested = True
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(self.dist.all_sum(flag).item() > 0)

    def state_digest(self) -> str:
        """SHA-256 of the model's parameters and buffers and the optimizer's momentum: two runs
        with equal digests hold bit-identical training state."""
        h = hashlib.sha256()
        for key, value in self.model.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        for state in self.optimizer.state_dict()["state"].values():
            buf = state.get("momentum_buffer")
            if buf is not None:
                h.update(buf.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        step = int(bad_step.item())
        if step >= 0:
            raise NonFiniteLoss(
                f"the training loss became NaN or inf at global step {step} (epoch "
                f"{self.epoch + 1}); the last good checkpoint in {self.ckpt_dir} is kept. Lower "
                "lr, or use amp=off/bf16 if fp16 overflowed, then rerun")

    def run_epoch(self) -> dict:
        try:
            return self._run_epoch()
        except CorruptData:
            # the data failed between two steps: the state is that of the last completed step
            self._check_finite(self.bad_step)
            self.save(best=False)
            raise

    def _run_epoch(self) -> dict:
        r, dist = self.recipe, self.dist
        self.model.train()
        bar = console.progress(self.steps_per_epoch, self.step_in_epoch,
                               f"epoch {self.epoch + 1}/{r.epochs}", dist.is_main)
        bad_step = self.bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        streak = torch.zeros((), dtype=torch.int64, device=self.device)  # non-finite in a row
        window = self.window  # loss sum and count since the last log line
        t0, seen = time.perf_counter(), 0
        for x, y, n_global in self.train_batches.epoch(self.epoch, self.step_in_epoch):
            lr = self.current_lr()
            loss, correct = self.train_step(x, y, n_global)
            n = y.numel()
            finite = torch.isfinite(loss)
            if self.scaler.is_enabled():  # an fp16 overflow is the scaler's to handle...
                streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
                tripped = streak > FP16_MAX_SKIPS  # ...unless it never recovers
            else:
                tripped = ~finite
            bad_step = self.bad_step = torch.where(
                (bad_step < 0) & tripped, torch.full_like(bad_step, self.global_step), bad_step)
            counted = finite.double() * n  # skipped fp16 steps do not enter the averages
            self.epoch_sums += torch.stack([torch.where(finite, loss.double(), 0.0) * n,
                                            correct.double() * finite, counted])
            window += torch.stack([torch.where(finite, loss.double(), 0.0) * n, counted])
            if self.global_step == 0 and dist.is_main:
                console.say(console.first_batch_line(loss.item(), r.num_classes))
            self.global_step += 1
            self.step_in_epoch += 1
            seen += n
            bar.update(1)
            if self.global_step % r.log_every_steps == 0:
                self._check_finite(bad_step)
                wl, wn = window.tolist()
                mean = wl / wn if wn else float("nan")
                bar.set_postfix_str(f"loss {mean:.4f} lr {lr:.4g}")
                self.record.log(step=self.global_step, epoch=self.epoch + 1,
                                train_loss_window=mean, lr=lr)
                window.zero_()
            if self.step_in_epoch < self.steps_per_epoch:
                if self._should_stop():
                    self._check_finite(bad_step)
                    self.save(best=False)
                    raise Preempted(self.global_step)
                if r.checkpoint_every_steps and self.global_step % r.checkpoint_every_steps == 0:
                    self._check_finite(bad_step)
                    self.save(best=False)
        bar.close()
        self._check_finite(bad_step)
        train_time = time.perf_counter() - t0
        loss_sum, correct, count = dist.all_sum(self.epoch_sums.clone()).tolist()
        metrics = {"step": self.global_step, "epoch": self.epoch + 1,
                   "train_loss": loss_sum / count if count else float("nan"),
                   "train_acc": correct / count if count else float("nan"),
                   "lr": self.current_lr()}
        metrics.update(evaluate(self.model, self.eval_batches, dist, self.amp_dtype, self.device))
        if r.schedule == "cosine_per_epoch":  # after eval: a failed eval must not step it twice
            self.scheduler.step()
        metrics["epoch_time"] = time.perf_counter() - t0
        metrics["train_images_per_s"] = seen * dist.world_size / max(train_time, 1e-9)
        return metrics

    # --- the parts EpochLoop.run needs -----------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def clear_epoch_sums(self) -> None:
        self.epoch_sums.zero_()

    def stop_at_epoch_end(self) -> bool:
        return self._should_stop_now()

    def describe(self) -> str:
        r = self.recipe
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"{r.recipe}: {r.model} ({n_params:,} parameters) on "
                f"{_device_name(self.device)} x {self.dist.world_size} process(es); "
                f"{self.train_batches.num_examples} train / {self.eval_batches.num_examples} "
                f"test images; {r.epochs} epochs of {self.steps_per_epoch} steps; "
                f"workdir {self.record.workdir}")


def train_and_evaluate(recipe: Recipe, workdir: str | Path, device: str = "auto",
                       stop_after_step: int | None = None) -> dict:
    """Train `recipe` in `workdir` (resuming what is there) and return the last metrics.

    Raises `Preempted` after writing a checkpoint when SIGTERM/SIGINT arrives (or, for tests,
    after global step `stop_after_step`); calling again with the same arguments resumes.
    """
    trainer = Trainer(recipe, workdir, device)
    trainer.stop_after_step = stop_after_step
    try:
        with StopOnSignal(trainer, announce=trainer.dist.is_main):
            return trainer.run()
    finally:
        trainer.dist.close()


def evaluate_checkpoint(recipe: Recipe, workdir: str | Path, path: str | None,
                        device: str = "auto") -> dict:
    """--eval-only: load a checkpoint (default: the workdir's best, else last) and evaluate it."""
    dev = distributed.pick_device(device)
    dist = distributed.from_environment(dev.type)
    try:
        ckpt_dir = Path(workdir) / "checkpoints"
        if path is None:
            path = ckpt_dir / checkpoint.BEST
            if not path.exists():
                path = ckpt_dir / checkpoint.LAST
        path = Path(path)
        state = checkpoint.load(path, map_location=dev)
        checkpoint.check_matches(state, recipe, path)
        eval_batches = data.build_eval(recipe, dev, dist)
        fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
        model = build_model(recipe).to(dev, memory_format=fmt)
        model.load_state_dict(state["model_state"])
        metrics = evaluate(model, eval_batches, dist, autocast_dtype(recipe, dev), dev)
        if dist.is_main:
            console.say(f"{path}: test loss {metrics['test_loss']:.4f} acc "
                        f"{100 * metrics['test_acc']:.2f}% on {metrics['test_count']} images "
                        f"(epoch {state['epoch']}, step {state['global_step']})")
        return metrics
    finally:
        dist.close()


def main(argv: list[str] | None = None) -> int:
    try:
        args, recipe = cli.parse(argv, PROG, STACK)
        if recipe is None:
            cli.print_keys()
            return 0
        if args.eval_only:
            evaluate_checkpoint(recipe, args.workdir, args.checkpoint, args.device)
        else:
            train_and_evaluate(recipe, args.workdir, args.device)
        return 0
    except UserError as err:
        return report(err, PROG)
    except Preempted as stop:
        print(f"stopped after global step {stop}; checkpoint written, run the same command to "
              f"resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["train_and_evaluate", "evaluate_checkpoint", "evaluate", "Trainer", "main", "Preempted",
           "EXIT_PREEMPTED"]
