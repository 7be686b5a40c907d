"""The user's mistakes: one exception type, one line of text, exit code 2 (74 for a failed
data-loading worker)."""

from __future__ import annotations

import errno
import os
import sys

EXIT_USAGE = 2  # bad command line, bad config, missing data: what argparse uses too
EXIT_DATA_WORKER = 74  # EX_IOERR: a data-loading worker died or raised; rerun to resume


class UserError(Exception):
    """A mistake the user can fix. The message says what is wrong and how to fix it.

    Entry points catch it, print ``error: <message>`` on one line and exit with `exit_code`.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        # One line, always: a message that spans lines would read as a traceback.
        super().__init__(" ".join(str(message).split()))


def report(err: BaseException, prog: str) -> int:
    """Print a user error on one line of stderr (rank 0 only under torchrun) and return its
    exit code (2 unless the error says otherwise)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {err}", file=sys.stderr)
    return getattr(err, "exit_code", EXIT_USAGE)


class DataFailure(UserError):
    """The data failed between two training steps (the state is that of the last completed
    step). The run driver writes a checkpoint of it before it stops, and says so in the line
    (`outcome`), so fixing the cause and rerunning the command loses nothing."""

    def outcome(self, text: str) -> "DataFailure":
        """The same error with what the driver did appended."""
        out = type(self)(f"{self}; {text}")
        out.__cause__ = self.__cause__
        return out


class CorruptData(DataFailure):
    """A data file that cannot be decoded (for any reason its decoder gives): exit code 2."""


class WorkerFailed(DataFailure):
    """A data-loading worker process died (killed, out of memory) or raised: exit code 74."""

    exit_code = EXIT_DATA_WORKER


class UnusableCheckpoint(UserError):
    """A checkpoint that cannot be read (truncated, corrupt, not a checkpoint). Resuming falls
    back to the one before it; evaluating it reports this line."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}
_BAD_PLACE = {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
FILE_SYSTEM_ERRNOS = _NO_SPACE | _NOT_ALLOWED | _BAD_PLACE


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _free_space(path: str) -> str:
    """ "12.0 MB free" on the file system of `path` (or its nearest existing parent)."""
    import shutil

    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return f"{_megabytes(shutil.disk_usage(p).free)} free"
    except OSError:
        return "free space unknown"


def file_system_error(
    err: BaseException, need_bytes: int | None = None, resumable: bool = True, where=None
) -> UserError | None:
    """A failed write as the one line a user needs: which path, why, what is needed and that
    nothing was lost (the previous checkpoint and record stay; writes are atomic). None when
    `err` is not a file-system error of the kinds users cause (full disk, no permission, a
    read-only file system, a path under a file); those are programming errors and keep their
    traceback. Errors that libraries wrap (Orbax, TensorStore) are recognised by their text;
    `where` names the place when the error does not."""
    code, path, why = getattr(err, "errno", None), getattr(err, "filename", None), None
    path = path or (str(where) if where is not None else None)
    if code in FILE_SYSTEM_ERRNOS:
        why = os.strerror(code)
    else:
        text = str(err)
        for c in sorted(FILE_SYSTEM_ERRNOS):
            if os.strerror(c) in text:
                code, why = c, os.strerror(c)
                break
        if code not in FILE_SYSTEM_ERRNOS:
            return None
    where = f" {path}" if path else ""
    after = (
        "the last checkpoint and the record are intact: rerun the same command to resume"
        if resumable
        else "no checkpoint was written yet: rerun the same command to start again"
    )
    if code in _NO_SPACE:
        need = f", a checkpoint needs about {_megabytes(need_bytes)}" if need_bytes else ""
        place = path or os.getcwd()
        return UserError(
            f"cannot write{where}: {why} ({_free_space(place)}{need}); free space "
            f"or pass another --workdir; {after}"
        )
    if code in _NOT_ALLOWED:
        return UserError(
            f"cannot write{where}: {why}; make it writable or pass another --workdir; {after}"
        )
    return UserError(
        f"cannot write{where}: {why} (a part of the path is a file, or the path is "
        f"too long); pass another --workdir; {after}"
    )
