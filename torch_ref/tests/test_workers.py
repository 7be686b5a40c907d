"""DataLoader workers that fail never hang the trainer: one that raises, one that is killed (as
the kernel's out-of-memory killer does), an image that does not decode in training or in
evaluation, and a stop request while the trainer waits on a stalled worker each end the run
within a bounded time with one line, a checkpoint of the last completed step and the
documented exit code; the rerun resumes. Faults are planted in `FolderImages.__getitem__`,
which the forked workers inherit, at a chosen step, so every case is deterministic."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import testkit

from core import preemption
from testkit import samples
from core.errors import EXIT_DATA_WORKER
from core.preemption import EXIT_PREEMPTED
from torch_ref import checkpoints, data, train

FAULT_STEP = 2  # of 4 per epoch: two steps done, so "the last completed step" means something


@pytest.fixture(autouse=True)
def fresh_stop_state():
    preemption.reset()
    yield
    preemption.reset()


def argv(root, workdir, *extra):
    # resnet18 at 32 pixels stands in for resnet50 at 224: the same loader and loop
    return [
        "--recipe",
        "imagenet",
        "--size",
        "smoke",
        "--data-dir",
        str(root),
        "--workdir",
        str(workdir),
        "--device",
        "cpu",
        *testkit.SMALL_IMAGENET,
        "batch_size=4",
        "eval_batch_size=4",
        "epochs=1",
        "train_subset=0",
        "eval_subset=0",
        "num_workers=2",
        *extra,
    ]


def plant(monkeypatch, fault):
    """Run `fault(item)` in a worker for the first image of training step FAULT_STEP."""
    real = data.FolderImages.__getitem__

    def getitem(self, item):
        if (
            torch.utils.data.get_worker_info() is not None
            and isinstance(item, data.Item)
            and item.step == FAULT_STEP
            and item.position == 0
        ):
            fault(item)
        return real(self, item)

    monkeypatch.setattr(data.FolderImages, "__getitem__", getitem)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def saved_step(workdir) -> int:
    return checkpoints.load(workdir / "checkpoints" / checkpoints.LAST)["global_step"]


def test_a_worker_that_raises_ends_the_run_with_one_line(
    imagefolder_dir, tmp_path, capsys, monkeypatch
):
    def fault(_):
        raise ValueError("planted fault")

    plant(monkeypatch, fault)
    assert train.main(argv(imagefolder_dir, tmp_path / "w")) == EXIT_DATA_WORKER
    line = one_line(capsys)
    assert "a data-loading worker raised ValueError: planted fault" in line
    assert f"a checkpoint of global step {FAULT_STEP} was written" in line
    assert saved_step(tmp_path / "w") == FAULT_STEP
    monkeypatch.undo()
    assert train.main(argv(imagefolder_dir, tmp_path / "w")) == 0
    assert "resumed from" in capsys.readouterr().out


def _trainer_waits_for_step(step: int) -> bool:
    """The trainer (this process's main thread) waits inside torch's DataLoader for the batch
    of training step `step` (its loop variable still holds the step before)."""
    frame, waiting = sys._current_frames().get(threading.main_thread().ident), False
    while frame is not None:
        code = frame.f_code
        waiting = waiting or code.co_name == "_get_data"  # the DataLoader's wait on its queue
        if code.co_name == "epoch" and code.co_filename == data.__file__:
            return waiting and frame.f_locals.get("step") == step - 1
        frame = frame.f_back
    return False


def stall_then(monkeypatch, tmp_path, act):
    """The worker of step FAULT_STEP stalls (as on a hung network file system); once the
    trainer is seen waiting for that batch, act(worker_pid) runs in a helper thread."""
    pid_file = tmp_path / "stalled.pid"

    def stall(_):
        pid_file.write_text(str(os.getpid()))
        time.sleep(300)

    plant(monkeypatch, stall)

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if pid_file.exists() and _trainer_waits_for_step(FAULT_STEP):
                act(int(pid_file.read_text()))
                return
            time.sleep(0.01)

    helper = threading.Thread(target=watch, daemon=True)
    helper.start()
    return helper, pid_file


def test_a_killed_worker_ends_the_run_and_the_rerun_loses_nothing(
    imagefolder_dir, tmp_path, capsys, monkeypatch
):
    """The waited-for worker SIGKILLed from outside, as the out-of-memory killer does. torch
    finds the dead worker while it waits (it checks every 5 s), between two steps; the rerun
    ends with the weights of an uninterrupted run, bit for bit."""
    helper, _ = stall_then(monkeypatch, tmp_path, lambda pid: os.kill(pid, signal.SIGKILL))
    t0 = time.monotonic()
    assert train.main(argv(imagefolder_dir, tmp_path / "w")) == EXIT_DATA_WORKER
    assert time.monotonic() - t0 < 120  # bounded: torch checks its workers every 5 s
    helper.join()
    line = one_line(capsys)
    assert "a data-loading worker died (pid " in line and "killed by SIGKILL" in line, line
    assert "out-of-memory" in line and f"global step {FAULT_STEP} was written" in line
    monkeypatch.undo()
    assert train.main(argv(imagefolder_dir, tmp_path / "w")) == 0
    assert train.main(argv(imagefolder_dir, tmp_path / "straight")) == 0
    want = checkpoints.load(tmp_path / "straight" / "checkpoints" / checkpoints.LAST)
    got = checkpoints.load(tmp_path / "w" / "checkpoints" / checkpoints.LAST)
    for key, value in want["model_state"].items():
        assert torch.equal(value, got["model_state"][key]), key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_waiting_on_a_stalled_worker_ends_at_once(
    sig, imagefolder_dir, tmp_path, capsys, monkeypatch
):
    """The signal arrives while the trainer waits on the stalled worker: it stops there, with a
    checkpoint of the last completed step, and the stalled worker is ended with it."""
    helper, pid_file = stall_then(monkeypatch, tmp_path, lambda _: os.kill(os.getpid(), sig))
    t0 = time.monotonic()
    assert train.main(argv(imagefolder_dir, tmp_path / "w")) == EXIT_PREEMPTED
    assert time.monotonic() - t0 < 120
    helper.join()
    err = capsys.readouterr().err
    assert f"stopped after global step {FAULT_STEP}; checkpoint written" in err, err
    assert saved_step(tmp_path / "w") == FAULT_STEP
    stalled = int(pid_file.read_text())
    for _ in range(200):  # the worker goes with the run (SIGKILL: workers ignore SIGTERM)
        try:
            os.kill(stalled, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the stalled worker {stalled} outlived the run")


def test_an_undecodable_test_image_keeps_the_epochs_training(imagefolder_dir, tmp_path, capsys):
    """An oversized image in val/, read by evaluation's workers: one line naming it and the
    setting, a checkpoint of the epoch's last step; once replaced, the rerun evaluates again."""
    root = tmp_path / "inet"
    shutil.copytree(imagefolder_dir, root)
    victim = sorted((root / "val").rglob("*.JPEG"))[4]
    good = victim.read_bytes()
    victim.write_bytes(samples.png_bytes(16000, 12000))
    assert train.main(argv(root, tmp_path / "w")) == 2
    line = one_line(capsys)
    assert f"image file {victim} is refused: it has 16000x12000" in line
    assert "max_image_pixels=192000000" in line and "global step 4 was written" in line
    victim.write_bytes(good)
    assert train.main(argv(root, tmp_path / "w")) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 4 of 4" in out


def test_workers_never_hold_the_exit(tmp_path):
    """Workers ignore SIGTERM (the trainer handles the job's signals), and multiprocessing
    ends daemon processes at exit with Popen.terminate and then waits for them: a process that
    left persistent workers behind hung there for ever. Ours are ended with SIGKILL."""
    script = (
        "import torch\n"
        "from core import preemption\n"
        "from torch_ref import data\n"
        "loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2,\n"
        "    persistent_workers=True, worker_init_fn=preemption.quiet_worker,\n"
        "    multiprocessing_context=data.worker_context())\n"
        "it = iter(loader); next(it)\n"
        "raise SystemExit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
