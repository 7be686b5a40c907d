"""The demo's page (see the package docstring)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

# before gradio is imported: no analytics, no telemetry, nothing leaves the machine
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core import predict  # noqa: E402
from core.cli import Parser, add_weights_flag  # noqa: E402
from core.datasets import class_names  # noqa: E402
from core.errors import UserError, report  # noqa: E402

PROG = "python -m demo"
EXAMPLES = 6  # test-set images offered as examples


def best_accuracy(workdir: Path) -> str:
    """The run's best test accuracy and its epoch, from metrics.jsonl."""
    best = None
    try:
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if "test_acc" in m and (best is None or m["test_acc"] > best["test_acc"]):
                best = m
    except (OSError, ValueError):
        pass
    return (
        "no epoch finished"
        if best is None
        else f"{100 * best['test_acc']:.2f}% (epoch {best['epoch']})"
    )


def test_examples(recipe, folder: Path) -> list[str]:
    """The first test images as PNG files, when the data set is on disk (else none)."""
    from PIL import Image

    from core import datasets

    if recipe.dataset == "imagenet":
        return []
    try:
        split = datasets.load_split(
            recipe.replace(eval_subset=EXAMPLES), datasets.resolve_data_dir(recipe), train=False
        )
    except (UserError, OSError):
        return []
    paths = []
    for i, img in enumerate(split.images[:EXAMPLES]):
        p = folder / f"test{i}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
        paths.append(str(p))
    return paths


def image_file_input(gr, **kwargs):
    """A gr.Image that hands the function the uploaded file's path, undecoded. Gradio's own
    preprocessing opens every upload with PIL first (and turns it by its EXIF orientation), so
    a file PIL refuses would end in Gradio's generic error, never reaching `classify`: here
    the upload goes through predict's own decoding, with predict's one-line reasons. (The
    instance's method is replaced: a subclass of a Gradio component makes Gradio write a .pyi
    file beside this module.)"""
    image = gr.Image(type="filepath", **kwargs)
    gradios = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return gradios(payload)  # None, or an inline (base64) image

    image.preprocess = preprocess
    return image


def build(
    workdir: str | Path,
    checkpoint: str | None = None,
    max_pixels: int | None = None,
    which: str = "model",
):
    """The gr.Blocks of a run (both stacks loaded from one checkpoint, the model's weights or
    its EMA's); `max_pixels`: the uploads' pixel limit (default the run's max_image_pixels)."""
    import gradio as gr

    from flax_impl import predict as flax_predict
    from torch_ref import predict as torch_predict

    workdir = Path(workdir)
    recipe = predict.run_recipe(workdir)
    torch_fn, where = torch_predict.load(recipe, checkpoint, workdir, "cpu", which)
    flax_fn, _ = flax_predict.load(recipe, checkpoint, workdir, "cpu", which)
    names = class_names(recipe)
    folder = tempfile.mkdtemp(prefix="demo-examples-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # gone when the demo stops
    examples = test_examples(recipe, Path(folder))

    def classify(image: str | None):
        if image is None:
            return None, None, "upload an image or click an example"
        try:
            x = predict.load_image(image, recipe, max_pixels)[None]
        except UserError as err:  # the page and API clients get predict's line, not a trace
            raise gr.Error(
                str(err).replace(image, Path(image).name), print_exception=False
            ) from None
        t, f = torch_fn(x)[0], flax_fn(x)[0]
        labels = [{n["name"]: n["prob"] for n in predict.top_k(z, names, 5)} for z in (t, f)]
        gap = float(np.abs(t - f).max())
        same = "same" if np.argmax(t) == np.argmax(f) else "DIFFERENT"
        return (
            labels[0],
            labels[1],
            f"largest logit difference torch_ref vs flax_impl: {gap:.2e} "
            f"(largest logit {float(np.abs(t).max()):.2f}); top class: {same}",
        )

    with gr.Blocks(title=f"{recipe.recipe}: {recipe.model}", analytics_enabled=False) as page:
        gr.Markdown(
            f"## {recipe.recipe}: {recipe.model}, best test accuracy "
            f"{best_accuracy(workdir)}\ncheckpoint `{where}`, served by both stacks"
        )
        with gr.Row():
            image = image_file_input(gr, label="image", elem_id="image")
            with gr.Column():
                go = gr.Button("Classify", elem_id="classify")
                parity = gr.Markdown(elem_id="parity")
        with gr.Row():
            torch_out = gr.Label(num_top_classes=5, label="torch_ref", elem_id="torch_ref")
            flax_out = gr.Label(num_top_classes=5, label="flax_impl", elem_id="flax_impl")
        if examples:
            gr.Examples(examples, inputs=image, label="test-set images")
        go.click(classify, inputs=image, outputs=[torch_out, flax_out, parity], api_name="predict")
    return page


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=PROG, allow_abbrev=False, description="The Gradio demo of a trained run.")
    p.add_argument("--workdir", required=True, help="the training run's folder")
    p.add_argument("--checkpoint", help="a checkpoint of either stack (default: the run's best)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    add_weights_flag(p, "serve")
    predict.add_pixel_limit(p)
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        if not 0 < args.port < 65536:
            raise UserError(f"--port {args.port} is not a port number (1-65535)")
        if not port_free(args.host, args.port):
            raise UserError(f"port {args.port} on {args.host} is in use; pass another --port")
        limit = predict.pixel_limit(args, predict.run_recipe(Path(args.workdir)))
        # SIGTERM (a service manager, `kill`) stops it as Ctrl-C does: the server closes and
        # the example files go
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        page = build(args.workdir, args.checkpoint, limit, args.weights)
        print(f"demo on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
        page.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            quiet=True,
            footer_links=[],
            ssr_mode=False,
        )
        return 0
    except UserError as err:
        return report(err, PROG)
    except KeyboardInterrupt:
        return 0
