"""torch_ref under torchrun (2 gloo processes on this CPU): a stop of the whole job mid-epoch
resumes to the records of an uninterrupted run, epoch metrics included (every rank's partial sums
are saved), and a dead peer ends the others at once with one line; the rerun resumes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from testkit import chaos, samples
from core.preemption import EXIT_PEER_LOST

# 200 images in global batches of 16: 13 steps an epoch, so that the processes' agreement on
# stopping (every 10 steps) falls inside an epoch
OVERRIDES = [
    "batch_size=8",
    "epochs=2",
    "train_subset=0",
    "eval_subset=0",
    "eval_batch_size=16",
    "num_workers=0",
    "log_every_steps=1",
    "checkpoint_every_steps=5",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    data = samples.write_fashion_mnist(root / "data", n_train=200, n_test=40)
    done = launch(root / "reference", data)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    want = epochs(root / "reference")
    # every image counted once in the epoch's accuracy, though the run checkpoints mid-epoch
    # (a checkpoint's all-reduce of the running sums once summed them in place, twice over)
    assert all(abs(m["train_acc"] * 200 - round(m["train_acc"] * 200)) < 1e-9 for m in want), want
    return data, want


def launch(workdir, data, env=None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "torch_ref.train",
        *chaos.smoke_args(data, workdir),
        *OVERRIDES,
    ]
    environ = {**chaos.trainer_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd,
        env=environ,
        cwd=chaos.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


epochs = chaos.epoch_records


def resumes_to(workdir, data, want):
    """The same command again: it resumes and ends with the uninterrupted run's epoch lines."""
    rerun = launch(workdir, data)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "resumed from" in out, err[-3000:]
    assert epochs(workdir) == want


def wait_for(flag, proc):
    deadline = time.time() + 300
    while not flag.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never paused: {proc.communicate()}")
        time.sleep(0.02)


def ours(err):
    """The lines our trainer printed (torchrun adds its own report of failed children)."""
    return [
        x
        for x in err.splitlines()
        if x.startswith("python -m torch_ref.train") or x.startswith("stopped ")
    ]


def test_a_job_stopped_mid_epoch_resumes_with_the_same_epoch_metrics(setup, tmp_path):
    data, want = setup
    flag = tmp_path / "paused"
    proc = launch(
        tmp_path / "run", data, {"TRAINER_PAUSE_AT": "step:3@0", "TRAINER_PAUSE_FILE": str(flag)}
    )
    wait_for(flag, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both processes, as a scheduler does
    out, err = proc.communicate(timeout=300)
    stops = [x for x in ours(err) if x.startswith("stopped after global step 10;")]
    assert len(stops) == 1, err[-3000:]  # rank 0 alone, at the first agreed point (step 10)
    resumes_to(tmp_path / "run", data, want)  # weights, digests, epoch 1's loss/acc


def test_a_dead_peer_ends_the_other_at_once_and_the_rerun_resumes(setup, tmp_path):
    data, want = setup
    flag = tmp_path / "paused"
    proc = launch(
        tmp_path / "run", data, {"TRAINER_PAUSE_AT": "step:7@1", "TRAINER_PAUSE_FILE": str(flag)}
    )
    wait_for(flag, proc)
    os.kill(int(flag.read_text()), signal.SIGKILL)  # rank 1, inside its 7th step
    killed = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert time.monotonic() - killed < 60, err[-3000:]
    assert proc.returncode != 0
    lost = [x for x in ours(err) if "another process of this run stopped answering" in x]
    assert len(lost) == 1 and "rank 0 of 2" in lost[0], err[-3000:]
    assert f"exitcode  : {EXIT_PEER_LOST}" in err or "Signals.SIGTERM" in err, err[-3000:]
    resumes_to(tmp_path / "run", data, want)
