"""core.tensorboard: the scalars TensorBoard reads back, resume without duplicates on
disk, crash-truncated files, the main-process switch, and no TensorFlow, torch or JAX."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2

import core.tensorboard as tbmod
from core.errors import UserError
from core.tensorboard import TensorBoardSink
import testkit

REPO = testkit.REPO
# (tag, key of the sink's dict, scale): accuracies are fractions in the dicts, percent in the files
STEP_SCALARS = [
    ("Loss/train_step", "train_loss_window", 1),
    ("Accuracy/train_step", "train_acc_window", 100),
    ("LR", "lr", 1),
    ("Momentum", "momentum", 1),
]
EPOCH_SCALARS = [
    ("Loss/train", "train_loss", 1),
    ("Accuracy/train", "train_acc", 100),
    ("Loss/val", "test_loss", 1),
    ("Accuracy/val", "test_acc", 100),
    ("Throughput/train_images_per_s", "train_images_per_s", 1),
    ("Time/epoch_s", "epoch_time", 1),
    ("Epoch", "epoch", 1),
]
STEP_TAGS = {t for t, _, _ in STEP_SCALARS}
EPOCH_TAGS = {t for t, _, _ in EPOCH_SCALARS}


# --- what a run writes: every value depends on the step and on which run wrote it -------------
def step_line(step, run=1, steps_per_epoch=15):
    return {
        "step": step,
        "epoch": (step - 1) // steps_per_epoch + 1,
        "train_loss_window": run + step / 100,
        "train_acc_window": 0.5 + step / 1000 - run / 10,
        "lr": 0.1 * run / step,
        "momentum": 0.9 - step / 1000,
    }


def epoch_line(step, epoch, run=1):
    return {
        "step": step,
        "epoch": epoch,
        "train_loss": run + 0.5 + epoch,
        "train_acc": 0.3 + epoch / 10 - run / 100,
        "test_loss": run + 0.25 + epoch,
        "test_acc": 0.2 + epoch / 10 - run / 100,
        "lr": 0.01,
        "train_images_per_s": 1000.0 * run,
        "epoch_time": 12.5 + run,
        "momentum": 0.85,
        "best_test_acc": 0.4,
        "state_digest": "abc",
    }


def expected(step_lines, epoch_lines):
    """tag -> [(step, float32 value)] for these log lines, in step order."""
    out = {}
    for tag, key, scale in STEP_SCALARS:
        out[tag] = [(m["step"], np.float32(scale * m[key])) for m in step_lines]
    for tag, key, scale in EPOCH_SCALARS:
        out[tag] = [(m["step"], np.float32(scale * m[key])) for m in epoch_lines]
    return {t: sorted(v) for t, v in out.items() if v}


def write_run(logdir, resume_step, steps, run, steps_per_epoch=15):
    """log_step at every step, log_epoch at each epoch's last step; the lines written."""
    step_lines, epoch_lines = [], []
    with TensorBoardSink(logdir, resume_step) as sink:
        for s in steps:
            step_lines.append(step_line(s, run, steps_per_epoch))
            sink.log_step(step_lines[-1])
            if s % steps_per_epoch == 0:
                epoch_lines.append(epoch_line(s, s // steps_per_epoch, run))
                sink.log_epoch(epoch_lines[-1])
    return step_lines, epoch_lines


def tensorboard_scalars(logdir):
    """tag -> [(step, value)] as TensorBoard shows them."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        t: [(e.step, np.float32(e.value)) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
    }


def event_files(logdir):
    return sorted(p for p in Path(logdir).iterdir() if "tfevents" in p.name)


def raw_scalars(logdir):
    """(tag, step) -> every value on disk, from every event file, as tensorboard reads them."""
    out = {}
    for path in event_files(logdir):
        for rec in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(rec)
            for v in event.summary.value:
                out.setdefault((v.tag, event.step), []).append(np.float32(v.simple_value))
    return out


# --- tests ----------------------------------------------------------------------------------
def test_two_epochs_read_back_exactly(tmp_path):
    logdir = tmp_path / "tb"
    step_lines, epoch_lines = write_run(logdir, 0, range(1, 11), run=1, steps_per_epoch=5)
    got = tensorboard_scalars(logdir)
    assert set(got) == STEP_TAGS | EPOCH_TAGS
    assert got == expected(step_lines, epoch_lines)
    assert got["Epoch"] == [(5, 1.0), (10, 2.0)]
    assert got["Accuracy/val"][0][1] == np.float32(100 * epoch_lines[0]["test_acc"])  # percent
    assert len(event_files(logdir)) == 1


def test_resume_keeps_each_step_once_and_removes_the_redone_steps_from_disk(tmp_path):
    logdir = tmp_path / "tb"
    first = write_run(logdir, 0, range(1, 31), run=1)  # then a crash; the checkpoint is at 15
    second = write_run(logdir, 15, range(16, 31), run=2)
    want = expected(first[0][:15] + second[0], first[1][:1] + second[1])
    assert want["Loss/train"] == [(15, np.float32(2.5)), (30, np.float32(4.5))]  # 1+.5+1, 2+.5+2
    assert tensorboard_scalars(logdir) == want
    # on disk, not only hidden by TensorBoard's purge: each (tag, step) once, with its run's value
    on_disk = raw_scalars(logdir)
    assert on_disk == {(tag, s): [v] for tag, pairs in want.items() for s, v in pairs}
    files = event_files(logdir)
    assert len(files) == 2 and files[0].name.endswith(".rewound")
    assert not [p for p in logdir.iterdir() if p not in files]  # no temporary file left


def test_resume_twice_in_the_same_second_keeps_the_rewound_file(tmp_path, monkeypatch):
    # both rewinds name their file alike (a frozen clock); the second must not delete its own
    monkeypatch.setattr(tbmod, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    logdir = tmp_path / "tb"
    first = write_run(logdir, 0, range(1, 31), run=1)
    second = write_run(logdir, 15, range(16, 26), run=2)
    third = write_run(logdir, 20, range(21, 31), run=3)
    want = expected(first[0][:15] + second[0][:5] + third[0], first[1][:1] + third[1])
    assert tensorboard_scalars(logdir) == want
    assert raw_scalars(logdir) == {(t, s): [v] for t, pairs in want.items() for s, v in pairs}
    assert len(event_files(logdir)) == 2


def test_resume_from_zero_drops_everything(tmp_path):
    logdir = tmp_path / "tb"
    write_run(logdir, 0, range(1, 16), run=1)
    again = write_run(logdir, 0, range(1, 6), run=2, steps_per_epoch=5)
    assert tensorboard_scalars(logdir) == expected(*again)
    assert raw_scalars(logdir) == {
        (t, s): [v] for t, pairs in expected(*again).items() for s, v in pairs
    }


def test_events_left_twice_by_a_crash_during_a_rewind_are_kept_once(tmp_path):
    # a crash between the rename of the rewound file and the deletion of the old ones
    logdir = tmp_path / "tb"
    step_lines, epoch_lines = write_run(logdir, 0, range(1, 16), run=1)
    (path,) = event_files(logdir)
    (logdir / "events.out.tfevents.0000000001.host.1.rewound").write_bytes(path.read_bytes())
    write_run(logdir, 15, [], run=2)
    want = expected(step_lines, epoch_lines)
    assert raw_scalars(logdir) == {(t, s): [v] for t, pairs in want.items() for s, v in pairs}


@pytest.mark.parametrize("keep_of_last", [0, 5, 20, -3])
def test_a_truncated_last_record_is_dropped_and_the_rest_kept(tmp_path, keep_of_last):
    logdir = tmp_path / "tb"
    step_lines, _ = write_run(logdir, 0, range(1, 11), run=1)  # no epoch end: step 10 is last
    (path,) = event_files(logdir)
    records = list(tbmod.read_records(path, tbmod._import_tensorboard().masked_crc32c))
    last = 12 + len(records[-1]) + 4
    size = path.stat().st_size
    os.truncate(path, size - last + keep_of_last if keep_of_last >= 0 else size + keep_of_last)
    with TensorBoardSink(logdir, resume_step=10) as sink:  # no exception
        assert sink.path is not None
    assert tensorboard_scalars(logdir) == expected(step_lines[:9], [])
    assert raw_scalars(logdir) == {
        (t, s): [v] for t, pairs in expected(step_lines[:9], []).items() for s, v in pairs
    }


def test_not_the_writer_creates_nothing(tmp_path):
    logdir = tmp_path / "tb"
    with TensorBoardSink(logdir, 0, writer=False) as sink:
        sink.log_step(step_line(1))
        sink.log_epoch(epoch_line(1, 1))
        sink.flush()
    assert not logdir.exists() and sink.path is None


def test_non_finite_and_missing_values_are_skipped(tmp_path):
    logdir = tmp_path / "tb"
    with TensorBoardSink(logdir, 0) as sink:
        sink.log_step(
            {
                "step": 1,
                "epoch": 1,
                "train_loss_window": float("nan"),
                "train_acc_window": float("inf"),
                "lr": 0.5,
            }
        )  # no momentum
        sink.log_step(
            {
                "step": 2,
                "epoch": 1,
                "train_loss_window": float("nan"),
                "train_acc_window": float("nan"),
                "lr": float("nan"),
            }
        )  # nothing at all
        sink.log_epoch(
            {
                "step": 2,
                "epoch": 1,
                "train_loss": 1.5,
                "train_acc": float("-inf"),
                "test_loss": None,
                "test_acc": np.float32(0.25),
                "lr": 0.5,
                "train_images_per_s": np.nan,
                "epoch_time": "soon",
            }
        )
    assert tensorboard_scalars(logdir) == {
        "LR": [(1, 0.5)],
        "Loss/train": [(2, 1.5)],
        "Accuracy/val": [(2, 25.0)],
        "Epoch": [(2, 1.0)],
    }


def test_flushes_every_ten_log_steps_and_each_epoch(tmp_path, monkeypatch):
    with TensorBoardSink(tmp_path, 0) as sink:
        flushes = []
        monkeypatch.setattr(sink, "flush", lambda: flushes.append(1) or TensorBoardSink.flush(sink))
        for s in range(1, 26):
            sink.log_step(step_line(s))
        assert len(flushes) == 2
        sink.log_epoch(epoch_line(25, 1))
        assert len(flushes) == 3
    assert len(tensorboard_scalars(tmp_path)["LR"]) == 25


def test_close_twice_and_log_after_close_are_harmless(tmp_path):
    sink = TensorBoardSink(tmp_path, 0)
    sink.log_step(step_line(1))
    sink.close()
    sink.close()
    sink.log_step(step_line(2))
    sink.log_epoch(epoch_line(2, 1))
    assert [s for s, _ in tensorboard_scalars(tmp_path)["LR"]] == [1]


def test_new_files_sort_after_the_rewound_one_and_start_with_a_purge(tmp_path):
    write_run(tmp_path, 0, range(1, 6), run=1)
    with TensorBoardSink(tmp_path, 3) as sink:
        pass
    assert event_files(tmp_path)[-1] == sink.path
    events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(str(sink.path)).Load()]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 4 and events[1].session_log.status == event_pb2.SessionLog.START


def test_no_tensorflow_torch_or_jax_even_when_tensorflow_is_installed(tmp_path):
    # a fake tensorflow that tells when it is imported: tensorboard.compat.tf would import it
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import builtins\nbuiltins.FAKE_TF_IMPORTED = True\nraise ImportError('fake tensorflow')\n"
    )
    code = f"""
import builtins, sys
import core.tensorboard as m
assert not [n for n in sys.modules if n.split('.')[0] == 'tensorboard'], 'import is not lazy'
for resume in (0, 1):
    with m.TensorBoardSink({str(tmp_path / "tb")!r}, resume) as s:
        s.log_step({step_line(1)!r})
        s.log_epoch({epoch_line(1, 1)!r})
print(sorted(n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'torch', 'jax', 'jaxlib')),
      getattr(builtins, 'FAKE_TF_IMPORTED', False))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"
    assert len(event_files(tmp_path / "tb")) == 2


def test_missing_tensorboard_is_a_one_line_user_error(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "tensorboard" or n.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for writer in (True, False):  # every process fails alike
        with pytest.raises(UserError, match="pip install tensorboard") as err:
            TensorBoardSink(tmp_path / "tb", 0, writer=writer)
        assert "\n" not in str(err.value) and "tensorboard=false" in str(err.value)
    assert not (tmp_path / "tb").exists()
