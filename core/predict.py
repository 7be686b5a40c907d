"""Predict with a trained run, written once for both stacks.

    python -m torch_ref.predict --workdir RUN [--checkpoint PATH] [--weights model|ema] [--top K]
                                [--json] IMAGE...
    python -m flax_impl.predict ...            (the same flags)

The run folder says what the model is (its `config.json`, the resolved recipe); the checkpoint is
the run's best (else its last) unless --checkpoint names one, of either stack: a checkpoint of
the other framework is converted through `crossing` (a note on stderr says so). Each
image goes through the recipe's evaluation path: decoded with PIL and turned upright by its EXIF
orientation (`core.pil_transforms.open_image`: 16-bit and float images scaled to 8
bits, any file that does not decode one line), converted to the recipe's
channels (grey "L" or "RGB"), then ImageNet's resize-256 + centre-crop-224 (`eval_resize`), and
an image of another size than the model's input (Fashion-MNIST 28, CIFAR 32) resized to it first
(PIL bilinear); a test image of the data set's own size is taken as it is, so its logits are
those `--eval-only` computes. Output: per image the top-K classes with names and probabilities
(softmax in float64), or with --json one JSON object per line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.cli import Parser, add_weights_flag
from core.errors import UserError, report
from core.recipe import Recipe, make_recipe

# (recipe, checkpoint path or None, run folder, device, "model" | "ema") -> (logits of uint8 NHWC
# images, a description)
Loader = Callable[
    [Recipe, "str | None", Path, str, str], tuple[Callable[[np.ndarray], np.ndarray], str]
]


def run_recipe(workdir: Path) -> Recipe:
    """The recipe a run folder was trained with (its config.json)."""
    config = workdir / "config.json"
    if not workdir.is_dir():
        raise UserError(f"{workdir} is not a run folder; pass --workdir of a training run")
    try:
        saved = json.loads(config.read_text())["recipe"]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        return make_recipe(**fields)
    except FileNotFoundError:
        raise UserError(f"{workdir} has no config.json; pass --workdir of a training run") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as err:
        raise UserError(
            f"{config} is unreadable ({err}); pass --workdir of a training run"
        ) from None


def find_checkpoint(workdir: Path, given: str | None) -> tuple[str, Path]:
    """("torch_ref" | "flax_impl", path) of the checkpoint to use: `given` (a torch_ref .pt file
    or a flax_impl step folder such as RUN/checkpoints/best/1234), else the run's best, else its
    last, whichever stack wrote them."""
    if given is not None:
        p = Path(given)
        if p.is_file():
            return "torch_ref", p
        if p.is_dir() and p.name.isdigit() and (p / "meta").exists():
            return "flax_impl", p
        if not p.exists():
            raise UserError(f"--checkpoint {given} does not exist")
        raise UserError(
            f"--checkpoint {given} is neither a torch_ref checkpoint file (such as "
            "RUN/checkpoints/best.pt) nor a flax_impl step folder (such as "
            "RUN/checkpoints/best/1234)"
        )
    ckpt = workdir / "checkpoints"
    for kind in ("best", "last"):
        if (ckpt / f"{kind}.pt").is_file():
            return "torch_ref", ckpt / f"{kind}.pt"
        steps = sorted(
            (
                int(d.name)
                for d in (ckpt / kind).glob("*")
                if d.name.isdigit() and (d / "meta").exists()
            ),
            reverse=True,
        )
        if steps:
            return "flax_impl", ckpt / kind / str(steps[0])
    raise UserError(
        f"{workdir} holds no checkpoint (nothing in {ckpt}); train it first, or pass --checkpoint"
    )


def check_model(meta: dict, recipe: Recipe, where: str) -> None:
    """A checkpoint's model must be the run's: same recipe, architecture, classes, channels."""
    keys = ("recipe", "model", "num_classes", "in_channels")
    have = {k: meta.get(k) for k in keys}
    want = {k: getattr(recipe, k) for k in keys}
    if have != want:

        def say(d):
            return (
                f"{d['recipe']}/{d['model']} ({d['num_classes']} classes, "
                f"{d['in_channels']} channels)"
            )

        raise UserError(
            f"checkpoint {where} holds a {say(have)} model, the run is {say(want)}; "
            "pass a checkpoint of this run, or the run it belongs to"
        )


def load_image(path: str, recipe: Recipe, max_pixels: int | None = None) -> np.ndarray:
    """One image file as the recipe's evaluation input: uint8 (size, size, channels). Turned
    upright by its EXIF orientation (a phone photo), decoded by `pil_transforms.open_image`
    (`max_pixels`: its pixel limit, default the run's `max_image_pixels`); any file that does
    not decode is a UserError with the reason."""
    from core import pil_transforms

    if not Path(path).exists():
        raise UserError(f"no such image: {path}")
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder; pass image files")
    limit = recipe.max_image_pixels if max_pixels is None else max_pixels
    try:
        img = pil_transforms.open_image(path, recipe.in_channels, limit, exif=True)
    except pil_transforms.BadImage as bad:
        if bad.too_large:
            raise UserError(
                f"{path} is refused: {bad.reason}; if the file is trusted, pass "
                f"--max-image-pixels {bad.pixels} (or 0 for no limit)"
            ) from None
        raise UserError(f"{path} is not an image PIL can read ({bad.reason})") from None
    return prepare(img, recipe)


def prepare(img, recipe: Recipe) -> np.ndarray:
    """A decoded PIL image as the recipe's evaluation input: uint8 (size, size, channels)."""
    from PIL import Image

    from core import pil_transforms

    img = pil_transforms.to_channels(img, recipe.in_channels)
    size = recipe.eval_size
    if recipe.eval_resize:  # ImageNet: Resize(256) + CenterCrop(224), as evaluation does
        return pil_transforms.eval_image(img, recipe.eval_resize, size, recipe.in_channels)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.uint8).reshape(size, size, recipe.in_channels)


