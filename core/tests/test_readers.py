"""The framework-free readers against files written in the real formats, and their error paths."""

import gzip
import os

import numpy as np
import pytest

from core import readers
from testkit import samples
from core.errors import UserError


def test_cifar10_round_trip(tmp_path):
    train = samples.patterned_images(30, 32, 3, 10, seed=1)
    test = samples.patterned_images(7, 32, 3, 10, seed=2)
    readers.write_cifar("cifar10", tmp_path, train, test)
    got = readers.read_cifar("cifar10", tmp_path, train=True)
    assert np.array_equal(got.images, train[0]) and np.array_equal(got.labels, train[1])
    got = readers.read_cifar("cifar10", tmp_path, train=False)
    assert np.array_equal(got.images, test[0]) and np.array_equal(got.labels, test[1])
    assert sorted(os.listdir(tmp_path / "cifar-10-batches-py")) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )


def test_cifar_files_load_in_torchvision(tmp_path, monkeypatch):
    """Our generated pickles are read by torchvision's own CIFAR classes (an independent reader),
    so they are in the real layout: Python-2 byte-string keys, latin1, NumPy's old module names."""
    tvd = pytest.importorskip("torchvision.datasets")
    import torchvision.datasets.cifar as tv_cifar

    # torchvision compares every file with the official archive's md5 sums; ours differ
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kw: True)
    for name, cls, classes in (("cifar10", tvd.CIFAR10, 10), ("cifar100", tvd.CIFAR100, 100)):
        train = samples.patterned_images(12, 32, 3, classes, seed=3)
        test = samples.patterned_images(5, 32, 3, classes, seed=4)
        readers.write_cifar(name, tmp_path, train, test)
        for is_train, (images, labels) in ((True, train), (False, test)):
            ds = cls(str(tmp_path), train=is_train)
            assert np.array_equal(ds.data, images)
            assert list(ds.targets) == labels.tolist()


def test_cifar_pickle_is_python2_style(tmp_path):
    """The official files need encoding='latin1': a plain pickle.load fails on them, as on ours."""
    import pickle

    samples.write_cifar(tmp_path, n_train=10, n_test=5)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        with pytest.raises(UnicodeDecodeError):
            pickle.load(fh)


def test_truncated_and_hostile_cifar(tmp_path):
    samples.write_cifar(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        readers.read_cifar("cifar10", tmp_path, train=True)
    import pickle

    path.write_bytes(pickle.dumps({"data": os.system}))  # a pickle that asks for a function
    with pytest.raises(UserError, match="truncated or corrupt"):
        readers.read_cifar("cifar10", tmp_path, train=True)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="missing CIFAR file"):
        readers.read_cifar("cifar10", tmp_path, train=False)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_torchvision(tmp_path, gz):
    samples.write_fashion_mnist(tmp_path, n_train=9, n_test=4, gz=gz)
    split = readers.read_fashion_mnist(tmp_path, train=True)
    assert split.images.shape == (9, 28, 28, 1) and split.labels.shape == (9,)
    assert split.images.flags.writeable
    mnist = pytest.importorskip("torchvision.datasets.mnist")
    raw = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    plain = tmp_path / "plain-images"
    plain.write_bytes(gzip.decompress(raw.read_bytes()) if gz else raw.read_bytes())
    theirs = mnist.read_image_file(str(plain)).numpy()  # torchvision's own IDX reader
    assert np.array_equal(theirs, split.images[..., 0])


def test_fashion_mnist_torchvision_layout(tmp_path):
    samples.write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=5, n_test=3, gz=False)
    assert readers.fashion_mnist_present(tmp_path)
    assert len(readers.read_fashion_mnist(tmp_path, train=False)) == 3


def test_idx_errors(tmp_path):
    samples.write_fashion_mnist(tmp_path, n_train=6, n_test=3)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(UserError, match="header promises"):
        readers.read_fashion_mnist(tmp_path, train=True)
    path.write_bytes(path.read_bytes()[:20])  # a gzip stream cut short
    with pytest.raises(UserError, match="truncated or corrupt"):
        readers.read_fashion_mnist(tmp_path, train=True)
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))  # float32 type code
    with pytest.raises(UserError, match="magic"):
        readers.read_fashion_mnist(tmp_path, train=True)
    with pytest.raises(UserError, match="no Fashion-MNIST IDX files"):
        readers.read_fashion_mnist(tmp_path / "nowhere", train=True)


def test_image_folder_listing_matches_torchvision(tmp_path):
    samples.write_image_folder(tmp_path, classes=3, per_class=(4, 2))
    paths, labels, classes = readers.list_image_folder(tmp_path / "train")
    tvd = pytest.importorskip("torchvision.datasets")
    ref = tvd.ImageFolder(str(tmp_path / "train"))
    assert classes == ref.classes
    assert [(p, int(y)) for p, y in zip(paths, labels)] == [(p, y) for p, y in ref.samples]
    vpaths, vlabels, _ = readers.list_image_folder(tmp_path / "val", classes)
    assert len(vpaths) == 6 and sorted(set(vlabels.tolist())) == [0, 1, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        readers.list_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no image files"):
        readers.list_image_folder(tmp_path / "empty")
    (tmp_path / "val" / "other").mkdir(parents=True)
    with pytest.raises(UserError, match="class folders that train/ lacks"):
        readers.list_image_folder(tmp_path / "val", ["cls"])


def test_channel_stats_of_real_fashion_mnist_match_the_recipe():
    if not readers.fashion_mnist_present(readers.FASHION_MNIST_SYSTEM_DIR):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from configs import get_config

    split = readers.read_fashion_mnist(readers.FASHION_MNIST_SYSTEM_DIR, train=True)
    mean, std = readers.channel_stats(split.images)
    recipe = get_config("fashion_mnist")
    # channel_stats rounds to 4 decimals, as the recipe writes them
    assert mean == recipe.mean and std == recipe.std
