"""One measurement per process: ``python -m benchmarks.measure '<json spec>'`` prints one JSON line.

Running each measurement in its own process keeps the two frameworks apart (threads, allocators,
compilation caches) and makes the peak resident memory (VmHWM) that process's alone.

Specs:
  {"kind": "epoch", "stack": "torch_ref"|"flax_impl", "overrides": [...], "data_dir": ...,
  "epochs": k,
   "model_time": bool, "model_iters": i}
      k epochs of a recipe through the run driver with the stack's backend; images/s of each
      epoch's training part, of the input pipeline alone, and (model_time) of the same step on
      one batch in place, timed after each epoch over i steps (default: an epoch's worth)
  {"kind": "step", "stack": ..., "model": "resnet20", "size": 32, "batch": 128, "dtype":
  "float32"|"bf16",
   "repeats": r, "iters": i}
      train steps on one batch already in place (model time): images/s of r repeats of i steps
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _peak_mib() -> float:
    """This process's peak resident memory, MiB.

    Linux's VmHWM belongs to the process's own address space, which exec starts afresh;
    ru_maxrss does not: a child keeps its parent's high-water mark across fork+exec, so under a
    parent that once held 1 GiB every child would report at least 1 GiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak / (1024.0**2 if sys.platform == "darwin" else 1024.0)


def _factory(spec: dict, recipe):
    """The stack's backend factory, as its train_and_evaluate builds it."""
    if spec["stack"] == "torch_ref":
        from torch_ref.train import backend_factory

        return backend_factory(recipe, spec.get("device", "auto"))
    from flax_impl.train import backend_factory

    return backend_factory(recipe)


def epoch(spec: dict) -> dict:
    """Epochs through the run driver itself (core.driver.Run.run_epoch), the loop
    every training run uses, with the model time of a second backend after each."""
    from pathlib import Path

    from configs import get_config
    from core.driver import Run
    from core.recipe import apply_overrides

    recipe = apply_overrides(get_config(spec.get("recipe", "cifar10")), spec["overrides"])
    recipe = recipe.replace(data_dir=spec["data_dir"])
    make = _factory(spec, recipe)
    run = Run(make, recipe, spec["workdir"], spec["stack"])
    # a second backend for the model time, so that its steps leave the run's state alone
    timed = make(Path(spec["workdir"]) / "model-time", True) if spec.get("model_time") else None
    ips, model_ips = [], []
    for _ in range(spec["epochs"]):
        m = run.run_epoch()
        run.epoch += 1
        run.step_in_epoch = 0
        ips.append(m["train_images_per_s"])
        if timed is not None:
            # one model-time repeat right after each epoch and over as many steps, so that a
            # drift in the machine's speed (another job, clocks) moves both numbers of a pair
            model_ips += model_time(
                timed,
                spec.get("model_iters") or run.steps_per_epoch,
                repeats=1,
                warmup=1 if model_ips else 3,
            )
    input_ips = input_time(run.backend, spec["stack"], spec["epochs"])
    return {"images_per_s": ips, "model_images_per_s": model_ips, "input_images_per_s": input_ips}


def _wait(stack: str, value) -> None:
    """Block until the device has finished what produced `value`."""
    if stack == "torch_ref":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        import jax

        jax.block_until_ready(value)


def input_time(backend, stack: str, epoch_index: int) -> list[float]:
    """One epoch of the input pipeline alone: every batch produced and placed, no model.

    torch_ref's batches come out augmented and on the device; flax_impl's are indices and
    augmentation draws placed on the devices, its augmentation being part of the jitted step and
    so of the model time."""
    t0 = time.perf_counter()
    last = None
    for last in backend.batches(epoch_index, 0):
        pass
    _wait(stack, last)
    return [backend.num_train / (time.perf_counter() - t0)]