def top_k(logits: np.ndarray, names: Sequence[str], k: int) -> list[dict]:
    """The k most probable classes of one image's logits (softmax in float64)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [{"class": int(i), "name": names[i], "prob": float(p[i])} for i in order]


def build_parser(prog: str) -> Parser:
    p = Parser(
        prog=prog,
        allow_abbrev=False,
        description="Classify image files with a trained run (see README.md).",
    )
    p.add_argument("--workdir", required=True, help="the training run's folder")
    p.add_argument(
        "--checkpoint", help="a checkpoint of either stack (default: the run's best, else its last)"
    )
    p.add_argument("--top", type=int, default=5, help="how many classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_weights_flag(p, "classify with")
    add_pixel_limit(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p


def _no_ema(where) -> UserError:
    return UserError(
        f"checkpoint {where} holds no model EMA (its run had ema_decay=0); use --weights model"
    )


def torch_weights(state: dict, weights: str, where) -> dict:
    """The state_dict of the model, or of its EMA (torch's AveragedModel keeps the model under
    "module." beside its count), from a torch_ref checkpoint's dict."""
    if weights == "model":
        return state["model_state"]
    ema = state.get("model_ema")
    if ema is None:
        raise _no_ema(where)
    return {k[len("module.") :]: v for k, v in ema.items() if k.startswith("module.")}


def flax_variables(state: dict, weights: str, where) -> dict:
    """{"params", "batch_stats"} of the model, or of its EMA, from a flax_impl checkpoint's
    TrainState read as a dict."""
    if weights == "ema":
        if "ema" not in state:
            raise _no_ema(where)
        state = state["ema"]
    return {k: state[k] for k in ("params", "batch_stats")}


def add_pixel_limit(p: Parser) -> None:
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="refuse images of more "
        "pixels, a guard against decompression bombs (default: the run's "
        "max_image_pixels, PIL's limit; 0 = no limit)",
    )


def pixel_limit(args, recipe: Recipe) -> int:
    """--max-image-pixels, else the run's max_image_pixels; UserError when negative."""
    if args.max_image_pixels is None:
        return recipe.max_image_pixels
    if args.max_image_pixels < 0:
        raise UserError(
            f"--max-image-pixels must be 0 (no limit) or more, got {args.max_image_pixels}"
        )
    return args.max_image_pixels


def main(argv: list[str] | None, prog: str, load: Callable[..., tuple]) -> int:
    """The command line of both stacks' predict; load(recipe, checkpoint, workdir, device,
    weights) returns (logits_fn, description)."""
    from core.datasets import class_names

    try:
        args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
        workdir = Path(args.workdir)
        recipe = run_recipe(workdir)
        if not 1 <= args.top:
            raise UserError(f"--top must be at least 1, got {args.top}")
        k = min(args.top, recipe.num_classes)
        limit = pixel_limit(args, recipe)
        images = np.stack([load_image(p, recipe, limit) for p in args.images])
        logits_fn, where = load(recipe, args.checkpoint, workdir, args.device, args.weights)
        logits = logits_fn(images)
        names = class_names(recipe)
        for path, row in zip(args.images, logits):
            top = top_k(row, names, k)
            if args.json:
                print(
                    json.dumps(
                        {
                            "image": path,
                            "checkpoint": where,
                            "top": top,
                            "logits": [float(v) for v in row],
                        }
                    ),
                    flush=True,
                )
            else:
                shown = "  ".join(f"{t['name']} {100 * t['prob']:.1f}%" for t in top)
                print(f"{path}: {shown}", flush=True)
        return 0
    except UserError as err:
        return report(err, prog)
