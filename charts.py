"""Pictures, drawn with pillow: training curves, several runs' curves side by side, bar charts, the confusion matrix."""

from __future__ import annotations

import io
import os
import statistics

from PIL import Image, ImageDraw

from data import EMOTIONS, INVALID, atomic_write_bytes, read_jsonl


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Encode in memory, then write atomically (no half-written picture after a crash)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


CURVE_KEYS = ["loss", "reward_mean", "reward_accuracy", "reward_format", "val_accuracy", "kl_mean",
              "frac_clipped_lower", "frac_clipped_upper", "entropy", "completion_len_mean"]


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike,
                keys: list[str] | None = None) -> list[str]:
    """Small multiples of training curves from a metrics.jsonl (pillow only). Returns the keys drawn."""
    rows = list(read_jsonl(metrics_path))
    keys = [k for k in (keys or CURVE_KEYS) if any(isinstance(r.get(k), (int, float)) for r in rows)]
    w, h, cols = 300, 160, 3
    img = Image.new("RGB", (w * cols, h * max(1, -(-len(keys) // cols))), "white")
    draw = ImageDraw.Draw(img)
    for n, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        x0, y0 = (n % cols) * w, (n // cols) * h
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        s_lo, s_hi = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        box = (x0 + 40, y0 + 20, x0 + w - 10, y0 + h - 20)
        draw.rectangle(box, outline=(180, 180, 180))
        draw.text((x0 + 40, y0 + 4), key, fill="black")
        draw.text((x0 + 2, box[1]), f"{hi:.3g}", fill="gray")
        draw.text((x0 + 2, box[3] - 10), f"{lo:.3g}", fill="gray")
        draw.text((box[2] - 30, box[3] + 4), str(s_hi), fill="gray")
        xy = [(box[0] + (st - s_lo) / (s_hi - s_lo) * (box[2] - box[0]),
               box[3] - (0.5 if hi == lo else (v - lo) / (hi - lo)) * (box[3] - box[1])) for st, v in pts]
        if len(xy) > 1:
            # raw values faintly, a trailing moving average (window ~1/15 of the run) on top
            draw.line(xy, fill=(185, 200, 235), width=1)
            win = max(1, len(xy) // 15)
            ys = [p[1] for p in xy]
            smooth = [(x, sum(ys[max(0, i - win + 1):i + 1]) / (i + 1 - max(0, i - win + 1)))
                      for i, (x, _) in enumerate(xy)]
            draw.line(smooth, fill=(30, 90, 200), width=2)
        else:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=(30, 90, 200))
    save_png(img, out_png)
    return keys


SIDE_BY_SIDE_KEYS = ["reward_mean", "reward_accuracy", "val_accuracy", "kl_mean", "entropy", "frac_clipped_lower",
                     "frac_clipped_upper", "frac_zero_std"]


def curves_side_by_side_png(runs: dict[str, list[str | os.PathLike]], path: str | os.PathLike,
                            keys: list[str] | None = None) -> list[str]:
    """Training curves of several runs (e.g. stages 2-4) side by side: one column per run, one
    row per metric, the same y range across a row so columns compare at a glance. Each run
    may have several metrics.jsonl (seeds): each is drawn faintly, their step-wise mean on top.
    A run that did not log a metric gets an empty, labelled cell. Returns the keys drawn."""
    series = {name: [list(read_jsonl(f)) for f in files] for name, files in runs.items()}
    keys = [k for k in (keys or SIDE_BY_SIDE_KEYS)
            if any(isinstance(r.get(k), (int, float)) for logs in series.values() for log in logs for r in log)]
    w, h, left, top = 260, 120, 95, 20
    img = Image.new("RGB", (left + w * len(runs) + 10, top + h * len(keys) + 10), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(runs):
        draw.text((left + j * w + 5, 4), name, fill="black")
    for i, key in enumerate(keys):
        pts = {name: [[(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float))] for log in logs]
               for name, logs in series.items()}
        values = [v for per in pts.values() for line in per for _, v in line]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        y0 = top + i * h
        draw.text((2, y0 + 8), key[:15], fill="black")
        draw.text((2, y0 + 24), f"max {hi:.3g}", fill="gray")
        draw.text((2, y0 + h - 22), f"min {lo:.3g}", fill="gray")
        for j, name in enumerate(runs):
            box = (left + j * w + 5, y0 + 4, left + (j + 1) * w - 5, y0 + h - 8)
            draw.rectangle(box, outline=(180, 180, 180))
            lines = [line for line in pts[name] if line]
            if not lines:
                draw.text((box[0] + 6, box[1] + 6), "not logged", fill="gray")
                continue
            s_hi = max(max(st for st, _ in line) for line in lines)
            s_lo = min(min(st for st, _ in line) for line in lines)
            span = max(1, s_hi - s_lo)
            to_xy = lambda st, v: (box[0] + (st - s_lo) / span * (box[2] - box[0]),  # noqa: E731
                                   box[3] - (v - lo) / (hi - lo) * (box[3] - box[1]))
            for line in lines:
                if len(line) > 1:
                    draw.line([to_xy(*p) for p in line], fill=(190, 205, 235), width=1)
            by_step: dict[int, list[float]] = {}
            for line in lines:
                for st, v in line:
                    by_step.setdefault(st, []).append(v)
            mean_line = [to_xy(st, statistics.mean(vs)) for st, vs in sorted(by_step.items())]
            if len(mean_line) > 1:
                win = max(1, len(mean_line) // 15)  # a trailing moving average, as in plot_curves
                ys = [p[1] for p in mean_line]
                smooth = [(x, sum(ys[max(0, k - win + 1):k + 1]) / (k + 1 - max(0, k - win + 1)))
                          for k, (x, _) in enumerate(mean_line)]
                draw.line(smooth, fill=(30, 90, 200), width=2)
            else:
                x, y = mean_line[0]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
            draw.text((box[2] - 28, box[3] - 12), str(s_hi), fill="gray")
    save_png(img, path)
    return keys


BAR_COLORS = [(120, 120, 120), (70, 130, 180), (100, 170, 100), (230, 150, 40), (200, 60, 60), (150, 100, 190),
              (90, 190, 190), (190, 150, 120)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bar_chart_png(rows: dict[str, list[float]], path: str | os.PathLike, title: str = "", ylabel: str = "accuracy (%)",
                  reference: tuple[str, float] | None = None, colors: list[int] | None = None) -> Image.Image:
    """One bar per row at the mean of its values (e.g. one accuracy per seed), an error bar of
    +- one sample std, every value as a dot, and an optional dashed reference line (e.g. the
    label-noise ceiling). The y axis runs from 0 to just above the largest value drawn.
    `colors`: a palette index per bar (default: one colour per bar, in turn)."""
    if not rows or not all(rows.values()):
        raise ValueError("bar_chart_png: every row needs at least one value")
    names = list(rows)
    bar_w, gap, left, top, bottom, plot_h = 56, 22, 50, 40, 70, 300
    width = left + len(names) * (bar_w + gap) + gap + 10
    img = Image.new("RGB", (width, top + plot_h + bottom), "white")
    draw = ImageDraw.Draw(img)
    hi = max([v for vals in rows.values() for v in vals] + [m + s for m, s in map(_mean_std, rows.values())]
             + ([reference[1]] if reference else []))
    y_max = max(1e-9, hi * 1.08)
    y_of = lambda v: top + plot_h - v / y_max * plot_h  # noqa: E731
    draw.text((5, 5), title[:100], fill="black")
    draw.text((5, 20), ylabel, fill="gray")
    step = min(m * 10 ** e for e in range(-3, 6) for m in (1, 2, 5) if m * 10 ** e >= y_max / 6)  # round gridlines
    for k in range(int(y_max / step) + 1):
        v = k * step
        draw.line([(left, y_of(v)), (width - 10, y_of(v))], fill=(225, 225, 225))
        draw.text((5, y_of(v) - 6), f"{v:g}", fill="gray")
    if reference:
        y = y_of(reference[1])
        for x in range(left, width - 10, 10):
            draw.line([(x, y), (x + 5, y)], fill=(200, 0, 0), width=1)
        draw.text((left + 2, y - 13), f"{reference[0]} {reference[1]:.3g}", fill=(200, 0, 0))
    for i, name in enumerate(names):
        mean, std = _mean_std(rows[name])
        x0 = left + gap + i * (bar_w + gap)
        color = BAR_COLORS[(colors[i] if colors else i) % len(BAR_COLORS)]
        draw.rectangle([x0, y_of(mean), x0 + bar_w, y_of(0)], fill=color)
        xc = x0 + bar_w / 2
        if std > 0:
            draw.line([(xc, y_of(mean - std)), (xc, y_of(mean + std))], fill="black", width=2)
            for v in (mean - std, mean + std):
                draw.line([(xc - 8, y_of(v)), (xc + 8, y_of(v))], fill="black", width=2)
        for v in rows[name]:
            draw.ellipse([xc + 12 - 2, y_of(v) - 2, xc + 12 + 2, y_of(v) + 2], fill="black")
        draw.text((x0, y_of(mean + std) - 14), f"{mean:.1f}", fill="black")
        for k, part in enumerate([name[j:j + 9] for j in range(0, len(name), 9)][:3]):
            draw.text((x0, top + plot_h + 6 + 12 * k), part, fill="black")
    save_png(img, path)
    return img


CELL, MARGIN = 40, 90   # confusion_png: a cell's side, the room for the labels


def confusion_png(matrix: list[list[int]], path: str | os.PathLike, title: str = "") -> Image.Image:
    """Heatmap of the 8 x 9 confusion matrix (row-normalised shading, raw counts written in)."""
    rows, cols = len(matrix), len(matrix[0])
    img = Image.new("RGB", (MARGIN + cols * CELL + 10, MARGIN + rows * CELL + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((5, 5), title[:60], fill="black")
    col_names = list(EMOTIONS) + [INVALID]
    for j, name in enumerate(col_names):
        draw.text((MARGIN + j * CELL + 2, MARGIN - 14 - 10 * (j % 2)), name[:6], fill="black")
    for i, row in enumerate(matrix):
        draw.text((5, MARGIN + i * CELL + CELL // 2 - 5), EMOTIONS[i][:11], fill="black")
        total = max(1, sum(row))
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            x0, y0 = MARGIN + j * CELL, MARGIN + i * CELL
            draw.rectangle([x0, y0, x0 + CELL - 1, y0 + CELL - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x0 + 4, y0 + CELL // 2 - 5), str(count), fill="black" if shade > 110 else "white")
    save_png(img, path)
    return img
