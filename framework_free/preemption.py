"""Stopping cleanly: SIGTERM/SIGINT finish the current step, write a checkpoint, exit with 75."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped after writing a checkpoint; rerun to resume


class Preempted(Exception):
    """A stop was requested (SIGTERM, SIGINT); a checkpoint of the current step was written."""


class StopOnSignal:
    """While active, SIGTERM or SIGINT set ``holder.stop_requested``; the training loop checks it
    after each step. A second SIGINT interrupts at once (the last checkpoint on disk stays
    intact). Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self, holder, announce: bool = True):
        self.holder, self.announce, self.previous = holder, announce, {}

    def _handle(self, signum, frame):
        if self.holder.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.holder.stop_requested = True
        if self.announce:
            print(f"{signal.Signals(signum).name}: stopping after this step and writing a "
                  "checkpoint (SIGINT again to quit at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
