"""What a run prints: a progress bar on a terminal, and the same lines in both stacks."""

from __future__ import annotations

import math
import sys


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when it is a terminal (and `enabled`), else a silent stand-in."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr
    )


def say(text: str) -> None:
    print(text, flush=True)


def first_batch_line(loss: float, num_classes: int) -> str:
    return (
        f"first batch loss {loss:.4f} (ln {num_classes} = {math.log(num_classes):.4f} "
        "for an untrained model)"
    )


def epoch_line(m: dict, epochs: int) -> str:
    ema = f" (ema {100 * m['test_acc_ema']:.2f}%)" if "test_acc_ema" in m else ""
    return (
        f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} "
        f"acc {100 * m['train_acc']:.2f}%  test loss {m['test_loss']:.4f} "
        f"acc {100 * m['test_acc']:.2f}%{ema}  lr {m['lr']:.4g}  {m['epoch_time']:.1f}s "
        f"({m['train_images_per_s']:.0f} img/s)"
    )


class EpochLines:
    """The console as a sink of the run driver: one line per epoch, main process only."""

    def __init__(self, epochs: int, enabled: bool):
        self.epochs, self.enabled = epochs, enabled

    def log_step(self, metrics: dict) -> None:
        pass  # the progress bar shows the window's loss

    def log_epoch(self, metrics: dict) -> None:
        if self.enabled:
            say(epoch_line(metrics, self.epochs))
