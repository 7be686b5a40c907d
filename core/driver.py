"""The run driver: one training loop, written once, that both stacks run.

core owns the run: the epoch and step loop, when to log, checkpoint and stop, the
first-batch line, detecting a non-finite loss, the metrics of an epoch, the console and record
lines, what a checkpoint says about the run (its identity, where to resume, the running sums) and
the command line's `main`. A stack supplies a `Backend`: the framework's model, data, optimizer
and arrays behind the small interface below. `torch_ref.train` and `flax_impl.train` are each
one `Backend` class plus the three public entry points, which call `train_and_evaluate`,
`evaluate_checkpoint` and `main` here; `main` takes the stack's `COMMAND`, a `Stack` (its name,
recipes, entry points and hooks). `Backend.fetch` hands the step metrics back as a
`StepMetrics` record (loss, correct, count, finite: one array each).

What goes where, at each step of an epoch:

    batch = next(backend.batches(epoch, start))       the stack loads, decodes, places (the data
                                                      plan, core.sampling, decides what)
    handle = backend.train_step(batch)                one optimizer step; nothing waits for it
    every ema_every_steps:  backend.ema_update(...)   the model EMA follows (core.schedules)
    every log_every_steps:  backend.fetch(handles)    one device sync: a StepMetrics of per-step
                                                      loss, correct, count, finite; the driver
                                                      adds them up
    stop requested / checkpoint_every_steps:          backend.any_process(flag), backend.save(meta)

and at the end of an epoch: `backend.all_sum(sums)`, `backend.evaluate()` (and
`backend.evaluate(weights="ema")` with a model EMA), `backend.end_epoch()`
(torch's per-epoch scheduler step), `backend.digest()`, `backend.save(meta, best)`.

Adding a metric: compute it in `Run.run_epoch` or `Run._log_window` below. Adding a log sink: a
class with `log_step(metrics)` and `log_epoch(metrics)` (and optionally `close()`), appended to
`Run.sinks`, as the TensorBoard writer (core.tensorboard) and the pictures (core.plot.Pictures)
are. Neither touches a stack.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import numpy as np

from core import cli, console, plot, preemption, records, schedules
from core.errors import DataFailure, UnusableCheckpoint, UserError, file_system_error, report
from core.preemption import (
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    Preempted,
    StopOnSignal,
)
from core.recipe import Recipe
from core.records import RunRecord
from core.tensorboard import TensorBoardSink

STOP_CHECK_EVERY = 10  # with several processes, they agree on stopping every this many steps
_END = object()  # the end of an epoch's batches


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class WrongRun(UserError):
    """A checkpoint of another run (recipe, model, framework, format): never fallen back from."""


class _EvalStopped(Exception):
    """A stop request arrived during evaluation (one process): the epoch is evaluated again on
    resume, from a checkpoint taken after its last training step."""


class StepMetrics(NamedTuple):
    """What `Backend.fetch` returns for n steps: one float64 array of length n per field."""

    loss: np.ndarray  # each step's mean training loss over its real (unpadded) images
    correct: np.ndarray  # images each step got right
    count: np.ndarray  # images each step trained on
    finite: np.ndarray  # 1.0 where the loss was finite, 0.0 where not (a skipped fp16 step)

    @classmethod
    def of(cls, loss, correct, count, finite) -> "StepMetrics":
        return cls(*(np.asarray(a, np.float64).reshape(-1) for a in (loss, correct, count, finite)))


@dataclasses.dataclass(frozen=True)
class Stack:
    """What a stack's command line hands `main`: its name, its recipes and two entry points,
    plus optional hooks. `train(recipe, workdir, device)`, `evaluate(recipe, workdir,
    checkpoint, device, weights)`; `flags(parser)` adds flags, `setup(args)` runs right after
    parsing (flax_impl: join the other processes), `peer_lost(err)` is the line that says
    another process of the run died (None when `err` is not that)."""

    prog: str  # "python -m torch_ref.train"
    framework: str  # "torch_ref" | "flax_impl"
    recipes: cli.RecipeBook
    train: Callable[[Recipe, str, str], Any]
    evaluate: Callable[[Recipe, str, str | None, str, str], Any]
    flags: Callable[[Any], None] | None = None
    setup: Callable[[Any], None] | None = None
    peer_lost: Callable[[BaseException], str | None] | None = None


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

    def num_params(self) -> int: ...

    def batches(self, epoch: int, start_step: int) -> Iterable[Any]:
        """This process's batches of an epoch from `start_step`, ready for `train_step`."""

    def train_step(self, batch) -> Any:
        """One optimizer step; returns a handle to its metrics without waiting for the device."""

    def fetch(self, handles: list) -> StepMetrics:
        """The metrics of the steps behind `handles`, one device sync for all of them."""

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes (every process calls it); a stack whose step metrics
        already cover the global batch (per_process_metrics False) returns `values`."""

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is True on any (every process calls it)."""

    def evaluate(
        self, between: Callable[[], None] | None = None, weights: str = "model"
    ) -> tuple[float, float, float, np.ndarray]:
        """(loss sum, correct, count, confusion) over the whole test split, every image once;
        confusion[true, predicted] counts images (num_classes x num_classes integers). Calls
        `between()` (if given) before each batch; it may raise to abandon the evaluation.
        `weights`: "model", or "ema" for the model EMA's weights and BatchNorm statistics."""

    def ema_update(self, restart: bool) -> None:
        """Update the model EMA from the model after an optimizer step (recipes with
        ema_decay > 0): the first update after a restart copies the model, later ones average
        with the decay of core.schedules.ema_decay; `restart`: the next update copies again."""

    def end_epoch(self) -> None:
        """After an epoch's evaluation (torch: the per-epoch scheduler step)."""

    def save(self, meta: dict, best: bool) -> None:
        """Write the arrays with `meta` (JSON-able) as `last`, and as `best` first if `best`."""

    def resume_candidates(self) -> list[str]:
        """The checkpoints a run may resume from, newest first: the `last` one, the one before
        it, then the best (each a complete state; an older one only redoes steps)."""

    def restore(self, where: str, check: Callable[[dict, str], None]) -> dict:
        """Load the training state of checkpoint `where`, calling check(meta, where) before the
        arrays; its meta. UnusableCheckpoint when it cannot be read."""

    def checkpoint_bytes(self) -> int:
        """About how large one checkpoint is (for the message when a disk is full)."""

    def restore_for_eval(
        self, path: str | None, check: Callable[[dict, str], None], weights: str = "model"
    ) -> tuple[dict, str]:
        """Load `path`, or the best checkpoint (else the last) of the checkpoint folder, for
        evaluating the model: with `weights` "ema" the checkpoint's EMA becomes the model."""

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the parameters, BatchNorm statistics and momentum."""

    def close(self) -> None: ...


Factory = Callable[[Path, bool], Backend]


# --- what a checkpoint says about the run ---------------------------------------------------------


def identity(recipe: Recipe, backend: Backend) -> dict:
    """The run a checkpoint belongs to; a checkpoint whose identity differs is refused."""
    return {
        "format": backend.checkpoint_format,
        "framework": backend.framework,
        "recipe": recipe.recipe,
        "model": recipe.model,
        "num_classes": recipe.num_classes,
        "in_channels": recipe.in_channels,
    }


def identity_check(recipe: Recipe, backend: Backend) -> Callable[[dict, str], None]:
    want = identity(recipe, backend)

    def check(meta: dict, where: str) -> None:
        have = {k: meta.get(k) for k in want}
        if have["framework"] == want["framework"] and have["format"] != want["format"]:
            raise WrongRun(
                f"checkpoint {where} has format {have['format']}, this version of "
                f"{want['framework']} reads {want['format']}; finish that run with "
                "the version that wrote it, or pass another --workdir"
            )
        if have != want:

            def say(d):
                return (
                    f"{d['framework']} {d['recipe']}/{d['model']} ({d['num_classes']} classes, "
                    f"{d['in_channels']} channels, format {d['format']})"
                )

            raise WrongRun(
                f"checkpoint {where} belongs to {say(have)}, this run is "
                f"{say(want)}; pass the --recipe and overrides it was trained with, "
                "or another --workdir"
            )

    return check


class Run:
    """One run in one workdir: `run()` trains to the recipe's last epoch or raises."""

    def __init__(
        self,
        make: Factory,
        recipe: Recipe,
        workdir: str | Path,
        framework: str,
        main_process: bool = True,
    ):
        self.recipe = recipe
        self.record = RunRecord(workdir, framework, recipe, writer=False)
        # one run per workdir (the main process holds it), before anything is read or cleaned
        self.lock = self.record.lock() if main_process else None
        try:
            self._start(make, recipe)
        except BaseException:
            self.release(tidy=True)
            raise

    def release(self, tidy: bool = False) -> None:
        if self.lock is not None:
            self.lock.release(tidy)
            self.lock = None

    def _start(self, make: Factory, recipe: Recipe) -> None:
        resuming = self.record.check()  # before any data is read: a wrong workdir fails fast
        self.backend = b = make(self.record.checkpoint_dir, True)
        preemption.announce(b.is_main)
        self.record.writer = b.is_main
        self.steps_per_epoch = b.steps_per_epoch
        self.lr_table, momentum = schedules.for_recipe(recipe, b.steps_per_epoch, b.replicas)
        # the momentum goes into the record and TensorBoard where the schedule cycles it
        self.momentum_table = momentum if np.ptp(momentum) > 0 else None
        self.pictures = plot.Pictures(self.record)
        self.sinks: list = [
            self.record,
            self.pictures,
            console.EpochLines(recipe.epochs, b.is_main),
        ]
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc = -1.0
        self.epoch_sums = np.zeros(3)  # loss sum, correct, count of this epoch so far
        self.window = np.zeros(3)  # loss sum, correct and count since the last log line
        self.nonfinite_streak = 0
        self.stop_after_step: int | None = None  # tests: behave as if signalled after this step
        self.have_checkpoint = False  # one to resume from exists (for the full-disk message)
        self.saved_step: int | None = None  # the global step of the newest checkpoint
        self.resumed_from = ""  # the checkpoint this run resumed from
        self._check = identity_check(recipe, b)
        if resuming:
            self._resume_latest()
            self._check_record_kept()
        self.record.start(b.libraries(), b.device_name())
        self.record.rewind(self.global_step)
        if self.global_step:
            self.pictures.rewound()
        events = self.record.workdir / "tensorboard"
        if recipe.tensorboard:  # event files rewound to the same step as the record
            self.sinks.append(TensorBoardSink(events, self.global_step, b.is_main))
        elif resuming and events.is_dir():  # off for now: still drop the discarded steps
            TensorBoardSink(events, self.global_step, b.is_main).close()

    # --- checkpoints -------------------------------------------------------------------------
    def meta(self) -> dict:
        """What a checkpoint records of the run besides the arrays. The epoch's sums are summed
        over processes here (every process saves), so a resumed run has them all."""
        return {
            **identity(self.recipe, self.backend),
            "config": self.recipe.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_acc": self.best_acc,
            "epoch_sums": self.backend.all_sum(self.epoch_sums).tolist(),
            "window": self.window.tolist(),
            "data": self.data_sizes(),
        }

    def data_sizes(self) -> dict:
        """What a resumed run must find again: the number of images and the steps they make
        (the schedule is laid out over them)."""
        b = self.backend
        return {
            "num_train": b.num_train,
            "num_eval": b.num_eval,
            "steps_per_epoch": b.steps_per_epoch,
        }

    def _resume_latest(self) -> None:
        """Resume from the newest checkpoint that loads. Those newer that cannot be read are
        moved to checkpoints/unusable/ (kept, not deleted) and the steps since the one used are
        redone, identically. A record with results and no usable checkpoint is refused, never
        started over (and then nothing is moved)."""
        b = self.backend
        unreadable = []
        for where in b.resume_candidates():
            try:
                meta = b.restore(where, self._check)
            except WrongRun:
                raise
            except UnusableCheckpoint as err:
                unreadable.append((where, err))
                continue
            self._resume(meta, where)  # its checks first: a refused resume moves nothing
            if unreadable:
                b.any_process(False)  # every process has read its checkpoint before any move
            for bad, err in unreadable:
                if b.is_main:
                    console.say(f"note: {err}; moved to {self._set_aside(bad)}")
            self.have_checkpoint, self.saved_step = True, self.global_step
            return
        # one epoch recorded without a checkpoint is what a failed first save leaves (the
        # epoch's line is written before it; checkpoint_every_steps=0 saves first there): that
        # epoch is redone. Two or more mean checkpoints existed and were lost.
        epochs = self.record.epochs_recorded()
        if unreadable or epochs >= 2:
            w = self.record.workdir
            what = f"{epochs} recorded epoch(s)" if epochs else "a record"
            why = f" ({unreadable[0][1]}; {len(unreadable)} unreadable)" if unreadable else ""
            raise UserError(
                f"workdir {w} holds {what} but no usable checkpoint{why}, so it is "
                f"not started over; move it aside (mv {w} {w}.old), which keeps its "
                "results, to train afresh, or pass another --workdir"
            )

    def _check_record_kept(self) -> None:
        """A resumed run's record (metrics.jsonl, and tensorboard/ when it was on) must hold
        the epochs its checkpoint has trained: refused in one line when a file was deleted or
        replaced, before anything is written, unless resume_with_gap=true says to go on."""
        missing = ""
        if self.backend.is_main and self.have_checkpoint and not self.recipe.resume_with_gap:
            lost = sorted(
                set(range(1, self.epoch + 1)) - self.record.epochs_in_record(self.global_step)
            )
            events = self.record.workdir / "tensorboard"
            was_on = self.record.saved_recipe.get("tensorboard", True)
            if lost:
                span = (
                    f"epoch {lost[0]}"
                    if len(lost) == 1
                    else f"epochs {lost[0]}-{lost[-1]}"
                    if lost[-1] - lost[0] == len(lost) - 1
                    else "epochs " + ", ".join(map(str, lost))
                )
                missing = f"{self.record.metrics_path} lacks {span}"
            elif (
                self.global_step
                and was_on
                and self.recipe.tensorboard
                and not any(events.glob("events.out.tfevents.*"))
            ):
                missing = f"{events} holds no event files"
        if self.backend.any_process(bool(missing)):
            raise UserError(
                f"{missing or 'the record in ' + str(self.record.workdir) + ' is incomplete'} "
                f"(deleted or replaced?), though checkpoint {self.resumed_from} has trained "
                f"{self.epoch} epoch(s) and {self.global_step} steps: the checkpoint holds the "
                "weights, so only those lines are gone. Restore the file to keep the whole "
                "record, or rerun with resume_with_gap=true to continue without them"
            )

    def _set_aside(self, where: str) -> str:
        """Move an unreadable checkpoint into checkpoints/unusable/ (main process)."""
        src = Path(where)
        folder = self.record.checkpoint_dir / "unusable"
        dest = folder / "-".join(src.relative_to(self.record.checkpoint_dir).parts)
        if self.backend.is_main and src.exists():
            folder.mkdir(exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(src), str(dest))
        return str(dest)

    def _resume(self, meta: dict, where: str) -> None:
        saved, now = meta.get("data"), self.data_sizes()
        images = ("num_train", "num_eval")
        if saved is not None and any(saved[k] != now[k] for k in images):

            def say(d):
                return f"{d['num_train']} training / {d['num_eval']} test images"

            raise UserError(
                f"the data of this run ({self.recipe.data_dir}) has {say(now)}; "
                f"checkpoint {where} was trained on {say(saved)}. Pass the "
                "--data-dir it was trained with (an image removed or added "
                "changes the schedule), or pass another --workdir for a new run"
            )
        if saved is not None and saved["steps_per_epoch"] != now["steps_per_epoch"]:
            raise UserError(
                f"checkpoint {where} was trained with {saved['steps_per_epoch']} "
                f"steps per epoch, this run makes {now['steps_per_epoch']} of the "
                "same images: its global batch differs (batch_size x processes or "
                "devices). Resume with the processes and devices it was trained "
                "on, or pass another --workdir for a new run"
            )
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.global_step, self.best_acc = meta["global_step"], meta["best_acc"]
        sums = np.asarray(meta["epoch_sums"], np.float64)
        # sums over all processes: one process carries them on, so that all_sum counts them once
        keep = self.backend.is_main or not self.backend.per_process_metrics
        self.epoch_sums = sums if keep else np.zeros(3)
        self.window = np.asarray(meta["window"], np.float64)
        self.resumed_from = where
        if self.backend.is_main:
            console.say(
                f"resumed from {where} at epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch} of {self.steps_per_epoch} (global step "
                f"{self.global_step})"
            )

    def save(self, best: bool = False) -> None:
        meta = self.meta()
        try:
            self.backend.save(meta, best)
        except Exception as err:
            # a save that wrote `best` and then filled the disk writing `last` leaves a
            # checkpoint the rerun resumes from, though none was complete before it
            found = file_system_error(
                err,
                getattr(self.backend, "checkpoint_bytes", int)(),
                resumable=self.have_checkpoint or bool(self.backend.resume_candidates()),
                where=self.record.checkpoint_dir,
            )
            if found is None:
                raise
            raise found from None
        self.have_checkpoint, self.saved_step = True, self.global_step

    def _kept(self) -> str:
        """What is on disk to go back to, for the line that stops a run."""
        if self.saved_step is None:
            return f"no checkpoint was written yet (none in {self.record.checkpoint_dir})"
        return (
            f"the last checkpoint, of global step {self.saved_step}, is kept in "
            f"{self.record.checkpoint_dir}"
        )

    def _data_failed(self, err: DataFailure, pending: list) -> DataFailure:
        """The data failed between two steps: checkpoint the last completed one and say so.
        With several processes only this one knows: a save (its collectives) would wait on
        the others forever, so it stops and the run resumes from its last checkpoint."""
        if self.backend.num_processes > 1:
            return err.outcome(
                f"this process stops without a new checkpoint (the others "
                f"would wait on it); {self._kept()}"
            )
        self._drain(pending)
        self.save()
        return err.outcome(
            f"a checkpoint of global step {self.global_step} was written: the run resumes there"
        )

    # --- stopping ----------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return preemption.requested() is not None

    def _stop_flag(self) -> bool:
        if self.stop_after_step is not None and self.global_step >= self.stop_after_step:
            return True
        return self.stop_requested

    def _should_stop(self, at_boundary: bool = False) -> bool:
        """Between two steps (or, `at_boundary`, at a point every process reaches at once): do
        all processes agree to stop now?"""
        flag = self._stop_flag()
        if (
            self.backend.num_processes > 1
            and not at_boundary
            and self.global_step % STOP_CHECK_EVERY
        ):
            return False
        return self.backend.any_process(flag)

    # --- metrics -----------------------------------------------------------------------------
    def _drain(self, pending: list) -> float:
        """Fetch the metrics of the steps since the last drain (one device sync), stop on a
        non-finite loss, and add them up; returns how many images those steps trained on. A
        non-finite step that fp16 loss scaling skipped is left out of the averages."""
        if not pending:
            return 0.0
        m = self.backend.fetch(pending)
        first = self.global_step - len(pending)
        for k, (loss, correct, count, finite) in enumerate(zip(*m)):
            if not finite:
                self.nonfinite_streak += 1
                if self.nonfinite_streak > self.backend.nonfinite_steps_allowed:
                    raise NonFiniteLoss(
                        f"the training loss became NaN or inf at global step {first + k} (epoch "
                        f"{self.epoch + 1}); {self._kept()}. Start a new run with a lower "
                        "lr (or amp=off if mixed precision overflowed) in another --workdir: "
                        "a run resumes only with the settings it started with"
                    )
                continue
            self.nonfinite_streak = 0
            self.epoch_sums += (loss * count, correct, count)
            self.window += (loss * count, correct, count)
        pending.clear()
        return float(m.count.sum())

    def _log_window(self, bar) -> None:
        wl, wc, wn = self.window
        mean = wl / wn if wn else float("nan")
        acc = wc / wn if wn else float("nan")
        lr = float(self.lr_table[self.global_step - 1])  # the rate the last step used
        bar.set_postfix_str(f"loss {mean:.4f} acc {100 * acc:.1f}% lr {lr:.4g}")
        line = {
            "step": self.global_step,
            "epoch": self.epoch + 1,
            "train_loss_window": mean,
            "train_acc_window": acc,
            "lr": lr,
        }
        if self.momentum_table is not None:
            line["momentum"] = float(self.momentum_table[self.global_step - 1])
        for sink in self.sinks:
            sink.log_step(line)
        self.window[:] = 0

    # --- the loop ----------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        """Train the rest of the current epoch and evaluate; the epoch's metrics."""
        r, b = self.recipe, self.backend
        bar = console.progress(
            self.steps_per_epoch,
            self.step_in_epoch,
            f"epoch {self.epoch + 1}/{r.epochs}",
            b.is_main,
        )
        pending: list = []
        t0, seen = time.perf_counter(), 0.0
        try:
            batches = iter(b.batches(self.epoch, self.step_in_epoch))
            while True:
                # a stop request while the data is late ends the wait (one process)
                with preemption.waiting(b.num_processes == 1):
                    batch = next(batches, _END)
                if batch is _END:
                    break
                pending.append(b.train_step(batch))
                if schedules.ema_updates_after(r, self.step_in_epoch):
                    b.ema_update(schedules.ema_restarts(r, self.epoch))
                preemption.pause("step")
                if self.global_step == 0 and b.is_main:
                    first = b.fetch(pending[-1:]).loss[0]
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
                    if (
                        r.checkpoint_every_steps
                        and self.global_step % r.checkpoint_every_steps == 0
                    ):
                        seen += self._drain(pending)
                        self.save()
        except DataFailure as err:
            raise self._data_failed(err, pending) from None
        except preemption.StopWaiting:
            self._drain(pending)
            self.save()
            raise Preempted(self.global_step) from None
        seen += self._drain(pending)
        bar.close()
        train_time = time.perf_counter() - t0
        if self.step_in_epoch == self.steps_per_epoch and self._should_stop(at_boundary=True):
            self.save()  # the epoch's training is done; its evaluation is done on resume
            raise Preempted(self.global_step)
        loss_sum, correct, count, seen = map(float, b.all_sum(np.append(self.epoch_sums, seen)))
        metrics = {
            "step": self.global_step,
            "epoch": self.epoch + 1,
            "train_loss": loss_sum / count if count else float("nan"),
            "train_acc": correct / count if count else float("nan"),
            "lr": float(self.lr_table[self.global_step - 1]),
        }
        if self.momentum_table is not None:
            metrics["momentum"] = float(self.momentum_table[self.global_step - 1])
        try:
            metrics.update(self.evaluate())
        except _EvalStopped:
            self.save()
            raise Preempted(self.global_step) from None
        except DataFailure as err:  # a test image: the epoch's training is kept, eval redone
            raise self._data_failed(err, []) from None
        b.end_epoch()  # after eval: a failed eval must not step a scheduler twice
        metrics["epoch_time"] = time.perf_counter() - t0
        metrics["train_images_per_s"] = seen / max(train_time, 1e-9)
        return metrics

    def evaluate(self) -> dict:
        """The model's test metrics and, with a model EMA, the EMA's loss and accuracy beside
        them (its confusion matrix is not kept: `best` and the matrix are the model's)."""
        out = test_metrics(self.backend, self._between_eval_batches)
        if self.recipe.ema_decay:
            ema = test_metrics(self.backend, self._between_eval_batches, weights="ema")
            out["test_loss_ema"], out["test_acc_ema"] = ema["test_loss"], ema["test_acc"]
        return out

    def _between_eval_batches(self) -> None:
        """A stop request abandons the evaluation when this process alone evaluates; with
        several processes, which must agree on it, the evaluation finishes first."""
        preemption.pause("eval")
        if self.backend.num_processes == 1 and self._stop_flag():
            raise _EvalStopped

    def describe(self) -> str:
        r, b = self.recipe, self.backend
        return (
            f"{r.recipe}: {r.model} ({b.num_params():,} parameters) on {b.describe()}; "
            f"{b.num_train} train / {b.num_eval} test images; {r.epochs} epochs of "
            f"{self.steps_per_epoch} steps; workdir {self.record.workdir}"
        )

    def run(self) -> dict:
        """Train to the recipe's last epoch (from wherever the run stands) and return the final
        metrics. Raises Preempted when a stop was requested at an epoch boundary."""
        r = self.recipe
        if self.backend.is_main:
            console.say(self.describe())
        if self.epoch < r.epochs and self._should_stop(at_boundary=True):
            raise Preempted(self.global_step, saved=False)  # before the first step: no new state
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
        self.pictures.flush()  # the last epoch's pictures; a failure here is the run's
        if not last and self.backend.is_main:
            console.say(
                f"the run in {self.record.workdir} already finished {r.epochs} epochs "
                f"(best test accuracy {100 * self.best_acc:.2f}%)"
            )
        return {"best_test_acc": self.best_acc, "global_step": self.global_step, **last}


