"""The learning-rate range test, written once for both stacks.

    python -m torch_ref.lr_find --recipe NAME [--workdir DIR] [--data-dir DIR] [--start-lr X]
        [--end-lr X] [--num-iter N] [--step-mode exp|linear] [--smooth-f X] [--diverge-th X]
        [--skip-start N] [--skip-end N] [key=value ...]
    python -m flax_impl.lr_find ...            (the same flags)

Trains the recipe's own model, optimizer (SGD with its momentum and weight decay), data pipeline,
regularisers and precision, from its initial weights, for `num_iter` steps while the learning
rate rises from `start_lr` to `end_lr`, and records the loss of each step. It does what
torch-lr-finder's ``LRFinder.range_test`` does, and the test suite checks torch_ref's curve against
that library's on the same model, optimizer and batches:

- step i (0-based) trains at lr_i = start * (end / start) ** (i / (num_iter - 1)) (``exp``) or
  start + i / (num_iter - 1) * (end - start) (``linear``); the rate recorded for step i is the rate
  that step used;
- the smoothed loss is s_0 = l_0, s_i = smooth_f * l_i + (1 - smooth_f) * s_(i-1) (no smoothing
  when smooth_f = 0);
- the test stops early once s_i > diverge_th * min(s_0 .. s_i), the step that crossed included;
  it also stops at a NaN or infinite loss (torch-lr-finder carries on with NaN);
- the suggested rate is that of the steepest descent of the smoothed curve: the argmin of
  ``np.gradient`` of s over the points left after dropping `skip_start` from the start and
  `skip_end` from the end (torch-lr-finder's ``plot(suggest_lr=True)``).

The weights a test trains are thrown away: nothing of a training run is read or written. The
results go to ``lr_find.json`` and ``lr_find.png`` in their own folder: ``WORKDIR/lr_find/`` when
--workdir names a run, else ``runs/<stack>/<recipe>-lr_find``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core import console, preemption
from core.cli import Parser, RecipeBook
from core.errors import UserError, report
from core.recipe import SIZES, Recipe, apply_overrides, given_once, resume_differences, world_lr

STEP_MODES = ("exp", "linear")
# recipe keys a range test does not use (its own schedule replaces them): a run folder whose
# recipe differs from the test's only in these is the same test
SCHEDULE_ONLY = {
    "lr",
    "lr_reference_world_size",
    "epochs",
    "schedule",
    "onecycle_pct_start",
    "onecycle_div_factor",
    "onecycle_final_div_factor",
    "onecycle_base_momentum",
    "onecycle_max_momentum",
    "onecycle_anneal",
    "log_every_steps",
    "checkpoint_every_steps",
    "eval_batch_size",
    "eval_subset",
}


@dataclasses.dataclass(frozen=True)
class RangeTest:
    """The options of torch-lr-finder's range_test and plot, with the seed's values."""

    start_lr: float = 1e-7  # the seed's optimizer rate before the test
    end_lr: float = 10.0
    num_iter: int = 200  # the seed's; torch-lr-finder's default is 100
    step_mode: str = "exp"
    smooth_f: float = 0.05
    diverge_th: float = 5.0
    skip_start: int = 10  # points left out of the suggestion and the plot, at the start
    skip_end: int = 5  # ... and at the end

    def check(self) -> "RangeTest":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(
            math.isfinite(self.start_lr) and self.start_lr > 0,
            f"--start-lr must be a positive number, got {self.start_lr}",
        )
        need(
            math.isfinite(self.end_lr) and self.end_lr > self.start_lr,
            f"--end-lr ({self.end_lr}) must be larger than --start-lr ({self.start_lr})",
        )
        need(self.num_iter >= 2, f"--num-iter must be at least 2, got {self.num_iter}")
        need(
            self.step_mode in STEP_MODES,
            f"--step-mode must be one of {', '.join(STEP_MODES)}, got {self.step_mode!r}",
        )
        need(0 <= self.smooth_f < 1, f"--smooth-f must be in [0, 1), got {self.smooth_f}")
        need(
            math.isfinite(self.diverge_th) and self.diverge_th > 1,
            f"--diverge-th must be larger than 1, got {self.diverge_th}",
        )
        need(
            self.skip_start >= 0 and self.skip_end >= 0,
            f"--skip-start and --skip-end must be >= 0, got {self.skip_start} and {self.skip_end}",
        )
        return self


def lr_schedule(t: RangeTest) -> np.ndarray:
    """The rate of each step, computed in Python floats as torch-lr-finder's schedulers do."""
    n = t.num_iter - 1
    if t.step_mode == "exp":
        values = [t.start_lr * (t.end_lr / t.start_lr) ** (i / n) for i in range(t.num_iter)]
    else:
        values = [t.start_lr + i / n * (t.end_lr - t.start_lr) for i in range(t.num_iter)]
    return np.array(values, np.float64)