def model_time(backend, iters: int, repeats: int = 3, warmup: int = 3) -> list[float]:
    """The backend's train step, repeated on one batch already on the device: no input work."""
    batch = next(iter(backend.batches(0, 0)))
    handles = [backend.train_step(batch) for _ in range(warmup)]
    rows = backend.fetch(handles)  # waits for the warm-up
    per_batch = float(rows.count[0]) * (backend.num_processes if backend.per_process_metrics else 1)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        handles = [backend.train_step(batch) for _ in range(iters)]
        backend.fetch(handles[-1:])  # the last step's metrics: the device is done
        out.append(iters * per_batch / (time.perf_counter() - t0))
    return out


def step(spec: dict) -> dict:
    model_name, size, batch = spec["model"], spec["size"], spec["batch"]
    repeats, iters = spec.get("repeats", 5), spec.get("iters", 5)
    dtype_name = spec["dtype"]  # float32 | bf16 | fp16 (torch on CUDA, with GradScaler)
    bf16 = dtype_name == "bf16"
    out = []
    extra = {}
    if spec["stack"] == "torch_ref":
        import torch

        from torch_ref import models, steps
        from torch_ref.augment import Targets

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        fmt = torch.channels_last if spec.get("channels_last", True) else torch.contiguous_format
        model = getattr(models, model_name)(num_classes=10).to(dev, memory_format=fmt)
        opt = torch.optim.SGD(
            model.parameters(),
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            fused=spec.get("fused", False) or None,
        )
        x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=dev)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        # the trainer's own step: eager, compiled (compile=true) or replayed (cuda_graphs=true)
        forward_loss = (
            steps.compiled_forward_and_loss(model, amp, 0.0, "inductor")
            if spec.get("compile")
            else None
        )
        if spec.get("cuda_graphs"):
            from torch_ref.graphs import GraphedStep

            graphed = GraphedStep(model, opt, scaler, amp, 0.0)

            def one():
                return graphed(x, Targets(y))[0]
        else:

            def one():
                loss, _ = steps.train_step(
                    model, opt, scaler, amp, x, Targets(y), 1.0, forward_loss=forward_loss
                )
                return loss

        for _ in range(spec.get("warmup", 2)):
            one()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                loss = one()
            loss.item()
            out.append(iters * batch / (time.perf_counter() - t0))
    else:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        from flax_impl import models, steps

        dtype = jnp.bfloat16 if bf16 else jnp.float32
        model = getattr(models, model_name)(num_classes=10, dtype=dtype)
        tx = optax.chain(
            optax.add_decayed_weights(5e-4), optax.trace(0.9), optax.scale_by_learning_rate(0.01)
        )
        from flax_impl import cpu_setup

        devices = jax.devices()  # as the trainer: every host device, one where a batch won't split
        devices = devices if cpu_setup.splits(devices, batch) else devices[:1]
        fns = steps.Steps(
            model,
            tx,
            {"pad": 0, "mean": (0.5,) * 3, "std": (0.25,) * 3},
            steps.make_mesh(devices),
            dtype,
        )
        state = fns.replicate(steps.create_state(model, tx, jax.random.PRNGKey(0), (size, size, 3)))
        rng = np.random.default_rng(0)
        b = fns.put_batch(
            {
                "images": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                "labels": rng.integers(0, 10, batch).astype(np.int32),
                "mask": np.ones(batch, np.float32),
            }
        )
        for _ in range(spec.get("warmup", 2)):
            state, m = fns.train_placed(state, b, None)
        jax.block_until_ready(m)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                state, m = fns.train_placed(state, b, None)
            jax.block_until_ready(m)
            out.append(iters * batch / (time.perf_counter() - t0))
        extra = {"devices": len(devices), "xla_cpu": cpu_setup.summary()}
    return {"images_per_s": out, **extra}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = {"epoch": epoch, "step": step}[spec["kind"]](spec)
    result["peak_rss_mib"] = _peak_mib()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    from flax_impl import cpu_setup

    cpu_setup.configure()  # as flax_impl's trainer runs (JAX is imported by main, lazily)
    sys.exit(main())
