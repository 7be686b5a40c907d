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
2. Correctness of each way to run a torch_ref step (fused SGD, torch.compile, cuda_graphs):
   one ResNet-20 step from the same weights and batch against the eager unfused step, float32
   with TF32 off (tolerances at STEP_TOLERANCES, each with its reason).
3. The cifar10 epoch (ResNet-20, batch 128, 50,000 images resident on the GPU, the trainer's own
   loop; the second epoch is timed, the first includes compilation and graph capture) for torch
   eager float32 NCHW, + channels_last, + AMP (fp16 + GradScaler) with unfused SGD (a host sync
   per step) and with fused SGD (none: the default on CUDA), + torch.compile, + cuda_graphs;
   flax_impl float32, bf16 without and with device prefetch; and seed 000's own pipeline
   (DataLoader + PIL transforms, 4 workers, NCHW, AMP) for the ratio. Target on one H100/H200:
   <= 1.0 s per epoch in both stacks, torch_ref within 1.2x of flax_impl.
4. ResNet-50 at 224 px, training images/s at batch 256: torch AMP + channels_last with unfused
   and fused SGD, + torch.compile, + cuda_graphs, and flax_impl bf16. Target on one H100:
   >= 3,000 images/s (NVIDIA publishes 2,470 images/s for one A100 with AMP).

--smoke runs the same code paths at toy sizes (on a CPU too), to check the script itself.
Each measurement runs in its own process; one that fails is listed under "Not measured" and the
rest go on; --budget-s skips what would start too late, so a time-limited lease keeps its rows.
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

    from crossing import weights as convert
    from flax_impl import models as fm
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
            fmodel = getattr(fm, name)(num_classes=10, dtype=jnp.bfloat16 if amp else jnp.float32)
            with jax.default_matmul_precision("highest" if strict else "default"):
                got = np.asarray(
                    jax.jit(lambda v, x: fmodel.apply(v, x, train=False))(variables, xj), np.float32
                )
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            rows.append((name, precision, err, TOLERANCES[precision], err <= TOLERANCES[precision]))
        torch.backends.cudnn.allow_tf32 = True
    return rows


# Tolerances of the step rows, each relative to the size of what is compared (L2 norms):
# - fused SGD: the same update rounded in another order, one float32 ulp of some elements of an
#   update whose own size is the norm compared against (parameter change): <= 1e-6;
# - torch.compile: inductor fuses and reorders the float32 sums of the forward and the backward
#   (~1e-7 per operation through 20 layers and back): logits and parameter change <= 1e-4;
# - cuda_graphs: the same kernels as the fused eager step, replayed, at a rate that float32
#   holds exactly (a graph's rate is a float32 tensor; see torch_ref/graphs.py), cuDNN
#   deterministic: expected equal; <= 1e-6 allows for a kernel chosen differently in capture.
STEP_TOLERANCES = {"fused SGD": 1e-6, "torch.compile": 1e-4, "cuda_graphs": 1e-6}


def step_correctness(batch: int) -> list[tuple]:
    """(step, compared, relative error, tolerance, ok) rows: one ResNet-20 step each way."""
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = torch.backends.cudnn
    kept = (flags.allow_tf32, torch.backends.cuda.matmul.allow_tf32, flags.deterministic)
    flags.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    flags.deterministic = True
    try:
        return _step_rows(torch, dev, batch)
    finally:
        flags.allow_tf32, torch.backends.cuda.matmul.allow_tf32, flags.deterministic = kept


