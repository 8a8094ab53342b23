"""
Inverse-problem solvers of inverse.py, measured two ways.

(1) Exactness, on a Gaussian prior (always runs, ~1 min on 2 CPU cores). The prior is the correlated Gaussian on
4 x 4 images of tests/test_inverse.py; its posterior given y = A x0 + s_y n is Gaussian in closed form
(inverse.gaussian_posterior). For 50% random-pixel inpainting and 2x average-pool super-resolution, each without and
with measurement noise (s_y = 0.1), every method draws --n samples for one y with the exact prior denoiser, all at
the same number of denoiser evaluations (NFE; CCDF spends them on a shorter trajectory from sigma = --ccdf-sigma),
and the table gives
  mean err   ||mean(samples) - m_post|| / sqrt(tr C_post)        (0 = exact; Monte-Carlo floor ~ 1/sqrt(n))
  cov err    ||Cov(samples) - C_post||_F / ||C_post||_F
  |Ax-y|     RMS measurement residual of the samples (noise-free y: 0 for the projection methods)
'oracle' samples the closed-form posterior with the same ancestral step: its errors are the floor (Monte-Carlo
noise and the first-order bias of an ancestral step at this NFE), not a method.

(2) A trained model (--checkpoint PATH, a train.py checkpoint): PSNR against the original and measurement
consistency for 50% random-pixel inpainting, a centre box (half of each side) and 4x super-resolution, on test
images of the checkpoint's dataset, every method at --nfe denoiser evaluations, plus a PNG with one row per image:
measurement (A^+ y), each method's reconstruction, original. Gradient methods also pay a backward pass per NFE
(the 'sec' column). Without --checkpoint this part is skipped with a message.

    python benchmarks/inverse.py                                   # the Gaussian table
    python benchmarks/inverse.py --skip-gaussian --checkpoint runs/shapes/ckpt.pt --dps-zeta 4 --mcg-zeta 4

What the Gaussian table shows (n = 4000, 64 NFE, seed 0; ~1 min): the projection methods (replacement = ILVR, POCS,
CCDF) meet a noise-free y exactly but stay biased towards the prior mean where pixels are correlated (mean err
0.39-0.48 for inpainting, ~0.08 for SR); the gradient methods (MCG, reconstruction_guidance_tweedie, DPS) are 2-4x
closer (0.11-0.16 and 0.02-0.035), while Ho et al.'s reconstruction_guidance at w_r = 1 is not (0.47 and 0.21 at
n = 2000: its constant weight is too weak where sigma is large); none reaches the oracle's ~0.015, because each approximates p(y | x_sigma). With noisy y
(s_y = 0.1) the projection methods force A x = y and so fit the noise (SR cov err 0.12 -> 0.20); the tweedie
reconstruction guidance, whose weight includes s_y, is least affected (SR mean err 0.035 -> 0.040, cov err 0.15 -> 0.15), while
DPS's normalised step knows nothing of s_y (SR mean err 0.023 -> 0.065).

What the model part shows, for a 1.2M-parameter 'tiny' U-Net trained on the procedural shapes dataset
(`python train.py --unconditional --steps 3000 --batch-size 128`, 2 min on one H100; MNIST needs the training files,
which ../shared/data lacks), 32 test images, 50 NFE, PSNR in dB, run on one H100:

    method                 inpaint 50%   centre box   4x SR       |Ax-y| (RMS, noise-free y)
    A^+ y (no model)          12.0          14.7       19.6
    replacement = ILVR        40.7          22.8       39.4        < 1e-7
    POCS                      41.0          21.7       39.1        < 1e-7
    CCDF (from sigma 2)       42.3          19.4       39.5        < 1e-7
    MCG (zeta 4)              44.8          33.0       44.3        < 1e-7
    recon. tweedie (w_r 1)    45.9          29.4       42.7        ~4e-4
    DPS (zeta 4)              34.7          28.5       42.0        ~0.03
    DPS (zeta 0.5, default)   38.8          28.3       16.2

The centre box is where the gradient through the denoiser matters: the projection methods fill the hole with shapes
that ignore the visible rim (picture), while MCG, reconstruction guidance and DPS complete the shape. (The
reconstruction-guidance row was measured with the weighting now named reconstruction_guidance_tweedie; Ho et al.'s
weighting, now reconstruction_guidance, has not been run on the model.) The step size of
DPS and MCG does not carry over between problems (the norm-normalised step is the same size in 16 and 3072
dimensions): 0.5 is best on the Gaussian problems, ~4 here for SR, so tune it per model and task. A gradient method
costs about 2x the time per NFE (one backward pass). At 20 NFE MCG stays best (44.7 / 30.7 / 42.6) and CCDF
gains most from its short trajectory (41.3 / 19.2 / 38.9 against replacement's 38.2 / 20.7 / 35.9), while
reconstruction guidance drops on the box (21.2).
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import GaussianMixture                                                   # noqa: E402
from inverse import INVERSE_METHODS, gaussian_posterior, make_operator                 # noqa: E402
from samplers import SAMPLERS, karras_sigmas                                            # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    g = p.add_argument_group('Gaussian prior')
    g.add_argument('--n', type=int, default=4000, help='samples per method for the moments')
    g.add_argument('--steps', type=int, default=64, help='noise levels = NFE per method')
    g.add_argument('--ccdf-sigma', type=float, default=1.0, help='noise level CCDF starts from')
    g.add_argument('--skip-gaussian', action='store_true', help='only the trained-model part')
    g = p.add_argument_group('trained model')
    g.add_argument('--checkpoint', default=None, help='train.py checkpoint; without it the model part is skipped')
    g.add_argument('--data-dir', default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      '..', 'shared', 'data'), help='where the test images are read')
    g.add_argument('--num-images', type=int, default=16, help='test images per task')
    g.add_argument('--show', type=int, default=4, help='images per task in the picture')
    g.add_argument('--nfe', type=int, default=50, help='denoiser evaluations per method')
    g.add_argument('--model-ccdf-sigma', type=float, default=2.0, help='CCDF start for the model (data std ~0.5)')
    g.add_argument('--dps-zeta', type=float, default=None, help='DPS step size (default: inverse.py\'s)')
    g.add_argument('--mcg-zeta', type=float, default=None, help='MCG step size (default: inverse.py\'s)')
    g.add_argument('--w-r', type=float, default=1.0, help='reconstruction-guidance weight')
    g.add_argument('--methods', nargs='+', default=list(INVERSE_METHODS), choices=list(INVERSE_METHODS),
                   help='methods to run on the model (all by default)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--out', default='benchmarks/out/inverse_model.png', help='PNG of the reconstructions')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args()


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (one call = one batched network evaluation = one NFE)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


# ----------------------------------------------------------------------------------------------------
# (1) Gaussian prior: errors against the closed-form posterior.

def gaussian_prior():
    """The prior of tests/test_inverse.py: mu a ramp, S = 0.25 exp(-d^2 / 2) + 0.01 I over 4 x 4 pixel distances."""
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing='ij'), -1).reshape(16, 2)
    S = 0.25 * torch.exp(-torch.cdist(grid, grid).double() ** 2 / 2) + 0.01 * torch.eye(16, dtype=torch.float64)
    return GaussianMixture(torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)[None], S[None])


def gaussian_table(args):
    torch.set_num_threads(1)                 # 16-number tensors: threads only add overhead
    shape, prior = (1, 4, 4), gaussian_prior()
    print(f'Gaussian prior on 4x4 images, {args.n} samples per method, {args.steps} NFE each '
          f'(CCDF: from sigma = {args.ccdf_sigma})')
    print(f"{'problem':<23} {'method':<31} {'mean err':>9} {'cov err':>8} {'|Ax-y|':>8} {'NFE':>4} {'sec':>6}")
    for op_name, noise_std in [('inpaint_random', 0.0), ('sr', 0.0), ('inpaint_random', 0.1), ('sr', 0.1)]:
        g = torch.Generator().manual_seed(args.seed)
        x_true = prior.sample(1, generator=g)[0].reshape(1, *shape)
        op = make_operator(op_name, shape, generator=g, p=0.5, factor=2, noise_std=noise_std)
        y = op.measure(x_true, generator=g)
        m_post, C_post = gaussian_posterior(prior.mean(), prior.cov(), op.matrix(shape), y, noise_std)
        y_batch = y.expand(args.n, *y.shape[1:])
        label = f'{op_name}, s_y={noise_std:g}'
        for name in ['oracle'] + list(INVERSE_METHODS):
            sigma_max = args.ccdf_sigma if name == 'ccdf' else 20.0
            sigmas = karras_sigmas(args.steps, 0.002, sigma_max).double()
            x = sigmas[0] * torch.randn(args.n, *shape, generator=g, dtype=torch.float64)
            t0 = time.perf_counter()
            if name == 'oracle':
                D = CountingDenoiser(GaussianMixture(m_post[None], C_post[None]))
                out = SAMPLERS['ddpm'](D, x, sigmas, generator=g)
            else:
                D = CountingDenoiser(prior)
                out = INVERSE_METHODS[name](D, x, sigmas, op, y_batch, generator=g)
            seconds = time.perf_counter() - t0
            flat = out.reshape(args.n, -1)
            mean_err = ((flat.mean(0) - m_post).norm() / C_post.trace().sqrt()).item()
            cov_err = ((flat.T.cov() - C_post).norm() / C_post.norm()).item()
            residual = (op.forward(out) - y).pow(2).mean().sqrt().item()
            print(f'{label:<23} {name:<31} {mean_err:>9.3f} {cov_err:>8.3f} {residual:>8.1e} {D.calls:>4} {seconds:>6.2f}')
        print()


# ----------------------------------------------------------------------------------------------------
# (2) A trained model: PSNR and consistency on test images, and the picture.

def load_denoiser(path, device):
    """(Diffusion, EMA network, config) of a train.py checkpoint, through sample.py's loader, so the benchmark
    rebuilds the model exactly as the sampling command line does."""
    from sample import load_model
    net, diffusion, config = load_model(path, device)
    return diffusion, net, config


def psnr(x, ref):
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), per image (N,)."""
    mse = (x.clamp(-1, 1) - ref).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