class Curve:
    """The losses of a range test so far: `add` one step's loss, it says whether to go on."""

    def __init__(self, t: RangeTest):
        self.t = t
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.best = math.inf
        self.stopped: str | None = None  # why the test ended before num_iter steps

    def add(self, lr: float, loss: float) -> bool:
        lr, loss = float(lr), float(loss)
        self.lrs.append(lr)
        self.raw.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(loss)
            self.stopped = f"the loss became {loss} at step {len(self.raw) - 1}"
            return False
        if self.smoothed and self.t.smooth_f > 0:
            loss = self.t.smooth_f * loss + (1 - self.t.smooth_f) * self.smoothed[-1]
        self.smoothed.append(loss)
        self.best = min(self.best, loss)
        if loss > self.t.diverge_th * self.best:
            self.stopped = (
                f"the smoothed loss passed {self.t.diverge_th:g} x its minimum at "
                f"step {len(self.raw) - 1} (lr {lr:.3g})"
            )
            return False
        return True

    def suggestion(self) -> tuple[float | None, int | None]:
        """(rate, index) of the steepest descent after skipping, or (None, None) when fewer than
        two finite points remain."""
        return suggest(self.lrs, self.smoothed, self.t.skip_start, self.t.skip_end)


def _trimmed(smoothed: Sequence[float], skip_start: int, skip_end: int) -> np.ndarray:
    """The points a suggestion may pick: skipped at both ends, cut at a non-finite value."""
    losses = np.asarray(smoothed[skip_start : max(len(smoothed) - skip_end, 0)], np.float64)
    finite = np.isfinite(losses)
    return losses if finite.all() else losses[: int(np.argmin(finite))]


def suggest(
    lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = 10, skip_end: int = 5
) -> tuple[float | None, int | None]:
    """torch-lr-finder's suggestion: lrs[argmin(np.gradient(smoothed))] over the trimmed
    points (a non-finite tail, where a test stopped, is left out as well)."""
    losses = _trimmed(smoothed, skip_start, skip_end)
    if len(losses) < 2:
        return None, None
    k = int(np.gradient(losses).argmin())
    return float(lrs[skip_start + k]), skip_start + k


def lowest(
    lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = 10, skip_end: int = 5
) -> float | None:
    """The rate where the smoothed loss is lowest, over the same points (a steadier landmark
    than the steepest descent, which a spike in the curve can move by an order of magnitude)."""
    losses = _trimmed(smoothed, skip_start, skip_end)
    return float(lrs[skip_start + int(losses.argmin())]) if len(losses) else None


# --- running it -----------------------------------------------------------------------------


def endless(backend, count: int):
    """The first `count` training batches, epoch after epoch, as a training run draws them."""
    epoch, left = 0, count
    while left > 0:
        it = iter(backend.batches(epoch, 0))
        try:
            for batch in it:
                yield batch
                left -= 1
                if left == 0:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        epoch += 1


def run(
    make: Callable[[Path, bool, tuple], object], recipe: Recipe, t: RangeTest
) -> tuple[dict, bool]:
    """Run the test with a backend made by make(checkpoint_dir, train, tables); (the result,
    whether this process is the one that writes)."""
    lrs = lr_schedule(t)
    tables = (lrs, np.full(len(lrs), recipe.momentum))
    scratch = Path(tempfile.mkdtemp(prefix="lr_find-"))  # a checkpoint folder nothing uses
    try:
        backend = make(scratch / "checkpoints", True, tables)
        try:
            return _run(backend, recipe, t, lrs), backend.is_main
        finally:
            backend.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(b, recipe: Recipe, t: RangeTest, lrs: np.ndarray) -> dict:
    curve = Curve(t)
    if b.is_main:
        console.say(
            f"LR range test of {recipe.recipe} ({recipe.model}) on {b.describe()}: "
            f"{t.num_iter} steps of batch {recipe.batch_size * b.replicas}, "
            f"lr {t.start_lr:g} -> "
            f"{t.end_lr:g} ({t.step_mode})"
        )
    bar = console.progress(t.num_iter, 0, "lr range test", b.is_main)
    t0 = time.perf_counter()
    for i, batch in enumerate(endless(b, t.num_iter)):
        m = b.fetch([b.train_step(batch)])
        loss, count = m.loss[0], m.count[0]
        if b.num_processes > 1 and b.per_process_metrics:  # the loss of the global batch
            total, n = b.all_sum(np.array([loss * count, count]))
            loss = total / n
        go_on = curve.add(lrs[i], loss)
        bar.update(1)
        preemption.pause("step")  # tests: a signal at a known step
        bar.set_postfix_str(f"lr {lrs[i]:.3g} loss {curve.smoothed[-1]:.4f}")
        if not go_on:
            break
    bar.close()
    lr, index = curve.suggestion()
    low = lowest(curve.lrs, curve.smoothed, t.skip_start, t.skip_end)
    # the rates above are applied as they are; training scales the recipe's lr with the world
    # size when lr_reference_world_size is set, so the override that trains at rate r is
    # r * reference / replicas
    scale = recipe.lr_reference_world_size / b.replicas if recipe.lr_reference_world_size else 1.0
    return {
        "recipe": recipe.recipe,
        "model": recipe.model,
        "batch_size": recipe.batch_size,
        "replicas": b.replicas,
        "global_batch": recipe.batch_size * b.replicas,
        "suggested_override": None if lr is None else lr * scale,
        "options": dataclasses.asdict(t),
        "lr": curve.lrs,
        "loss_raw": curve.raw,
        "loss_smoothed": curve.smoothed,
        "steps_run": len(curve.raw),
        "stopped_early": curve.stopped,
        "suggested_lr": lr,
        "suggested_index": index,
        "lowest_loss_lr": low,
        "recipe_lr": world_lr(recipe, b.replicas),
        "seconds": time.perf_counter() - t0,
        "device": b.describe(),
        "config": recipe.to_dict(),
    }


