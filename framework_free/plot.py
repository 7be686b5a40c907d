"""The learning curves of a run as one SVG file, written beside its metrics (no plotting library).

Two panels over epochs: train and test loss, and train and test accuracy, from the per-epoch lines
of ``metrics.jsonl``. `curves_svg(records)` returns the document; the run record rewrites
``WORKDIR/curves.svg`` after every epoch, so the picture always matches the record.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 360, 240  # one panel, pixels
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 52, 12, 28, 36
SERIES = {  # key in the epoch record -> (label, colour)
    "train_loss": ("train", "#1f77b4"),
    "test_loss": ("test", "#d62728"),
    "train_acc": ("train", "#1f77b4"),
    "test_acc": ("test", "#d62728"),
}
PANELS = (("loss", ("train_loss", "test_loss")), ("accuracy (%)", ("train_acc", "test_acc")))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _panel(x0: int, title: str, keys, epochs: list[int], records: list[dict]) -> list[str]:
    scale = 100.0 if "acc" in keys[0] else 1.0
    values = [scale * r[k] for r in records for k in keys if _finite(r.get(k))]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    e_lo, e_hi = min(epochs), max(epochs)
    w, h = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B

    def px(e):
        return x0 + MARGIN_L + (w * (e - e_lo) / (e_hi - e_lo) if e_hi > e_lo else w / 2)

    def py(v):
        return MARGIN_T + h * (hi - v) / (hi - lo)

    out = [f'<text x="{x0 + WIDTH / 2:.1f}" y="16" text-anchor="middle">{escape(title)}</text>',
           f'<rect x="{x0 + MARGIN_L}" y="{MARGIN_T}" width="{w}" height="{h}" fill="none" '
           'stroke="#888"/>']
    for v in _ticks(lo, hi):
        out.append(f'<text x="{x0 + MARGIN_L - 4}" y="{py(v) + 4:.1f}" text-anchor="end">'
                   f'{v:.3g}</text>')
    for e in sorted({e_lo, e_hi, (e_lo + e_hi) // 2}):
        out.append(f'<text x="{px(e):.1f}" y="{HEIGHT - MARGIN_B + 16}" '
                   f'text-anchor="middle">{e}</text>')
    out.append(f'<text x="{x0 + WIDTH / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">epoch</text>')
    for i, key in enumerate(keys):
        label, colour = SERIES[key]
        pts = [(px(r["epoch"]), py(scale * r[key])) for r in records if _finite(r.get(key))]
        if pts:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline data-series="{key}" points="{coords}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.5"/>')
        # the legend where the curves are not: loss falls (legend on top), accuracy rises
        ly = (MARGIN_T + h - 8 - 14 * (len(keys) - 1 - i)) if scale != 1.0 else MARGIN_T + 14 + 14 * i
        out.append(f'<text x="{x0 + WIDTH - MARGIN_R - 6}" y="{ly}" text-anchor="end" '
                   f'fill="{colour}">{label}</text>')
    return out


def curves_svg(records: list[dict], title: str = "") -> str:
    """An SVG of loss and accuracy per epoch from metric records (lines without ``epoch`` or a
    test accuracy, such as the per-step log lines, are skipped)."""
    epochs_records = [r for r in records if "test_acc" in r and _finite(r.get("epoch"))]
    epochs = [r["epoch"] for r in epochs_records] or [0]
    body = []
    for i, (name, keys) in enumerate(PANELS):
        body += _panel(i * WIDTH, name, keys, epochs, epochs_records)
    total_h = HEIGHT + (18 if title else 0)
    shift = 18 if title else 0
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{total_h}" '
            f'font-family="sans-serif" font-size="11">',
            '<rect width="100%" height="100%" fill="white"/>']
    if title:
        head.append(f'<text x="{WIDTH}" y="13" text-anchor="middle">{escape(title)}</text>')
    return "\n".join(head + [f'<g transform="translate(0,{shift})">'] + body + ["</g>", "</svg>"]) + "\n"
