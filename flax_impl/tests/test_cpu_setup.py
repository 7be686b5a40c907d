"""flax_impl's XLA:CPU settings (flax_impl/cpu_setup.py): on by default, off by switch, and a user's
own XLA_FLAGS win.

Whether XLA applied the fusion option is read from what it compiled: in relu(x * s + b) feeding
both a reduction and a transpose, the element-wise chain is computed by one fusion when the option
is in force and copied into both consumers (two fusions reading x) when it is not. The host device
count is read from jax.devices()."""

import os
import subprocess
import sys

import pytest

from flax_impl import cpu_setup
import testkit

REPO = str(testkit.REPO)

PROBE = r"""
import os
from flax_impl import cpu_setup
cpu_setup.configure()  # as every entry point of flax_impl does first
import jax, jax.numpy as jnp
def f(x, s, b):
    y = jax.nn.relu(x * s + b)
    return y.sum(axis=(0, 1, 2)), jnp.transpose(y, (3, 1, 2, 0))
x, v = jnp.ones((8, 6, 6, 4)), jnp.ones(4)
entry = jax.jit(f).lower(x, v, v).compile().as_text().split("ENTRY")[1]
readers = [ln for ln in entry.splitlines() if " fusion(" in ln and "%x" in ln.split("fusion(")[1]]
print(len(readers), len(jax.devices()), cpu_setup.state()["fusion"], cpu_setup.state()["devices"],
      repr(os.environ.get("XLA_FLAGS")), sep="|")
"""