def write(result: dict, out: Path, framework: str) -> None:
    """lr_find.json and lr_find.png in `out` (each written whole or not at all)."""
    from core import plot
    from core.files import atomic_write_text

    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out / "lr_find.json", json.dumps({"framework": framework, **result}, indent=1) + "\n"
        )
    except OSError as err:
        raise UserError(
            f"cannot write {out / 'lr_find.json'}: {err.strerror or err}; free "
            "space or pass another --workdir"
        ) from None
    o = result["options"]
    title = (
        f"{result['recipe']} ({result['model']}), {framework}: LR range test, "
        f"batch {result['global_batch']}"
    )
    plot.lr_find_png(
        result["lr"],
        result["loss_smoothed"],
        out / "lr_find.png",
        title,
        suggestion=result["suggested_lr"],
        raw_losses=result["loss_raw"],
        skip_start=o["skip_start"],
        skip_end=o["skip_end"],
        log_lr=o["step_mode"] == "exp",
    )


# --- the command line -----------------------------------------------------------------------


def build_parser(prog: str, recipes: Sequence[str]) -> argparse.ArgumentParser:
    d = RangeTest()
    p = Parser(
        prog=prog,
        allow_abbrev=False,
        description="LR range test: train a recipe's model while the rate rises "
        "exponentially, plot the loss, suggest a rate (see README.md).",
        epilog="overrides: key=value words change the recipe, e.g. batch_size=64",
    )
    p.add_argument("--recipe", help=f"one of: {', '.join(recipes)}")
    p.add_argument("--size", default="full", choices=SIZES)
    p.add_argument(
        "--workdir",
        help="a run folder: results go to WORKDIR/lr_find/ (the run's "
        "own files are not touched); default runs/<stack>/<recipe>-lr_find",
    )
    p.add_argument("--data-dir", help="where the dataset lives (default depends on the dataset)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--start-lr", type=float, default=d.start_lr)
    p.add_argument("--end-lr", type=float, default=d.end_lr)
    p.add_argument("--num-iter", type=int, default=d.num_iter)
    p.add_argument("--step-mode", default=d.step_mode, choices=STEP_MODES)
    p.add_argument("--smooth-f", type=float, default=d.smooth_f)
    p.add_argument("--diverge-th", type=float, default=d.diverge_th)
    p.add_argument("--skip-start", type=int, default=d.skip_start)
    p.add_argument("--skip-end", type=int, default=d.skip_end)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def parse(argv: list[str] | None, prog: str, stack: str, recipes: RecipeBook):
    """(recipe, range test, output folder), every check done before anything is read."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog, recipes.RECIPES).parse_intermixed_args(argv)
    if not args.recipe:
        raise UserError(f"--recipe is required; choose one of: {', '.join(recipes.RECIPES)}")
    t = RangeTest(
        args.start_lr,
        args.end_lr,
        args.num_iter,
        args.step_mode,
        args.smooth_f,
        args.diverge_th,
        args.skip_start,
        args.skip_end,
    ).check()
    recipe = apply_overrides(recipes.get_config(args.recipe, args.size), given_once(args.overrides))
    if args.data_dir is not None:
        if not args.data_dir.strip():
            raise UserError("--data-dir is empty; pass the folder that holds the dataset")
        recipe = recipe.replace(data_dir=args.data_dir)
    if args.workdir is not None:
        if not args.workdir.strip():
            raise UserError("--workdir is empty; pass a run folder, or leave it out")
        out = Path(args.workdir) / "lr_find"
        _check_run(Path(args.workdir), recipe)
    else:
        suffix = "" if args.size == "full" else f"-{args.size}"
        out = Path("runs") / stack / f"{recipe.recipe}{suffix}-lr_find"
    _check_writable(out)
    return recipe, t, out, args.device


def _check_writable(out: Path) -> None:
    """Fail before the test, not after it: the folder (or its nearest existing parent) must be
    a folder this process may write in."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; move it aside or pass another --workdir")
    here = out
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir() or not os.access(here, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write the results into {out}: {here} is not a writable "
            "folder; pass --workdir with a folder you can write to"
        )


