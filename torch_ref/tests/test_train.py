"""The trainer end to end on small files: every recipe's data path runs, resumes exactly."""

import json
import math

import pytest
import torch

import testkit
from testkit import AUGMENTED, REGULARISED, TODAY, samples
from torch_ref import checkpoints
from torch_ref.train import Preempted, train_and_evaluate

QUICK = [
    "batch_size=16",
    "eval_batch_size=16",
    "epochs=2",
    "train_subset=0",
    "eval_subset=0",
    "log_every_steps=2",
    "num_workers=0",
]


def recipe_for(name, data_dir, *overrides):
    return testkit.smoke_recipe(name, data_dir, *QUICK, *overrides)


def load_last(workdir):
    return checkpoints.load(workdir / "checkpoints" / checkpoints.LAST)


def assert_same_state(a, b):
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["global_step"], a["best_acc"]) == (
        b["epoch"],
        b["global_step"],
        b["best_acc"],
    )


def test_fashion_mnist_runs_and_records(fashion_dir, tmp_path):
    r = recipe_for("fashion_mnist", fashion_dir)
    out = train_and_evaluate(r, tmp_path / "run")
    assert out["epoch"] == 2 and out["test_count"] == 40
    assert out["global_step"] == 2 * 6  # 96 images / 16 per step
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in lines if "test_acc" in m]
    assert [m["epoch"] for m in epochs] == [1, 2]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["framework"] == "torch_ref" and config["recipe"]["epochs"] == 2
    assert (tmp_path / "run" / "environment.json").exists()
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {
        "last.pt",
        "previous.pt",
        "best.pt",
    }


def records(workdir):
    """Every line of a run's record without its wall-clock fields."""
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("epoch_time", "train_images_per_s")}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("stop_after", [5, 6])  # mid-epoch, and exactly at the epoch boundary
@pytest.mark.parametrize(
    "pipeline, extra", [("fast", []), ("dataloader", []), ("fast", REGULARISED + TODAY + AUGMENTED)]
)
def test_resume_is_exact(fashion_dir, tmp_path, stop_after, pipeline, extra):
    """A run stopped after step k and resumed ends bit-identical to an uninterrupted run."""
    r = recipe_for(
        "fashion_mnist", fashion_dir, f"pipeline={pipeline}", "checkpoint_every_steps=4", *extra
    )
    train_and_evaluate(r, tmp_path / "straight")
    with pytest.raises(Preempted):
        train_and_evaluate(r, tmp_path / "stopped", stop_after_step=stop_after)
    assert load_last(tmp_path / "stopped")["global_step"] == stop_after
    train_and_evaluate(r, tmp_path / "stopped")
    assert_same_state(load_last(tmp_path / "straight"), load_last(tmp_path / "stopped"))
    assert records(tmp_path / "straight") == records(tmp_path / "stopped")  # one run's record
    assert samples.tensorboard_scalars(tmp_path / "stopped") == samples.tensorboard_scalars(
        tmp_path / "straight"
    )  # each step once, with the uninterrupted run's values


@pytest.mark.parametrize("case", ["imagenet", "dataloader"])
def test_worker_processes_neither_change_nor_break_a_resumed_run(
    case, fashion_dir, imagefolder_dir, tmp_path
):
    """DataLoader workers apply the data plan's draws (crop boxes, flips, jitter; Cutout and
    the mixes on the batch), so a run
    with 2 worker processes, stopped mid-epoch (global step 3) and resumed, ends bit-identical
    to one uninterrupted run with 2 workers and to one with none in the main process."""
    if case == "imagenet":  # resnet18 at 32 pixels stands in for resnet50 at 224
        r = recipe_for(
            "imagenet",
            imagefolder_dir,
            *testkit.SMALL_IMAGENET,
            "batch_size=4",
            "color_jitter=0.4,0.4,0.4",
            *REGULARISED,
        )
    else:
        r = recipe_for(
            "fashion_mnist",
            fashion_dir,
            "pipeline=dataloader",
            "color_jitter=0.4,0.4,0",
            *REGULARISED,
        )
    two, none = r.replace(num_workers=2), r.replace(num_workers=0)
    train_and_evaluate(two, tmp_path / "straight")
    with pytest.raises(Preempted):
        train_and_evaluate(two, tmp_path / "stopped", stop_after_step=3)
    train_and_evaluate(two, tmp_path / "stopped")
    train_and_evaluate(none, tmp_path / "in-process")
    want = records(tmp_path / "straight")
    assert len([m for m in want if "state_digest" in m]) == 2
    assert records(tmp_path / "stopped") == want
    assert records(tmp_path / "in-process") == want
    assert_same_state(load_last(tmp_path / "straight"), load_last(tmp_path / "stopped"))


def test_cifar10_and_cifar100_paths(cifar_dir, tmp_path):
    out = train_and_evaluate(recipe_for("cifar10", cifar_dir), tmp_path / "c10")
    assert out["test_count"] == 30
    r = recipe_for("cifar100", cifar_dir.parent / "c100")
    from testkit import samples

    samples.write_cifar(r.data_dir, "cifar100", n_train=40, n_test=20)
    # ResNet-50 on 32x32: one epoch of a few steps keeps this quick
    out = train_and_evaluate(r.replace(epochs=1, batch_size=8), tmp_path / "c100")
    assert out["test_count"] == 20 and out["global_step"] == 5


# imagenet_v2 (smoke): torchvision's V2 training side, FixRes at 24 -> 36 -> 32, the EMA every
# 2 steps and a one-epoch warm-up of a two-epoch run; its last batch is kept (no drop_last)
V2 = ["train_crop=24", "ema_every_steps=2", "warmup_epochs=1", "epochs=2"]


@pytest.mark.parametrize(
    "name, extra, steps", [("imagenet", ["epochs=1"], 4), ("imagenet_v2", V2, 10)]
)
def test_imagenet_folder_path(imagefolder_dir, tmp_path, name, extra, steps):
    # resnet18 at 32 pixels stands in for resnet50 at 224: the same loader, transforms and loop
    r = recipe_for(
        name,
        imagefolder_dir,
        *testkit.SMALL_IMAGENET,
        "batch_size=4",
        *extra,
    )
    out = train_and_evaluate(r, tmp_path / "inet")
    # 18 images: 18 // 4 steps with drop_last (imagenet), 5 an epoch without (imagenet_v2)
    assert out["test_count"] == 9 and out["global_step"] == steps
    assert ("test_acc_ema" in out) == (name == "imagenet_v2")


def test_bf16_autocast_on_cpu(fashion_dir, tmp_path):
    r = recipe_for("fashion_mnist", fashion_dir, "amp=bf16", "epochs=1")
    out = train_and_evaluate(r, tmp_path / "bf16")
    assert out["test_count"] == 40
    assert math.isfinite(out["train_loss"]) and math.isfinite(out["test_loss"])


def test_diverging_run_stops_and_keeps_last_good_checkpoint(fashion_dir, tmp_path):
    from torch_ref.train import NonFiniteLoss

    r = recipe_for("fashion_mnist", fashion_dir, "lr=1e30", "epochs=2")
    with pytest.raises(NonFiniteLoss, match="NaN or inf at global step"):
        train_and_evaluate(r, tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoints" / "best.pt").exists()