def per_class(confusion: np.ndarray) -> list:
    """Each class's test accuracy; None (JSON null) for a class without test images."""
    return [None if np.isnan(a) else a for a in records.per_class_accuracy(confusion)]


# --- entry points -------------------------------------------------------------------------------


def test_metrics(
    backend: Backend, between: Callable[[], None] | None = None, weights: str = "model"
) -> dict:
    """Loss and accuracy over the whole test split, each image counted once, and the confusion
    matrix (key "confusion", an integer array: not for the JSON record as it is); `weights`:
    the model's ("model") or its EMA's ("ema")."""
    loss_sum, correct, count, confusion = backend.evaluate(between, weights)
    # cannot happen unless sharding is broken
    if int(count) != backend.num_eval or int(confusion.sum()) != backend.num_eval:
        raise RuntimeError(
            f"evaluated {int(count)} images ({int(confusion.sum())} in the "
            f"confusion matrix), the split has {backend.num_eval}"
        )
    if int(np.trace(confusion)) != int(correct):
        raise RuntimeError(
            f"the confusion matrix has {int(np.trace(confusion))} correct "
            f"answers, the count says {int(correct)}"
        )
    return {
        "test_loss": loss_sum / count,
        "test_acc": correct / count,
        "test_count": int(count),
        "confusion": confusion,
    }


