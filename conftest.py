"""Test-session set-up shared by every test folder.

JAX reads XLA_FLAGS once, when it first initialises its CPU backend; asking for 8 host devices here,
before any test imports jax, gives the sharding tests their 8 fake CPU devices. Tests that want one
device pass ``jax.devices()[:1]`` explicitly.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# flax_impl's XLA:CPU fusion option joins XLA_FLAGS now, before any test can start JAX's backends,
# so that the whole suite runs as users run (flax_impl/cpu_setup.py; importing it loads no JAX)
from flax_impl import cpu_setup  # noqa: E402

cpu_setup.configure()

import pytest  # noqa: E402  (after the XLA_FLAGS set-up, on purpose)

from testkit import samples  # noqa: E402


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """A small Fashion-MNIST-shaped data set in the real (gzipped IDX) format."""
    return samples.write_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=96, n_test=40)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A small CIFAR-10 set in the python-pickle layout."""
    return samples.write_cifar(tmp_path_factory.mktemp("cifar"), n_train=80, n_test=30)


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory):
    """train/ and val/ folders of real JPEG files, ImageNet's layout, three classes."""
    return samples.write_image_folder(
        tmp_path_factory.mktemp("imagenet"), classes=3, per_class=(6, 3), size=(48, 40)
    )
