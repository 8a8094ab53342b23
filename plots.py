"""
Line charts as PNG files, drawn with PIL alone (no matplotlib): the picture of a training log.

train.py redraws `log.png` next to `log.jsonl` at every log interval, so a run can be watched by reloading one
image: the training loss against the held-out loss (their gap opening up is the sign of memorisation), the loss
per noise-level bucket (which noise levels the network has learned), the learning rate, and the sample metrics
(KID / Frechet distance) of in-training evaluation.

    plot_training_log('runs/default/log.jsonl', 'runs/default/log.png')
    line_chart({'a': ([0, 1, 2], [3, 1, 2])}, 'chart.png', title='a', log_y=True)

A chart is a dict name -> (xs, ys); a log axis drops non-positive values. Usage from the shell:
`python plots.py runs/default/log.jsonl` writes runs/default/log.png.
"""
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

# Colour-blind-safe palette (Okabe & Ito 2008), cycled over the series of a chart.
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0)]


# ----------------------------------------------------------------------------------------------------
# One chart: axes with ticks, series as polylines, a legend.

def _ticks(lo, hi, log):
    """About five round tick values in [lo, hi]: powers of ten on a log axis, 1-2-5 steps on a linear one."""
    if log:                                                   # lo, hi are log10 values; 1-2-5 within short ranges
        mults = (1, 2, 5) if hi - lo < 3 else (1,)
        ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mults]
        return [t for t in ticks if lo <= math.log10(t) <= hi] or [10 ** lo]
    raw = (hi - lo) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _label(v):
    if float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f'{v:.1e}' if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2) else f'{v:.3g}'


def draw_chart(draw, box, series, title='', log_y=False, font=None):
    """Draw series {name: (xs, ys)} into box = (left, top, right, bottom) of a PIL ImageDraw."""
    font = font or ImageFont.load_default()
    left, top, right, bottom = box
    draw.text((left + 4, top + 2), title, fill=(0, 0, 0), font=font)
    pts = {k: [(float(x), float(y)) for x, y in zip(*v) if y is not None and math.isfinite(float(y))
               and (not log_y or float(y) > 0)] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    px0, py0, px1, py1 = left + 48, top + 16, right - 8, bottom - 18         # the plotting area inside the box
    draw.rectangle((px0, py0, px1, py1), outline=(120, 120, 120))
    if not pts:
        draw.text((px0 + 8, py0 + 8), 'no data yet', fill=(120, 120, 120), font=font)
        return
    xs = [x for v in pts.values() for x, _ in v]
    ys = [math.log10(y) if log_y else y for v in pts.values() for _, y in v]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 or (abs(y_hi) * 0.1 or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    to_px = lambda x, y: (px0 + (x - x_lo) / (x_hi - x_lo) * (px1 - px0),
                          py1 - ((math.log10(y) if log_y else y) - y_lo) / (y_hi - y_lo) * (py1 - py0))
    for t in _ticks(y_lo, y_hi, log_y):                                    # horizontal grid lines with labels
        y = py1 - ((math.log10(t) if log_y else t) - y_lo) / (y_hi - y_lo) * (py1 - py0)
        draw.line((px0, y, px1, y), fill=(225, 225, 225))
        draw.text((left + 2, y - 5), _label(t), fill=(60, 60, 60), font=font)
    for t in _ticks(x_lo, x_hi, False):
        x = px0 + (t - x_lo) / (x_hi - x_lo) * (px1 - px0)
        draw.text((x - 8, py1 + 3), _label(t), fill=(60, 60, 60), font=font)
    for i, (name, v) in enumerate(pts.items()):
        colour = PALETTE[i % len(PALETTE)]
        line = [to_px(x, y) for x, y in v]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        else:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=colour)
        draw.text((px1 - 120, py0 + 4 + 11 * i), name[:20], fill=colour, font=font)


def line_chart(series, path, title='', log_y=False, size=(480, 300)):
    """One chart in its own PNG."""
    img = Image.new('RGB', size, 'white')
    draw_chart(ImageDraw.Draw(img), (0, 0) + size, series, title, log_y)
    img.save(path)


# ----------------------------------------------------------------------------------------------------
# The training log: records of train.py's log.jsonl, one JSON object per line, each with 'step'.

def read_log(path):
    """The records of a log.jsonl; a line cut off by a crash mid-write is skipped, not an error."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def series_of(records, key):
    """(steps, values) of every record that has `key`."""
    rows = [(r['step'], r[key]) for r in records if key in r and 'step' in r]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_training_log(log_path, png_path=None, size=(960, 600)):
    """Four panels: losses (train and held-out), loss by noise level, learning rate, evaluation metrics."""
    records = read_log(log_path)
    png_path = png_path or os.path.splitext(log_path)[0] + '.png'
    img = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(img)
    w, h = size[0] // 2, size[1] // 2
    losses = {k: series_of(records, k) for k in ('loss', 'val_loss', 'train_loss_fixed') if series_of(records, k)[0]}
    draw_chart(draw, (0, 0, w, h), losses, 'loss (train, held-out)', log_y=True)
    buckets = {}                                                           # sigma bucket -> (steps, losses)
    for r in records:
        for sigma, v in r.get('loss_by_sigma', {}).items():
            buckets.setdefault(f'sigma {sigma}', ([], []))
            buckets[f'sigma {sigma}'][0].append(r['step'])
            buckets[f'sigma {sigma}'][1].append(v)
    draw_chart(draw, (w, 0, 2 * w, h), buckets, 'loss by noise level', log_y=True)
    draw_chart(draw, (0, h, w, 2 * h), {'lr': series_of(records, 'lr')}, 'learning rate')
    metrics = {}
    for r in records:
        for k, v in (r.get('eval') or {}).items():
            metrics.setdefault(k, ([], []))
            metrics[k][0].append(r['step'])
            metrics[k][1].append(v)
    draw_chart(draw, (w, h, 2 * w, 2 * h), metrics, 'evaluation', log_y=True)
    tmp = png_path + '.tmp.png'                                            # never leave a half-written picture
    img.save(tmp)
    os.replace(tmp, png_path)
    return png_path


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit('usage: python plots.py RUN/log.jsonl   (writes RUN/log.png)')
    print('wrote', plot_training_log(sys.argv[1]))
