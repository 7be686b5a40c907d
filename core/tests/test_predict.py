"""predict's framework-free half: images of any size and mode become the recipe's evaluation
input, the top-K, which checkpoint is used, and one-line errors for a user's mistakes."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import get_config
from core import predict
from testkit import samples

FASHION = get_config("fashion_mnist")


def run_folder(tmp_path, recipe=FASHION):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"framework": "torch_ref", "recipe": recipe.to_dict()})
    )
    return run


def test_images_of_any_size_and_mode_become_the_eval_input(tmp_path):
    grey = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(grey).save(tmp_path / "same.png")
    assert np.array_equal(predict.load_image(str(tmp_path / "same.png"), FASHION)[..., 0], grey)
    for name, img in {
        "rgba.png": Image.new("RGBA", (90, 40), (200, 10, 10, 128)),
        "pal.gif": Image.new("P", (13, 77)),
        "cmyk.jpg": Image.new("CMYK", (50, 50)),
        "i16.png": Image.new("I;16", (30, 31)),
    }.items():
        img.save(tmp_path / name)
        out = predict.load_image(str(tmp_path / name), FASHION)
        assert out.shape == (28, 28, 1) and out.dtype == np.uint8, name
    cifar = get_config("cifar10")
    assert predict.load_image(str(tmp_path / "pal.gif"), cifar).shape == (32, 32, 3)
    inet = get_config("imagenet")  # Resize(256) + CenterCrop(224)
    assert predict.load_image(str(tmp_path / "rgba.png"), inet).shape == (224, 224, 3)


def test_a_sideways_phone_photo_is_read_upright(tmp_path):
    """EXIF orientation 6: the model sees the picture the phone showed (within JPEG's error),
    not the stored pixels turned on their side."""
    picture = np.zeros((28, 28), np.uint8)
    picture[:, :7] = 255  # a bright left band: turned, it would be a band at the top or bottom
    samples.sideways_jpeg(tmp_path / "phone.jpg", picture)
    x = predict.load_image(str(tmp_path / "phone.jpg"), FASHION)[..., 0].astype(int)
    assert np.abs(x - picture).max() <= 8  # quality-95 JPEG of hard edges


def test_top_k_is_the_softmax_order():
    top = predict.top_k(np.array([1.0, 3.0, 2.0]), ["a", "b", "c"], 2)
    assert [t["name"] for t in top] == ["b", "c"]
    e = np.exp([1.0, 3.0, 2.0])
    assert top[0]["prob"] == pytest.approx(e[1] / e.sum(), rel=1e-12)


def test_which_checkpoint(tmp_path):
    run = run_folder(tmp_path)
    with pytest.raises(predict.UserError, match="holds no checkpoint"):
        predict.find_checkpoint(run, None)
    step = run / "checkpoints" / "last" / "12"
    (step / "meta").mkdir(parents=True)
    assert predict.find_checkpoint(run, None) == ("flax_impl", step)
    (run / "checkpoints" / "best.pt").write_bytes(b"x")
    assert predict.find_checkpoint(run, None) == ("torch_ref", run / "checkpoints" / "best.pt")
    assert predict.find_checkpoint(run, str(step)) == ("flax_impl", step)
    with pytest.raises(predict.UserError, match="neither a torch_ref checkpoint file"):
        predict.find_checkpoint(run, str(run))


def test_another_models_checkpoint_is_refused():
    meta = {"recipe": "cifar100", "model": "resnet50", "num_classes": 100, "in_channels": 3}
    with pytest.raises(predict.UserError, match="holds a cifar100/resnet50 .100 classes"):
        predict.check_model(meta, FASHION, "ckpt")
    ok = {k: getattr(FASHION, k) for k in meta}
    predict.check_model(ok, FASHION, "ckpt")


@pytest.mark.parametrize(
    "case, says",
    [
        ("missing image", "no such image"),
        ("text file", "is not an image PIL can read"),
        ("folder", "is a folder; pass image files"),
        ("no config", "has no config.json"),
        ("no run", "is not a run folder"),
        ("top 0", "--top must be at least 1"),
        ("empty file", "empty.png is not an image PIL can read (the file is empty (0 bytes))"),
        (
            "oversized",
            "bomb.png is refused: it has 16000x12000 = 192,000,000 pixels, more than the "
            "limit of 178,956,970 (a guard against decompression bombs); if the file is "
            "trusted, pass --max-image-pixels 192000000 (or 0 for no limit)",
        ),
        (
            "limit lowered",
            "ok.png is refused: it has 28x28 = 784 pixels, more than the limit of 700",
        ),
        ("limit raised", "bomb.png is not an image PIL can read (OSError"),
        ("negative limit", "--max-image-pixels must be 0 (no limit) or more, got -1"),
    ],
)
def test_user_mistakes_are_one_line(case, says, tmp_path, capsys):
    run = run_folder(tmp_path)
    Image.new("L", (28, 28)).save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(samples.png_bytes(16000, 12000))
    args = {
        "missing image": [str(tmp_path / "nope.png")],
        "text file": [str(tmp_path / "notes.txt")],
        "folder": [str(tmp_path)],
        "no config": [str(tmp_path / "ok.png")],
        "no run": [str(tmp_path / "ok.png")],
        "top 0": ["--top", "0", str(tmp_path / "ok.png")],
        "empty file": [str(tmp_path / "empty.png")],
        "oversized": [str(tmp_path / "bomb.png")],
        "limit lowered": ["--max-image-pixels", "700", str(tmp_path / "ok.png")],
        "limit raised": ["--max-image-pixels", "0", str(tmp_path / "bomb.png")],
        "negative limit": ["--max-image-pixels", "-1", str(tmp_path / "ok.png")],
    }[case]
    workdir = {"no config": run / "checkpoints", "no run": tmp_path / "nothing"}.get(case, run)

    def never(*_):
        raise AssertionError("no model is loaded for bad input")

    assert predict.main(["--workdir", str(workdir), *args], "prog", never) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_the_ema_weights_are_picked_from_either_stacks_checkpoint():
    """--weights ema: torch's AveragedModel keeps the model under "module." beside its count;
    flax_impl's TrainState under "ema"; a checkpoint without one is one line."""
    from core.errors import UserError

    state = {"model_state": {"fc.bias": 1}, "model_ema": {"n_averaged": 3, "module.fc.bias": 2}}
    assert predict.torch_weights(state, "model", "x.pt") == {"fc.bias": 1}
    assert predict.torch_weights(state, "ema", "x.pt") == {"fc.bias": 2}
    tree = {"params": 1, "batch_stats": 2, "opt_state": 0, "ema": {"params": 3, "batch_stats": 4}}
    assert predict.flax_variables(tree, "model", "s") == {"params": 1, "batch_stats": 2}
    assert predict.flax_variables(tree, "ema", "s") == {"params": 3, "batch_stats": 4}
    for pick, bare in ((predict.torch_weights, {"model_state": {}}), (predict.flax_variables, {})):
        with pytest.raises(UserError, match="holds no model EMA .* use --weights model"):
            pick(bare, "ema", "RUN/checkpoints/best.pt")
