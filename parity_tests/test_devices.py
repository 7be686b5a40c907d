"""Contract item 8, devices: DDP over 2 gloo processes against one process (torch_ref), 8 fake CPU
devices against 1 (flax_impl), and exact eval (every test image once) in both.

torch_ref: DDP over 2 gloo processes (torchrun) against one process that sees the same global
batches.

torch's SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"),
so on CPU each process normalises its own share of the batch. The single-process reference does the
same: it runs each process's share through the model separately (per-replica batch statistics),
averages the losses with the shares' weights, and keeps rank 0's running statistics, which DDP
broadcasts from rank 0 at every forward.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import get_config
from core import sampling
from core.recipe import apply_overrides
from torch_ref import checkpoints, data
from torch_ref.distributed import Dist
from torch_ref.models import build_model
from torch_ref import optim

WORLD, PER_RANK = 2, 8
OVERRIDES = [
    f"batch_size={PER_RANK}",
    "epochs=2",
    "train_subset=0",
    "eval_subset=0",
    "eval_batch_size=8",
    "num_workers=0",
    "log_every_steps=1",
]
N_TRAIN, N_TEST = 61, 37  # 61 = 3 full global batches of 16 + 13, split 7/6: uneven shares


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory):
    from testkit import samples

    return samples.write_fashion_mnist(tmp_path_factory.mktemp("ddp_data"), N_TRAIN, N_TEST)


def run_torchrun(workdir, data_dir, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    changed = {x.split("=")[0] for x in extra}  # the command line takes each key once
    overrides = [x for x in OVERRIDES if x.split("=")[0] not in changed] + list(extra)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--standalone",
        "-m",
        "torch_ref.train",
        "--recipe",
        "fashion_mnist",
        "--size",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def one_process_reference(recipe):
    """Per-replica BN emulated on one process; returns the model after every step of the run."""
    torch.manual_seed(recipe.seed)  # as TorchBackend: seed, then build the model
    model = build_model(recipe)
    model = model.to(memory_format=torch.channels_last)
    global_recipe = recipe.replace(batch_size=PER_RANK * WORLD)  # one process, global batch
    batches = data.InMemoryTrain(
        data.load_split(global_recipe, data.resolve_data_dir(recipe), True),
        global_recipe,
        "cpu",
        Dist(),
    )
    opt, sched, when = optim.for_recipe(model, recipe, batches.steps, WORLD)
    assert when == "epoch"  # the loop below steps it once per epoch
    model.train()
    for epoch in range(recipe.epochs):
        for x, targets, n in batches.epoch(epoch):
            y = targets.y
            shares = [sampling.share(n, WORLD, r) for r in range(WORLD)]
            saved = None
            loss = 0
            for rank, (a, b) in enumerate(shares):
                if rank == 1:  # rank 0's running statistics are the ones DDP keeps
                    saved = {
                        k: v.clone()
                        for k, v in model.state_dict().items()
                        if "running" in k or "num_batches" in k
                    }
                loss = loss + F.cross_entropy(model(x[a:b]), y[a:b]) * (b - a) / n
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():  # after backward: BN's backward reads the running buffers
                model.load_state_dict(saved, strict=False)
            opt.step()
        sched.step()
    return model


def test_ddp_two_processes_equal_one_process(small_fashion, tmp_path):
    """Bit-equal, not merely close. Each process runs one thread (OMP_NUM_THREADS=1), and so does
    the reference, so every share's forward and backward are the same kernels on the same numbers.
    The rest is exact in floating point: DDP averages by dividing gradients by 2 (a power of two);
    the reference weights each share's loss by n_r/n and DDP by 2*n_r/n before that division, and
    a power-of-two factor passes through every rounding unchanged; a + b = b + a for the sum of
    two shares. Any difference at all would mean different batches, weights or steps."""
    proc = run_torchrun(tmp_path / "ddp", small_fashion)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = apply_overrides(get_config("fashion_mnist", "smoke"), OVERRIDES).replace(
        data_dir=str(small_fashion)
    )
    ddp = checkpoints.load(tmp_path / "ddp" / "checkpoints" / checkpoints.LAST)["model_state"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = one_process_reference(recipe).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert list(ddp) == list(ref)
    for key, value in ref.items():
        assert torch.equal(ddp[key], value), key


def test_ddp_eval_counts_every_image_once(small_fashion, tmp_path):
    proc = run_torchrun(tmp_path / "ddp", small_fashion, ["epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if "test_count" in m][-1]
    assert final["test_count"] == N_TEST  # 19 + 18 shards: no image twice, none dropped
    assert len([m for m in lines if "test_acc" not in m]) == 4  # rank 0 alone writes the record


def test_sync_bn_on_cpu_is_a_clear_error(small_fashion, tmp_path):
    proc = run_torchrun(tmp_path / "sbn", small_fashion, ["sync_bn=true"])
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("python -m torch_ref")]
    assert len(ours) == 1 and "sync_bn needs CUDA" in ours[0]  # one line, from rank 0 only
    # the processes print no traceback; torchrun itself reports the failed child with one
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr


# --- flax_impl: a mesh of 8 fake CPU devices against 1 -----------------------------------------

from flax_impl.tests.test_train import ONE, _setup, recipe_for  # noqa: E402
from flax_impl.train import train_and_evaluate as flax_train  # noqa: E402


def test_eight_fake_devices_are_there():
    assert len(jax.devices()) == 8, "conftest.py sets XLA_FLAGS before jax is imported"


def test_eight_devices_equal_one_device(fashion_dir):
    """The same global batches on a mesh of 8 CPU devices and on 1. BatchNorm's statistics are
    over the global batch either way, so only the order of sums differs. In float64 the
    parameters after 3 steps agree to 1e-10 relative (measured ~1e-12; the gap grows ~20x per
    step, which is rounding amplified by training, not a difference of method: a per-device
    BatchNorm or a mis-split batch moves them by >1e-2 at once). In float32 that amplification
    starts from 1e-7 and reaches 1e-3 after one step, so float32 is compared on the first
    step's loss, before any update (1e-6: a few ulp of a sum over 16 examples)."""
    with jax.enable_x64(True):
        _, batches, fns1, s1 = _setup(fashion_dir, ONE, jnp.float64)
        _, _, fns8, s8 = _setup(fashion_dir, jax.devices(), jnp.float64)
        src1, src8 = fns1.replicate(batches.arrays), fns8.replicate(batches.arrays)
        for step, batch in zip(range(3), batches.epoch(0)):
            s1, m1 = fns1.train(s1, batch, src1)
            s8, m8 = fns8.train(s8, batch, src8)
        assert len(s8.params["fc"]["kernel"].sharding.device_set) == 8
        assert s8.params["fc"]["kernel"].dtype == jnp.float64
        for a, b in zip(
            jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
            jax.tree_util.tree_leaves((s8.params, s8.batch_stats)),
        ):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 1e-10 * max(np.linalg.norm(a), 1e-12)
    _, batches, fns1, s1 = _setup(fashion_dir, ONE)
    _, _, fns8, s8 = _setup(fashion_dir, jax.devices())
    batch = next(iter(batches.epoch(0)))
    _, m1 = fns1.train(s1, batch, fns1.replicate(batches.arrays))
    _, m8 = fns8.train(s8, batch, fns8.replicate(batches.arrays))
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-6 * float(m1["loss"])


def test_eval_counts_each_image_once_on_eight_devices(fashion_dir, tmp_path):
    r = recipe_for("fashion_mnist", fashion_dir, "eval_batch_size=24")  # 40 = 24 + 16 (padded)
    out = flax_train(r.replace(epochs=1), tmp_path / "eight")
    assert out["test_count"] == 40
