"""
Sampler accuracy on Gaussian mixtures, where the exact denoiser is known, against a published implementation.

Deterministic samplers: mean distance (RMS over dimensions) to a converged solution of the probability-flow ODE
from the same noise (scipy DOP853, rtol 1e-10, in lambda = -log sigma, where dx/dlambda = D(x, sigma) - x),
followed by the same final denoising step all samplers take. Stochastic samplers: sliced Wasserstein-1 distance
between their samples and exact samples of the mixture (sliced Wasserstein-1) (the line "exact" gives the Monte Carlo floor).
Every sampler uses the same Karras schedule (sigma 0.002..80, rho 7) at 5, 10, 20, 35, 50 and 100 denoiser
evaluations (NFE). The reference is k-diffusion (Crowson, pip 'k-diffusion'), loaded from --kdiffusion, a folder
holding the unpacked k_diffusion, torchsde, torchdiffeq and trampoline wheels; without it only ours are printed.

    python benchmarks/samplers.py --kdiffusion /tmp/kd/site [--png benchmarks/out/sampler_paths.png]
"""
import argparse
import importlib.util
import math
import os
import sys
import time
import types

import numpy as np
import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import GaussianMixture                     # noqa: E402
from samplers import SAMPLERS, STOCHASTIC, karras_sigmas, steps_for_nfe   # noqa: E402

