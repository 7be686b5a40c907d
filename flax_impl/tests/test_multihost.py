"""Several JAX processes from the command line (flax_impl.multihost), on this CPU: 2 processes x 1
device against 1 process x 2 devices, a dead peer, and the flags' mistakes."""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from flax_impl import multihost
from testkit import chaos, samples
from core.errors import UserError
from core.preemption import EXIT_PEER_LOST

COMMON = [
    "--recipe",
    "fashion_mnist",
    "--size",
    "smoke",
    "--device",
    "cpu",
    "train_subset=0",
    "eval_subset=0",
    "epochs=2",
    "log_every_steps=1",
    "checkpoint_every_steps=2",
    "--peer-timeout",
    "30",
]
B, E = 16, 24  # per process; the one-process run takes the global batches, 2 x B and 2 x E


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 200 training images: the last batch of each epoch is short (200 = 6 x 32 + 8) and 40 test
    # images do not fill the last evaluation batch either, so padding and masks are exercised
    return samples.write_fashion_mnist(
        tmp_path_factory.mktemp("mh") / "data", n_train=200, n_test=40
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, data, index, port, env=None):
    cmd = [
        sys.executable,
        "-m",
        "flax_impl.train",
        *COMMON,
        "--data-dir",
        str(data),
        "--workdir",
        str(workdir),
        f"batch_size={B}",
        f"eval_batch_size={E}",
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(index),
    ]
    environ = {**chaos.trainer_env(), "FLAX_IMPL_CPU_DEVICES": "1", **(env or {})}
    return subprocess.Popen(
        cmd, env=environ, cwd=chaos.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_two(workdir, data, env1=None):
    port = free_port()
    procs = [start(workdir, data, 0, port), start(workdir, data, 1, port, env1)]
    return procs, [p.communicate(timeout=600) for p in procs]


_one: dict = {}


def one_process(workdir, data):
    """The one-process run (once per module: both tests compare with the same run)."""
    if "run" in _one:
        return shutil.copytree(_one["run"], workdir)
    _one["run"] = workdir
    cmd = [
        sys.executable,
        "-m",
        "flax_impl.train",
        *COMMON,
        "--data-dir",
        str(data),
        "--workdir",
        str(workdir),
        f"batch_size={2 * B}",
        f"eval_batch_size={2 * E}",
    ]
    env = {**chaos.trainer_env(), "FLAX_IMPL_CPU_DEVICES": "2"}
    done = subprocess.run(cmd, env=env, cwd=chaos.REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def lines(workdir):
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("epoch_time", "train_images_per_s")}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_two_processes_equal_one_process_with_two_devices_step_for_step(data, tmp_path):
    """Every logged step and epoch line, and the state digest (parameters, BatchNorm statistics,
    momentum) after each epoch, equal bit for bit: the cross-process sums (gloo) add the same two
    halves as the one process's two devices do. Each test image is counted once."""
    procs, outs = run_two(tmp_path / "two", data)
    assert [p.returncode for p in procs] == [0, 0], outs
    one_process(tmp_path / "one", data)
    two, one = lines(tmp_path / "two"), lines(tmp_path / "one")
    assert len(two) == 2 * 7 + 2 and two == one  # 7 steps an epoch, logged each, + epoch lines
    assert all(m["test_count"] == 40 for m in two if "test_count" in m)
    assert "2 x cpu" in outs[0][0] and outs[1][0].count("epoch") == 0  # process 0 alone prints


def test_a_dead_peer_stops_the_other_at_once_and_the_rerun_resumes(data, tmp_path):
    """SIGKILL of process 1 inside its 5th step: process 0 fails its next collective and exits
    with 76 and one line within seconds (not after a timeout); both started again resume from
    the step-4 checkpoint and end where an undisturbed run does."""
    flag = tmp_path / "paused"
    port = free_port()
    p0 = start(tmp_path / "run", data, 0, port)
    p1 = start(
        tmp_path / "run",
        data,
        1,
        port,
        {"TRAINER_PAUSE_AT": "step:5", "TRAINER_PAUSE_FILE": str(flag)},
    )
    deadline = time.time() + 300
    while not flag.exists():
        assert p1.poll() is None and time.time() < deadline, p1.communicate()
        time.sleep(0.02)
    p1.kill()
    killed = time.monotonic()
    _, err = p0.communicate(timeout=120)
    waited = time.monotonic() - killed
    p1.communicate()
    assert p0.returncode == EXIT_PEER_LOST, err
    assert waited < 20, waited  # the heartbeat timeout (30 s here) is not what ended it
    err_lines = [x for x in err.strip().splitlines() if x]
    assert len(err_lines) == 1 and "another process of this run stopped answering" in err, err
    procs, outs = run_two(tmp_path / "run", data)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "resumed from" in outs[0][0]
    one_process(tmp_path / "one", data)
    assert [m for m in lines(tmp_path / "run") if "state_digest" in m] == [
        m for m in lines(tmp_path / "one") if "state_digest" in m
    ]


def ns(**kw):
    base = dict(
        coordinator_address=None,
        num_processes=None,
        process_id=None,
        distributed=None,
        peer_timeout=100,
    )
    return argparse.Namespace(**{**base, **kw})


def test_settings_from_flags_environment_and_mistakes():
    assert multihost.settings(ns(), {}) is None  # one process: nothing to set up
    got = multihost.settings(
        ns(process_id=1),
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "FLAX_IMPL_NUM_PROCESSES": "2"},
    )
    assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == (
        "10.0.0.1:1234",
        2,
        1,
    )
    assert got["heartbeat_timeout_seconds"] == 100
    assert multihost.settings(ns(distributed="auto"), {}) == {
        "initialization_timeout": 100,
        "heartbeat_timeout_seconds": 100,
        "shutdown_timeout_seconds": 100,
    }  # JAX reads the cluster itself
    for bad, needle in [
        (ns(num_processes=2), "missing: --coordinator-address, --process-id"),
        (ns(coordinator_address="h:1", num_processes=2, process_id=2), "is not in 0..1"),
        (ns(coordinator_address="host", num_processes=2, process_id=0), "is not HOST:PORT"),
        (ns(peer_timeout=0), "--peer-timeout must be positive"),
    ]:
        with pytest.raises(UserError, match=needle):
            multihost.settings(bad, {})
    with pytest.raises(UserError, match="is not a number"):
        multihost.settings(
            ns(),
            {
                "FLAX_IMPL_PROCESS_ID": "one",
                "FLAX_IMPL_NUM_PROCESSES": "2",
                "JAX_COORDINATOR_ADDRESS": "h:1",
            },
        )


def test_an_incomplete_set_is_one_line_before_anything_starts(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flax_impl.train",
            "--recipe",
            "fashion_mnist",
            "--workdir",
            str(tmp_path / "w"),
            "--num-processes",
            "2",
        ],
        env={**chaos.trainer_env(), "JAX_COORDINATOR_ADDRESS": ""},
        cwd=chaos.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "missing: --coordinator-address, --process-id" in done.stderr
    assert not (tmp_path / "w").exists()
