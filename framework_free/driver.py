"""The run driver: one training loop, written once, that both stacks run.

framework_free owns the run: the epoch and step loop, when to log, checkpoint and stop, the
first-batch line, detecting a non-finite loss, the metrics of an epoch, the console and record
lines, what a checkpoint says about the run (its identity, where to resume, the running sums) and
the command line's `main`. A stack supplies a `Backend`: the framework's model, data, optimizer
and arrays behind the small interface below. `torch_ref.train` and `flax_impl.train` are each
one `Backend` class plus the three public entry points, which call `train_and_evaluate`,
`evaluate_checkpoint` and `main` here.

What goes where, at each step of an epoch:

    batch = next(backend.batches(epoch, start))       the stack loads, decodes, places (the data
                                                      plan, framework_free.sampling, decides what)
    handle = backend.train_step(batch)                one optimizer step; nothing waits for it
    every log_every_steps:  backend.fetch(handles)    one device sync: per-step loss, correct,
                                                      count, finite; the driver adds them up
    stop requested / checkpoint_every_steps:          backend.any_process(flag), backend.save(meta)

and at the end of an epoch: `backend.all_sum(sums)`, `backend.evaluate()`, `backend.end_epoch()`
(torch's per-epoch scheduler step), `backend.digest()`, `backend.save(meta, best)`.

Adding a metric: compute it in `Run.run_epoch` or `Run._log_window` below. Adding a log sink: a
class with `log_step(metrics)` and `log_epoch(metrics)` (and optionally `close()`), appended to
`Run.sinks`, as the TensorBoard writer (framework_free.tensorboard) is. Neither touches a stack.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from framework_free import cli, console, plot, schedules
from framework_free.errors import CorruptData, UserError, report
from framework_free.preemption import EXIT_PREEMPTED, Preempted, StopOnSignal
from framework_free.recipe import Recipe
from framework_free.records import RunRecord
from framework_free.tensorboard import TensorBoardSink

STOP_CHECK_EVERY = 10  # with several processes, they agree on stopping every this many steps


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Backend(Protocol):
    """What a stack supplies to the driver (torch_ref.train.TorchBackend,
    flax_impl.train.FlaxBackend). Built by a factory ``make(checkpoint_dir, train)``; with
    train=False only what evaluation needs exists (no training data, no optimizer)."""

    framework: str  # "torch_ref" | "flax_impl": the record's and the checkpoints' owner
    checkpoint_format: str  # the format tag a checkpoint carries; another one is refused
    is_main: bool  # this process prints and writes
    num_processes: int  # processes of this run (not devices)
    replicas: int  # data-parallel replicas: the learning rate scales with them
    per_process_metrics: bool  # True: step metrics cover this process's share of the batch
    nonfinite_steps_allowed: int  # non-finite losses in a row tolerated (fp16 loss scaling)
    steps_per_epoch: int
    num_train: int  # images in the training set (as used: after any subset)
    num_eval: int

    def describe(self) -> str:
        """Where it runs, for the opening line: "cpu (2 threads) x 1 process(es)"."""

    def device_name(self) -> str:
        """The device, for environment.json."""

    def libraries(self) -> dict[str, str]:
        """Library versions, for environment.json."""

    def num_params(self) -> int:
        ...

    def batches(self, epoch: int, start_step: int) -> Iterable[Any]:
        """This process's batches of an epoch from `start_step`, ready for `train_step`."""

    def train_step(self, batch) -> Any:
        """One optimizer step; returns a handle to its metrics without waiting for the device."""

    def fetch(self, handles: list) -> np.ndarray:
        """(len(handles), 4) float64: loss (mean over the step's real examples), correct,
        count, finite (1/0), for each step; one device sync for all of them."""

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes (every process calls it); a stack whose step metrics
        already cover the global batch (per_process_metrics False) returns `values`."""

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is True on any (every process calls it)."""

    def evaluate(self) -> tuple[float, float, float, np.ndarray]:
        """(loss sum, correct, count, confusion) over the whole test split, every image once;
        confusion[true, predicted] counts images (num_classes x num_classes integers)."""

    def end_epoch(self) -> None:
        """After an epoch's evaluation (torch: the per-epoch scheduler step)."""

    def save(self, meta: dict, best: bool) -> None:
        """Write the arrays with `meta` (JSON-able) as `last`, and as `best` first if `best`."""

    def restore_latest(self, check: Callable[[dict, str], None]) -> tuple[dict, str] | None:
        """Load the latest `last` checkpoint, calling check(meta, where) before the arrays;
        (meta, where) or None when there is none."""

    def restore_for_eval(self, path: str | None,
                         check: Callable[[dict, str], None]) -> tuple[dict, str]:
        """Load `path`, or the best checkpoint (else the last) of the checkpoint folder."""

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the parameters, BatchNorm statistics and momentum."""

    def close(self) -> None:
        ...


Factory = Callable[[Path, bool], Backend]


# --- what a checkpoint says about the run ---------------------------------------------------------


def identity(recipe: Recipe, backend: Backend) -> dict:
    """The run a checkpoint belongs to; a checkpoint whose identity differs is refused."""
    return {"format": backend.checkpoint_format, "framework": backend.framework,
            "recipe": recipe.recipe, "model": recipe.model, "num_classes": recipe.num_classes,
            "in_channels": recipe.in_channels}


def identity_check(recipe: Recipe, backend: Backend) -> Callable[[dict, str], None]:
    want = identity(recipe, backend)

    def check(meta: dict, where: str) -> None:
        have = {k: meta.get(k) for k in want}
        if have["framework"] == want["framework"] and have["format"] != want["format"]:
            raise UserError(f"checkpoint {where} has format {have['format']}, this version of "
                            f"{want['framework']} reads {want['format']}; finish that run with "
                            "the version that wrote it, or pass another --workdir")
        if have != want:
            def say(d):
                return (f"{d['framework']} {d['recipe']}/{d['model']} ({d['num_classes']} classes, "
                        f"{d['in_channels']} channels, format {d['format']})")

            raise UserError(f"checkpoint {where} belongs to {say(have)}, this run is "
                            f"{say(want)}; pass the --recipe and overrides it was trained with, "
                            "or another --workdir")
    return check


class Run:
    """One run in one workdir: `run()` trains to the recipe's last epoch or raises."""

    def __init__(self, make: Factory, recipe: Recipe, workdir: str | Path, framework: str):
        self.recipe = recipe
        self.record = RunRecord(workdir, framework, recipe, writer=False)
        resuming = self.record.check()  # before any data is read: a wrong workdir fails fast
        self.backend = b = make(self.record.checkpoint_dir, True)
        self.record.writer = b.is_main
        self.steps_per_epoch = b.steps_per_epoch
        self.lr_table, momentum = schedules.for_recipe(recipe, b.steps_per_epoch, b.replicas)
        # the momentum goes into the record and TensorBoard where the schedule cycles it
        self.momentum_table = momentum if np.ptp(momentum) > 0 else None
        self.sinks: list = [self.record, console.EpochLines(recipe.epochs, b.is_main)]
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc = -1.0
        self.epoch_sums = np.zeros(3)  # loss sum, correct, count of this epoch so far
        self.window = np.zeros(3)  # loss sum, correct and count since the last log line
        self.nonfinite_streak = 0
        self.stop_requested = False
        self.stop_after_step: int | None = None  # tests: behave as if signalled after this step
        self._check = identity_check(recipe, b)
        if resuming:
            found = b.restore_latest(self._check)
            if found is not None:
                self._resume(*found)
        self.record.start(b.libraries(), b.device_name())
        self.record.rewind(self.global_step)
        events = self.record.workdir / "tensorboard"
        if recipe.tensorboard:  # event files rewound to the same step as the record
            self.sinks.append(TensorBoardSink(events, self.global_step, b.is_main))
        elif resuming and events.is_dir():  # off for now: still drop the discarded steps
            TensorBoardSink(events, self.global_step, b.is_main).close()

    # --- checkpoints -------------------------------------------------------------------------
    def meta(self) -> dict:
        """What a checkpoint records of the run besides the arrays. The epoch's sums are summed
        over processes here (every process saves), so a resumed run has them all."""
        return {**identity(self.recipe, self.backend), "config": self.recipe.to_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "best_acc": self.best_acc,
                "epoch_sums": self.backend.all_sum(self.epoch_sums).tolist(),
                "window": self.window.tolist()}

    def _resume(self, meta: dict, where: str) -> None:
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.global_step, self.best_acc = meta["global_step"], meta["best_acc"]
        sums = np.asarray(meta["epoch_sums"], np.float64)
        # sums over all processes: one process carries them on, so that all_sum counts them once
        keep = self.backend.is_main or not self.backend.per_process_metrics
        self.epoch_sums = sums if keep else np.zeros(3)
        window = np.asarray(meta["window"], np.float64)
        if len(window) == 2:  # a checkpoint from before the window counted correct answers
            window = np.array([window[0], np.nan, window[1]])
        self.window = window
        if self.backend.is_main:
            console.say(f"resumed from {where} at epoch {self.epoch + 1}, step "
                        f"{self.step_in_epoch} of {self.steps_per_epoch} (global step "
                        f"{self.global_step})")

    def save(self, best: bool = False) -> None:
        self.backend.save(self.meta(), best)

    # --- stopping ----------------------------------------------------------------------------
    def _stop_flag(self) -> bool:
        if self.stop_after_step is not None and self.global_step >= self.stop_after_step:
            self.stop_requested = True
        return self.stop_requested

    def _should_stop(self) -> bool:
        """Between two steps: do all processes agree to stop now?"""
        flag = self._stop_flag()
        if self.backend.num_processes > 1 and self.global_step % STOP_CHECK_EVERY:
            return False
        return self.backend.any_process(flag)

    # --- metrics -----------------------------------------------------------------------------
    def _drain(self, pending: list) -> float:
        """Fetch the metrics of the steps since the last drain (one device sync), stop on a
        non-finite loss, and add them up; returns how many images those steps trained on. A
        non-finite step that fp16 loss scaling skipped is left out of the averages."""
        if not pending:
            return 0.0
        rows = self.backend.fetch(pending)
        first = self.global_step - len(pending)
        for k, (loss, correct, count, finite) in enumerate(rows):
            if not finite:
                self.nonfinite_streak += 1
                if self.nonfinite_streak > self.backend.nonfinite_steps_allowed:
                    raise NonFiniteLoss(
                        f"the training loss became NaN or inf at global step {first + k} (epoch "
                        f"{self.epoch + 1}); the last good checkpoint in "
                        f"{self.record.checkpoint_dir} is kept. Lower lr, or use amp=off if "
                        "mixed precision overflowed, then rerun")
                continue
            self.nonfinite_streak = 0
            self.epoch_sums += (loss * count, correct, count)
            self.window += (loss * count, correct, count)
        pending.clear()
        return float(rows[:, 2].sum())

    def _log_window(self, bar) -> None:
        wl, wc, wn = self.window
        mean = wl / wn if wn else float("nan")
        acc = wc / wn if wn else float("nan")
        lr = float(self.lr_table[self.global_step - 1])  # the rate the last step used
        bar.set_postfix_str(f"loss {mean:.4f} acc {100 * acc:.1f}% lr {lr:.4g}")
        line = {"step": self.global_step, "epoch": self.epoch + 1,
                "train_loss_window": mean, "train_acc_window": acc, "lr": lr}
        if self.momentum_table is not None:
            line["momentum"] = float(self.momentum_table[self.global_step - 1])
        for sink in self.sinks:
            sink.log_step(line)
        self.window[:] = 0

    # --- the loop ----------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        """Train the rest of the current epoch and evaluate; the epoch's metrics."""
        r, b = self.recipe, self.backend
        bar = console.progress(self.steps_per_epoch, self.step_in_epoch,
                               f"epoch {self.epoch + 1}/{r.epochs}", b.is_main)
        pending: list = []
        t0, seen = time.perf_counter(), 0.0
        try:
            for batch in b.batches(self.epoch, self.step_in_epoch):
                pending.append(b.train_step(batch))
                if self.global_step == 0 and b.is_main:
                    first = b.fetch(pending[-1:])[0, 0]
                    console.say(console.first_batch_line(first, r.num_classes))
                self.global_step += 1
                self.step_in_epoch += 1
                bar.update(1)
                if self.global_step % r.log_every_steps == 0:
                    seen += self._drain(pending)
                    self._log_window(bar)
                if self.step_in_epoch < self.steps_per_epoch:
                    if self._should_stop():
                        self._drain(pending)
                        self.save()
                        raise Preempted(self.global_step)
                    if (r.checkpoint_every_steps
                            and self.global_step % r.checkpoint_every_steps == 0):
                        seen += self._drain(pending)
                        self.save()
        except CorruptData:
            # the data failed between two steps: the state is that of the last completed step
            self._drain(pending)
            self.save()
            raise
        seen += self._drain(pending)
        bar.close()
        train_time = time.perf_counter() - t0
        loss_sum, correct, count, seen = map(float, b.all_sum(np.append(self.epoch_sums, seen)))
        metrics = {"step": self.global_step, "epoch": self.epoch + 1,
                   "train_loss": loss_sum / count if count else float("nan"),
                   "train_acc": correct / count if count else float("nan"),
                   "lr": float(self.lr_table[self.global_step - 1])}
        if self.momentum_table is not None:
            metrics["momentum"] = float(self.momentum_table[self.global_step - 1])
        metrics.update(self.evaluate())
        b.end_epoch()  # after eval: a failed eval must not step a scheduler twice
        metrics["epoch_time"] = time.perf_counter() - t0
        metrics["train_images_per_s"] = seen / max(train_time, 1e-9)
        return metrics

    def evaluate(self) -> dict:
        return test_metrics(self.backend)

    def describe(self) -> str:
        r, b = self.recipe, self.backend
        return (f"{r.recipe}: {r.model} ({b.num_params():,} parameters) on {b.describe()}; "
                f"{b.num_train} train / {b.num_eval} test images; {r.epochs} epochs of "
                f"{self.steps_per_epoch} steps; workdir {self.record.workdir}")

    def run(self) -> dict:
        """Train to the recipe's last epoch (from wherever the run stands) and return the final
        metrics. Raises Preempted when a stop was requested at an epoch boundary."""
        r = self.recipe
        if self.backend.is_main:
            console.say(self.describe())
        last: dict = {}
        while self.epoch < r.epochs:
            metrics = self.run_epoch()
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums[:] = 0
            best = metrics["test_acc"] > self.best_acc
            if best:
                self.best_acc = metrics["test_acc"]
            metrics["best_test_acc"] = self.best_acc
            metrics["state_digest"] = self.backend.digest()
            confusion = metrics.pop("confusion")
            metrics["per_class_test_acc"] = per_class(confusion)
            # record and sinks, then best, then last: a crash between any two of them resumes
            # from the previous `last`, which rewinds the record and the event files and redoes
            # the epoch identically (the pictures are drawn again from the record)
            self.record.log(**metrics)
            if best:  # the best epoch's confusion matrix (its numbers and its picture)
                self.record.confusion(confusion, metrics)
            for sink in self.sinks:
                sink.log_epoch(metrics)
            self.save(best)
            last = metrics
            if self.epoch < r.epochs and self.backend.any_process(self._stop_flag()):
                raise Preempted(self.global_step)
        if not last and self.backend.is_main:
            console.say(f"the run in {self.record.workdir} already finished {r.epochs} epochs "
                        f"(best test accuracy {100 * self.best_acc:.2f}%)")
        return {"best_test_acc": self.best_acc, "global_step": self.global_step, **last}


