"""TFDS data sets in the real array_record format, prepared here without TensorFlow, read by
the official builders through `tfds.data_source`, and trained on by flax_impl."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import get_config
from flax_impl import tfds_source
from flax_impl.train import train_and_evaluate
from testkit import samples
from core.errors import UserError
from core.recipe import apply_overrides

pytest.importorskip("tensorflow_datasets")
ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    train = samples.patterned_images(48, 28, 1, 10, seed=0)
    test = samples.patterned_images(20, 28, 1, 10, seed=1)
    tfds_source.prepare("fashion_mnist", root, {"train": train, "test": test})
    c_train = samples.patterned_images(24, 32, 3, 10, seed=2)
    c_test = samples.patterned_images(8, 32, 3, 10, seed=3)
    tfds_source.prepare("cifar10", root, {"train": c_train, "test": c_test})
    return root, train, test


def _as_set(images, labels):
    return sorted((int(y), img.tobytes()) for img, y in zip(images, labels))


def test_prepared_files_are_tfds_array_record(tfds_dir):
    root, _, _ = tfds_dir
    folder = root / "fashion_mnist" / "3.0.1"
    names = {p.name for p in folder.iterdir()}
    assert {"dataset_info.json", "features.json"} <= names
    assert any(n.startswith("fashion_mnist-train.array_record") for n in names)


def test_official_builder_reads_every_example_back(tfds_dir):
    root, train, test = tfds_dir
    r = get_config("fashion_mnist").replace(data_dir=str(root))
    for split_is_train, (images, labels) in ((True, train), (False, test)):
        got = tfds_source.load_split("fashion_mnist", str(root), split_is_train, r)
        # TFDS shuffles records when it writes them: compare as multisets, pixel for pixel
        assert _as_set(got.images, got.labels) == _as_set(images, labels)
        assert got.num_classes == 10


def test_reading_does_not_import_tensorflow(tfds_dir):
    root, _, _ = tfds_dir
    code = (
        "import sys; from configs import get_config; from flax_impl import tfds_source; "
        f"r = get_config('fashion_mnist'); "
        f"s = tfds_source.load_split('fashion_mnist', {str(root)!r}, True, r); "
        "print(len(s), 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["48", "False"]


def test_train_from_tfds(tfds_dir, tmp_path):
    root, _, _ = tfds_dir
    for name in ("fashion_mnist", "cifar10"):
        r = apply_overrides(
            get_config(name, "smoke"),
            [
                "data_source=tfds",
                f"data_dir={root}",
                "batch_size=8",
                "eval_batch_size=8",
                "epochs=1",
                "train_subset=0",
                "eval_subset=0",
            ],
        )
        out = train_and_evaluate(r, tmp_path / name, devices=ONE)
        assert out["test_count"] == (20 if name == "fashion_mnist" else 8)


def test_missing_tfds_dataset_is_a_user_error(tmp_path):
    r = get_config("cifar100").replace(data_dir=str(tmp_path))
    with pytest.raises(UserError, match="is not prepared in the array_record format"):
        tfds_source.load_split("cifar100", str(tmp_path), True, r)


def test_imagenet2012_from_tfds(tmp_path):
    """imagenet2012 in TFDS holds JPEG bytes; flax_impl crops them like ImageNet folders."""
    folder = samples.write_image_folder(tmp_path / "jpegs", classes=3, per_class=(4, 2))
    splits = {}
    for split, name in (("train", "train"), ("validation", "val")):
        files = sorted((folder / name).rglob("*.JPEG"))
        labels = [int(p.parent.name[1:]) for p in files]
        splits[split] = ([p.read_bytes() for p in files], labels)
    tfds_source.prepare("imagenet2012", tmp_path / "tfds", splits)
    r = apply_overrides(
        get_config("imagenet", "smoke"),
        [
            "data_source=tfds",
            f"data_dir={tmp_path / 'tfds'}",
            "model=resnet18",
            "num_classes=1000",
            "image_size=32",
            "eval_resize=36",
            "batch_size=4",
            "eval_batch_size=4",
            "epochs=1",
            "train_subset=0",
            "eval_subset=0",
            "num_workers=2",
        ],
    )
    out = train_and_evaluate(r, tmp_path / "run", devices=ONE)
    assert out["test_count"] == 6 and out["global_step"] == 12 // 4
    assert np.isfinite(out["train_loss"])
