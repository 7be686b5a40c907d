"""Atomic file writes, the one primitive every record, checkpoint and picture is written with.

A leaf module: it imports nothing of this project but `core.preemption` (for its test pause
point), so records, plots, TensorBoard files and both stacks' checkpoints can use it without
importing each other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core import preemption

UMASK = os.umask(0)  # the process's umask, read once (reading it means setting it)
os.umask(UMASK)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never a mix.

    `write(fh)` fills a temporary file in the same folder; it is flushed, fsynced and renamed
    over `path`, and the folder is fsynced so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        preemption.pause("write")  # tests: a signal lands inside the write
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename is None:  # say which file could not be
            raise OSError(err.errno, err.strerror, str(path)) from None  # written
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))
