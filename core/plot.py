"""The pictures of a run as PNG files, drawn with matplotlib (Agg, no window, no pyplot).

    curves_png      loss and accuracy per epoch from the lines of ``metrics.jsonl``
    lr_find_png     the learning-rate range test, drawn as torch-lr-finder draws it
    confusion_png   the confusion matrix of a test set (a top-confusions chart for many classes)

`Pictures` is the run driver's sink that redraws curves.png and the best epoch's confusion.png
from the run record after each epoch (the record itself draws nothing). The numbers behind the
confusion picture (`per_class_accuracy`, `top_confusions`) are the record's, in core.records.
Every figure is a `matplotlib.figure.Figure` with its own Agg canvas:
nothing touches pyplot or the global rc settings, so drawing is safe from any thread and never
opens a window. Files are written atomically (`core.files.atomic_write`).
"""

from __future__ import annotations

import math
import numbers
import os
import time

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core.files import atomic_write
from core.records import TOP_K, _square, per_class_accuracy, top_confusions

TRAIN_COLOUR, TEST_COLOUR = "#1f77b4", "#d62728"
CURVE_PANELS = (  # panel title, (key, label, colour, marker) per series, scale of the values
    (
        "loss",
        (("train_loss", "train", TRAIN_COLOUR, "o"), ("test_loss", "test", TEST_COLOUR, "s")),
        1.0,
    ),
    (
        "accuracy (%)",
        (("train_acc", "train", TRAIN_COLOUR, "o"), ("test_acc", "test", TEST_COLOUR, "s")),
        100.0,
    ),
)
ANNOTATE_MAX = 20  # up to this many classes, each cell of the matrix shows its count
MATRIX_MAX = 100  # above this many classes, only the most frequent confusions are drawn


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas of this figure alone: no backend switch, no pyplot
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    # lazily: records imports this module lazily too
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))


def _note(ax, text: str, y: float = 0.5) -> None:
    box = {"boxstyle": "round", "fc": "white", "ec": "#bbbbbb", "alpha": 0.9}
    ax.text(
        0.5,
        y,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=10,
        color="#555555",
        bbox=box,
    )


def _short(name: str, limit: int = 28) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


# ------------------------------------------------------------------ learning curves


def _epoch_records(records: list[dict]) -> list[dict]:
    """The per-epoch lines of a metrics log in epoch order (the last line wins for an epoch
    written twice); per-step lines, which have no ``test_acc``, are left out."""
    by_epoch = {}
    for r in records:
        if isinstance(r, dict) and "test_acc" in r and _finite(r.get("epoch")):
            by_epoch[r["epoch"]] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def curves_png(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss (left) and accuracy in % (right) per epoch, train and test, as a PNG at `path`.

    `records` are the lines of ``metrics.jsonl``; only lines with a finite ``epoch`` and a
    ``test_acc`` are drawn, and non-finite values are left out. With no epoch line yet the file
    is still written, with a note on empty axes.
    """
    rows = _epoch_records(records)
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, (name, series, scale) in zip(axes, CURVE_PANELS):
        drawn = 0
        for key, label, colour, marker in series:
            pts = [(r["epoch"], scale * r[key]) for r in rows if _finite(r.get(key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs, ys, color=colour, marker=marker, markersize=4, linewidth=1.5, label=label
                )
                drawn += 1
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(loc="upper right" if scale == 1.0 else "lower right")
        else:
            _note(ax, "no epoch finished yet")
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi=100)


# ------------------------------------------------------------------ learning-rate range test


def _trim(values, skip_start: int, skip_end: int) -> np.ndarray:
    """torch-lr-finder's trimming: ``v[skip_start:-skip_end]``, or ``v[skip_start:]``."""
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float).reshape(-1)
    return a[skip_start:] if skip_end == 0 else a[skip_start:-skip_end]


