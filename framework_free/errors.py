"""The user's mistakes: one exception type, one line of text, exit code 2."""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2  # bad command line, bad config, missing data: what argparse uses too


class UserError(Exception):
    """A mistake the user can fix. The message says what is wrong and how to fix it.

    Entry points catch it, print ``error: <message>`` on one line and exit with code 2.
    """

    def __init__(self, message: str):
        # One line, always: a message that spans lines would read as a traceback.
        super().__init__(" ".join(str(message).split()))


def report(err: BaseException, prog: str) -> int:
    """Print a user error on one line of stderr (rank 0 only under torchrun) and return 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {err}", file=sys.stderr)
    return EXIT_USAGE


class CorruptData(UserError):
    """A data file that cannot be decoded. The run driver writes a checkpoint of the last completed
    step before it stops with it, so fixing the file and rerunning the command loses nothing."""
