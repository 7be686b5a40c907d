"""``python -m benchmarks.gpu [--smoke]``: the GPU benchmark, one command, under 10 minutes.

Needs no network and no data: it generates CIFAR-format files and random tensors.

1. Correctness on the GPU, before any timing: torch_ref and flax_impl logits (eval mode) on the
   same weights (converted), ResNet-20 at 32 px and ResNet-50 at 224 px:
     - float32 with TF32 off in both (torch's cuDNN/cuBLAS flags; JAX precision "highest"):
       relative L2 error <= 1e-5 (float32 rounding through 50 layers, ~1e-6 on a CPU);
     - TF32 (each framework's default for float32 convolutions on Ampere and later):
       <= 5e-3 (a 10-bit mantissa rounds each product to ~5e-4; errors partly cancel);
     - bf16 compute (torch autocast bf16, flax dtype=bfloat16): <= 5e-2 (an 8-bit mantissa,
       ~4e-3 per operation, through tens of layers).
2. The cifar10 epoch (ResNet-20, batch 128, 50,000 images resident on the GPU, the trainer's own
   loop; the second epoch is timed, the first includes compilation) for torch eager float32 NCHW,
   + channels_last, + AMP (fp16 + GradScaler), + torch.compile; and flax_impl bf16.
   Targets on one H100: <= 1.5 s per epoch.
3. ResNet-50 at 224 px, training images/s at batch 256: torch AMP + channels_last +
   torch.compile, and flax_impl bf16. Target on one H100: >= 3,000 images/s (NVIDIA publishes
   2,470 images/s for one A100 with AMP).

--smoke runs the same code paths at toy sizes (on a CPU too), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.__main__ import measure, med, versions

TOLERANCES = {"float32": 1e-5, "tf32": 5e-3, "bf16": 5e-2}


def correctness(size_scale: float, batch: int) -> list[tuple]:
    """(model, precision, relative error, tolerance, ok) rows."""
    import jax
    import jax.numpy as jnp
    import torch

    from flax_impl import convert, models as fm
    from torch_ref import models as tm

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, size in (("resnet20", 32), ("resnet50", max(32, int(224 * size_scale)))):
        torch.manual_seed(0)
        tmodel = getattr(tm, name)(num_classes=10).to(dev).eval()
        variables = convert.torch_to_flax(tmodel.state_dict())
        x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x).to(dev)
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        for precision in ("float32", "tf32", "bf16"):
            strict = precision == "float32"
            torch.backends.cudnn.allow_tf32 = not strict
            torch.backends.cuda.matmul.allow_tf32 = not strict
            amp = precision == "bf16"
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                want = tmodel(xt).float().cpu().numpy()
            fmodel = getattr(fm, name)(num_classes=10,
                                       dtype=jnp.bfloat16 if amp else jnp.float32)
            with jax.default_matmul_precision("highest" if strict else "default"):
                got = np.asarray(jax.jit(lambda v, x: fmodel.apply(v, x, train=False))(
                    variables, xj), np.float32)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            rows.append((name, precision, err, TOLERANCES[precision],
                         err <= TOLERANCES[precision]))
        torch.backends.cudnn.allow_tf32 = True
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes; runs on a CPU too")
    args = parser.parse_args(argv)
    import jax
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("python -m benchmarks.gpu: error: torch sees no CUDA device; run it on a GPU "
              "machine, or pass --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    n_images = 2048 if args.smoke else 50_000
    big_batch = 4 if args.smoke else 256
    big_size = 64 if args.smoke else 224
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    lines = [f"`python -m benchmarks.gpu{' --smoke' if args.smoke else ''}` on {device}; "
             f"jax devices {jax.devices()}; {versions()}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "", "### Correctness (eval logits, "
             "torch_ref vs flax_impl on the same weights)", "",
             "| model | precision | relative L2 error | tolerance | ok |",
             "| --- | --- | --- | --- | --- |"]
    rows = correctness(0.3 if args.smoke else 1.0, 4 if args.smoke else 32)
    for name, prec, err, tol, ok in rows:
        lines.append(f"| {name} | {prec} | {err:.1e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
    print("\n".join(lines), flush=True)
    all_ok = all(r[-1] for r in rows)

    lines += ["", f"### cifar10 epoch: ResNet-20, batch 128, {n_images:,} images resident on "
              "the device (second epoch timed)", "", "| configuration | s per epoch | "
              "images/s | peak host memory |", "| --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        from framework_free import testing

        data = testing.write_cifar(Path(tmp) / "cifar", n_train=n_images, n_test=512)
        configs = [
            ("torch eager float32, NCHW", "torch_ref", ["amp=off", "channels_last=false"]),
            ("torch float32, channels_last", "torch_ref", ["amp=off", "channels_last=true"]),
            ("torch AMP fp16, channels_last", "torch_ref", ["amp=auto", "channels_last=true"]),
            ("torch AMP + channels_last + torch.compile", "torch_ref",
             ["amp=auto", "channels_last=true", "compile=true"]),
            ("flax_impl bf16", "flax_impl", ["amp=bf16"]),
        ]
        for label, stack, extra in configs:
            res = measure({"kind": "epoch", "stack": stack, "data_dir": str(data),
                           "workdir": str(Path(tmp) / label.replace(" ", "_")), "epochs": 2,
                           "overrides": [f"train_subset={n_images}", "eval_subset=512",
                                         "log_every_steps=1000", *extra]})
            ips = res["images_per_s"][1]
            lines.append(f"| {label} | {n_images / ips:.2f} | {ips:,.0f} | "
                         f"{res['peak_rss_mib']:,.0f} MiB |")
            print(lines[-1], flush=True)

    lines += ["", f"### ResNet-50 training, {big_size} px, batch {big_batch}", "",
              "| configuration | images/s (median, min-max) | peak host memory |",
              "| --- | --- | --- |"]
    for label, spec in (
            ("torch AMP fp16 + channels_last + torch.compile",
             {"stack": "torch_ref", "dtype": "fp16" if torch.cuda.is_available() else "bf16",
              "compile": True}),
            ("flax_impl bf16", {"stack": "flax_impl", "dtype": "bf16"})):
        res = measure({"kind": "step", "model": "resnet50", "size": big_size, "batch": big_batch,
                       "repeats": 5, "iters": 3 if args.smoke else 20, "warmup": 3, **spec})
        lines.append(f"| {label} | {med(res['images_per_s'])} | {res['peak_rss_mib']:,.0f} MiB |")
        print(lines[-1], flush=True)
    lines += ["", f"Correctness: {'all within tolerance' if all_ok else 'FAILED'}. "
              f"Whole run: {time.perf_counter() - t0:.0f} s."]
    print("\n".join(lines[-2:]))
    Path(tempfile.gettempdir(), "gpu-benchmark.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"ok": all_ok}))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