NFES = (5, 10, 20, 35, 50, 100)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def load_kdiffusion(path):
    """Import k_diffusion/sampling.py alone: its package __init__ pulls torchvision, safetensors and more, of which
    sampling.py needs only utils.append_dims, provided here with the same two lines."""
    if path is None:
        return None
    sys.path.insert(0, path)
    pkg = types.ModuleType('k_diffusion')
    pkg.__path__ = [os.path.join(path, 'k_diffusion')]
    utils = types.ModuleType('k_diffusion.utils')
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({'k_diffusion': pkg, 'k_diffusion.utils': utils})
    spec = importlib.util.spec_from_file_location('k_diffusion.sampling', os.path.join(path, 'k_diffusion', 'sampling.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_ode(gm, x_T, sigma_max, sigma_min):
    """Converged PF-ODE solution from sigma_max to sigma_min, then D at sigma_min (what every sampler's last step does)."""
    shape = x_T.shape
    def f(lam, y):
        x = torch.from_numpy(y).reshape(shape)
        return (gm.denoise(x, math.exp(-lam)) - x).reshape(-1).numpy()
    sol = solve_ivp(f, (-math.log(sigma_max), -math.log(sigma_min)), x_T.reshape(-1).numpy(), method='DOP853',
                    rtol=1e-10, atol=1e-10)
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return gm.denoise(x, sigma_min)


def sliced_w1(a, b, n_proj=256, seed=0):
    """Sliced Wasserstein-1 distance: the W1 of sorted 1-D projections (equal sample counts), averaged over random
    directions. W1 rather than W2: W2 of samples is dominated by the few most extreme points."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return (pa - pb).abs().mean().item()


def kd_model(gm):
    """k-diffusion calls model(x, sigma) with sigma (N,), as ours do."""
    return lambda x, sigma, **kw: gm.denoise(x, sigma)


def ours(name, **kw):
    return lambda gm, x, sigmas, g: SAMPLERS[name](gm, x, sigmas, **({'generator': g} if name in STOCHASTIC or 'S_churn' in kw else {}), **kw)


def theirs(kd, name, **kw):
    def run(gm, x, sigmas, g):
        fn = getattr(kd, 'sample_' + name)
        extra = {}
        if 'noise_sampler' in fn.__code__.co_varnames:
            extra['noise_sampler'] = lambda s, s_next: torch.randn(x.shape, generator=g, dtype=x.dtype)
        if g is not None and 'noise_sampler' not in extra:
            torch.manual_seed(g.initial_seed())           # samplers that draw with torch.randn_like
        return fn(kd_model(gm), x, sigmas, disable=True, **extra, **kw)
    return run


def nfe_steps(name, nfe):
    return steps_for_nfe('heun' if name.startswith('heun') else ('pc' if name == 'pc' else 'euler'), nfe)


def main(args):
    kd = load_kdiffusion(args.kdiffusion)
    problems = {
        '2-D, 3 comps': GaussianMixture.random(K=3, D=2, seed=0),
        '64-D, 8 comps': GaussianMixture.random(K=8, D=64, scale=0.5, seed=1),
    }
    det = {'euler': ours('euler'), 'ddim (eta=0)': ours('ddim'), 'heun': ours('heun'), 'dpmpp_2m': ours('dpmpp_2m'),
           'dpmpp_3m': ours('dpmpp_3m'), 'dpmpp_3m corrector=False': ours('dpmpp_3m', corrector=False)}
    sto = {'ddpm / euler_anc.': ours('euler_ancestral'), 'heun churn=40': ours('heun', S_churn=40, S_tmin=0.05, S_tmax=50),
           'dpmpp_2m_sde': ours('dpmpp_2m_sde'), 'pc': ours('pc')}
    if kd is not None:
        det.update({'k-diff euler': theirs(kd, 'euler'), 'k-diff heun': theirs(kd, 'heun'),
                    'k-diff dpmpp_2m': theirs(kd, 'dpmpp_2m'), 'k-diff dpmpp_3m (sde eta=0)': theirs(kd, 'dpmpp_3m_sde', eta=0.0)})
        sto.update({'k-diff euler_anc.': theirs(kd, 'euler_ancestral'),
                    'k-diff heun churn=40': theirs(kd, 'heun', s_churn=40, s_tmin=0.05, s_tmax=50),
                    'k-diff dpmpp_2m_sde': theirs(kd, 'dpmpp_2m_sde')})
    header = f"{'sampler':<30}" + ''.join(f'{n:>10}' for n in NFES)
    for pname, gm in problems.items():
        g = torch.Generator().manual_seed(0)
        x_T = SIGMA_MAX * torch.randn(args.n_ode, gm.D, generator=g, dtype=torch.float64)
        t0 = time.time()
        ref = reference_ode(gm, x_T, SIGMA_MAX, SIGMA_MIN)
        print(f'\n[{pname}] deterministic: RMS distance to the converged ODE solution ({args.n_ode} paths, '
              f'reference in {time.time() - t0:.1f}s)\n{header}')
        for name, run in det.items():
            errs = []
            for nfe in NFES:
                sigmas = karras_sigmas(nfe_steps(name.replace('k-diff ', ''), nfe), SIGMA_MIN, SIGMA_MAX).double()
                out = run(gm, x_T.clone(), sigmas, None)
                errs.append(((out - ref) ** 2).mean().sqrt().item())
            print(f'{name:<30}' + ''.join(f'{e:>10.2e}' for e in errs))
        exact = gm.sample(args.n_sde, generator=torch.Generator().manual_seed(1))[0]
        exact2 = gm.sample(args.n_sde, generator=torch.Generator().manual_seed(2))[0]
        print(f'\n[{pname}] stochastic: sliced W1 to exact samples ({args.n_sde} samples; '
              f'exact vs exact = {sliced_w1(exact, exact2):.3f})\n{header}')
        for name, run in sto.items():
            dists = []
            for nfe in NFES:
                sigmas = karras_sigmas(nfe_steps(name.replace('k-diff ', '').split()[0], nfe), SIGMA_MIN, SIGMA_MAX).double()
                x = SIGMA_MAX * torch.randn(args.n_sde, gm.D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                out = run(gm, x, sigmas, torch.Generator().manual_seed(4))
                dists.append(sliced_w1(out, exact))
            print(f'{name:<30}' + ''.join(f'{d:>10.3f}' for d in dists))
    if args.png:
        draw_paths(problems['2-D, 3 comps'], args.png)


def draw_paths(gm, path, n_paths=24, size=512):
    """A 2-D picture: exact ODE paths (grey), Euler at 10 NFE (red) and Heun at 11 (blue), from the same points at sigma=3."""
    from PIL import Image, ImageDraw
    g = torch.Generator().manual_seed(5)
    sigma_start = 3.0
    x0 = gm.sample(n_paths, generator=g)[0] + sigma_start * torch.randn(n_paths, 2, generator=g, dtype=torch.float64)
    sigmas = karras_sigmas(10, SIGMA_MIN, sigma_start).double()
    def record(name, steps):
        pts = []
        def den(x, sigma):
            pts.append(x.clone())
            return gm.denoise(x, sigma)
        out = SAMPLERS[name](den, x0.clone(), karras_sigmas(steps, SIGMA_MIN, sigma_start).double())
        return (pts[::2] if name == 'heun' else pts) + [out]     # Heun's odd calls are its predictor points
    fine = record('heun', 200)
    paths = {(160, 160, 160): fine, (220, 40, 40): record('euler', 10), (40, 80, 220): record('heun', 6)}
    dens_x = gm.sample(3000, generator=g)[0]
    allpts = torch.cat([torch.cat(p) for p in paths.values()] + [dens_x])
    lo, hi = allpts.min(0).values, allpts.max(0).values
    to_px = lambda p: tuple(((p - lo) / (hi - lo) * (size - 40) + 20).tolist())
    img = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(img)
    for p in dens_x:
        x, y = to_px(p)
        draw.point((x, size - y), fill=(200, 230, 200))
    for color, pts in paths.items():
        for i in range(n_paths):
            line = [to_px(p[i]) for p in pts]
            draw.line([(x, size - y) for x, y in line], fill=color, width=2)
    draw.text((10, 10), 'grey: exact ODE   red: Euler, 10 NFE   blue: Heun, 11 NFE   green: data', fill='black')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    img.save(path)
    print(f'\nwrote {path}')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kdiffusion', default=os.environ.get('KDIFFUSION_PATH'), help='folder with the unpacked k-diffusion wheel')
    p.add_argument('--n-ode', type=int, default=128, help='noise samples for the ODE error')
    p.add_argument('--n-sde', type=int, default=10000, help='samples for the distribution distance')
    p.add_argument('--png', default=None, help='write a 2-D picture of sampler paths here')
    main(p.parse_args())
