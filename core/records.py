"""The workdir record of a run: resolved config, environment, JSON-lines metrics, the lock.

    WORKDIR/config.json        the resolved recipe, the framework, the command line
    WORKDIR/environment.json   library versions, machine, git commit (rewritten at each start)
    WORKDIR/metrics.jsonl      one JSON object per log line: step, epoch, losses, accuracies, lr
    WORKDIR/curves.png         loss and accuracy per epoch (core.plot), after each epoch
    WORKDIR/confusion.json     the best epoch's confusion matrix, per-class test accuracy and the
    WORKDIR/confusion.png      most frequent confusions, with class names; and its picture
    WORKDIR/checkpoints/       each stack's checkpoints (torch: last.pt, previous.pt, best.pt;
                               unusable/: unreadable ones a resume moved aside)
    WORKDIR/.lock              held (flock) by the run that owns the workdir; names its pid

Starting a run in a workdir that already holds one resumes it when the recipe agrees, and refuses
with a one-line error when it does not (another recipe, another framework, changed numbers), when
another run holds it, or when it holds results without the config to resume them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core import preemption
from core.files import UMASK, atomic_write_text
from core.errors import UserError
from core.recipe import Recipe, resume_differences


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(libraries: dict[str, str], device: str) -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname(),
        "device": device,
        "git_commit": git_commit(),
        "libraries": libraries,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


class RunRecord:
    """The workdir of one run. Only the main process writes; every process checks."""

    def __init__(self, workdir: str | os.PathLike, framework: str, recipe: Recipe, writer: bool):
        self.workdir = Path(workdir)
        self.framework, self.recipe, self.writer = framework, recipe, writer
        self.config_path = self.workdir / "config.json"
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.checkpoint_dir = self.workdir / "checkpoints"
        self.saved_recipe: dict = {}  # the recipe of the run in the workdir (after `check`)

    def check(self) -> bool:
        """Raise UserError if the workdir holds a different run; True if it holds this one."""
        if self.workdir.exists() and not self.workdir.is_dir():
            raise UserError(f"workdir {self.workdir} is a file; pass --workdir with a folder")
        if not self.config_path.exists():
            held = self.results()
            if held:
                raise UserError(
                    f"workdir {self.workdir} holds results of a run ({', '.join(held)}) but no "
                    "config.json, so it cannot be resumed safely and is not started over; move "
                    f"it aside (mv {self.workdir} {self.workdir}.old), which keeps those "
                    "results, or pass another --workdir"
                )
            return False
        try:
            saved = json.loads(self.config_path.read_text())
            saved_recipe, saved_framework = saved["recipe"], saved["framework"]
            self.saved_recipe = dict(saved_recipe)
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{self.config_path} is unreadable; move the workdir away or pass another --workdir"
            ) from None
        fix = "pass another --workdir to start a new run"
        if saved_framework != self.framework:
            raise UserError(
                f"workdir {self.workdir} holds a {saved_framework} run, not a "
                f"{self.framework} one; {fix}"
            )
        if saved_recipe.get("recipe") != self.recipe.recipe:
            raise UserError(
                f"workdir {self.workdir} holds a run of recipe "
                f"{saved_recipe.get('recipe')!r}, not {self.recipe.recipe!r}; {fix}"
            )
        diffs = resume_differences(saved_recipe, self.recipe)
        if diffs:
            shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
            raise UserError(
                f"workdir {self.workdir} holds a {self.recipe.recipe} run with other "
                f"settings ({shown}); rerun with the same overrides to resume, or {fix}"
            )
        return True

    def results(self) -> list[str]:
        """What in the workdir a fresh start would destroy: a record with lines, checkpoints."""
        held = []
        try:
            if self.metrics_path.stat().st_size > 0:
                held.append("metrics.jsonl")
        except OSError:
            pass
        if self.checkpoint_dir.is_dir() and any(
            p.is_file() for p in self.checkpoint_dir.rglob("*")
        ):
            held.append("checkpoints/")
        return held

    def epochs_in_record(self, upto_step: int) -> set[int]:
        """The epochs whose end line (the one with test metrics) metrics.jsonl holds, up to
        global step `upto_step`."""
        found = set()
        for m in self._lines():
            if "test_acc" in m and "epoch" in m and m.get("step", 0) <= upto_step:
                found.add(int(m["epoch"]))
        return found

    def _lines(self) -> list[dict]:
        """The record's lines, skipping one cut short by a crash; [] when there is none."""
        try:
            text = self.metrics_path.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def epochs_recorded(self) -> int:
        """Epoch lines in metrics.jsonl (lines cut short by a crash are skipped)."""
        return sum("state_digest" in m for m in self._lines())

    def lock(self) -> "WorkdirLock":
        """Hold the workdir for this run (see WorkdirLock); UserError if another run holds it
        or the folder cannot be made."""
        return WorkdirLock(self.workdir)

    def start(self, libraries: dict[str, str], device: str) -> None:
        if not self.writer:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # what a killed run's atomic writes left (this run holds the workdir's lock: no other
        # writer's file can be among them); the checkpoint folder is each stack's to tidy
        for tmp in self.workdir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        config = {"framework": self.framework, "recipe": self.recipe.to_dict(), "argv": sys.argv}
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        atomic_write_text(
            self.workdir / "environment.json",
            json.dumps(environment(libraries, device), indent=2) + "\n",
        )

    def rewind(self, step: int) -> None:
        """Drop what was written after `step` (the checkpoint a resumed run continues from):
        metric lines, and the confusion files of an epoch that is done again (the driver's
        pictures sink redraws the curves from what is left)."""
        if not self.writer or not self.metrics_path.exists():
            return
        confusion = self.workdir / "confusion.json"
        try:
            stale = json.loads(confusion.read_text())["step"] > step
        except (OSError, ValueError, KeyError, TypeError):
            stale = confusion.exists()  # unreadable: cut short by a crash
        if stale:
            for name in ("confusion.json", "confusion.png"):
                (self.workdir / name).unlink(missing_ok=True)
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    def log(self, **metrics) -> None:
        if not self.writer:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")

    # as a sink of the run driver (core.driver): the driver writes an epoch's JSONL line with
    # `log`, and each step's lines through `log_step`; the pictures are another sink (core.plot)
    def log_step(self, metrics: dict) -> None:
        self.log(**metrics)

    def log_epoch(self, metrics: dict) -> None:
        pass

    def confusion(self, matrix, metrics: dict) -> None:
        """WORKDIR/confusion.json of an epoch's test predictions: the matrix, per-class test
        accuracy and the most frequent confusions, with class names."""
        if not self.writer:
            return
        from core.datasets import class_names

        names = class_names(self.recipe)
        matrix = np.asarray(matrix, np.int64)
        record = {
            "epoch": metrics["epoch"],
            "step": metrics["step"],
            "test_acc": metrics["test_acc"],
            "class_names": names,
            "per_class_test_acc": [None if a != a else a for a in per_class_accuracy(matrix)],
            "top_confusions": [
                {"true": t, "predicted": p, "count": n} for t, p, n in top_confusions(matrix, names)
            ],
            "confusion": matrix.tolist(),
        }
        atomic_write_text(self.workdir / "confusion.json", json.dumps(record) + "\n")

    def read_confusion(self) -> dict | None:
        """confusion.json, or None when there is none (or it is unreadable)."""
        try:
            return json.loads((self.workdir / "confusion.json").read_text())
        except (OSError, ValueError):
            return None

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]