def lr_find_png(
    lrs,
    losses,
    path: str | os.PathLike,
    title: str = "",
    suggestion: float | None = None,
    raw_losses=None,
    skip_start: int = 10,
    skip_end: int = 5,
    log_lr: bool = True,
) -> None:
    """The LR range test as a PNG: smoothed loss against learning rate (log axis when `log_lr`).

    Only ``lrs[skip_start:-skip_end]`` is drawn (``lrs[skip_start:]`` when `skip_end` is 0), as
    torch-lr-finder's plot does; `raw_losses`, when given, is drawn faintly over the same range.
    A `suggestion` is marked by a red dot on the smoothed curve and a dashed vertical line.
    Non-finite losses are dropped; the top of the y axis is clipped so that a diverged tail does
    not flatten the curve. Never raises for short inputs: it draws what there is, with a note.
    """
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"skip_start and skip_end must be >= 0, got {skip_start}, {skip_end}")
    x = _trim(lrs, skip_start, skip_end)
    y = _trim(losses, skip_start, skip_end)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    x_ok = np.isfinite(x) & ((x > 0) if log_lr else True)
    keep = x_ok & np.isfinite(y)
    xs, ys = x[keep], y[keep]
    raw = None
    if raw_losses is not None:
        r = _trim(raw_losses, skip_start, skip_end)
        m = min(n, len(r))
        rk = x_ok[:m] & np.isfinite(r[:m])
        raw = (x[:m][rk], r[:m][rk])

    fig = _figure(7, 4.5)
    ax = fig.subplots()
    if raw is not None and len(raw[0]):
        ax.plot(raw[0], raw[1], color="#1f77b4", alpha=0.3, linewidth=1, label="loss (raw)")
    if len(xs):
        ax.plot(
            xs,
            ys,
            color="#1f77b4",
            linewidth=1.8,
            label="loss (smoothed)",
            marker="o" if len(xs) <= 2 else None,
            markersize=4,
        )
    if log_lr:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)

    marked = []
    if suggestion is not None and _finite(suggestion) and (suggestion > 0 or not log_lr):
        marked.append(float(suggestion))
        label = f"suggested lr = {suggestion:.2e}"
        ax.axvline(suggestion, color="red", linestyle="--", linewidth=1, label=label)
        if len(xs):
            order = np.argsort(xs)
            t = np.log10 if log_lr else (lambda v: v)
            at = float(np.interp(t(suggestion), t(xs[order]), ys[order]))
            ax.scatter([suggestion], [at], s=60, color="red", zorder=3)

    # y range: the finite trimmed points, with the top clipped at four times the starting loss
    # so that a diverged tail does not flatten the rest (the raw loss may leave the frame)
    if len(ys) >= 2:
        lo = float(min(ys.min(), raw[1].min() if raw is not None and len(raw[1]) else np.inf))
        hi = float(ys.max())
        top = min(hi, 4 * float(ys[0]))
        if top > lo:
            hi = top
        if hi > lo:
            pad = 0.05 * (hi - lo)
            ax.set_ylim(lo - pad, hi + pad)
    # x range: one distinct learning rate (or none but a suggestion) would give a singular axis
    xvals = np.concatenate([xs] + ([raw[0]] if raw is not None else []) + [np.array(marked)])
    if len(xvals) and np.ptp(xvals) == 0:
        c = float(xvals[0])
        ax.set_autoscalex_on(False)  # else set_xlim first autoscales to the singular range
        half = max(abs(c), 1.0) / 2
        ax.set_xlim(*((c / 10, c * 10) if log_lr else (c - half, c + half)))

    if len(xs) <= 2:
        _note(
            ax,
            f"only {len(xs)} point{'s' if len(xs) != 1 else ''} to draw "
            f"(skip_start={skip_start}, skip_end={skip_end})",
        )
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="best")
    _save(fig, path, dpi=100)


# ------------------------------------------------------------------ confusion matrix


def _confusion_panels(fig, m: np.ndarray, names: list[str]) -> None:
    c = m.shape[0]
    rows = m.sum(axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows[:, None] > 0, m / np.where(rows > 0, rows, 1)[:, None], 0.0)
    small = c <= ANNOTATE_MAX
    tick_fs = 9 if c <= 10 else 7 if small else 6 if c <= 50 else 4.5
    ax, bx = fig.subplots(1, 2, width_ratios=[1.45, 1] if small else [2.2, 1])
    labels = [_short(s, 24) for s in names]

    # many classes: cells fill the panel, so the rows line up with the bars beside them
    im = ax.imshow(
        norm,
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        aspect="equal" if small else "auto",
    )
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046 if small else 0.02,
        aspect=20 if small else 50,
        pad=0.02,
        label="fraction of the true class",
    )
    ax.set_xticks(
        range(c),
        labels,
        fontsize=tick_fs,
        rotation=45 if small else 90,
        ha="right",
        rotation_mode="anchor",
    )
    ax.set_yticks(range(c), labels, fontsize=tick_fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = m.sum()
    acc = f", accuracy {100 * np.trace(m) / total:.2f}%" if total > 0 else ""
    ax.set_title(f"confusion matrix (row-normalised){acc}", fontsize=10)
    if small:
        digits = len(str(int(m.max()))) if m.size else 1
        fs = min(9.0, max(5.0, (4.6 / c) * 72 / max(digits, 2) * 1.4))
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    str(int(m[i, j])),
                    ha="center",
                    va="center",
                    fontsize=fs,
                    color="white" if norm[i, j] > 0.55 else "black",
                )

    accs = np.array(per_class_accuracy(m)) * 100
    bars = bx.barh(
        range(c), np.nan_to_num(accs, nan=0.0), color="#4c72b0", height=0.7 if small else 0.8
    )
    bx.bar_label(
        bars,
        labels=["n/a" if np.isnan(a) else f"{a:.1f}" for a in accs],
        padding=2,
        fontsize=min(tick_fs, 8) if small else min(tick_fs, 5),
    )
    bx.set_yticks(range(c), labels, fontsize=tick_fs)
    bx.set_ylim(c - 0.5, -0.5)  # class 0 on top, as in the matrix
    bx.set_xlim(0, 112)
    bx.set_xticks([0, 25, 50, 75, 100])
    bx.set_xlabel("accuracy (%)")
    bx.set_title("per-class accuracy", fontsize=10)
    bx.grid(True, axis="x", alpha=0.3)


