"""The curves picture: a valid SVG whose lines follow the epoch records."""

import xml.etree.ElementTree as ET

from framework_free.plot import curves_svg

NS = "{http://www.w3.org/2000/svg}"


def _records(n):
    out = [{"step": 1, "epoch": 1, "train_loss_window": 2.3, "lr": 0.1}]  # a log line: skipped
    for e in range(1, n + 1):
        out.append({"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e,
                    "train_acc": 1 - 0.5 / e, "test_acc": 1 - 0.6 / e})
    return out


def _series(svg):
    root = ET.fromstring(svg)
    return {p.get("data-series"): [tuple(map(float, xy.split(",")))
                                   for xy in p.get("points").split()]
            for p in root.iter(f"{NS}polyline")}


def test_one_point_per_epoch_and_values_in_order():
    series = _series(curves_svg(_records(5), title="fashion_mnist <torch_ref>"))
    assert set(series) == {"train_loss", "test_loss", "train_acc", "test_acc"}
    for key, pts in series.items():
        assert len(pts) == 5, key
        xs = [x for x, _ in pts]
        assert xs == sorted(xs) and xs[0] < xs[-1]
    # SVG y grows downwards: falling loss goes down the page (y up), rising accuracy up (y down)
    assert [y for _, y in series["test_loss"]] == sorted(y for _, y in series["test_loss"])
    assert [y for _, y in series["test_acc"]] == sorted((y for _, y in series["test_acc"]),
                                                        reverse=True)


def test_non_finite_values_are_left_out_and_one_epoch_draws():
    recs = _records(3)
    recs[2]["train_loss"] = float("nan")
    series = _series(curves_svg(recs))
    assert len(series["train_loss"]) == 2 and len(series["test_loss"]) == 3
    assert len(_series(curves_svg(_records(1)))["test_acc"]) == 1
    ET.fromstring(curves_svg([]))  # no epochs yet: still a valid document
