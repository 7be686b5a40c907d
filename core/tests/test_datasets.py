"""CIFAR download (from a local HTTP server standing in for cs.toronto.edu) and data discovery."""

import functools
import hashlib
import http.server
import tarfile
import threading

import pytest

from configs import get_config
from core import datasets, readers
from testkit import samples
from core.errors import UserError


@pytest.fixture
def served_archive(tmp_path, monkeypatch):
    """A real cifar-10-python.tar.gz of generated batches, served over HTTP on localhost."""
    src = samples.write_cifar(tmp_path / "src", n_train=20, n_test=10)
    archive = tmp_path / "www" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=archive.parent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{archive.name}"
    monkeypatch.setitem(readers.CIFAR_ARCHIVE, "cifar10", url)
    monkeypatch.setitem(
        datasets.CIFAR_MD5, "cifar10", hashlib.md5(archive.read_bytes()).hexdigest()
    )
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield archive
    server.shutdown()


def test_cifar_is_downloaded_checked_and_extracted(served_archive, tmp_path):
    r = get_config("cifar10", "smoke").replace(data_dir=str(tmp_path / "data"))
    root = datasets.ensure_present(r)
    assert readers.cifar_present("cifar10", root)
    assert len(readers.read_cifar("cifar10", root, train=True)) == 20
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no partial archive left


def test_a_download_with_the_wrong_checksum_leaves_nothing(served_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.CIFAR_MD5, "cifar10", "0" * 32)
    r = get_config("cifar10", "smoke").replace(data_dir=str(tmp_path / "data"))
    with pytest.raises(UserError, match="has md5"):
        datasets.ensure_present(r)
    assert not (tmp_path / "data").exists()


def test_download_false_does_not_touch_the_network(tmp_path):
    r = get_config("cifar10", "smoke").replace(data_dir=str(tmp_path / "d"), download=False)
    with pytest.raises(UserError, match=r"could not be downloaded \(download=false\)"):
        datasets.ensure_present(r)


def test_default_folders():
    assert (
        str(datasets.resolve_data_dir(get_config("fashion_mnist")))
        == readers.FASHION_MNIST_SYSTEM_DIR
    )
    assert str(datasets.resolve_data_dir(get_config("cifar10"))) == "data"
    with pytest.raises(UserError, match="ImageNet has no default location"):
        datasets.resolve_data_dir(get_config("imagenet"))


def test_class_names_come_from_the_data(cifar_dir, imagefolder_dir, tmp_path):
    """The names that label confusion.png: CIFAR's meta file (the fixture writes class_0 ...),
    ImageNet's class folders, Fashion-MNIST's documented ten; "class k" where none exist."""
    c10 = get_config("cifar10").replace(data_dir=str(cifar_dir))
    assert datasets.class_names(c10) == [f"class_{i}" for i in range(10)]
    inet = get_config("imagenet").replace(data_dir=str(imagefolder_dir), num_classes=5)
    names = datasets.class_names(inet)
    assert names[:3] == sorted(p.name for p in (imagefolder_dir / "train").iterdir())
    assert names[3:] == ["class 3", "class 4"]
    assert datasets.class_names(get_config("fashion_mnist"))[6] == "Shirt"
    missing = get_config("cifar100").replace(data_dir=str(tmp_path / "none"))
    assert datasets.class_names(missing) == [f"class {i}" for i in range(100)]