def to_pil(img):
    """(C, H, W) in [-1, 1] -> a PIL image (grey or RGB)."""
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert('RGB')


def save_picture(rows, col_names, path, scale=3):
    """rows: list of (task name, list of (N, C, H, W) tensors, one per column). One line of images per test image,
    a header with the column names, and the task name before each block."""
    h, w = rows[0][1][0].shape[-2:]
    cell_w, cell_h, label_h = w * scale + 4, h * scale + 4, 14
    n_cols = len(col_names)
    n_lines = sum(len(cols[0]) for _, cols in rows)
    canvas = Image.new('RGB', (n_cols * cell_w + 4, label_h + len(rows) * label_h + n_lines * cell_h), 'white')
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(col_names):
        draw.text((4 + j * cell_w, 2), name[:cell_w // 6], fill='black')
    top = label_h
    for task, cols in rows:
        draw.text((4, top + 1), task, fill='black')
        top += label_h
        for i in range(len(cols[0])):
            for j, col in enumerate(cols):
                img = to_pil(col[i]).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(img, (4 + j * cell_w, top))
            top += cell_h
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path)


def model_benchmark(args):
    import data
    device = args.device
    diffusion, net, config = load_denoiser(args.checkpoint, device)
    info = config['data']
    shape = (info['channels'], info['resolution'], info['resolution'])
    dataset = data.load_dataset(info['dataset'], data_dir=args.data_dir, split='test', resolution=info['resolution'],
                                download=False)
    x0 = torch.stack([dataset[i][0] for i in range(args.num_images)]).to(device)
    n = len(x0)
    cond = {}
    if info.get('num_classes'):
        cond['y'] = torch.full((n,), info['num_classes'], device=device)      # the "no class" index: unconditional
    if config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(n, config['net']['aug_dim'], device=device)
    sigma_min, sigma_max = diffusion.sigma_min, diffusion.sigma_max
    print(f"\n{args.checkpoint}: {config['model']} {config.get('config_name', '')}, {info['dataset']} {shape}, "
          f"{n} test images, {args.nfe} NFE per method, sigma in [{sigma_min:.3g}, {sigma_max:.3g}], {device}")
    print(f'step sizes: DPS zeta={args.dps_zeta or "default"}, MCG zeta={args.mcg_zeta or "default"}, '
          f'reconstruction guidance w_r={args.w_r}; CCDF from sigma={args.model_ccdf_sigma}')
    print(f"{'task':<16} {'method':<31} {'PSNR':>6} {'|Ax-y|':>8} {'NFE':>4} {'sec':>6}")
    tasks = [('inpaint_random', dict(p=0.5)), ('inpaint_box', dict(box=0.5)), ('sr', dict(factor=4))]
    rows = []
    for task, kw in tasks:
        g = torch.Generator().manual_seed(args.seed)
        op = make_operator(task, shape, generator=g, **kw)
        if hasattr(op, 'mask'):
            op.mask = op.mask.float().to(device)
        y = op.measure(x0)
        baseline = op.pinv(y)
        print(f"{task:<16} {'A^+ y (no model)':<31} {psnr(baseline, x0).mean():>6.2f} {0:>8.1e} {0:>4} {0:>6.2f}")
        cols = [baseline[:args.show]]
        for name in args.methods:
            fn = INVERSE_METHODS[name]
            start = args.model_ccdf_sigma if name == 'ccdf' else sigma_max
            sigmas = karras_sigmas(args.nfe, sigma_min, start).to(device)
            g = torch.Generator().manual_seed(args.seed + 1)
            x = sigmas[0] * torch.randn(x0.shape, generator=g).to(device)
            D = CountingDenoiser(diffusion.denoiser(net))
            opts = {}
            zeta = {'dps': args.dps_zeta, 'mcg': args.mcg_zeta}.get(name)
            if zeta is not None:
                opts['zeta'] = zeta
            if name == 'reconstruction_guidance':
                opts['w_r'] = args.w_r
            if name == 'reconstruction_guidance_tweedie':
                opts['w_r'] = args.w_r
                opts['sigma_data'] = config['diffusion'].get('sigma_data', 0.5)
            t0 = time.perf_counter()
            out = fn(D, x, sigmas, op, y, generator=g, cond=cond, **opts)
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            residual = (op.forward(out) - y).pow(2).mean().sqrt().item()
            print(f'{task:<16} {name:<31} {psnr(out, x0).mean():>6.2f} {residual:>8.1e} {D.calls:>4} {seconds:>6.2f}')
            cols.append(out[:args.show].clamp(-1, 1))
        cols.append(x0[:args.show])
        rows.append((task, cols))
        print()
    short = {'reconstruction_guidance': 'recon. guid.', 'reconstruction_guidance_tweedie': 'recon. (tweedie)'}
    save_picture(rows, ['A^+ y'] + [short.get(m, m) for m in args.methods] + ['original'], args.out)
    print(f'picture: {args.out}')


if __name__ == '__main__':
    args = parse_args()
    if not args.skip_gaussian:
        gaussian_table(args)
    if args.checkpoint is None:
        print('trained-model part skipped: pass --checkpoint PATH (a train.py checkpoint, e.g. runs/mnist/ckpt.pt)')
    elif not os.path.isfile(args.checkpoint):
        print(f'trained-model part skipped: no checkpoint at {args.checkpoint!r} (train one with train.py first)')
    else:
        model_benchmark(args)
