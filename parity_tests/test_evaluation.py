"""Both stacks' evaluation of the same weights: the same confusion matrix, hence the same
per-class accuracies and confusion.png, and the same test loss at float32 level.

The weights are torch's after six training steps (converted to Flax), so that the predictions
spread over several classes. Exact equality of the matrix is a fair demand only when no image is
a near tie between its two highest logits: float32 logits of the two stacks differ by ~1e-6
relative (PARITY.md), so the test first checks that every image's top-2 margin exceeds 1e-3
relative to its largest logit and only then asks for the same argmax everywhere.
"""

import itertools

import jax
import numpy as np
import torch

from crossing import weights as convert
from flax_impl.train import FlaxBackend
from torch_ref.tests.test_train import recipe_for
from torch_ref.train import TorchBackend


def test_same_weights_give_the_same_confusion_matrix(fashion_dir, tmp_path):
    recipe = recipe_for("fashion_mnist", fashion_dir)
    tb = TorchBackend(recipe, tmp_path / "t", "cpu", True)
    for batch in itertools.islice(tb.batches(0, 0), 6):
        tb.train_step(batch)
    t_loss, t_correct, t_count, t_conf = tb.evaluate()

    fb = FlaxBackend(recipe, tmp_path / "f", jax.devices()[:1], False)
    variables = convert.torch_to_flax(tb.model.state_dict())
    fb.state = fb.steps.replicate(
        fb.state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    )
    f_loss, f_correct, f_count, f_conf = fb.evaluate()

    with torch.no_grad():
        logits = torch.cat([tb.model(x) for x, _ in tb.eval_batches]).numpy()
    top2 = np.sort(logits, 1)[:, -2:]
    assert np.min((top2[:, 1] - top2[:, 0]) / np.abs(top2[:, 1])) > 1e-3  # no near tie
    assert len(np.unique(logits.argmax(1))) >= 2  # the matrix is not one column

    assert t_count == f_count == 40 and t_conf.sum() == 40
    np.testing.assert_array_equal(f_conf, t_conf)
    assert f_correct == t_correct == np.trace(t_conf)
    # the summed loss: float32 logits ~1e-6 apart, summed over 40 images
    assert abs(f_loss - t_loss) / t_loss < 1e-5
