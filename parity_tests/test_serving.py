"""A trained model used from either framework: each stack evaluates and predicts with the
other's checkpoint, on real Fashion-MNIST test images (the first 2,000 of the 10,000: what is
compared is per image, and the evaluations of the whole set cost a minute a stack).

A short real run in each stack (4,096 training images, one epoch at batch 64: ~50% test
accuracy) gives the checkpoints. Both
stacks then compute float32 logits of the same images from the same weights; they differ by
float32 rounding (~1e-6 relative, parity item 3), so a prediction can differ only where an
image's two highest logits are closer than that. The bound on the accuracies: the number of
correct answers differs by at most the number of test images whose top-2 margin is below 1e-4
of the largest logit's size (100x the measured float32 gap), counted in the test.
"""

import json

import numpy as np
import pytest

from configs import get_config
from flax_impl import predict as flax_predict, train as flax_train
from core import readers
from torch_ref import predict as torch_predict, train as torch_train

pytestmark = pytest.mark.skipif(
    not readers.fashion_mnist_present(readers.FASHION_MNIST_SYSTEM_DIR),
    reason="Debian's dataset-fashion-mnist is not installed",
)

EVAL = 2000
RECIPE = get_config("fashion_mnist").replace(
    epochs=1, train_subset=4096, eval_subset=EVAL, batch_size=64, log_every_steps=16
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import jax

    root = tmp_path_factory.mktemp("serving")
    torch_train.train_and_evaluate(RECIPE, root / "torch_ref", "cpu")
    flax_train.train_and_evaluate(RECIPE, root / "flax_impl", jax.devices()[:1])
    test = readers.read_fashion_mnist(readers.FASHION_MNIST_SYSTEM_DIR, train=False)
    return root, test


def near_ties(logits: np.ndarray) -> int:
    top2 = np.sort(logits, 1)[:, -2:]
    return int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4 * np.abs(top2).max(1)))


@pytest.mark.parametrize("trained_by", ["torch_ref", "flax_impl"])
def test_each_stack_evaluates_the_others_checkpoint(runs, trained_by, tmp_path, capsys):
    root, test = runs
    run = root / trained_by
    own = torch_train if trained_by == "torch_ref" else flax_train
    other = flax_train if trained_by == "torch_ref" else torch_train
    ckpt = (
        run / "checkpoints" / "best.pt"
        if trained_by == "torch_ref"
        else max((run / "checkpoints" / "best").iterdir(), key=lambda p: int(p.name))
    )
    mine = own.evaluate_checkpoint(RECIPE, run)
    theirs = other.evaluate_checkpoint(RECIPE, tmp_path / "elsewhere", str(ckpt))
    assert "checkpoint; converted to" in capsys.readouterr().err  # the note on stderr
    assert mine["test_count"] == theirs["test_count"] == EVAL
    # both stacks' logits of the same images, through predict's loaders
    images = test.images[:EVAL]
    t_logits = torch_predict.load(RECIPE, str(ckpt), run, "cpu")[0](images)
    f_logits = flax_predict.load(RECIPE, str(ckpt), run, "cpu")[0](images)
    assert np.max(np.abs(f_logits - t_logits)) < 1e-4 * np.abs(t_logits).max()
    ties = near_ties(t_logits)
    assert abs(round(mine["test_acc"] * EVAL) - round(theirs["test_acc"] * EVAL)) <= ties
    assert 0.3 < mine["test_acc"]  # a model that learned: the comparison means something
    assert not (tmp_path / "elsewhere").exists()  # evaluating writes nothing


def test_a_predicted_file_has_the_evaluations_logits(runs, tmp_path, capsys):
    """Test image 0 saved as a PNG and predicted from the file: the logits of the evaluation
    path (the in-memory test set, normalised the same way) for that image, and the top-5 the
    same in both stacks."""
    from PIL import Image

    root, test = runs
    png = tmp_path / "test0.png"
    Image.fromarray(test.images[0, :, :, 0]).save(png)
    out = {}
    for name, stack in (("torch_ref", torch_predict), ("flax_impl", flax_predict)):
        assert (
            stack.main(
                ["--workdir", str(root / "torch_ref"), "--json", "--device", "cpu", str(png)]
            )
            == 0
        )
        out[name] = json.loads(capsys.readouterr().out)
    direct = torch_predict.load(RECIPE, None, root / "torch_ref", "cpu")[0](test.images[:256])[0]
    # a batch of 1 against a batch of 256: oneDNN blocks the convolutions differently
    np.testing.assert_allclose(out["torch_ref"]["logits"], direct, rtol=0, atol=1e-5)
    assert [t["name"] for t in out["torch_ref"]["top"]] == [
        t["name"] for t in out["flax_impl"]["top"]
    ]
    # probabilities: softmax of logits ~1e-6 apart
    np.testing.assert_allclose(
        [t["prob"] for t in out["flax_impl"]["top"]],
        [t["prob"] for t in out["torch_ref"]["top"]],
        rtol=0,
        atol=1e-5,
    )


def test_16_bit_and_float_files_get_their_8_bit_copies_logits(runs, tmp_path):
    """Real test images saved as 16-bit grey PNG and TIFF, 32-bit integer TIFF, float TIFF and
    16-bit RGB PNG, each beside its 8-bit PNG: predict's decoding makes the same uint8 input of
    each, so both stacks' logits are bit-equal to the 8-bit copy's (bound 0: the same input
    through the same weights and kernels; the old conversion clipped every non-zero 16-bit
    pixel to white and moved the top logit from 2.7 to 11.1)."""
    from PIL import Image

    from core import predict
    from testkit import samples

    root, test = runs
    grey = test.images[:4, :, :, 0]
    wide = grey.astype(np.uint16) * 257  # 8-bit x as a 16-bit file stores it
    copies = {"8-bit": [], "I;16": [], "I;16B": [], "I": [], "F": [], "RGB16": []}
    for i, g in enumerate(grey):
        files = {
            "8-bit": (Image.fromarray(g), "png"),
            "I;16": (Image.fromarray(wide[i]), "png"),
            "I;16B": (
                Image.frombytes("I;16B", g.shape[::-1], wide[i].astype(">u2").tobytes()),
                "tif",
            ),
            "I": (Image.fromarray(wide[i].astype(np.int32)), "tif"),
            "F": (Image.fromarray(g.astype(np.float32) / 255), "tif"),
        }
        for mode, (img, ext) in files.items():
            path = tmp_path / f"{i}-{mode}.{ext}"
            img.save(path)
            copies[mode].append(str(path))
        path = tmp_path / f"{i}-rgb16.png"
        path.write_bytes(samples.png_bytes(28, 28, np.repeat(wide[i][..., None], 3, -1)))
        copies["RGB16"].append(str(path))
    for stack in (torch_predict, flax_predict):
        logits_fn = stack.load(RECIPE, None, root / "torch_ref", "cpu")[0]
        want = logits_fn(np.stack([predict.load_image(p, RECIPE) for p in copies["8-bit"]]))
        for mode, paths in copies.items():
            got = logits_fn(np.stack([predict.load_image(p, RECIPE) for p in paths]))
            assert np.array_equal(got, want), (stack.__name__, mode)
