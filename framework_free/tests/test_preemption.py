"""A scheduler's stop reaches the whole job (the trainer and its data-loading workers) at any
moment: during a step, inside a checkpoint write, during evaluation, at start-up. Each case here
is made deterministic with the trainer's pause points (framework_free.preemption.pause): the run
stops at a known place, the test signals the process group there, and the run must exit 75
with one line and resume to the records of an uninterrupted run, bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest

from framework_free import chaos, testing
from framework_free.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED

# ImageNet folders (real JPEGs) with worker processes (torch_ref's DataLoader) or decoding
# threads (flax_impl): the pipeline whose workers a group signal used to kill
OVERRIDES = ["model=resnet18", "num_classes=3", "image_size=32", "eval_resize=36", "batch_size=4",
             "eval_batch_size=4", "epochs=2", "train_subset=0", "eval_subset=0", "num_workers=2",
             "log_every_steps=1", "checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    data = testing.write_image_folder(root / "inet", classes=3, per_class=(8, 4))
    return root, data


def command(stack, data, workdir):
    return [sys.executable, "-m", f"{stack}.train", "--recipe", "imagenet", "--size", "smoke",
            "--data-dir", str(data), "--workdir", str(workdir), "--device", "cpu", *OVERRIDES]


_references: dict = {}


def reference(stack, folders):
    """The records of an uninterrupted run (once per stack)."""
    root, data = folders
    if stack not in _references:
        chaos.run_once(command(stack, data, root / f"{stack}-reference"), None)
        _references[stack] = chaos.epoch_records(root / f"{stack}-reference")
    return _references[stack]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def paused_run(cmd, tmp_path, point):
    """Start `cmd` in its own process group, paused at `point`; returns the process once the
    trainer waits there."""
    flag = tmp_path / "paused"
    env = dict(chaos._env(), TRAINER_PAUSE_AT=point, TRAINER_PAUSE_FILE=str(flag))
    proc = subprocess.Popen(cmd, env=env, cwd=chaos.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not flag.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached {point}: {proc.communicate()}")
        time.sleep(0.02)
    return proc


CASES = [  # stack, pause point, signal, whether workers are signalled alone first
    ("torch_ref", "step:3", signal.SIGTERM, True),
    ("torch_ref", "write:3", signal.SIGTERM, False),  # the first checkpoint's file (after
    ("torch_ref", "eval:2", signal.SIGINT, False),    # config.json and environment.json)
    ("flax_impl", "step:3", signal.SIGTERM, False),
    ("flax_impl", "eval:2", signal.SIGINT, False),
]


@pytest.mark.parametrize("stack,point,sig,workers_first", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2].name}" for c in CASES])
def test_group_signal_checkpoints_exits_75_and_resumes_exactly(stack, point, sig, workers_first,
                                                               folders, tmp_path):
    root, data = folders
    want = reference(stack, folders)
    cmd = command(stack, data, tmp_path / "run")
    proc = paused_run(cmd, tmp_path, point)
    if workers_first:  # a signal that reaches a worker before the trainer: the worker stays
        workers = children(proc.pid)
        assert workers, "torch_ref with num_workers=2 has DataLoader worker processes"
        for pid in workers:
            os.kill(pid, sig)
        time.sleep(0.5)
        assert set(workers) <= set(children(proc.pid)), "a worker died of the signal"
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "checkpoint written, run the same command to resume" in err
    chaos.run_once(cmd, None)  # the same command resumes and finishes
    assert chaos.epoch_records(tmp_path / "run") == want


@pytest.mark.parametrize("stack", ["torch_ref", "flax_impl"])
def test_signal_during_start_up_and_a_second_ctrl_c(stack, folders, tmp_path):
    """A stop request before the trainer has built anything ends it before it trains (exit 75,
    nothing written but the record's start); a second SIGINT quits at once (exit 130), one line,
    and the rerun still ends where an uninterrupted run does."""
    root, data = folders
    cmd = command(stack, data, tmp_path / "run")
    proc = paused_run(cmd, tmp_path, "start")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED and "stopped before training" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.is_file() for p in (tmp_path / "run" / "checkpoints").rglob("*"))

    (tmp_path / "paused").unlink()
    proc = paused_run(cmd, tmp_path, "step:4")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode in (EXIT_INTERRUPTED, EXIT_PREEMPTED), err  # 75 if it was done first
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    chaos.run_once(cmd, None)
    assert chaos.epoch_records(tmp_path / "run") == reference(stack, folders)
