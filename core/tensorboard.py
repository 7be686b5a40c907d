"""TensorBoard event files for a run: scalars per log step and per epoch, main process only.

    LOGDIR/events.out.tfevents.<time-1>.<host>.<pid>.rewound   what a resumed run kept (step <= S)
    LOGDIR/events.out.tfevents.<time>.<host>.<pid>.<n>.<hex>  this process's events

`TensorBoardSink` is a sink of the run driver (core.driver): `log_step` writes the
window's loss, accuracy (percent), learning rate and momentum at the global step; `log_epoch` the
epoch's train and test loss and accuracy, throughput, time and epoch number at the global step
that ends the epoch.

Resuming at global step S redoes the steps after S, so the sink first rewrites the event files
already in LOGDIR into one file that holds only the events with step <= S (written under a name
TensorBoard ignores, fsynced, renamed), deletes the old files, and then starts a new file whose
first event is a SessionLog START at step S + 1 (what torch's SummaryWriter(purge_step=S + 1)
writes), so that TensorBoard also hides any step > S it may still have in memory. The rewritten
file is named one second earlier than the new one: TensorBoard reads a folder's files in name
order.

Only tensorboard's pure-Python pieces are used (the event writer, the protos, the stub's CRC);
tensorboard is imported when a sink is made, not when this module is, and never TensorFlow.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

from core.errors import UserError
from core.files import fsync_dir

EVENTS_GLOB = "events.out.tfevents.*"
_TMP_PREFIX = ".tensorboard-rewind."  # must not contain "tfevents": TensorBoard would read it
_FLUSH_EVERY_STEPS = 10

# (tag, key, scale): what each sink method writes, in this order
STEP_SCALARS = (
    ("Loss/train_step", "train_loss_window", 1.0),
    ("Accuracy/train_step", "train_acc_window", 100.0),
    ("LR", "lr", 1.0),
    ("Momentum", "momentum", 1.0),
)
EPOCH_SCALARS = (
    ("Loss/train", "train_loss", 1.0),
    ("Accuracy/train", "train_acc", 100.0),
    ("Loss/val", "test_loss", 1.0),
    ("Accuracy/val", "test_acc", 100.0),
    ("Loss/val_ema", "test_loss_ema", 1.0),  # with a model EMA
    ("Accuracy/val_ema", "test_acc_ema", 100.0),
    ("Throughput/train_images_per_s", "train_images_per_s", 1.0),
    ("Time/epoch_s", "epoch_time", 1.0),
    ("Epoch", "epoch", 1.0),
)


def _import_tensorboard() -> types.SimpleNamespace:
    """The tensorboard pieces the sink uses; UserError when tensorboard is not installed."""
    try:
        import tensorboard.compat  # noqa: F401  (cheap: resolves nothing)

        # tensorboard.compat.tf imports tensorflow when it is installed, unless a module
        # tensorboard.compat.notf exists (tensorboard's own "no TensorFlow" switch): declare it,
        # so that the event writer uses tensorboard's pure-Python stub and never loads TensorFlow
        sys.modules.setdefault(
            "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf")
        )
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as e:
        raise UserError(
            f"TensorBoard logging needs the tensorboard package ({e}): "
            f"pip install tensorboard, or set tensorboard=false"
        ) from None
    return types.SimpleNamespace(
        DecodeError=DecodeError,
        event_pb2=event_pb2,
        summary_pb2=summary_pb2,
        masked_crc32c=masked_crc32c,
        EventFileWriter=EventFileWriter,
        RecordWriter=RecordWriter,
    )


def read_records(path: str | os.PathLike, masked_crc32c) -> Iterator[bytes]:
    """The records of a TFRecord file (uint64 length, uint32 masked CRC of the length, data,
    uint32 masked CRC of the data), stopping quietly at the first incomplete or corrupt one: the
    tail a crash leaves behind."""
    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            return
        end = pos + 12 + length + 4
        if end > len(data):
            return
        body = data[pos + 12 : end - 4]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc32c(body):
            return
        yield body
        pos = end


def _finite(value) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class TensorBoardSink:
    """Scalars for TensorBoard in `logdir`; a run driver sink (`log_step`, `log_epoch`).

    `resume_step` is the global step the run starts from (0 on a fresh run): events with a larger
    step already on disk are removed first. With `writer=False` (not the main process) every
    method does nothing and nothing is created.
    """

    def __init__(self, logdir: str | os.PathLike, resume_step: int, writer: bool = True):
        self.logdir = Path(logdir)
        self.resume_step = int(resume_step)
        self.writer = writer
        self.path: Path | None = None  # this process's event file
        self._tb = _import_tensorboard()  # on every process: all fail alike when it is missing
        self._w = None
        self._steps_since_flush = 0
        if not writer:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._rewind()
        self._w = self._tb.EventFileWriter(
            str(self.logdir),
            max_queue_size=100,
            flush_secs=30,
            filename_suffix="." + os.urandom(3).hex(),
        )
        name = getattr(self._w, "_file_name", None)  # not public: only reported, never relied on
        self.path = Path(name) if name else None
        ev = self._tb.event_pb2
        self._w.add_event(
            ev.Event(
                wall_time=time.time(),
                step=self.resume_step + 1,
                session_log=ev.SessionLog(status=ev.SessionLog.START),
            )
        )
        self._w.flush()

    # --- resume --------------------------------------------------------------------------------
    def _rewind(self) -> None:
        """Rewrite LOGDIR's event files into one that holds only the events with step <= S."""
        for stale in self.logdir.glob(_TMP_PREFIX + "*"):  # a crash during an earlier rewind
            stale.unlink(missing_ok=True)
        old = sorted(p for p in self.logdir.glob(EVENTS_GLOB) if p.is_file())
        if not old:
            return
        tb = self._tb
        header, kept, seen = None, [], set()
        for path in old:  # name order: the order TensorBoard reads them in
            for rec in read_records(path, tb.masked_crc32c):
                try:
                    event = tb.event_pb2.Event.FromString(rec)
                except tb.DecodeError:  # CRCs that match but no Event: stop this file
                    break
                if event.HasField("file_version"):
                    header = header or rec
                elif event.step <= self.resume_step and rec not in seen:
                    # `seen`: a crash between the rename and the deletions below leaves the kept
                    # events twice on disk; the next rewind keeps them once
                    seen.add(rec)
                    kept.append(rec)
        if header is None:
            header = tb.event_pb2.Event(
                wall_time=time.time(), file_version="brain.Event:2"
            ).SerializeToString()
        # one second before the writer's own name, which takes time.time() after this
        final = self.logdir / (
            f"events.out.tfevents.{int(time.time()) - 1:010d}."
            f"{socket.gethostname()}.{os.getpid()}.rewound"
        )
        tmp = self.logdir / f"{_TMP_PREFIX}{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                writer = tb.RecordWriter(fh)
                for rec in [header, *kept]:
                    writer.write(rec)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.logdir)
        for path in old:
            if path != final:  # an earlier rewind in this same second had the same name
                path.unlink(missing_ok=True)
        fsync_dir(self.logdir)

    # --- the sink ------------------------------------------------------------------------------
    def _write(self, metrics: dict, scalars) -> bool:
        values = []
        for tag, key, scale in scalars:
            v = _finite(metrics.get(key))
            if v is not None:
                values.append(self._tb.summary_pb2.Summary.Value(tag=tag, simple_value=scale * v))
        if not values:
            return False
        self._w.add_event(
            self._tb.event_pb2.Event(
                wall_time=time.time(),
                step=int(metrics["step"]),
                summary=self._tb.summary_pb2.Summary(value=values),
            )
        )
        return True

    def log_step(self, metrics: dict) -> None:
        if self._w is None:
            return
        if self._write(metrics, STEP_SCALARS):
            self._steps_since_flush += 1
            if self._steps_since_flush >= _FLUSH_EVERY_STEPS:
                self.flush()

    def log_epoch(self, metrics: dict) -> None:
        if self._w is None:
            return
        self._write(metrics, EPOCH_SCALARS)
        self.flush()

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._steps_since_flush = 0

    def close(self) -> None:
        """Flush and close; harmless twice. The sink does nothing afterwards."""
        w, self._w = self._w, None
        if w is not None:
            w.close()

    def __enter__(self) -> "TensorBoardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