def train_and_evaluate(
    make: Factory,
    recipe: Recipe,
    workdir: str | Path,
    framework: str,
    stop_after_step: int | None = None,
    main_process: bool = True,
) -> dict:
    """Train `recipe` in `workdir` (resuming what is there) and return the last metrics.

    Raises `Preempted` after writing a checkpoint when SIGTERM/SIGINT arrives (or, for tests,
    after global step `stop_after_step`); calling again with the same arguments resumes.
    `main_process`: this process holds the workdir's lock (the one that will write).
    """
    with StopOnSignal():
        run = Run(make, recipe, workdir, framework, main_process)
        run.stop_after_step = stop_after_step
        try:
            return run.run()
        finally:
            try:
                for sink in run.sinks:
                    getattr(sink, "close", lambda: None)()
                run.backend.close()
            finally:
                run.release()


def evaluate_checkpoint(
    make: Factory, recipe: Recipe, workdir: str | Path, path: str | None, weights: str = "model"
) -> dict:
    """--eval-only: evaluate `path`, or the workdir's best checkpoint (else its last); its
    model's weights or, `weights` "ema", its EMA's."""
    backend = make(Path(workdir) / "checkpoints", False)
    try:
        try:
            meta, where = backend.restore_for_eval(path, identity_check(recipe, backend), weights)
        except UnusableCheckpoint as err:
            if "--checkpoint" in str(err):
                raise
            raise UserError(
                f"{err}; pass --checkpoint with a complete checkpoint (a run keeps "
                "best, last and the one before last)"
            ) from None

        def between() -> None:  # a stop request ends an evaluation at once: nothing to save
            preemption.pause("eval")
            if preemption.requested() and backend.num_processes == 1:
                raise Preempted(meta.get("global_step", 0), saved=False, doing="evaluating")

        metrics = test_metrics(backend, between)
        if backend.is_main:
            if weights == "ema":
                where = f"{where} (its EMA)"
            console.say(
                f"{where}: test loss {metrics['test_loss']:.4f} acc "
                f"{100 * metrics['test_acc']:.2f}% on {metrics['test_count']} images "
                f"(epoch {meta['epoch']}, step {meta['global_step']})"
            )
        return metrics
    finally:
        backend.close()