def _top_confusions_panel(fig, m: np.ndarray, names: list[str]) -> None:
    ax = fig.subplots()
    top = top_confusions(m, names, TOP_K)
    errors = int(m.sum() - np.trace(m))
    shown = sum(n for _, _, n in top)
    if top:
        labels = [f"{_short(t, 32)} -> {_short(p, 32)}" for t, p, _ in top]
        bars = ax.barh(range(len(top)), [n for _, _, n in top], color="#c44e52", height=0.7)
        ax.bar_label(bars, labels=[str(n) for _, _, n in top], padding=2, fontsize=8)
        ax.set_yticks(range(len(top)), labels, fontsize=8)
        ax.set_ylim(len(top) - 0.5, -0.5)
        ax.set_xlim(0, 1.12 * top[0][2])
    else:
        ax.set_yticks([])
        _note(ax, "no confusions")
    ax.set_xlabel("test images")
    total = m.sum()
    acc = f"accuracy {100 * np.trace(m) / total:.2f}%, " if total > 0 else ""
    ax.set_title(
        f"{len(top)} most frequent confusions (true -> predicted)\n"
        f"{m.shape[0]} classes, {acc}{shown} of {errors} errors shown",
        fontsize=10,
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="x", alpha=0.3)


def confusion_png(matrix, class_names: list[str], path: str | os.PathLike, title: str = "") -> None:
    """A confusion matrix (rows true class, columns predicted) as a PNG at `path`.

    Up to 100 classes: a heat map of the row-normalised matrix (counts written in the cells up
    to 20 classes) beside a bar chart of per-class accuracy. Above 100 classes: a bar chart of
    the 25 most frequent confusions, "true -> predicted", with their counts.
    """
    m = _square(matrix)
    c = m.shape[0]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}-class matrix")
    names = [str(s) for s in class_names]
    if c == 0:
        fig = _figure(6, 4)
        _note(fig.subplots(), "empty confusion matrix")
        dpi = 100
    elif c > MATRIX_MAX:
        fig = _figure(10, 8)
        _top_confusions_panel(fig, m, names)
        dpi = 110
    else:
        if c <= ANNOTATE_MAX:
            height = max(5.5, 0.12 * c + 2.5)
            width = 12 + 0.1 * (c - 10) if c > 10 else 12
        else:
            height = 0.1 * c + 3  # C=100: 13 x 18.5 inches
            width = height + 5.5
        fig = _figure(width, height)
        _confusion_panels(fig, m, names)
        dpi = 100 if c <= ANNOTATE_MAX else 120
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi=dpi)


# ------------------------------------------------------------------ the driver's sink


class Pictures:
    """A sink of the run driver (core.driver): curves.png drawn from metrics.jsonl, and
    confusion.png from confusion.json when an epoch wrote it (the best epoch so far). Everything
    is drawn from the record, so a resumed run draws the same.

    A picture takes ~0.5 s to draw, longer than a whole epoch of a smoke run: while a run
    trains, they are redrawn at most once every `every_seconds` (30; every epoch of any real
    run takes longer), and what is still to draw is drawn when the run finishes (`flush`, whose
    errors are the run's: a full disk is one line) and when it stops or fails (`close`, which
    lets a failed drawing go: the run is already ending with its own message, and the next
    run of the command draws the pictures again from the record)."""

    EVERY_SECONDS = 30.0

    def __init__(self, record, every_seconds: float = EVERY_SECONDS, clock=time.monotonic):
        self.record = record
        self.every_seconds = every_seconds
        self.clock = clock
        self._drawn_at = clock()  # the start counts as a drawing: a short run draws at its end
        self._curves = self._confusion = False  # what is to be drawn

    def redraw(self) -> None:
        """curves.png from the record as it stands, now."""
        r = self.record
        if r.writer and r.metrics_path.exists():
            title = f"{r.recipe.recipe}: {r.recipe.model}, {r.framework}"
            curves_png(r.read_metrics(), r.workdir / "curves.png", title)

    def rewound(self) -> None:
        """The record was rewound (a resume): curves.png is to be drawn again."""
        self._curves = True

    def log_step(self, metrics: dict) -> None:
        pass

    def log_epoch(self, metrics: dict) -> None:
        self._curves = True
        r = self.record
        confusion = r.read_confusion() if r.writer else None
        if confusion is not None and confusion["step"] == metrics["step"]:
            self._confusion = True
        if self.clock() - self._drawn_at >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        """Draw what is still to draw."""
        if self._curves:
            self.redraw()
            self._curves = False
        r = self.record
        confusion = r.read_confusion() if self._confusion and r.writer else None
        if confusion is not None:
            title = (
                f"{r.recipe.recipe}, {r.framework}: test set at epoch {confusion['epoch']} "
                f"({100 * confusion['test_acc']:.2f}%)"
            )
            confusion_png(
                np.asarray(confusion["confusion"], np.int64),
                confusion["class_names"],
                r.workdir / "confusion.png",
                title,
            )
        self._confusion = False
        self._drawn_at = self.clock()

    def close(self) -> None:
        try:
            self.flush()
        except OSError:
            pass
