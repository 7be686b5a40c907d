"""A scheduler's stop reaches the whole job (the trainer and its data-loading workers) at any
moment: during a step, inside a checkpoint write, during evaluation, at start-up. Each case is
made deterministic with the trainer's pause points (core.preemption.pause, driven by
testkit.chaos): the run waits at a known place, the test signals its process group
there, and the run must exit 75 with one line and resume to the records of an uninterrupted
run, bit for bit. `python -m testkit.chaos` runs every point on both stacks."""

import fcntl
import signal

import pytest

from testkit import chaos
from core.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED


@pytest.fixture
def images(references):
    """The session's ImageNet-layout folder of JPEGs (testkit.chaos.References, "images")."""
    return references.data("images")


def reference(stack, references):
    """The records of the session's uninterrupted run on those images (once per stack)."""
    return references.records(stack, "images")


def one_line(err):
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


# torch_ref's DataLoader workers are processes, flax_impl's decoding threads: the worker cases
# are torch_ref's; flax_impl is stopped inside an evaluation (its SIGTERM during training on
# Fashion-MNIST is test_reliability's)
CASES = [  # stack, pause point, signal, whether each worker is signalled alone first
    ("torch_ref", "step:3", signal.SIGTERM, True),
    ("torch_ref", "eval:2", signal.SIGINT, False),
    ("flax_impl", "eval:2", signal.SIGTERM, False),
]  # inside a checkpoint write: test_reliability's chaos group stop (write:3)


@pytest.mark.parametrize(
    "stack,point,sig,workers_first", CASES, ids=[f"{c[0]}-{c[1]}-{c[2].name}" for c in CASES]
)
def test_group_signal_checkpoints_exits_75_and_resumes_exactly(
    stack, point, sig, workers_first, images, references, tmp_path
):
    want = reference(stack, references)
    cmd = chaos.image_command(stack, images, tmp_path / "run")
    if workers_first:  # a worker signalled alone keeps serving: the run is not harmed
        proc = chaos.paused(cmd, point, tmp_path / "paused")
        workers = chaos.children(proc.pid)
        assert len(workers) >= 2, "torch_ref with num_workers=2 has worker processes"
        for pid in workers:
            chaos.os.kill(pid, sig)
        chaos.time.sleep(0.5)
        assert set(workers) <= set(chaos.children(proc.pid)), "a worker died of the signal"
        chaos.os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=300)
        code = proc.returncode
    else:
        code, err = chaos.group_stop(cmd, point, sig, tmp_path / "paused")
    assert code == EXIT_PREEMPTED and one_line(err), err
    assert "checkpoint written, run the same command to resume" in err
    chaos.run_once(cmd, None)  # the same command resumes and finishes
    assert chaos.epoch_records(tmp_path / "run") == want


@pytest.mark.parametrize("stack", ["torch_ref", "flax_impl"])
def test_a_stop_during_start_up_ends_the_run_before_it_trains(stack, images, tmp_path):
    cmd = chaos.image_command(stack, images, tmp_path / "run")
    code, err = chaos.group_stop(cmd, "start", signal.SIGTERM, tmp_path / "paused")
    assert code == EXIT_PREEMPTED and "stopped before training" in err and one_line(err), err
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not any(p.is_file() for p in ckpts.rglob("*"))


def test_a_second_ctrl_c_quits_at_once_and_the_rerun_still_ends_right(images, references, tmp_path):
    """Exit 130 (or 75 when the stop was done before the second signal landed), one line, and
    the rerun ends where an uninterrupted run does. The handler is core's, the same in
    both stacks (flax_impl's interpreter once crashed here: it now never reaches its teardown);
    torch_ref's worker processes make it the harder case."""
    cmd = chaos.image_command("torch_ref", images, tmp_path / "run")
    proc = chaos.paused(cmd, "step:4", tmp_path / "paused")
    chaos.os.killpg(proc.pid, signal.SIGINT)
    chaos.time.sleep(0.05)
    chaos.os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (EXIT_INTERRUPTED, EXIT_PREEMPTED) and one_line(err), err
    chaos.run_once(cmd, None)
    assert chaos.epoch_records(tmp_path / "run") == reference("torch_ref", references)


def test_the_lock_goes_with_a_killed_trainer_though_its_workers_linger(
    images, references, tmp_path
):
    """SIGKILL of the trainer alone: its DataLoader workers outlive it for a few seconds (until
    torch's watchdog sees the trainer gone), but they closed their copy of the workdir lock, so
    the rerun at once is not refused, and it ends where an uninterrupted run does."""
    cmd = chaos.image_command("torch_ref", images, tmp_path / "run")
    proc = chaos.paused(cmd, "step:3", tmp_path / "paused")
    workers = chaos.children(proc.pid)
    assert workers
    for pid in workers:  # the workers stay: as if the trainer died first
        chaos.os.kill(pid, signal.SIGSTOP)
    try:
        proc.kill()
        proc.wait(timeout=60)  # (its pipes stay open in the stopped workers)
        with open(tmp_path / "run" / ".lock", "rb") as fh:  # free now, workers or not
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        for pid in workers:
            try:
                chaos.os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    chaos.run_once(cmd, None)  # raises if refused
    assert chaos.epoch_records(tmp_path / "run") == reference("torch_ref", references)