def _check_run(workdir: Path, recipe: Recipe) -> None:
    """A run folder's test must be of that run's recipe: its results would mislead otherwise."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file; pass a run folder")
    config = workdir / "config.json"
    if not config.exists():
        return
    try:
        saved = json.loads(config.read_text())["recipe"]
        saved.get("recipe")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{config} is unreadable; pass another --workdir") from None
    if saved.get("recipe") != recipe.recipe:
        raise UserError(
            f"workdir {workdir} holds a run of recipe {saved.get('recipe')!r}, not "
            f"{recipe.recipe!r}; pass --recipe {saved.get('recipe')} with its "
            "overrides, or leave --workdir out"
        )
    diffs = [d for d in resume_differences(saved, recipe) if d.split(":")[0] not in SCHEDULE_ONLY]
    if diffs:
        raise UserError(
            f"workdir {workdir} holds a {recipe.recipe} run with other settings "
            f"({'; '.join(diffs[:4])}); pass the run's overrides, or leave --workdir out"
        )


def suggestion_lines(result: dict, train_prog: str) -> list[str]:
    lr = result["suggested_lr"]
    lines = []
    if result["stopped_early"]:
        lines.append(f"stopped after {result['steps_run']} steps: {result['stopped_early']}")
    if lr is None:
        o = result["options"]
        lines.append(
            f"no suggestion: {result['steps_run']} steps leave fewer than 2 points "
            f"after skipping {o['skip_start']} + {o['skip_end']}; raise --num-iter or "
            "lower --skip-start/--skip-end"
        )
        return lines
    lines.append(
        f"suggested lr {lr:.3g} (steepest descent of the smoothed loss; the recipe "
        f"trains at lr {result['recipe_lr']:.3g} here); the smoothed loss is lowest at "
        f"lr {result['lowest_loss_lr']:.3g}"
    )
    override = result["suggested_override"]
    note = ""
    if override != lr:
        ref = result["config"]["lr_reference_world_size"]
        note = (
            f" (the recipe's lr is the rate at {ref} replicas and scales with their number: "
            f"{override:.3g} x {result['replicas']} / {ref} = {lr:.3g})"
        )
    lines.append(
        f"to train with it: {train_prog} --recipe {result['recipe']} lr={override:.3g}{note}"
    )
    return lines


class _Stopped(BaseException):
    """SIGINT or SIGTERM during the range test: nothing is kept, so it ends at once."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


def main(
    argv: list[str] | None,
    prog: str,
    stack: str,
    recipes: RecipeBook,
    make: Callable[[Recipe, str], Callable],
) -> int:
    """The command line of both stacks' lr_find. make(recipe, device) returns a factory
    (checkpoint_dir, train, tables) -> Backend. SIGINT and SIGTERM end it at once with one line
    and exit 128 + the signal's number (130, 143): the test writes its files only at the end,
    so there is nothing to save (a stop request during start-up, marked by
    `preemption.install_early`, is honoured the same way)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        early = preemption.requested()
        if early:
            raise _Stopped(signal.Signals[early])
        return _main(argv, prog, stack, recipes, make)
    except _Stopped as stop:
        print(
            f"{prog}: {signal.Signals(stop.signum).name}: stopped; nothing written (exit code "
            f"{128 + stop.signum})",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv, prog, stack, recipes, make) -> int:
    try:
        recipe, t, out, device = parse(argv, prog, stack, recipes)
        result, is_main = run(make(recipe, device), recipe, t)
        if is_main:
            write(result, out, stack)
            for line in suggestion_lines(result, f"python -m {stack}.train"):
                console.say(line)
            console.say(f"wrote {out / 'lr_find.json'} and {out / 'lr_find.png'}")
        return 0
    except UserError as err:
        return report(err, prog)
