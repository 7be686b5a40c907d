"""XLA:CPU multi-output fusion: on by default, off by switch, and a user's XLA_FLAGS wins.

Whether XLA applied it is read from what it compiled: in relu(x * s + b) feeding both a reduction
and a transpose, the element-wise chain is computed by one fusion when the option is in force and
copied into both consumers (two fusions reading x) when it is not."""

import os
import subprocess
import sys

import pytest

from flax_impl import cpu_fusion

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = r"""
import os, flax_impl, jax, jax.numpy as jnp
from flax_impl import cpu_fusion
def f(x, s, b):
    y = jax.nn.relu(x * s + b)
    return y.sum(axis=(0, 1, 2)), jnp.transpose(y, (3, 1, 2, 0))
x, v = jnp.ones((8, 6, 6, 4)), jnp.ones(4)
entry = jax.jit(f).lower(x, v, v).compile().as_text().split("ENTRY")[1]
readers = [ln for ln in entry.splitlines() if " fusion(" in ln and "%x" in ln.split("fusion(")[1]]
print(len(readers), len(jax.devices()), cpu_fusion.state(), repr(os.environ.get("XLA_FLAGS")), sep="|")
"""


def probe(**env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_fusion.SWITCH)}
    env.update(env_vars, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    readers, devices, state, flags = proc.stdout.strip().splitlines()[-1].split("|")
    return int(readers), int(devices), state, flags


def test_on_by_default_and_xla_applies_it():
    readers, devices, state, flags = probe()
    assert (readers, devices, state) == (1, 1, "on")
    assert flags == repr(cpu_fusion.OPTION)


def test_switch_turns_it_off():
    readers, _, state, flags = probe(FLAX_IMPL_CPU_FUSION="0")
    assert (readers, state, flags) == (2, "off (FLAX_IMPL_CPU_FUSION=0)", "None")


def test_users_backend_options_win():
    mine = "--xla_backend_extra_options=xla_cpu_disable_loop_unrolling"
    readers, _, state, flags = probe(XLA_FLAGS=mine)
    assert readers == 2 and state.startswith("left to XLA_FLAGS")
    assert flags == repr(mine)


def test_users_other_flags_are_kept():
    readers, devices, state, _ = probe(XLA_FLAGS="--xla_force_host_platform_device_count=3")
    assert (readers, devices, state) == (1, 3, "on")


@pytest.mark.parametrize("environ, initialised, flags, state", [
    ({}, False, cpu_fusion.OPTION, "on"),
    ({"XLA_FLAGS": "--a=1"}, False, f"--a=1 {cpu_fusion.OPTION}", "on"),
    ({"FLAX_IMPL_CPU_FUSION": "off"}, False, None, "off (FLAX_IMPL_CPU_FUSION=off)"),
    ({"FLAX_IMPL_CPU_FUSION": "1"}, False, cpu_fusion.OPTION, "on"),
    ({"JAX_PLATFORMS": "cuda"}, False, None, "off (JAX_PLATFORMS=cuda has no cpu)"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False, cpu_fusion.OPTION, "on"),
    ({}, True, None, "off (JAX was initialised before flax_impl was imported)"),
])
def test_decide(environ, initialised, flags, state):
    assert cpu_fusion.decide(environ, initialised) == (flags, state)


def test_a_bad_switch_is_one_line_from_the_trainer(tmp_path, fashion_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, FLAX_IMPL_CPU_FUSION="yes please")
    proc = subprocess.run([sys.executable, "-m", "flax_impl.train", "--recipe", "fashion_mnist",
                           "--data-dir", str(fashion_dir), "--workdir", str(tmp_path / "run")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLAX_IMPL_CPU_FUSION='yes please' is not a switch" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(cpu_fusion.SWITCH in os.environ, reason="the switch is set for this session")
def test_this_test_session_runs_with_it():
    # conftest.py imports flax_impl before any test starts JAX: the suite tests what users run
    assert cpu_fusion.state() == "on"
    assert cpu_fusion.OPTION in os.environ["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