def probe(cores="0,1", **env_vars):
    """The probe in a fresh process on `cores` (taskset): fusion readers, devices, states, flags."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", cpu_setup.FUSION_SWITCH, cpu_setup.DEVICES_SWITCH)
    }
    env.update(env_vars, PYTHONPATH=REPO)
    proc = subprocess.run(
        ["taskset", "-c", cores, sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    readers, devices, fusion, dev_state, flags = proc.stdout.strip().splitlines()[-1].split("|")
    return int(readers), int(devices), fusion, dev_state, flags


two_cores = pytest.mark.skipif(cpu_setup.cores() < 2, reason="needs two cores to pin to")


@two_cores
def test_on_by_default_and_xla_applies_both():
    readers, devices, fusion, dev_state, flags = probe()
    assert (readers, devices, fusion, dev_state) == (1, 2, "on", "2 (2 cores)")
    assert flags == repr(f"{cpu_setup.FUSION} {cpu_setup.DEVICES}=2")


def test_one_core_one_device():
    readers, devices, _, dev_state, _ = probe(cores="0")
    assert (readers, devices, dev_state) == (1, 1, "1 (1 cores)")


@two_cores
def test_switches_turn_them_off():
    readers, devices, fusion, dev_state, flags = probe(
        FLAX_IMPL_CPU_FUSION="0", FLAX_IMPL_CPU_DEVICES="1"
    )
    assert (readers, devices, flags) == (2, 1, "None")
    assert (fusion, dev_state) == ("off (FLAX_IMPL_CPU_FUSION=0)", "1 (FLAX_IMPL_CPU_DEVICES=1)")


def test_users_own_flags_win():
    mine = "--xla_backend_extra_options=xla_cpu_disable_loop_unrolling"
    readers, devices, fusion, _, flags = probe(cores="0", XLA_FLAGS=mine)
    assert readers == 2 and fusion.startswith("left to XLA_FLAGS") and flags == repr(mine)
    mine = "--xla_force_host_platform_device_count=3"
    readers, devices, fusion, dev_state, flags = probe(XLA_FLAGS=mine)
    assert (readers, devices, fusion) == (1, 3, "on") and dev_state.startswith("left to XLA_FLAGS")
    assert flags == repr(f"{mine} {cpu_setup.FUSION}")


@pytest.mark.parametrize(
    "environ, initialised, flags, state",
    [
        (
            {},
            False,
            f"{cpu_setup.FUSION} {cpu_setup.DEVICES}=2",
            {"fusion": "on", "devices": "2 (16 cores)"},
        ),
        (
            {"XLA_FLAGS": "--a=1", "FLAX_IMPL_CPU_DEVICES": "3"},
            False,
            f"--a=1 {cpu_setup.FUSION} {cpu_setup.DEVICES}=3",
            {"fusion": "on", "devices": "3 (FLAX_IMPL_CPU_DEVICES=3)"},
        ),
        (
            {"FLAX_IMPL_CPU_FUSION": "off", "FLAX_IMPL_CPU_DEVICES": "1"},
            False,
            None,
            {"fusion": "off (FLAX_IMPL_CPU_FUSION=off)", "devices": "1 (FLAX_IMPL_CPU_DEVICES=1)"},
        ),
        (
            {"JAX_PLATFORMS": "cuda"},
            False,
            None,
            {
                "fusion": "off (JAX_PLATFORMS=cuda has no cpu)",
                "devices": "off (JAX_PLATFORMS=cuda has no cpu)",
            },
        ),
        (
            {"JAX_PLATFORMS": "cuda,cpu"},
            False,
            f"{cpu_setup.FUSION} {cpu_setup.DEVICES}=2",
            {"fusion": "on", "devices": "2 (16 cores)"},
        ),
        (
            {},
            True,
            None,
            {
                "fusion": "off (JAX was initialised before flax_impl was imported)",
                "devices": "off (JAX was initialised before flax_impl was imported)",
            },
        ),
    ],
)
def test_decide(environ, initialised, flags, state):
    assert cpu_setup.decide(environ, initialised, 16) == (flags, state)


@pytest.mark.parametrize(
    "switch, value, needle",
    [
        ("FLAX_IMPL_CPU_FUSION", "yes please", "FLAX_IMPL_CPU_FUSION='yes please' is not a switch"),
        ("FLAX_IMPL_CPU_DEVICES", "two", "FLAX_IMPL_CPU_DEVICES='two' is not a number of devices"),
    ],
)
def test_a_bad_switch_is_one_line_from_the_trainer(tmp_path, fashion_dir, switch, value, needle):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, **{switch: value})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flax_impl.train",
            "--recipe",
            "fashion_mnist",
            "--data-dir",
            str(fashion_dir),
            "--workdir",
            str(tmp_path / "run"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_default_host_devices_fall_back_to_one_for_a_batch_that_does_not_split(monkeypatch):
    class Dev:
        platform = "cpu"

    two = [Dev(), Dev()]
    monkeypatch.setitem(cpu_setup._state, "devices", "2 (2 cores)")
    assert cpu_setup.splits(two, 128, 256)
    assert not cpu_setup.splits(two, 7, 256) and not cpu_setup.splits(two, 8, 9)
    monkeypatch.setitem(cpu_setup._state, "devices", "2 (FLAX_IMPL_CPU_DEVICES=2)")
    assert cpu_setup.splits(two, 7, 256)  # chosen by the user: the trainer's error stands


@pytest.mark.skipif(cpu_setup.FUSION_SWITCH in os.environ, reason="the switch is set")
def test_importing_flax_impl_changes_nothing():
    """Only its entry points apply the options: a torch command that reads a flax checkpoint
    (through crossing, importing flax_impl's model code to build nothing) keeps its environment."""
    code = (  # JAX's own import sets two variables (TPU_SKIP_MDS_QUERY, TF_CPP_MIN_LOG_LEVEL)
        "import os, jax; before = dict(os.environ); "
        "import flax_impl, crossing.checkpoints, flax_impl.train, flax_impl.predict; "
        "from flax_impl import cpu_setup; "
        "print(dict(os.environ) == before, cpu_setup.state())"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True {}", proc.stdout


def test_this_test_session_runs_with_fusion():
    # conftest.py calls cpu_setup.configure() before any test starts JAX: the suite runs what
    # users run
    # (under pytest-xdist the controller configured it, and a worker inherits its XLA_FLAGS)
    if "PYTEST_XDIST_WORKER" in os.environ:
        assert cpu_setup.state()["fusion"].startswith("left to XLA_FLAGS")
    else:
        assert cpu_setup.state()["fusion"] == "on"
    assert cpu_setup.FUSION in os.environ["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
