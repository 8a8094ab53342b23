"""
Fidelity versus diversity of guidance methods on a 2-D Gaussian mixture, where everything is exact.

The data are three classes in [-1, 1]^2, each a mixture of two Gaussians (diffusion.GaussianMixture), so the
conditional and unconditional denoisers and the classifier of clean data are known in closed form. For guidance
weights w = 1..8 the script samples every class with Heun's method (samplers.py) and reports
  fidelity  share of samples that the exact classifier p(y | x0) assigns to the requested class (higher = better)
  spread    per-class (det Cov_generated / det Cov_true)^(1/4): the geometric mean of the std ratios; 1 is
            the true diversity, below 1 guidance has narrowed the class
  FD        Frechet distance between Gaussian fits of generated and true class samples (mean and covariance)
  out       share of samples outside [-1, 1]^2, the saturation that thresholding is meant to prevent
for constant, linearly increasing (1 -> 2w - 1, mean w over the steps), oscillating (w for the first quarter of
the steps, then 1, w, 1, ...) and interval (w only for sigma in (sigma_lo, sigma_hi]) schedules, each with and
without dynamic thresholding (p = 0.995), plus autoguidance with a deliberately degraded denoiser: the exact
denoiser of the same mixture with every covariance inflated (a model that has not yet learned how narrow the
classes are). 'auto, imperfect D1' guides an already too broad main model (covariances x1.5) by a worse one (x3).

    python benchmarks/guidance.py --out benchmarks/out/guidance_tradeoff.png

What the default run shows (about 70 s on 2 CPU cores): fidelity rises from 0.65 (w = 1) to 1.0 by w ~ 4 while
the spread falls to ~0.7 and the class means are pushed apart (FD grows). All four CFG schedules trace nearly
the same fidelity-spread curve: here they mostly re-parameterise w (the gains reported in the papers concern
image artifacts and mode coverage, which a 2-D mixture with exact denoisers lacks). Thresholding changes nothing
up to w ~ 4 and at large w removes the out-of-range samples and part of the drift (FD 0.49 -> 0.39 at w = 8).
Autoguidance of the exact model by a broader one only sharpens each component, so it loses spread much faster
than CFG; but when the main model is itself too broad, w ~ 2 cancels its error (spread 1.14 -> 0.93, FD
0.004 -> 0.001): the mechanism of Karras et al. 2024 in miniature.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import GaussianMixture                                                  # noqa: E402
from guidance import (Autoguidance, ClassifierFreeGuidance, IntervalSchedule, LinearSchedule,   # noqa: E402
                      OscillatingSchedule, Thresholded)
from samplers import SAMPLERS, karras_sigmas                                           # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--n', type=int, default=3000, help='samples (spread evenly over the classes)')
    p.add_argument('--steps', type=int, default=32, help='Heun noise levels (2 * steps - 1 denoiser calls)')
    p.add_argument('--weights', type=float, nargs='+', default=[1, 2, 3, 4, 5, 6, 7, 8], help='guidance weights (1 = none)')
    p.add_argument('--sigma-lo', type=float, default=0.3, help='guidance interval lower end')
    p.add_argument('--sigma-hi', type=float, default=3.0, help='guidance interval upper end')
    p.add_argument('--inflate', type=float, default=2.0, help='covariance factor of the degraded autoguidance model')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='benchmarks/out/guidance_tradeoff.png', help='PNG of the trade-off curves')
    return p.parse_args()


def make_mixture():
    """Three classes around a circle of radius 0.2, each two elongated Gaussians side by side. The classes overlap
    so much that a third of exact class samples lie where the classifier prefers another class: room for guidance."""
    means, covs, classes = [], [], []
    for c in range(3):
        angle = math.pi / 2 + 2 * math.pi * c / 3
        radial, tangent = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
        for side in (-1, 1):
            means.append(0.2 * radial + 0.2 * side * tangent)
            R = np.stack([radial, tangent], 1)                        # covariance long along the radius
            covs.append(R @ np.diag([0.25 ** 2, 0.1 ** 2]) @ R.T)
            classes.append(c)
    return GaussianMixture(np.array(means), np.array(covs), classes=classes)


def inflated(gm, factor):
    return GaussianMixture(gm.means, gm.covs * factor, gm.weights, gm.classes)


def class_moments(gm, c):
    """Mean and covariance of class c of a mixture (law of total covariance over its components)."""
    sub = GaussianMixture(gm.means[gm.classes == c], gm.covs[gm.classes == c], gm.weights[gm.classes == c])
    return sub.mean().numpy(), sub.cov().numpy()


def frechet(mu1, cov1, mu2, cov2):
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * covmean))


def metrics(gm, x, y):
    fidelity = (gm.class_posterior(x, 0.0).argmax(1) == y).double().mean().item()
    spreads, fds = [], []
    for c in range(gm.num_classes):
        xc = x[y == c].numpy()
        mu, cov = xc.mean(0), np.cov(xc.T)
        mu_true, cov_true = class_moments(gm, c)
        spreads.append((np.linalg.det(cov) / np.linalg.det(cov_true)) ** (1 / 4))
        fds.append(frechet(mu, cov, mu_true, cov_true))
    out = (x.abs() > 1).any(1).double().mean().item()
    return fidelity, float(np.mean(spreads)), float(np.mean(fds)), out


def methods(gm, sigmas, args):
    """name -> function w -> guided denoiser. Every denoiser is called as D(x, sigma, y=labels)."""
    null, n_steps = gm.num_classes, len(sigmas) - 1
    bad, good_imperfect, bad_imperfect = inflated(gm, args.inflate), inflated(gm, 1.5), inflated(gm, 3.0)
    base = {
        'constant': lambda w: ClassifierFreeGuidance(gm, w, null),
        'increasing': lambda w: ClassifierFreeGuidance(gm, LinearSchedule(sigmas, 2 * w - 1, 1.0), null),
        'oscillating': lambda w: ClassifierFreeGuidance(gm, OscillatingSchedule(sigmas, w, 1.0, n_steps // 4), null),
        'interval': lambda w: ClassifierFreeGuidance(gm, IntervalSchedule(w, args.sigma_lo, args.sigma_hi), null),
    }
    table = dict(base)
    for name, make in base.items():
        table[name + ' +dyn.thr'] = lambda w, make=make: Thresholded(make(w), 'dynamic', 0.995)
    table['constant +static thr'] = lambda w: Thresholded(base['constant'](w), 'static')
    table[f'autoguidance (cov x{args.inflate:g})'] = lambda w: Autoguidance(gm, bad, w)
    table['auto, imperfect D1'] = lambda w: Autoguidance(good_imperfect, bad_imperfect, w)
    return table


# ----------------------------------------------------------------------------------------------------
# A plot without matplotlib: PIL lines and the default bitmap font.

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]


def draw_tradeoff(results, weights, samples, path):
    """Left: fidelity against spread, one curve per method (thin lines and squares: thresholded). Right: samples."""
    W, H, left, top, pw, ph = 1320, 760, 70, 40, 620, 520
    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    spreads = [r[1] for rows in results.values() for r in rows]
    fids = [r[0] for rows in results.values() for r in rows]
    x_lo, x_hi = min(spreads) - 0.03, max(spreads) + 0.03
    y_lo, y_hi = min(fids) - 0.01, 1.0 + 0.005
    to_px = lambda s, f: (left + (s - x_lo) / (x_hi - x_lo) * pw, top + (y_hi - f) / (y_hi - y_lo) * ph)
    draw.rectangle([left, top, left + pw, top + ph], outline='black')
    for k in range(6):                                              # ticks
        s, f = x_lo + k * (x_hi - x_lo) / 5, y_lo + k * (y_hi - y_lo) / 5
        px, _ = to_px(s, y_lo)
        _, py = to_px(x_lo, f)
        draw.line([px, top + ph, px, top + ph + 5], fill='black')
        draw.text((px - 12, top + ph + 8), f'{s:.2f}', fill='black')
        draw.line([left - 5, py, left, py], fill='black')
        draw.text((left - 45, py - 5), f'{f:.3f}', fill='black')
    draw.text((left + pw // 2 - 150, top + ph + 25), 'spread = generated / true class std (1 = full diversity)', fill='black')
    draw.text((left, 12), f'fidelity (share the exact classifier assigns to the requested class) vs spread, '
                          f'w = {weights[0]:g}..{weights[-1]:g}', fill='black')
    if x_lo < 1 < x_hi:
        px, _ = to_px(1.0, y_lo)
        draw.line([px, top, px, top + ph], fill=(200, 200, 200))
    for i, (name, rows) in enumerate(results.items()):
        color, thin = COLORS[i % len(COLORS)], 'thr' in name
        pts = [to_px(r[1], r[0]) for r in rows]
        draw.line(pts, fill=color, width=1 if thin else 3)
        for (px, py), w in zip(pts, weights):
            (draw.rectangle if thin else draw.ellipse)([px - 3, py - 3, px + 3, py + 3], fill=color)
            if w == weights[-1]:
                draw.text((px + 5, py + 4 + 10 * (i % 3)), f'w={w:g}', fill=color)
        lx, ly = left + 20 + 300 * (i % 2), top + ph + 50 + 16 * (i // 2)     # legend below the axes
        draw.line([lx, ly + 5, lx + 25, ly + 5], fill=color, width=1 if thin else 3)
        draw.text((lx + 30, ly), name, fill=color)
    # right: 2 x 2 panels of samples coloured by requested class, with the data box [-1, 1]^2 in grey
    size = 260
    for j, (title, x, y) in enumerate(samples):
        ox, oy = 760 + (j % 2) * (size + 25), top + 20 + (j // 2) * (size + 45)
        draw.rectangle([ox, oy, ox + size, oy + size], outline='black')
        draw.text((ox, oy - 14), title, fill='black')
        to_panel = lambda u, v: (ox + (u + 1.4) / 2.8 * size, oy + (1.4 - v) / 2.8 * size)
        draw.rectangle([*to_panel(-1, 1), *to_panel(1, -1)], outline=(180, 180, 180))
        for xi, yi in zip(x[:1500].tolist(), y[:1500].tolist()):
            px, py = to_panel(*xi)
            if ox <= px <= ox + size and oy <= py <= oy + size:
                draw.point([(px, py), (px + 1, py), (px, py + 1)], fill=COLORS[yi])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)        # tiny tensors: extra threads only add overhead (30x slower on a busy 2-core box)
    gm = make_mixture()
    sigmas = karras_sigmas(args.steps, 0.002, 80.0).double()
    y = torch.arange(args.n) % gm.num_classes
    x_T = sigmas[0] * torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    print(f'{gm.num_classes} classes x 2 components, {args.n} samples, Heun with {args.steps} Karras sigmas '
          f'({2 * args.steps - 1} NFE); interval ({args.sigma_lo:g}, {args.sigma_hi:g}]')
    print('each cell: fidelity / spread / FD / out-of-range share')
    results, samples, t0 = {}, [], time.time()
    print(f'{"method":<24}' + ''.join(f'{"w=" + format(w, "g"):<26}' for w in args.weights))
    for name, make in methods(gm, sigmas, args).items():
        rows = []
        for w in args.weights:
            x = SAMPLERS['heun'](make(w), x_T, sigmas, cond={'y': y})
            rows.append(metrics(gm, x, y))
            if (name == 'constant' and w in (args.weights[0], args.weights[-1])) or \
                    (w == args.weights[-1] and name in ('constant +dyn.thr', f'autoguidance (cov x{args.inflate:g})')):
                samples.append((f'{name}, w = {w:g}', x, y))
        results[name] = rows
        print(f'{name:<24}' + ''.join(f'{f:.3f}/{s:.2f}/{fd:.3f}/{o:.3f}     ' for f, s, fd, o in rows), flush=True)
    print(f'({time.time() - t0:.1f} s)')
    draw_tradeoff(results, args.weights, samples, args.out)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main(parse_args())