def per_class(confusion: np.ndarray) -> list:
    """Each class's test accuracy; None (JSON null) for a class without test images."""
    return [None if np.isnan(a) else a for a in plot.per_class_accuracy(confusion)]


# --- entry points -------------------------------------------------------------------------------


def test_metrics(backend: Backend) -> dict:
    """Loss and accuracy over the whole test split, each image counted once, and the confusion
    matrix (key "confusion", an integer array: not for the JSON record as it is)."""
    loss_sum, correct, count, confusion = backend.evaluate()
    # cannot happen unless sharding is broken
    if int(count) != backend.num_eval or int(confusion.sum()) != backend.num_eval:
        raise RuntimeError(f"evaluated {int(count)} images ({int(confusion.sum())} in the "
                           f"confusion matrix), the split has {backend.num_eval}")
    if int(np.trace(confusion)) != int(correct):
        raise RuntimeError(f"the confusion matrix has {int(np.trace(confusion))} correct "
                           f"answers, the count says {int(correct)}")
    return {"test_loss": loss_sum / count, "test_acc": correct / count, "test_count": int(count),
            "confusion": confusion}


def train_and_evaluate(make: Factory, recipe: Recipe, workdir: str | Path, framework: str,
                       stop_after_step: int | None = None) -> dict:
    """Train `recipe` in `workdir` (resuming what is there) and return the last metrics.

    Raises `Preempted` after writing a checkpoint when SIGTERM/SIGINT arrives (or, for tests,
    after global step `stop_after_step`); calling again with the same arguments resumes.
    """
    run = Run(make, recipe, workdir, framework)
    run.stop_after_step = stop_after_step
    try:
        with StopOnSignal(run, announce=run.backend.is_main):
            return run.run()
    finally:
        for sink in run.sinks:
            getattr(sink, "close", lambda: None)()
        run.backend.close()


