"""Stopping cleanly: SIGTERM/SIGINT finish the current step, write a checkpoint, exit with 75.

A scheduler (Slurm's scancel, a container stop, `timeout`) signals every process of the job at
once: the trainer and its DataLoader workers. Only the trainer acts on the signal: a worker
(`quiet_worker`, each loader's worker_init_fn) ignores SIGINT, and after SIGTERM keeps serving
batches until the trainer has written its checkpoint and ends it. The handler is installed when
the command starts (`StopOnSignal` in `core.driver.main`), so a signal during start-up
stops the run before it trains instead of killing it. A second SIGINT quits at once; the last
checkpoint on disk stays intact.

Tests and the chaos tool make the moment of a signal deterministic with a pause point: with
``TRAINER_PAUSE_AT=POINT:N`` (or ``POINT:N@R``: only the process of rank R) and
``TRAINER_PAUSE_FILE=PATH`` in the environment, the N-th time the trainer reaches POINT it writes
its pid to PATH and waits (up to a minute) until a signal
arrives, then carries on. The points: ``start`` (the command has parsed its arguments, nothing is
built), ``step`` (an optimizer step was issued, before the trainer looks at the stop flag),
``write`` (inside an atomic write: the temporary file is complete, not yet renamed; for Orbax,
the moment before a checkpoint is handed to it) and ``eval`` (between two evaluation batches).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped after writing a checkpoint; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, quit at once
EXIT_PEER_LOST = 76  # EX_PROTOCOL: another process of the run died; start all again to resume

_state: dict = {"signal": None, "announce": True, "counts": {}, "waiting": False}


class StopWaiting(BaseException):
    """Raised by the signal handler itself when a stop request arrives while the trainer waits
    for its next batch (`waiting`): a slow, stalled or dead data-loading worker cannot hold the
    stop back. Nothing is half-done then (the last step is complete, the batch is not used).
    A BaseException, so that a library's ``except Exception`` around its wait cannot eat it."""


class Preempted(Exception):
    """A stop was requested (SIGTERM, SIGINT). `saved`: a checkpoint of the current step was
    written (False when the run stopped before its first step: nothing new to save)."""

    def __init__(self, global_step: int, saved: bool = True, doing: str = "training"):
        super().__init__(global_step)
        self.global_step, self.saved, self.doing = global_step, saved, doing

    def __str__(self):
        return str(self.global_step)


def requested() -> str | None:
    """The name of the signal that asked this process to stop, or None."""
    return _state["signal"]


def reset() -> None:
    """Forget a stop request (a new run in the same process, e.g. tests)."""
    _state["signal"] = None
    _state["waiting"] = False
    _state["counts"].clear()


def announce(on: bool) -> None:
    """Whether this process prints the stop line (the main process only)."""
    _state["announce"] = on


def _handle(signum, frame):
    if _state["signal"] is not None and signum == signal.SIGINT:
        # quit at once, here: an exception could land inside a library's write and leave it
        # half-done in memory; files on disk are safe (writes are atomic, a temporary file is
        # removed at the next start) and data-loading workers exit when they see the trainer gone
        if _state["announce"]:
            print(
                "SIGINT again: quitting at once; checkpoints on disk are intact, run the same "
                "command to resume from the last one",
                file=sys.stderr,
                flush=True,
            )
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    first = _state["signal"] is None
    _state["signal"] = signal.Signals(signum).name
    if first and _state["announce"]:
        print(
            f"{signal.Signals(signum).name}: stopping after this step and writing a "
            "checkpoint (SIGINT again to quit at once)",
            flush=True,
        )
    if first and _state["waiting"]:
        _state["waiting"] = False
        raise StopWaiting


@contextlib.contextmanager
def waiting(enabled: bool = True):
    """While the trainer waits for data: a first stop request raises `StopWaiting` at once
    instead of waiting for the batch (one process only: several must agree on stopping)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["waiting"] = True
    try:
        yield
    finally:
        _state["waiting"] = False


class StopOnSignal:
    """While active, SIGTERM or SIGINT mark a stop request (`requested()`); the training loop
    checks it after each step and between evaluation batches. Nesting is fine. Only the main
    thread can install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, _handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


HELD_FDS: set = set()  # descriptors a forked worker must not keep open (the workdir lock)


def install_early() -> None:
    """The command's first act (before torch or JAX load, seconds): SIGTERM/SIGINT already mark
    a stop request, which the trainer honours once it starts (exit 75, nothing trained)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _handle)


def quiet_worker(_worker_id: int = 0) -> None:
    """A data-loading worker's set-up (each loader's worker_init_fn): SIGINT and SIGTERM are the
    trainer's (its parent's) to act on for the whole job, so a worker ignores both and keeps
    serving batches while the trainer finishes its step and writes its checkpoint; the trainer
    then ends it, with SIGKILL when it must force it (torch_ref.data's worker context), and a
    worker whose trainer is gone exits by itself (torch's watchdog). It also closes its copy of
    the workdir lock, so that the lock goes with the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fd in list(HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass


PAUSE_WAIT_S = 60.0  # a pause ends by itself after this long: a test that forgot it cannot hang


def pause(point: str) -> None:
    """Wait here for a signal when the environment asks for it (tests; see the module text)."""
    want = os.environ.get("TRAINER_PAUSE_AT")
    if not want or threading.current_thread() is not threading.main_thread():
        return
    want, _, rank = want.partition("@")  # "@R": only the process of rank R (torchrun's RANK)
    if rank and rank != os.environ.get("RANK", "0"):
        return
    name, _, nth = want.partition(":")
    if name != point:
        return
    counts = _state["counts"]
    counts[point] = counts.get(point, 0) + 1
    if counts[point] != int(nth or 1):
        return
    path = os.environ.get("TRAINER_PAUSE_FILE")
    if path:
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(tmp, path)
    deadline = time.monotonic() + PAUSE_WAIT_S
    while _state["signal"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
