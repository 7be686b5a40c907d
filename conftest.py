"""Test-session set-up shared by every test folder.

JAX reads XLA_FLAGS once, when it first initialises its CPU backend; asking for 8 host devices here,
before any test imports jax, gives the sharding tests their 8 fake CPU devices. Tests that want one
device pass ``jax.devices()[:1]`` explicitly.
"""

import os

# CI runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`: each test file on one
# worker, so its module fixtures are made once) on two cores: with both busy, OpenMP threads
# that spin while they wait would take the other worker's core, so they sleep (torch reads this
# when it loads; the trainers the tests start inherit it)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# flax_impl's XLA:CPU fusion option joins XLA_FLAGS now, before any test can start JAX's backends,
# so that the whole suite runs as users run (flax_impl/cpu_setup.py; importing it loads no JAX)
from flax_impl import cpu_setup  # noqa: E402

cpu_setup.configure()

# One XLA compilation cache for the session: the test trainers start many flax_impl processes
# on the same tiny recipes (run, stop, resume, compare), and each would compile the same steps
# again. A cache hit loads the program XLA compiled before for the same computation, flags and
# machine, so results are bit-identical; only compile time goes (about 40% of a short flax_impl
# run here). The size limit turns on JAX's file lock, which concurrent trainers need. Users'
# runs cache nothing unless they set JAX_COMPILATION_CACHE_DIR themselves (docs/performance.md).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
    )

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


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """The session's uninterrupted reference runs and finished runs (testkit.chaos.References):
    each kind trained once per stack, however many tests compare with it or copy it."""
    from testkit import chaos

    return chaos.References(tmp_path_factory.mktemp("references"))


@pytest.fixture
def in_process():
    """`in_process(stack)`: `main` of that stack's train module (what `python -m STACK.train`
    runs), to call in this process instead of starting a trainer. The signal handlers it
    installs, the stop state and the download opener it may leave are put back afterwards."""
    import importlib
    import signal
    import urllib.request

    from core import preemption

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def main_of(stack):
        return importlib.import_module(f"{stack}.train").main

    yield main_of
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption.reset()
    # urlopen's shared opener read the proxies once, when a download was first tried (a closed
    # port in the offline tests): dropped, so later tests in this process connect as set up
    urllib.request.install_opener(None)