def evaluate_checkpoint(make: Factory, recipe: Recipe, workdir: str | Path,
                        path: str | None) -> dict:
    """--eval-only: evaluate `path`, or the workdir's best checkpoint (else its last)."""
    backend = make(Path(workdir) / "checkpoints", False)
    try:
        meta, where = backend.restore_for_eval(path, identity_check(recipe, backend))
        metrics = test_metrics(backend)
        if backend.is_main:
            console.say(f"{where}: test loss {metrics['test_loss']:.4f} acc "
                        f"{100 * metrics['test_acc']:.2f}% on {metrics['test_count']} images "
                        f"(epoch {meta['epoch']}, step {meta['global_step']})")
        return metrics
    finally:
        backend.close()


def main(argv: list[str] | None, prog: str, framework: str, recipes: cli.RecipeBook,
         train: Callable[[Recipe, str, str], Any],
         evaluate: Callable[[Recipe, str, str | None, str], Any]) -> int:
    """The command line of both stacks: parse, then train(recipe, workdir, device) or
    evaluate(recipe, workdir, checkpoint, device); user mistakes are one line and exit 2."""
    try:
        args, recipe = cli.parse(argv, prog, framework, recipes)
        if recipe is None:
            cli.print_keys()
            return 0
        if args.eval_only:
            evaluate(recipe, args.workdir, args.checkpoint, args.device)
        else:
            train(recipe, args.workdir, args.device)
        return 0
    except UserError as err:
        return report(err, prog)
    except Preempted as stop:
        print(f"stopped after global step {stop}; checkpoint written, run the same command to "
              f"resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
