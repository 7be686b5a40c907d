"""flax_impl's steps, sharding, checkpoints and trainer on small real-format files (CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import data, optim, steps
from flax_impl.models import resnet20
from flax_impl.train import FlaxBackend, NonFiniteLoss, Preempted, train_and_evaluate
import testkit
from testkit import AUGMENTED, REGULARISED, TODAY, samples

QUICK = [
    "batch_size=16",
    "eval_batch_size=16",
    "epochs=2",
    "train_subset=0",
    "eval_subset=0",
    "log_every_steps=2",
    "num_workers=2",
]
ONE = jax.devices()[:1]


def recipe_for(name, data_dir, *overrides):
    return testkit.smoke_recipe(name, data_dir, *QUICK, *overrides)


def _setup(fashion_dir, devices, dtype=jnp.float32):
    r = recipe_for("fashion_mnist", fashion_dir)
    batches = data.build_train(r, 16)
    model = resnet20(num_classes=10, dtype=dtype, param_dtype=dtype)
    tx, _, _ = optim.for_recipe(r, batches.steps, 1, dtype=dtype)
    fns = steps.Steps(
        model, tx, {"pad": 4, "mean": r.mean, "std": r.std}, steps.make_mesh(devices), dtype=dtype
    )
    state = fns.replicate(steps.create_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1), dtype))
    return r, batches, fns, state


def test_a_real_step_on_a_small_resnet_learns(fashion_dir):
    """Ten steps on one fixed batch: the loss falls (the step really trains)."""
    r, batches, fns, state = _setup(fashion_dir, ONE)
    source = fns.replicate(batches.arrays)
    batch = next(iter(batches.epoch(0)))
    losses = []
    for _ in range(10):
        state, m = fns.train(state, batch, source)
        losses.append(float(m["loss"]))
    assert int(state.step) == 10
    # SGD at lr 0.1 memorises one batch of 16: the loss falls far below half within ten steps,
    # while a step that does not update the weights keeps it within BatchNorm's noise of the first
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("extra", [[], REGULARISED + TODAY + AUGMENTED])
def test_run_records_and_resumes_exactly(fashion_dir, tmp_path, extra):
    r = recipe_for("fashion_mnist", fashion_dir, "checkpoint_every_steps=4", *extra)
    straight = train_and_evaluate(r, tmp_path / "straight", devices=ONE)
    with pytest.raises(Preempted):
        train_and_evaluate(r, tmp_path / "stopped", devices=ONE, stop_after_step=5)
    resumed = train_and_evaluate(r, tmp_path / "stopped", devices=ONE)
    assert resumed["global_step"] == straight["global_step"] == 12
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert resumed[key] == straight[key], key  # bit-identical run, so equal floats
    a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    drop = ("epoch_time", "train_images_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in a] == [
        {k: v for k, v in m.items() if k not in drop} for m in b
    ]
    assert samples.tensorboard_scalars(tmp_path / "stopped") == samples.tensorboard_scalars(
        tmp_path / "straight"
    )  # each step once, with the uninterrupted run's values
    kept = sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints" / "last").iterdir())
    assert kept == [8, 12]  # the latest two
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints" / "best").iterdir()]


def records(workdir):
    drop = ("epoch_time", "train_images_per_s")
    return [
        {k: v for k, v in json.loads(x).items() if k not in drop}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_decoding_threads_neither_change_nor_break_a_resumed_run(imagefolder_dir, tmp_path):
    """Each image's RandomResizedCrop draws come from the data plan, not from the thread that
    decodes it: 2 threads stopped mid-epoch (global step 3) and resumed end bit-identical to an
    uninterrupted run with 2 threads and to one with 1."""
    r = recipe_for(
        "imagenet",
        imagefolder_dir,
        *testkit.SMALL_IMAGENET,
        "batch_size=4",
        "eval_batch_size=4",
        *REGULARISED,
    )
    two, one = r.replace(num_workers=2), r.replace(num_workers=1)
    train_and_evaluate(two, tmp_path / "straight", devices=ONE)
    with pytest.raises(Preempted):
        train_and_evaluate(two, tmp_path / "stopped", devices=ONE, stop_after_step=3)
    train_and_evaluate(two, tmp_path / "stopped", devices=ONE)
    train_and_evaluate(one, tmp_path / "one-thread", devices=ONE)
    want = records(tmp_path / "straight")
    assert len([m for m in want if "state_digest" in m]) == 2
    assert records(tmp_path / "stopped") == want
    assert records(tmp_path / "one-thread") == want


# imagenet_v2 (smoke): as torch_ref's test of the same name
V2 = ["train_crop=24", "ema_every_steps=2", "warmup_epochs=1", "epochs=2"]


@pytest.mark.parametrize(
    "name, extra, steps", [("imagenet", ["epochs=1"], 4), ("imagenet_v2", V2, 10)]
)
def test_imagenet_folder_path(imagefolder_dir, tmp_path, name, extra, steps):
    r = recipe_for(
        name,
        imagefolder_dir,
        *testkit.SMALL_IMAGENET,
        "batch_size=4",
        "eval_batch_size=4",
        *extra,
    )
    out = train_and_evaluate(r, tmp_path / "inet", devices=ONE)
    assert out["test_count"] == 9 and out["global_step"] == steps
    assert ("test_acc_ema" in out) == (name == "imagenet_v2")


def test_cifar_path(cifar_dir, tmp_path):
    out = train_and_evaluate(
        recipe_for("cifar10", cifar_dir, "epochs=1"), tmp_path / "c10", devices=ONE
    )
    assert out["test_count"] == 30 and out["global_step"] == 5


def test_diverging_run_stops(fashion_dir, tmp_path):
    r = recipe_for("fashion_mnist", fashion_dir, "lr=1e30")
    with pytest.raises(NonFiniteLoss, match="NaN or inf at global step"):
        train_and_evaluate(r, tmp_path / "nan", devices=ONE)
    assert not (tmp_path / "nan" / "checkpoints" / "best").exists()


def test_bf16_compute(fashion_dir, tmp_path):
    """amp=bf16 computes in bfloat16 and keeps float32 parameters through a training step."""
    r = recipe_for("fashion_mnist", fashion_dir, "amp=bf16", "epochs=1")
    out = train_and_evaluate(r, tmp_path / "bf16", devices=ONE)
    assert np.isfinite(out["train_loss"]) and out["test_count"] == 40
    backend = FlaxBackend(r, tmp_path / "bf16-backend", ONE)
    backend.fetch([backend.train_step(next(iter(backend.batches(0, 0))))])
    leaves = jax.tree_util.tree_leaves(backend.state.params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
    logits = backend.model.apply(
        {"params": backend.state.params, "batch_stats": backend.state.batch_stats},
        jnp.zeros((2, 28, 28, 1)),
        train=False,
    )
    assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["memory", "images"])
def test_a_batch_larger_than_the_data_is_the_data(fashion_dir, imagefolder_dir, kind):
    """batch_size 100,000 over a few dozen images: padded to the images (rounded up to the
    devices), not to 100,000 rows (which once asked for 183 GB); the plan and its single step
    are the same as with the batch the data fills."""
    if kind == "memory":
        r = recipe_for("fashion_mnist", fashion_dir)
    else:
        r = recipe_for(
            "imagenet",
            imagefolder_dir,
            *testkit.SMALL_IMAGENET,
            "drop_last=false",
        )
    train, evals = (
        data.build_train(r, 100_000, pad_multiple=8),
        data.build_eval(r, 100_000, pad_multiple=8),
    )
    n, m = train.num_examples, evals.num_examples
    first = next(iter(train.epoch(0)))
    rows = -(-n // 8) * 8
    assert train.steps == 1 and len(first["mask"]) == rows and first["mask"].sum() == n
    batches = list(evals)
    assert len(batches) == 1 and len(batches[0]["mask"]) == -(-m // 8) * 8
    assert batches[0]["mask"].sum() == m
    exact = data.build_train(r, rows, pad_multiple=8)
    same = next(iter(exact.epoch(0)))
    assert all(np.array_equal(first[k], same[k]) for k in first)


def test_a_stop_while_the_decoding_threads_are_late_ends_the_wait():
    """flax_impl's trainer waits for ImageNet batches on its prefetch queue; a stop request
    then ends the wait at once (the driver checkpoints the last completed step: the same
    mechanism torch_ref's stalled-worker test drives end to end)."""
    import os
    import signal
    import threading

    from core.prefetch import Prefetch
    from core import preemption

    release = threading.Event()

    def late():
        release.wait(60)  # a decoding thread stuck on a hung file system
        yield "batch"

    batches = iter(Prefetch(late()))
    preemption.reset()
    try:
        with preemption.StopOnSignal():
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            with pytest.raises(preemption.StopWaiting), preemption.waiting():
                next(batches)
        assert preemption.requested() == "SIGTERM"
    finally:
        release.set()
        preemption.reset()


def test_a_checkpoint_sharded_over_two_devices_is_read_by_a_one_device_process(
    fashion_dir, tmp_path
):
    """What predict, --eval-only and the demo of the other stack do: a torch command has one
    host device (importing flax_impl sets none), and the saved sharding must not matter."""
    import os
    import subprocess
    import sys

    r = recipe_for("fashion_mnist", fashion_dir, "epochs=1")
    train_and_evaluate(r, tmp_path / "run", devices=jax.devices()[:2])
    step = max((tmp_path / "run" / "checkpoints" / "best").iterdir(), key=lambda p: int(p.name))
    code = (
        "import sys, jax; from crossing import checkpoints; "
        "meta, v = checkpoints.read_flax(sys.argv[1]); "
        "print(len(jax.devices()), meta['global_step'], "
        "type(jax.tree_util.tree_leaves(v)[0]).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(step)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", step.name, "ndarray"], proc.stdout
