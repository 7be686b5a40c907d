"""flax_impl's LR range test command: the recipe's own trainer with the test's rates, its files.
(That its curve equals torch_ref's, from the same weights, is parity_tests/test_lr_find.py.)"""

import json

import numpy as np

from flax_impl import lr_find as flax_lr_find
from core import lr_find

ARGS = [
    "--recipe",
    "fashion_mnist",
    "--size",
    "smoke",
    "--device",
    "cpu",
    "--num-iter",
    "9",
    "--start-lr",
    "1e-3",
    "--end-lr",
    "1",
    "--skip-start",
    "2",
    "--skip-end",
    "2",
    "batch_size=16",
    "num_workers=0",
]


def test_command_writes_the_curve_and_suggests(fashion_dir, tmp_path, capsys):
    args = ARGS + ["--workdir", str(tmp_path / "run"), "--data-dir", str(fashion_dir)]
    assert flax_lr_find.main(args) == 0
    out = tmp_path / "run" / "lr_find"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lr_find"]
    r = json.loads((out / "lr_find.json").read_text())
    assert r["framework"] == "flax_impl" and r["steps_run"] == 9
    t = lr_find.RangeTest(1e-3, 1.0, 9, skip_start=2, skip_end=2)
    assert r["lr"] == lr_find.lr_schedule(t).tolist()
    assert np.all(np.isfinite(r["loss_raw"]))
    # the file's suggestion is the rule applied to the file's own curve
    assert (r["suggested_lr"], r["suggested_index"]) == lr_find.suggest(
        r["lr"], r["loss_smoothed"], 2, 2
    )
    assert f"lr={r['suggested_lr']:.3g}" in capsys.readouterr().out


def test_the_backend_trains_at_the_tests_rates(fashion_dir, tmp_path):
    """The rates reach the optimizer through FlaxBackend: at rate 0 a step leaves every
    parameter as it was (weight decay is scaled by the rate too), where the recipe's own
    schedule (0.1 at step 0) would move them."""
    import jax

    from torch_ref.tests.test_train import recipe_for

    recipe = recipe_for("fashion_mnist", fashion_dir)
    make = flax_lr_find.factory(recipe, "cpu")
    zero = make(tmp_path / "a", True, (np.zeros(3), np.full(3, recipe.momentum)))
    own = make(tmp_path / "b", True, None)
    for b in (zero, own):
        before = jax.device_get(b.state.params)
        b.fetch([b.train_step(next(iter(b.batches(0, 0))))])
        moved = [
            float(np.max(np.abs(x - y)))
            for x, y in zip(
                jax.tree_util.tree_leaves(jax.device_get(b.state.params)),
                jax.tree_util.tree_leaves(before),
            )
        ]
        assert (max(moved) == 0) == (b is zero), max(moved)