def main(argv: list[str] | None, stack: Stack) -> int:
    """The command line of both stacks: parse, then stack.train(recipe, workdir, device) or
    stack.evaluate(recipe, workdir, checkpoint, device); user mistakes are one line and exit 2.

    SIGTERM/SIGINT are handled from the start: a stop request during start-up ends the command
    before it trains (exit 75); a second SIGINT quits at once (exit 130), one line either way.
    When `stack.peer_lost(err)` says another process of the run died, this one exits at once
    with EXIT_PEER_LOST."""
    prog, peer_lost = stack.prog, stack.peer_lost

    def main_rank() -> bool:  # torchrun (and flax_impl's processes): one line, not one each
        return os.environ.get("RANK", "0") == "0"

    with StopOnSignal():
        try:
            args, recipe = cli.parse(argv, prog, stack.framework, stack.recipes, stack.flags)
            if stack.setup is not None and recipe is not None:
                stack.setup(args)
                preemption.install_early()  # setup may have put its own handlers in (JAX's)
            preemption.pause("start")
            if recipe is None:
                cli.print_keys()
                return 0
            if args.eval_only:
                stack.evaluate(recipe, args.workdir, args.checkpoint, args.device, args.weights)
            else:
                stack.train(recipe, args.workdir, args.device)
            return 0
        except UserError as err:
            return report(err, prog)
        except Preempted as stop:
            if main_rank() and stop.saved:
                print(
                    f"stopped after global step {stop}; checkpoint written, run the same "
                    f"command to resume (exit code {EXIT_PREEMPTED})",
                    file=sys.stderr,
                )
            elif main_rank() and stop.doing == "evaluating":
                print(
                    f"stopped while evaluating; nothing was written, run the same command "
                    f"to evaluate again (exit code {EXIT_PREEMPTED})",
                    file=sys.stderr,
                )
            elif main_rank():
                print(
                    f"stopped before training (at global step {stop}, nothing new to save); "
                    f"run the same command to continue (exit code {EXIT_PREEMPTED})",
                    file=sys.stderr,
                )
            return EXIT_PREEMPTED
        except KeyboardInterrupt:
            if main_rank():
                print(
                    f"{prog}: interrupted at once (second SIGINT); checkpoints on disk are "
                    "intact, run the same command to resume from the last one",
                    file=sys.stderr,
                )
            return EXIT_INTERRUPTED
        except Exception as err:
            found = file_system_error(err)  # a write of the record, plots or event files
            if found is not None:
                return report(found, prog)
            line = peer_lost(err) if peer_lost is not None else None
            if line is None:
                raise
            # at once: a clean shutdown would wait on the dead process (barriers, teardown)
            print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)
