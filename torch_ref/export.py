"""Export a trained model to ONNX: ``python -m torch_ref.export --workdir RUN --out model.onnx
[--checkpoint PATH] [--force]``.

The exported graph takes what `predict` feeds the model: uint8 images, NHWC, of the recipe's
evaluation size (batch axis dynamic), and does the evaluation's normalisation itself, so a user
only decodes and sizes an image as predict does (upright by its EXIF orientation; ImageNet:
resize the short side to 256, centre-crop 224; the others: the data set's own size); the
model's metadata says so, with the class names. The
checkpoint may be either stack's (a flax_impl one is converted). Before it is written, the file is
checked: onnxruntime runs it on a seeded batch and its logits must equal torch's within
`BOUND` of the largest logit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from core import predict
from core.cli import Parser, add_weights_flag
from core.datasets import class_names
from core.errors import UserError, report
from torch_ref import predict as torch_predict

PROG = "python -m torch_ref.export"
# float32 logits of two runtimes with their own kernels and summation orders: ~1e-7 of the
# largest logit measured (ResNet-20); 1e-4 leaves room for deeper models and other CPUs
BOUND = 1e-4


class WithPreprocessing(torch.nn.Module):
    """uint8 NHWC images -> logits: the evaluation's normalisation, then the model."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.model((x - self.mean) / self.std)


def metadata(recipe, where: str) -> dict[str, str]:
    size, c = recipe.eval_size, recipe.in_channels
    before = (
        f"decode, turn upright by its EXIF orientation, scale 16-bit or float pixels to "
        f"8 bits, convert to {'RGB' if c == 3 else 'grey (L)'}, "
        + (
            f"resize the short side to {recipe.eval_resize} (bilinear), centre-crop {size}"
            if recipe.eval_resize
            else f"resize to {size}x{size} if it is another size"
        )
    )
    return {
        "input": f"images: uint8, NHWC, (batch, {size}, {size}, {c}); the graph divides by "
        f"255 and normalises with mean {list(recipe.mean)}, std {list(recipe.std)}",
        "preprocessing": before,
        "output": f"logits: float32, (batch, {recipe.num_classes})",
        "class_names": json.dumps(class_names(recipe)),
        "recipe": recipe.recipe,
        "model": recipe.model,
        "checkpoint": where,
    }


def export(recipe, checkpoint: str | None, workdir: Path, out: Path, which: str = "model") -> float:
    """Write `out` (the model's weights or its EMA's, `which`); the largest logit difference
    onnxruntime vs torch, relative to the largest logit, on a seeded batch of 4."""
    import onnx
    import onnxruntime as ort

    model, where = torch_predict.load_model(recipe, checkpoint, workdir, "cpu", which)
    wrapped = WithPreprocessing(model, recipe.mean, recipe.std).eval()
    size, c = recipe.eval_size, recipe.in_channels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, size, size, c), dtype=np.uint8)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapped,
            (torch.from_numpy(images[:2]),),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
        proto = onnx.load(str(path))
        for k, v in metadata(recipe, where).items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images})[0]
        with torch.no_grad():
            want = wrapped(torch.from_numpy(images)).numpy()
        gap = float(np.abs(got - want).max() / np.abs(want).max())
        if not gap < BOUND:
            raise RuntimeError(
                f"onnxruntime's logits differ from torch's by {gap:.2e} of the "
                f"largest logit (bound {BOUND}); the file was not written"
            )
        os.replace(path, out)
    return gap


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=PROG, allow_abbrev=False, description="Export a trained run to ONNX.")
    p.add_argument("--workdir", required=True, help="the training run's folder")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--checkpoint", help="a checkpoint of either stack (default: the run's best)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_weights_flag(p, "export")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        out = Path(args.out)
        if out.is_dir():
            raise UserError(
                f"--out {out} is a folder; --out must name the file to write, "
                f"e.g. --out {out / 'model.onnx'}"
            )
        if out.exists() and not args.force:
            raise UserError(f"{out} exists; pass --force to replace it, or another --out")
        if not out.parent.is_dir():
            raise UserError(f"{out.parent} is not a folder; create it or pass another --out")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise UserError(
                f"exporting needs onnx, onnxruntime and onnxscript ({err.name} is "
                "missing): pip install -e '.[export]'"
            ) from None
        recipe = predict.run_recipe(Path(args.workdir))
        gap = export(recipe, args.checkpoint, Path(args.workdir), out, args.weights)
        print(
            f"wrote {out}: input uint8 (batch, {recipe.eval_size}, {recipe.eval_size}, "
            f"{recipe.in_channels}), output {recipe.num_classes} logits; onnxruntime equals "
            f"torch within {gap:.1e} of the largest logit"
        )
        return 0
    except UserError as err:
        return report(err, PROG)


if __name__ == "__main__":
    sys.exit(main())
