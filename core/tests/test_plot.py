"""The pictures of a run: valid PNGs whose drawn data follow the records, and the numbers behind
the confusion picture (per-class accuracy, most frequent confusions)."""

import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from core import plot
from core.plot import confusion_png, curves_png, lr_find_png
from core.records import per_class_accuracy, top_confusions
import testkit

REPO = testkit.REPO
FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@pytest.fixture
def figures(monkeypatch):
    """Every figure a call saves (the file is still written), to look at what was drawn."""
    saved = []
    real = plot._save

    def save(fig, path, dpi):
        saved.append(fig)
        real(fig, path, dpi)

    monkeypatch.setattr(plot, "_save", save)
    return saved


def png_size(path) -> tuple[int, int]:
    """(width, height) of a valid, non-blank PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        size = im.size
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 1.0, "a blank picture"
    with Image.open(path) as im:
        im.verify()
    return size


def lines_by_label(ax) -> dict:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}


def all_text(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


# ------------------------------------------------------------------ learning curves


def _records(n):
    out = []
    for e in range(1, n + 1):
        # per-step log lines (skipped), one with numbers that would show if it were drawn
        out.append(
            {
                "step": 10 * e,
                "epoch": e,
                "train_loss_window": 9.0,
                "train_acc_window": 0.01,
                "lr": 0.1,
            }
        )
        out.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "test_loss": 2.2 / e,
                "train_acc": 1 - 0.5 / e,
                "test_acc": 1 - 0.6 / e,
            }
        )
        out.append({"step": 10 * e + 5, "epoch": e, "train_loss": 9.0, "train_acc": 0.01})
    return out


def test_curves_draw_one_point_per_epoch_with_accuracy_in_percent(tmp_path, figures):
    path = tmp_path / "curves.png"
    curves_png(_records(5), path, title="fashion_mnist: resnet20, torch_ref")
    assert png_size(path) == (1000, 400)  # 10 x 4 inches at 100 dpi
    (fig,) = figures
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_title(), acc_ax.get_title()) == ("loss", "accuracy (%)")
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "epoch"
    loss, acc = lines_by_label(loss_ax), lines_by_label(acc_ax)
    assert set(loss) == set(acc) == {"train", "test"}
    assert loss["train"] == ([1, 2, 3, 4, 5], pytest.approx([2.0 / e for e in range(1, 6)]))
    assert acc["test"][1] == pytest.approx([100 * (1 - 0.6 / e) for e in range(1, 6)])
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["train", "test"]
    assert "fashion_mnist: resnet20, torch_ref" in all_text(fig)
    # integer epoch ticks only
    assert all(float(t).is_integer() for t in loss_ax.get_xticks())


def test_curves_skip_non_finite_values_and_lines_without_an_epoch(tmp_path, figures):
    recs = _records(4)
    epoch_lines = [r for r in recs if "test_acc" in r]
    epoch_lines[1]["train_loss"] = float("nan")
    epoch_lines[2]["test_loss"] = float("inf")
    epoch_lines[3]["train_acc"] = None
    epoch_lines[0]["test_acc"] = True  # not a number
    recs.append({"epoch": float("nan"), "train_loss": 5.0, "test_loss": 5.0, "test_acc": 0.5})
    recs.append({"train_loss": 5.0, "test_loss": 5.0, "test_acc": 0.5})  # no epoch
    curves_png(recs, tmp_path / "c.png")
    png_size(tmp_path / "c.png")
    loss, acc = (lines_by_label(ax) for ax in figures[0].axes)
    assert loss["train"][0] == [1, 3, 4] and loss["test"][0] == [1, 2, 4]
    assert acc["train"][0] == [1, 2, 3] and acc["test"][0] == [2, 3, 4]
    assert all(math.isfinite(y) for _, ys in [*loss.values(), *acc.values()] for y in ys)


def test_curves_with_no_epoch_yet_still_write_a_picture(tmp_path, figures):
    steps = [r for r in _records(3) if "test_acc" not in r]
    for recs in ([], steps):  # nothing yet, or only the step lines of the first epochs
        path = tmp_path / "curves.png"
        curves_png(recs, path)
        assert png_size(path) == (1000, 400)
        fig = figures.pop()
        assert all(not ax.lines for ax in fig.axes)
        assert all_text(fig).count("no epoch finished yet") == 2


def test_curves_with_one_epoch(tmp_path, figures):
    curves_png(_records(1), tmp_path / "c.png")
    png_size(tmp_path / "c.png")
    assert lines_by_label(figures[0].axes[0])["test"][0] == [1]


# ------------------------------------------------------------------ learning-rate range test


def _range_test(n=200):
    lrs = [1e-7 * (10 / 1e-7) ** (i / (n - 1)) for i in range(n)]
    raw = [2.3 - 1.7 * math.exp(-(((math.log10(lr) + 1) / 1.5) ** 2)) for lr in lrs]
    raw[-1] = 1e6  # the diverged last step
    smooth, avg = [], 0.0
    for i, loss in enumerate(raw):
        avg = 0.95 * avg + 0.05 * loss
        smooth.append(avg / (1 - 0.95 ** (i + 1)))
    return lrs, smooth, raw


def test_lr_find_draws_the_trimmed_range_with_suggestion_and_raw_loss(tmp_path, figures):
    lrs, smooth, raw = _range_test(65)  # 50 points after skip_start=10, skip_end=5
    smooth[30] = float("nan")
    path = tmp_path / "lr_find.png"
    lr_find_png(lrs, smooth, path, title="lr range test", suggestion=lrs[40], raw_losses=raw)
    assert png_size(path) == (700, 450)
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("learning rate", "loss")
    drawn = lines_by_label(ax)
    xs, ys = drawn["loss (smoothed)"]
    assert xs == pytest.approx([lr for i, lr in enumerate(lrs[10:-5]) if i + 10 != 30])
    assert ys == pytest.approx([v for i, v in enumerate(smooth[10:-5]) if i + 10 != 30])
    assert drawn["loss (raw)"][0] == pytest.approx(lrs[10:-5])
    raw_line = next(ln for ln in ax.lines if ln.get_label() == "loss (raw)")
    assert raw_line.get_alpha() == pytest.approx(0.3)
    label = f"suggested lr = {lrs[40]:.2e}"
    assert drawn[label][0] == [lrs[40], lrs[40]]  # the vertical dashed line
    assert ax.get_lines()[-1].get_linestyle() == "--"
    (dot,) = ax.collections
    assert list(dot.get_offsets()[0]) == pytest.approx([lrs[40], smooth[40]])
    assert label in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_title() == "lr range test"


def test_lr_find_clips_a_diverged_tail_and_trims_like_torch_lr_finder(tmp_path, figures):
    lrs, smooth, _ = _range_test(60)
    smooth[-1] = 1e6  # diverged: must not flatten the rest of the curve
    lr_find_png(lrs, smooth, tmp_path / "a.png", skip_start=3, skip_end=0, log_lr=False)
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "linear"
    xs, _ = lines_by_label(ax)["loss (smoothed)"]
    assert xs == pytest.approx(lrs[3:])  # skip_end=0 keeps the end
    assert ax.get_ylim()[1] < 4 * smooth[3] * 1.1
    assert set(lines_by_label(ax)) == {"loss (smoothed)"}  # no raw, no suggestion


@pytest.mark.parametrize("kept", [0, 1, 2])
@pytest.mark.parametrize("extras", [False, True])
def test_lr_find_never_raises_for_short_inputs(tmp_path, figures, kept, extras):
    lrs, smooth, raw = _range_test(10 + kept + 5)
    path = tmp_path / "short.png"
    lr_find_png(
        lrs,
        smooth,
        path,
        suggestion=lrs[10] if extras else None,
        raw_losses=raw[:-3] if extras else None,
    )  # raw shorter than the rest: no error
    assert png_size(path) == (700, 450)
    (ax,) = figures[0].axes
    smoothed = lines_by_label(ax).get("loss (smoothed)", ([], []))[0]
    assert len(smoothed) == kept
    assert f"only {kept} point" in all_text(figures[0])


def test_lr_find_with_nothing_finite_or_nothing_at_all(tmp_path):
    lr_find_png([], [], tmp_path / "empty.png", suggestion=1e-3)
    lr_find_png([1e-3] * 20, [float("nan")] * 10 + [None] * 10, tmp_path / "nan.png")
    lr_find_png([0.0, -1.0] * 20, [1.0] * 40, tmp_path / "nonpositive.png")  # no log of <= 0
    for name in ("empty", "nan", "nonpositive"):
        png_size(tmp_path / f"{name}.png")


# ------------------------------------------------------------------ confusion matrix

HAND = np.array(
    [
        [3, 2, 0, 1],  # class a: 3 of 6 right
        [0, 0, 0, 0],  # class b: no test images
        [1, 2, 4, 1],  # class c: 4 of 8
        [2, 0, 0, 2],
    ]
)  # class d: 2 of 4


def test_per_class_accuracy_by_hand():
    acc = per_class_accuracy(HAND)
    assert acc[0] == pytest.approx(0.5) and acc[2] == pytest.approx(0.5)
    assert acc[3] == pytest.approx(0.5) and math.isnan(acc[1])
    assert all(type(a) is float for a in acc)
    assert per_class_accuracy(np.diag([5, 7])) == [1.0, 1.0]
    assert per_class_accuracy(np.array([[0, 3], [1, 1]])) == [0.0, 0.5]


def test_top_confusions_by_hand_with_ties():
    names = ["a", "b", "c", "d"]
    everything = [
        ("a", "b", 2),
        ("c", "b", 2),
        ("d", "a", 2),  # tie: by (true, pred) index
        ("a", "d", 1),
        ("c", "a", 1),
        ("c", "d", 1),
    ]
    assert top_confusions(HAND, names) == everything  # diagonal and zeros left out
    assert top_confusions(HAND, names, k=2) == everything[:2]
    assert top_confusions(HAND, names, k=4) == everything[:4]
    assert top_confusions(HAND, names, k=0) == []
    assert top_confusions(HAND.astype(np.uint8), names, k=3) == everything[:3]  # unsigned counts
    assert top_confusions(np.diag([3, 4]), ["x", "y"]) == []
    assert all(type(n) is int for _, _, n in top_confusions(HAND.astype(float), names))
    with pytest.raises(ValueError):
        top_confusions(HAND, names[:3])
    with pytest.raises(ValueError):
        per_class_accuracy(np.zeros((2, 3)))


def _random_matrix(c, seed, per_class=50):
    rng = np.random.default_rng(seed)
    m = rng.poisson(0.3, size=(c, c)) * (rng.random((c, c)) < 0.3)
    m[np.arange(c), np.arange(c)] = rng.integers(per_class // 2, per_class, size=c)
    return m


def test_confusion_small_heat_map_with_counts_and_per_class_bars(tmp_path, figures):
    path = tmp_path / "confusion.png"
    confusion_png(HAND[[0, 1, 2]][:, [0, 1, 2]], ["a", "b", "c"], path, title="three")
    png_size(path)
    m = _random_matrix(10, 0, per_class=1000)
    confusion_png(m, FASHION, path, title="fashion_mnist")
    assert png_size(path) == (1200, 550)  # 12 x 5.5 inches at 100 dpi
    fig = figures[-1]
    heat, bars, colourbar = fig.axes
    assert colourbar.get_ylabel() == "fraction of the true class"
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in heat.get_xticklabels()] == FASHION
    assert [t.get_text() for t in heat.get_yticklabels()] == FASHION
    assert 45 <= heat.get_xticklabels()[0].get_rotation() <= 90
    assert heat.get_xticklabels()[0].get_horizontalalignment() == "right"
    shown = np.asarray(heat.images[0].get_array())
    assert shown == pytest.approx(m / m.sum(axis=1, keepdims=True))
    cells = [t.get_text() for t in heat.texts]
    assert cells == [str(v) for v in m.ravel()]
    assert [p.get_width() for p in bars.patches] == pytest.approx(
        [100 * a for a in per_class_accuracy(m)]
    )
    assert [t.get_text() for t in bars.get_yticklabels()] == FASHION
    assert len(bars.texts) == 10  # the value at the end of each bar
    assert "fashion_mnist" in all_text(fig)
    # the class without images: a zero row in the picture, "n/a" beside its bar
    three = figures[0]
    assert np.asarray(three.axes[0].images[0].get_array())[1] == pytest.approx([0, 0, 0])
    assert "n/a" in [t.get_text() for t in three.axes[1].texts]


def test_confusion_hundred_classes_is_larger_and_unannotated(tmp_path, figures):
    path = tmp_path / "c100.png"
    m = _random_matrix(100, 1)
    names = [f"class_{i:02d}" for i in range(100)]
    confusion_png(m, names, path)
    w, h = png_size(path)
    assert w > 1500 and h > 1200
    heat, bars, _ = figures[0].axes
    assert not heat.texts  # no count in the cells
    assert len(bars.patches) == 100
    assert heat.get_xticklabels()[0].get_fontsize() <= 6
    assert [t.get_text() for t in heat.get_yticklabels()] == names


def test_confusion_thousand_classes_shows_the_top_confusions(tmp_path, figures):
    path = tmp_path / "c1000.png"
    m = _random_matrix(1000, 2)
    names = [f"n{i:08d}" for i in range(1000)]
    confusion_png(m, names, path, title="imagenet")
    w, h = png_size(path)
    assert 800 <= w <= 2000 and 600 <= h <= 1600
    (ax,) = figures[0].axes  # one panel, no matrix
    assert not ax.images
    top = top_confusions(m, names, 25)
    assert len(top) == 25 and top[0][2] >= top[-1][2] > 0
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{a} -> {b}" for a, b, _ in top]
    assert [p.get_width() for p in ax.patches] == [n for _, _, n in top]
    assert [t.get_text() for t in ax.texts] == [str(n) for _, _, n in top]


def test_confusion_rejects_a_matrix_that_is_not_square_or_mislabelled(tmp_path):
    with pytest.raises(ValueError):
        confusion_png(np.zeros((3, 2), dtype=int), ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError):
        confusion_png(np.zeros((3, 3), dtype=int), ["a", "b"], tmp_path / "x.png")
    confusion_png(np.zeros((2, 2), dtype=int), ["a", "b"], tmp_path / "zero.png")  # no images
    png_size(tmp_path / "zero.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ how files are written


def test_a_failed_drawing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    curves_png(_records(2), path)
    before = path.read_bytes()

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        curves_png(_records(3), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["curves.png"]


def test_drawing_from_several_threads_at_once(tmp_path):
    errors = []

    def draw(i):
        try:
            curves_png(_records(i + 2), tmp_path / f"c{i}.png", title=f"run {i}")
            confusion_png(_random_matrix(3, i), FASHION[:3], tmp_path / f"m{i}.png")
        except Exception as e:  # noqa: BLE001 - collected and shown below
            errors.append(e)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"c{i}.png" for i in range(3)] + [f"m{i}.png" for i in range(3)]
    )
    for name in os.listdir(tmp_path):
        png_size(tmp_path / name)


def test_drawing_loads_neither_pyplot_nor_a_framework(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from core.plot import curves_png, lr_find_png, confusion_png\n"
        f"out = {str(tmp_path)!r}\n"
        "curves_png([{'epoch': 1, 'train_loss': 1.0, 'test_loss': 1.1, 'train_acc': 0.5,"
        " 'test_acc': 0.4}], out + '/c.png')\n"
        "lr_find_png([10 ** (i / 10 - 6) for i in range(60)], [1.0] * 60, out + '/l.png',"
        " suggestion=1e-4, raw_losses=[1.0] * 60)\n"
        "confusion_png(np.eye(3, dtype=int), ['a', 'b', 'c'], out + '/m.png')\n"
        "print(sorted(m for m in sys.modules if m == 'matplotlib.pyplot'"
        " or m.split('.')[0] in ('torch', 'jax', 'flax', 'configs')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert sorted(os.listdir(tmp_path)) == ["c.png", "l.png", "m.png"]