# ------------------------------------------------------------------ the confusion matrix's numbers

TOP_K = 25  # confusions listed in confusion.json and drawn for many classes


def _square(matrix) -> np.ndarray:
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square (C, C), got shape {m.shape}")
    return m


def per_class_accuracy(matrix) -> list[float]:
    """Diagonal over row sum for each true class (a fraction); NaN for a class with no images."""
    m = _square(matrix).astype(float)
    rows = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(rows > 0, np.diag(m) / np.where(rows > 0, rows, 1), np.nan)
    return [float(a) for a in acc]


def top_confusions(matrix, class_names: list[str], k: int = TOP_K) -> list[tuple[str, str, int]]:
    """The `k` largest off-diagonal counts as (true name, predicted name, count), by count
    descending, then by (true, predicted) index; zero counts are left out."""
    m = _square(matrix)
    if len(class_names) != m.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {m.shape[0]}-class matrix")
    if k <= 0:
        return []
    off = m.copy()
    np.fill_diagonal(off, 0)
    t, p = np.nonzero(off > 0)
    counts = off[t, p]
    if len(counts) > k:  # keep everything tied with the k-th largest, then sort those few
        kth = np.partition(counts, len(counts) - k)[len(counts) - k]
        sel = counts >= kth
        t, p, counts = t[sel], p[sel], counts[sel]
    order = np.lexsort((p, t, -counts.astype(np.float64)))[:k]
    return [(class_names[t[i]], class_names[p[i]], int(counts[i])) for i in order]


class WorkdirLock:
    """One run per workdir: an exclusive `flock` on WORKDIR/.lock, held while the run lives and
    released by the operating system when its process ends, however it ends (so a crash never
    leaves a stale lock). The file says who holds it: pid, host and start time. Local file
    systems and NFS (Linux emulates flock with NFS locks) honour it; a file system without locks
    refuses it with one line."""

    NAME = ".lock"

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / self.NAME
        if workdir.exists() and not workdir.is_dir():
            raise UserError(f"workdir {workdir} is a file; pass --workdir with a folder")
        self.fd = None
        self.created = next(
            (p for p in reversed([workdir, *workdir.parents]) if not p.exists()), None
        )  # the first folder this makes
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        except OSError as err:
            raise UserError(
                f"cannot use {workdir} as a run folder ({err.strerror}); pass a "
                "--workdir you can write to"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"workdir {workdir} is in use by another run ({holder}); wait for it to "
                    "finish, or stop it (kill -TERM PID writes a checkpoint; the same command "
                    "then resumes it), or pass another --workdir"
                ) from None
            raise UserError(
                f"cannot lock {self.path} ({err.strerror}); the file system of "
                f"{workdir} does not support locks: pass a --workdir on a local "
                "disk"
            ) from None
        preemption.HELD_FDS.add(self.fd)  # forked data-loading workers close their copy
        os.ftruncate(self.fd, 0)
        os.pwrite(
            self.fd,
            (
                f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            ).encode(),
            0,
        )

    def release(self, tidy: bool = False) -> None:
        """Drop the lock. `tidy` (a start that failed): remove the folders this lock made if
        nothing else was written in them, so that a mistake leaves no trace."""
        if self.fd is None:
            return
        workdir = self.path.parent
        tidy = (
            tidy and self.created is not None and [p.name for p in workdir.iterdir()] == [self.NAME]
        )
        if tidy:
            self.path.unlink()  # while still held: no other start can lock it in between
        preemption.HELD_FDS.discard(self.fd)
        os.close(self.fd)  # closing the descriptor drops the lock
        self.fd = None
        if tidy:
            for folder in [workdir, *workdir.parents]:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self.created:
                    break
