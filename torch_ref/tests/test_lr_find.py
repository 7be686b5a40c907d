"""torch_ref's LR range test against torch-lr-finder's own, on the same model, optimizer and
batches; and what the command leaves on disk."""

import hashlib
import json
import warnings

import pytest
import torch

from core import lr_find
from torch_ref import lr_find as torch_lr_find, optim
from torch_ref.tests.test_train import recipe_for
from torch_ref.train import TorchBackend, train_and_evaluate

torch_lr_finder = pytest.importorskip("torch_lr_finder")  # installed by scripts/setup.sh

# 96 images at batch 16: 6 full steps per epoch, so 14 steps cross two epoch boundaries and
# every batch has the same size (torch-lr-finder's DataLoader has to cut them alike)
STEPS = 14


def reference(recipe, t: lr_find.RangeTest, tmp_path):
    """torch-lr-finder's range_test and suggestion on a fresh TorchBackend's model (the same
    initial weights as the test's own, from the recipe's seed) and the batches the trainer
    draws, fed through a DataLoader that cuts them as they came."""
    b = TorchBackend(recipe, tmp_path / "ref-ckpt", "cpu", True, None)
    xs, ys = [], []
    for x, targets, _ in lr_find.endless(b, t.num_iter):
        xs.append(x)
        ys.append(targets.y)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=len(ys[0])
    )
    finder = torch_lr_finder.LRFinder(
        b.model, optim.make_optimizer(b.model, recipe, 1), torch.nn.CrossEntropyLoss(), device="cpu"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its scheduler calls get_lr(), which torch warns about
        finder.range_test(
            loader,
            start_lr=t.start_lr,
            end_lr=t.end_lr,
            num_iter=t.num_iter,
            step_mode=t.step_mode,
            smooth_f=t.smooth_f,
            diverge_th=t.diverge_th,
        )
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    _, suggested = finder.plot(
        skip_start=t.skip_start, skip_end=t.skip_end, suggest_lr=True, ax=Figure().add_subplot()
    )
    return finder.history["lr"], finder.history["loss"], suggested


@pytest.mark.parametrize(
    "t",
    [
        # the whole range, exponential (the seed's call, shortened)
        lr_find.RangeTest(1e-4, 10.0, STEPS, "exp", 0.05, 5.0, 2, 2),
        # linear steps, stronger smoothing, and a threshold that stops the test early
        lr_find.RangeTest(1e-3, 2.0, STEPS, "linear", 0.3, 1.5, 1, 1),
    ],
)
def test_curve_equals_torch_lr_finder(t, fashion_dir, tmp_path):
    recipe = recipe_for("fashion_mnist", fashion_dir)
    ours, _ = lr_find.run(torch_lr_find.factory(recipe, "cpu"), recipe, t)
    lrs, losses, suggested = reference(recipe, t, tmp_path)
    # the same float64 rates, losses and smoothing, in the same order: equal, not close
    assert ours["lr"] == lrs
    assert ours["loss_smoothed"] == losses
    assert ours["suggested_lr"] == suggested
    if t.diverge_th < 2:
        assert ours["stopped_early"] and ours["steps_run"] < t.num_iter  # the rule was exercised
    else:
        assert ours["steps_run"] == t.num_iter


def digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_command_in_a_run_folder_touches_only_lr_find(fashion_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = recipe_for("fashion_mnist", fashion_dir, "epochs=1")
    train_and_evaluate(recipe, run, "cpu")
    before = digests(run)
    args = [
        "--recipe",
        "fashion_mnist",
        "--size",
        "smoke",
        "--workdir",
        str(run),
        "--data-dir",
        str(fashion_dir),
        "--device",
        "cpu",
        "--num-iter",
        "8",
        "--skip-start",
        "1",
        "--skip-end",
        "1",
        "batch_size=16",
        "eval_batch_size=16",
        "epochs=1",
        "train_subset=0",
        "eval_subset=0",
        "log_every_steps=2",
        "num_workers=0",
        "lr=0.5",
    ]  # the run's rate does not matter to the test
    assert torch_lr_find.main(args) == 0
    after = digests(run)
    assert {k: v for k, v in after.items() if not k.startswith("lr_find/")} == before
    assert {k for k in after if k.startswith("lr_find/")} == {
        "lr_find/lr_find.json",
        "lr_find/lr_find.png",
    }
    result = json.loads((run / "lr_find" / "lr_find.json").read_text())
    assert result["framework"] == "torch_ref" and result["steps_run"] == 8
    out = capsys.readouterr().out
    assert f"lr={result['suggested_lr']:.3g}" in out  # the override that uses the suggestion
    # another recipe's test is refused in this run's folder, and nothing is written
    code = torch_lr_find.main(["--recipe", "cifar10", "--workdir", str(run)])
    assert code == 2 and "holds a run of recipe 'fashion_mnist'" in capsys.readouterr().err
    assert digests(run) == after