def _step_rows(torch, dev, batch: int) -> list[tuple]:
    from torch_ref import models, steps
    from torch_ref.augment import Targets

    rate = float(np.float32(0.1))  # the same number as a float64 and as a float32 tensor
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)

    def one_step(fused: bool, how: str):
        torch.manual_seed(0)
        model = models.resnet20(num_classes=10).to(dev)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(
            model.parameters(), lr=rate, momentum=0.9, weight_decay=5e-4, fused=fused or None
        )
        scaler = torch.amp.GradScaler(dev.type, enabled=False)
        with torch.no_grad():
            logits = model.eval()(x).clone() if how != "compile" else None
        model.train()
        if how == "graphs":
            from torch_ref.graphs import GraphedStep

            GraphedStep(model, opt, scaler, None, 0.0)(x, Targets(y))
        else:
            compiled = None
            if how == "compile":
                compiled = steps.compiled_forward_and_loss(model, None, 0.0, "inductor")
                model.eval()
                with torch.no_grad():
                    logits = compiled(x, Targets(y))[0].clone()
                model.train()
            steps.train_step(model, opt, scaler, None, x, Targets(y), 1.0, forward_loss=compiled)
        change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        return logits, change

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    ref_logits, ref_change = one_step(False, "eager")
    rows = []
    variants = [("fused SGD", True, "eager"), ("torch.compile", True, "compile")]
    if dev.type == "cuda":
        variants.append(("cuda_graphs", True, "graphs"))
    fused_change = None
    for name, fused, how in variants:
        logits, change = one_step(fused, how)
        tol = STEP_TOLERANCES[name]
        if how == "compile":
            err = rel(logits, ref_logits)
            rows.append((name, "eval logits", err, tol, err <= tol))
        # a replay is the fused eager step's: compared with that, and with the reference
        against = fused_change if how == "graphs" else ref_change
        err = rel(change, against)
        rows.append((name, "parameter change after one step", err, tol, err <= tol))
        if name == "fused SGD":
            fused_change = change
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes; runs on a CPU too")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir(), "gpu-benchmark.md"),
        help="the markdown report, rewritten after every row (default: %(default)s)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="skip the measurements that would start after this many seconds, "
        "so that a lease's time limit keeps what was measured "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    import jax
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "python -m benchmarks.gpu: error: torch sees no CUDA device; run it on a GPU "
            "machine, or pass --smoke to check the script on a CPU",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    n_images = 2048 if args.smoke else 50_000
    big_batch = 4 if args.smoke else 256
    big_size = 64 if args.smoke else 224
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    lines: list[str] = []
    failures: list[str] = []
    no_cuda: list[str] = []  # CUDA-only rows on a CPU (--smoke): not run, not a failure

    def emit(*new: str) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)
        args.out.write_text("\n".join(lines) + "\n")

    def run(label: str, spec: dict):
        """One measurement, or None (recorded) if it failed or the time budget is spent."""
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 20:
            failures.append(f"{label}: skipped, time budget spent")
            return None
        try:
            return measure(spec, timeout=left)
        except RuntimeError as exc:
            failures.append(f"{label}: {str(exc).strip().splitlines()[-1][:300]}")
            return None

    emit(
        f"`python -m benchmarks.gpu{' --smoke' if args.smoke else ''}` on {device}; "
        f"jax devices {jax.devices()}; Python {platform.python_version()}; {versions()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "### Correctness (eval logits, torch_ref vs flax_impl on the same weights)",
        "",
        "| model | precision | relative L2 error | tolerance | ok |",
        "| --- | --- | --- | --- | --- |",
    )
    try:
        rows = correctness(0.3 if args.smoke else 1.0, 4 if args.smoke else 32)
    except Exception as exc:  # a broken check must not cost the timings below
        rows = []
        failures.append(f"correctness: {type(exc).__name__}: {exc}"[:300])
    for name, prec, err, tol, ok in rows:
        emit(f"| {name} | {prec} | {err:.1e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
    emit(
        "",
        "### Correctness of each way to run a step (ResNet-20, float32, TF32 off, one SGD step "
        "from the same weights and batch, against torch's eager step with its unfused SGD)",
        "",
        "| step | compared | relative error | tolerance | ok |",
        "| --- | --- | --- | --- | --- |",
    )
    try:
        step_rows = step_correctness(4 if args.smoke else 128)
    except Exception as exc:
        step_rows = []
        failures.append(f"step correctness: {type(exc).__name__}: {exc}"[:300])
    for name, what, err, tol, ok in step_rows:
        emit(f"| {name} | {what} | {err:.1e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
    rows = rows + [(None, None, None, None, r[-1]) for r in step_rows]
    all_ok = bool(rows) and all(r[-1] for r in rows)

    emit(
        "",
        f"### cifar10 epoch: ResNet-20, batch 128, {n_images:,} images (second epoch "
        "timed; training only)",
        "",
        "| configuration | s per epoch | images/s | peak host memory |",
        "| --- | --- | --- | --- |",
    )
    epoch_ips = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        from testkit import samples

        data = samples.write_cifar(Path(tmp) / "cifar", n_train=n_images, n_test=512)
        configs = [
            (
                "seed 000's pipeline: DataLoader + PIL, 4 workers, NCHW, AMP fp16",
                "torch_ref",
                ["pipeline=dataloader", "num_workers=4", "channels_last=false", "amp=auto"],
            ),
            ("torch eager float32, NCHW", "torch_ref", ["amp=off", "channels_last=false"]),
            ("torch float32, channels_last", "torch_ref", ["amp=off", "channels_last=true"]),
            (
                "torch AMP fp16, channels_last, unfused SGD (GradScaler's .item() per step)",
                "torch_ref",
                ["amp=auto", "channels_last=true", "fused_optimizer=off"],
            ),
            (
                "torch AMP fp16, channels_last, fused SGD: no sync (the default)",
                "torch_ref",
                ["amp=auto", "channels_last=true"],
            ),
            # before the slower rows, so that a lease's time budget keeps it
            (
                "torch AMP + channels_last + cuda_graphs",
                "torch_ref",
                ["amp=auto", "channels_last=true", "cuda_graphs=true"],
            ),
            ("flax_impl float32", "flax_impl", ["amp=off"]),
            ("flax_impl bf16, no device prefetch", "flax_impl", ["amp=bf16", "device_prefetch=0"]),
            ("flax_impl bf16 (device prefetch 2, the default)", "flax_impl", ["amp=bf16"]),
            (
                "torch AMP + channels_last + torch.compile",
                "torch_ref",
                ["amp=auto", "channels_last=true", "compile=true"],
            ),
        ]
        for label, stack, extra in configs:
            if "cuda_graphs=true" in extra and not torch.cuda.is_available():
                no_cuda.append(f"{label}: needs CUDA")
                continue
            res = run(
                label,
                {
                    "kind": "epoch",
                    "stack": stack,
                    "data_dir": str(data),
                    "workdir": str(Path(tmp) / f"run{len(epoch_ips)}"),
                    "epochs": 2,
                    "overrides": [
                        f"train_subset={n_images}",
                        "eval_subset=512",
                        "log_every_steps=1000",
                        *extra,
                    ],
                },
            )
            if res is None:
                continue
            ips = epoch_ips[label] = res["images_per_s"][1]
            emit(
                f"| {label} | {n_images / ips:.2f} | {ips:,.0f} | {res['peak_rss_mib']:,.0f} MiB |"
            )
    seed_label = configs[0][0]
    best = max((k for k in epoch_ips if k != seed_label), key=epoch_ips.get, default=None)
    if seed_label in epoch_ips and best:
        emit(
            "",
            f"Fastest against the seed's pipeline: {best}, "
            f"**{epoch_ips[best] / epoch_ips[seed_label]:.2f}x**.",
        )

    emit(
        "",
        f"### ResNet-50 training, {big_size} px, batch {big_batch}",
        "",
        "| configuration | images/s (median, min-max) | peak host memory |",
        "| --- | --- | --- |",
    )
    half = "fp16" if torch.cuda.is_available() else "bf16"
    torch50 = {"stack": "torch_ref", "dtype": half}
    for label, spec in (
        ("flax_impl bf16", {"stack": "flax_impl", "dtype": "bf16"}),
        ("torch AMP fp16 + channels_last, unfused SGD", torch50),
        ("torch AMP fp16 + channels_last, fused SGD", {**torch50, "fused": True}),
        ("torch ... fused SGD + torch.compile", {**torch50, "fused": True, "compile": True}),
        ("torch ... fused SGD + cuda_graphs", {**torch50, "fused": True, "cuda_graphs": True}),
    ):
        if spec.get("cuda_graphs") and not torch.cuda.is_available():
            no_cuda.append(f"ResNet-50 {label}: needs CUDA")
            continue
        res = run(
            label,
            {
                "kind": "step",
                "model": "resnet50",
                "size": big_size,
                "batch": big_batch,
                "repeats": 5,
                "iters": 3 if args.smoke else 20,
                "warmup": 3,
                **spec,
            },
        )
        if res is not None:
            emit(f"| {label} | {med(res['images_per_s'])} | {res['peak_rss_mib']:,.0f} MiB |")
    emit(
        "",
        f"Correctness: {'all within tolerance' if all_ok else 'FAILED'}. "
        f"Whole run: {time.perf_counter() - t0:.0f} s.",
    )
    if failures or no_cuda:
        emit("", "Not measured:", "", *(f"- {f}" for f in failures + no_cuda))
    print(json.dumps({"ok": all_ok and not failures}))
    return 0 if all_ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
