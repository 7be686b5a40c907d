"""The range test's arithmetic (schedule, smoothing, stopping, suggestion) and its command line's
refusals, without a framework."""

import math

import numpy as np
import pytest

import configs
from core import lr_find
from core.lr_find import Curve, RangeTest, lr_schedule, suggest


def test_schedule_ends_where_asked():
    exp = lr_schedule(RangeTest(1e-7, 10.0, 200))
    assert exp[0] == 1e-7 and math.isclose(exp[-1], 10.0, rel_tol=1e-15)
    assert np.all(np.diff(np.log(exp)) > 0)
    # equal ratios between steps: exponential, as torch-lr-finder's ExponentialLR
    assert np.allclose(np.diff(np.log(exp)), math.log(1e8) / 199, rtol=1e-9)
    lin = lr_schedule(RangeTest(0.1, 1.0, 10, "linear"))
    assert np.allclose(lin, np.linspace(0.1, 1.0, 10), rtol=0, atol=1e-15)


def test_smoothing_and_divergence():
    t = RangeTest(1e-3, 1.0, 10, smooth_f=0.5, diverge_th=2.0)
    c = Curve(t)
    assert c.add(1e-3, 4.0) and c.smoothed == [4.0]
    assert c.add(2e-3, 2.0) and c.smoothed[-1] == 0.5 * 2.0 + 0.5 * 4.0
    assert c.add(3e-3, 0.0) and c.smoothed[-1] == 1.5 and c.best == 1.5
    # 0.5 * 6 + 0.5 * 1.5 = 3.75 > 2 x 1.5: the step that crosses is recorded, then it stops
    assert not c.add(4e-3, 6.0)
    assert c.smoothed[-1] == 3.75 and len(c.raw) == 4 and "2 x its minimum" in c.stopped


def test_no_smoothing_and_a_nan_stops():
    c = Curve(RangeTest(1e-3, 1.0, 10, smooth_f=0.0))
    assert c.add(1e-3, 2.0) and c.add(1e-2, 1.0) and c.smoothed == [2.0, 1.0]
    assert not c.add(1e-1, float("nan"))
    assert "nan" in c.stopped and len(c.raw) == 3


def test_suggestion_is_the_steepest_descent_after_skipping():
    lrs = [10.0 ** (k - 6) for k in range(12)]
    # steepest fall between points 6 and 7; np.gradient's central differences put the minimum
    # at 6 and 7 alike, argmin takes the first
    losses = [2.0, 2.0, 1.99, 1.98, 1.9, 1.7, 1.4, 0.6, 0.55, 0.5, 3.0, 9.0]
    assert suggest(lrs, losses, 0, 0) == (lrs[6], 6)
    assert suggest(lrs, losses, 7, 0) == (lrs[8], 8)  # the skipped points cannot be suggested
    # skip_end trims the diverged tail, whose rise would not matter anyway; too few points left
    assert suggest(lrs, losses, 10, 1) == (None, None)
    assert suggest(lrs, losses[:7] + [math.inf] * 5, 0, 0) == (lrs[6], 6)  # a non-finite tail


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--end-lr", "1e-8"], "--end-lr (1e-08) must be larger than --start-lr"),
        (["--num-iter", "1"], "--num-iter must be at least 2"),
        (["--start-lr", "0"], "--start-lr must be a positive number"),
        (["--start-lr", "-1"], "--start-lr must be a positive number"),
        (["--smooth-f", "1"], "--smooth-f must be in [0, 1)"),
        (["--smooth-f", "-0.1"], "--smooth-f must be in [0, 1)"),
        (["--diverge-th", "0.5"], "--diverge-th must be larger than 1"),
        (["--step-mode", "cos"], "invalid choice"),
        (["--num-iter", "ten"], "invalid int value"),
        (["--workdir", ""], "--workdir is empty"),
        ([], None),  # the recipe is checked too: a bad override
    ],
)
def test_bad_input_is_one_line_and_touches_nothing(flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    argv = ["--recipe", "fashion_mnist", "--workdir", str(work)] + flags
    if says is None:
        argv, says = argv + ["batch_size=0"], "batch_size"

    def never(*_):
        raise AssertionError("the backend must not be built for bad input")

    assert lr_find.main(argv, "prog", "stack", configs, never) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: ") and says in err
    assert list(work.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["w"]


def test_lowest_point_over_the_same_points():
    lrs = [0.1 * k for k in range(1, 9)]
    losses = [9.0, 3.0, 2.0, 1.0, 1.5, 0.5, math.nan, 0.1]
    assert lr_find.lowest(lrs, losses, 0, 0) == lrs[5]  # the NaN cuts the tail off
    assert lr_find.lowest(lrs, losses, 0, 3) == lrs[3]  # skip_end leaves 0.5 out
    assert lr_find.lowest(lrs, losses, 8, 0) is None


def test_the_override_undoes_the_recipes_world_size_scaling():
    """imagenet's lr is the rate at 4 replicas (lr x world / 4): a rate found on 1 replica is
    trained with lr = rate x 4."""
    result = {
        "suggested_lr": 0.2,
        "suggested_override": 0.8,
        "stopped_early": None,
        "recipe": "imagenet",
        "recipe_lr": 0.025,
        "lowest_loss_lr": 0.3,
        "replicas": 1,
        "config": {"lr_reference_world_size": 4},
        "options": {},
        "steps_run": 200,
    }
    lines = lr_find.suggestion_lines(result, "python -m torch_ref.train")
    assert "to train with it: python -m torch_ref.train --recipe imagenet lr=0.8 " in lines[-1]
    assert "0.8 x 1 / 4 = 0.2" in lines[-1]


def test_an_unwritable_output_folder_is_refused_before_the_test(tmp_path, capsys):
    """A results folder under a regular file (root, as CI runs, may write anywhere else)."""
    (tmp_path / "notes.txt").write_text("x")
    code = lr_find.main(
        ["--recipe", "fashion_mnist", "--workdir", str(tmp_path / "notes.txt" / "run")],
        "prog",
        "stack",
        configs,
        lambda *_: None,
    )
    assert code == 2 and "is not a writable folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "x"


@pytest.mark.parametrize("stack", ["torch_ref", "flax_impl"])
def test_sigterm_ends_the_range_test_with_one_line(stack, fashion_dir, tmp_path):
    """SIGTERM at step 2 (a pause point): one line, exit 143 (128 + SIGTERM, as SIGINT's is
    130), nothing written; torch_ref once died silently with 143, flax_impl by the signal."""
    import signal

    from testkit import chaos

    out = tmp_path / "w"
    cmd = [
        chaos.sys.executable,
        "-m",
        f"{stack}.lr_find",
        "--recipe",
        "fashion_mnist",
        "--size",
        "smoke",
        "--data-dir",
        str(fashion_dir),
        "--workdir",
        str(out),
        "--device",
        "cpu",
        "--num-iter",
        "20",
    ]
    proc = chaos.paused(cmd, "step:2", tmp_path / "paused")
    chaos.os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM: stopped; nothing written (exit code 143)" in lines[0]
    assert not (out / "lr_find").exists()
