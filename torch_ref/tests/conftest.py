import pytest

from framework_free import testing


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """A small Fashion-MNIST-shaped data set in the real (gzipped IDX) format."""
    return testing.write_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=96, n_test=40)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return testing.write_cifar(tmp_path_factory.mktemp("cifar"), n_train=80, n_test=30)


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory):
    return testing.write_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3,
                                      per_class=(6, 3), size=(48, 40))
