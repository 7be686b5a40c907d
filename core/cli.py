"""The command line both `python -m torch_ref.train` and `python -m flax_impl.train` take.

    --recipe NAME [--size full|smoke] [--workdir DIR] [--data-dir DIR] [--eval-only]
    [--checkpoint PATH] [--device auto|cpu|cuda] [key=value ...]

Overrides are ``key=value`` words after the flags (``epochs=5 lr=0.05``); ``--list-keys`` prints the
keys. Every mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Protocol, Sequence

from core.errors import UserError
from core.recipe import SIZES, Recipe, apply_overrides, given_once, keys_help


class RecipeBook(Protocol):
    """Where recipes come from (the `configs` package): passed in, so that this layer does not
    import what sits above it."""

    RECIPES: Sequence[str]

    def get_config(self, name: str, size: str = "full") -> Recipe: ...


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError: one line, exit 2 (every command here uses it)."""

    def error(self, message):  # argparse prints usage + message; we want one line
        raise UserError(f"{message} (see --help)")


WEIGHTS = ("model", "ema")


def add_weights_flag(p, what: str = "use") -> None:
    """--weights model|ema, for every command that reads a checkpoint's weights."""
    p.add_argument(
        "--weights",
        default="model",
        choices=WEIGHTS,
        help=f"the weights to {what}: the model's, or its EMA's (a run with ema_decay > 0)",
    )


def build_parser(prog: str, recipes: Sequence[str]) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        allow_abbrev=False,
        description="Train a ResNet recipe from configs/ (see README.md).",
        epilog="overrides: key=value words, e.g. epochs=5 lr=0.05; --list-keys lists them",
    )
    p.add_argument("--recipe", help=f"one of: {', '.join(recipes)}")
    p.add_argument(
        "--size",
        default="full",
        choices=SIZES,
        help="smoke = a few steps on a data subset, to check a set-up",
    )
    p.add_argument(
        "--workdir",
        help="run folder (default: runs/<stack>/<recipe>[-smoke]); running again in it resumes",
    )
    p.add_argument("--data-dir", help="where the dataset lives (default depends on the dataset)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the workdir's best checkpoint (or --checkpoint) and exit",
    )
    p.add_argument("--checkpoint", help="checkpoint to evaluate with --eval-only")
    add_weights_flag(p, "evaluate with --eval-only")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--list-keys", action="store_true", help="print the override keys and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def parse(
    argv: list[str] | None, prog: str, stack: str, recipes: RecipeBook, flags=None
) -> tuple[argparse.Namespace, Recipe | None]:
    """Parse the command line into (args, recipe); recipe is None for --list-keys. `flags`:
    adds a stack's own flags to the parser."""
    parser = build_parser(prog, recipes.RECIPES)
    if flags is not None:
        flags(parser)
    # intermixed: key=value words may sit before, between or after the flags
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.list_keys:
        return args, None
    if not args.recipe:
        raise UserError(f"--recipe is required; choose one of: {', '.join(recipes.RECIPES)}")
    recipe = apply_overrides(recipes.get_config(args.recipe, args.size), given_once(args.overrides))
    if args.data_dir is not None:
        if not args.data_dir.strip():
            raise UserError("--data-dir is empty; pass the folder that holds the dataset")
        recipe = recipe.replace(data_dir=args.data_dir)
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint is for --eval-only; training resumes from --workdir")
    if args.weights != "model" and not args.eval_only:
        raise UserError(
            "--weights is for --eval-only; a run with ema_decay > 0 evaluates both every epoch"
        )
    if args.workdir is not None and not args.workdir.strip():
        raise UserError(
            "--workdir is empty; pass the run folder (or leave the flag out for "
            "runs/<stack>/<recipe>)"
        )
    if args.workdir is None:
        suffix = "" if args.size == "full" else f"-{args.size}"
        args.workdir = str(Path("runs") / stack / f"{recipe.recipe}{suffix}")
    return args, recipe


def print_keys() -> None:
    print(keys_help())
