"""
Sampler accuracy on Gaussian mixtures, where the exact denoiser is known, against published implementations.

Deterministic samplers: RMS distance (over paths and dimensions) to a converged solution of the probability-flow ODE
from the same noise (scipy DOP853, rtol = atol = 1e-12, in lambda = -log sigma, where dx/dlambda = D(x, sigma) - x),
followed by the same final denoising step D(x, sigma_min) that every sampler here takes. Stochastic samplers: sliced
Wasserstein-1 distance between their samples and exact samples of the mixture (the line "exact" is the Monte Carlo
floor), with THE SAME NOISE for ours and k-diffusion's (their samplers are wrapped by torch.no_grad, so the noise
sampler is passed explicitly, found with inspect.signature(inspect.unwrap(fn))); the "parity" line shows that with
shared noise the same algorithm gives the same samples.

Every sampler uses the same Karras schedule (sigma 80 -> 0.002, rho 7) at 5, 10, 20, 35, 50 and 100 denoiser
evaluations (NFE), on two problems, float64:
  2-D   GaussianMixture.random(K=3, D=2, seed=0): three well-separated full-covariance components
  64-D  image_like_mixture(): 10 components whose covariances share a basis with a 1/(1+k)^2 power spectrum (as
        natural images' 1/f^2), perturbed per component; variances from ~3e-5 to ~0.4 (condition number ~1e4)
References (optional; without them only ours are printed), installed into a private folder, e.g.
    pip install --no-deps --target /tmp/ref_pkgs k-diffusion torchsde torchdiffeq trampoline \\
        "diffusers==0.31.0" "huggingface_hub<0.30" safetensors
k-diffusion (Crowson): sampling.py alone is imported. diffusers (UniPCMultistepScheduler, DPMSolverMultistepScheduler,
DEISMultistepScheduler) are driven step by step on our sigmas with an x0-predicting model (drive_diffusers), so they
solve exactly the same problem; the UniPC parity line shows our unipc_bh1/bh2 equal theirs to round-off.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py --refs /tmp/ref_pkgs [--schedules] [--png out/sampler_paths.png]
    OMP_NUM_THREADS=1 python benchmarks/samplers.py --robustness     # single solvers against the per-cell best
"""
import argparse
import importlib.machinery
import importlib.util
import inspect
import math
import os
import sys
import time
import types

import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import GaussianMixture                                  # noqa: E402
from samplers import SAMPLERS, karras_sigmas, steps_for_nfe            # noqa: E402
from schedule_search import search_sigmas                               # noqa: E402

NFES = (5, 10, 20, 35, 50, 100)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# ----------------------------------------------------------------------------------------------------
# Problems and the converged reference.

def image_like_mixture(K=10, D=64, seed=0):
    """K anisotropic Gaussians in D dims with an image-like spectrum: a shared orthonormal basis Q (the role of the
    Fourier basis), variances 0.25/(1+k)^2 along its k-th vector (a 1/f^2 power spectrum), each scaled per
    component by exp(0.3 z); means drawn from the same spectrum, doubled. Unequal weights."""
    g = torch.Generator().manual_seed(seed)
    spec = 0.25 / (1 + torch.arange(D, dtype=torch.float64)) ** 2
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    means = 2 * (torch.randn(K, D, generator=g, dtype=torch.float64) * spec.sqrt()) @ Q.T
    scale = torch.exp(0.3 * torch.randn(K, D, generator=g, dtype=torch.float64))
    covs = torch.einsum('ij,kj,lj->kil', Q, spec * scale, Q)                  # Q diag(spec * scale_k) Q^T
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, covs, weights)


def reference_ode(gm, x_T, sigma_max, sigma_min, tol=1e-12):
    """Converged PF-ODE solution from sigma_max to sigma_min, then D at sigma_min (what every sampler's last step does)."""
    shape = x_T.shape

    def f(lam, y):
        x = torch.from_numpy(y).reshape(shape)
        return (gm.denoise(x, math.exp(-lam)) - x).reshape(-1).numpy()
    sol = solve_ivp(f, (-math.log(sigma_max), -math.log(sigma_min)), x_T.reshape(-1).numpy(), method='DOP853',
                    rtol=tol, atol=tol)
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


# ----------------------------------------------------------------------------------------------------
# The reference implementations.

def load_kdiffusion(path):
    """Import k_diffusion/sampling.py alone: its package __init__ pulls torchvision, safetensors and more, of which
    sampling.py needs only utils.append_dims, provided here with the same two lines."""
    if path is None or not os.path.isdir(os.path.join(path, 'k_diffusion')):
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
    pkg = types.ModuleType('k_diffusion')
    pkg.__path__ = [os.path.join(path, 'k_diffusion')]
    pkg.__spec__ = importlib.machinery.ModuleSpec('k_diffusion', None, is_package=True)
    utils = types.ModuleType('k_diffusion.utils')
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({'k_diffusion': pkg, 'k_diffusion.utils': utils})
    spec = importlib.util.spec_from_file_location('k_diffusion.sampling', os.path.join(path, 'k_diffusion', 'sampling.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_diffusers(path):
    if path is None or not os.path.isdir(os.path.join(path, 'diffusers')):
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
    import diffusers
    return diffusers


def drive_diffusers(cls, denoiser, x, sigmas, final_denoise=False, **config):
    """Run a diffusers multistep scheduler on OUR sigmas. diffusers works in the VP frame x_t = alpha x with
    alpha = 1/sqrt(1 + sigma^2) and sigma_t = sigma alpha; its `sigmas` attribute is our sigma, so we overwrite it
    (and give the timesteps distinct dummy values for its step counter) and feed it D(x, sigma) as an x0 prediction
    (prediction_type='sample'), or eps = (x - D)/sigma for schedulers that take only eps (DEIS).
    final_denoise: step only to sigmas[-2] and return D(x) there (DEIS cannot step to sigma = 0: log 0)."""
    sig = sigmas.double()
    steps = len(sig) - (2 if final_denoise else 1)
    sched = cls(num_train_timesteps=1000, **config)
    sched.set_timesteps(steps)
    sched.sigmas = torch.cat([sig[:-1], sig[-2:-1]]) if final_denoise else sig.clone()
    sched.timesteps = torch.arange(steps, 0, -1, dtype=torch.int64)
    alpha = lambda s: 1 / math.sqrt(1 + s ** 2)
    x_t = x * alpha(sig[0].item())
    for j, t in enumerate(sched.timesteps):
        s = sig[j].item()
        xs = x_t / alpha(s)
        d = denoiser(xs, xs.new_full((xs.shape[0],), s))
        x_t = sched.step(d if config.get('prediction_type') == 'sample' else (xs - d) / s, t, x_t).prev_sample
    if final_denoise:
        s = sig[-2].item()
        return denoiser(x_t / alpha(s), x_t.new_full((x_t.shape[0],), s))
    return x_t / alpha(sig[-1].item())


# ----------------------------------------------------------------------------------------------------
# Sampler runners: (gm, x, sigmas, generator) -> samples.

def ours(name, **options):
    def run(gm, x, sigmas, g):
        return SAMPLERS[name](gm, x, sigmas, **options, **({'generator': g} if g is not None else {}))
    return run


def kdiff(kd, name, **options):
    """k-diffusion's sampler with OUR noise: its samplers are decorated by torch.no_grad, so
    fn.__code__.co_varnames describes the wrapper; inspect.unwrap reaches the real signature."""
    fn = getattr(kd, 'sample_' + name)
    takes_noise_sampler = 'noise_sampler' in inspect.signature(inspect.unwrap(fn)).parameters

    def run(gm, x, sigmas, g):
        extra = {}
        if g is not None and takes_noise_sampler:
            gen = torch.Generator().manual_seed(g.initial_seed())       # the same stream our sampler draws from
            extra['noise_sampler'] = lambda sigma, sigma_next: torch.randn(x.shape, generator=gen, dtype=x.dtype)
        elif g is not None:
            torch.manual_seed(g.initial_seed())                         # torch.randn_like: the same stream as ours
        return fn(lambda x_, s: gm.denoise(x_, s), x, sigmas, disable=True, **extra, **options)
    return run


def diffusers_run(cls, final_denoise=False, tiny_last=False, **config):
    def run(gm, x, sigmas, g):
        if tiny_last:            # bh1's B(h) = -h is -inf on the step to sigma = 0 (0 * inf = nan in diffusers)
            sigmas = sigmas.clone()
            sigmas[-1] = 1e-200
        return drive_diffusers(cls, gm, x, sigmas, final_denoise, **config)
    return run


def nfe_steps(name, nfe):
    """Sigmas before the final 0 for `nfe` evaluations (Heun and DPM2 evaluate twice per step but the last)."""
    base = name.split()[-1] if ' ' in name else name
    return steps_for_nfe('heun' if base.startswith(('heun', 'dpm_2')) else ('pc' if base == 'pc' else 'euler'), nfe)


def deterministic_solvers(kd, df):
    """name -> (runner, is_ours, name used for the NFE rule)."""
    s = {'euler': (ours('euler'), True, 'euler'), 'heun': (ours('heun'), True, 'heun'),
         'dpmpp_2m': (ours('dpmpp_2m'), True, 'x'), 'dpmpp_3m': (ours('dpmpp_3m'), True, 'x'),
         'dpmpp_3m lof=False': (ours('dpmpp_3m', lower_order_final=False), True, 'x'),
         'ipndm': (ours('ipndm'), True, 'x')}
    for order in (2, 3, 4):                     # lof=False: lower_order_final off (k-diffusion's 3M, the paper's tAB)
        s[f'deis_tab order={order}'] = (ours('deis_tab', order=order), True, 'x')
        s[f'deis_tab order={order} lof=False'] = (ours('deis_tab', order=order, lower_order_final=False), True, 'x')
    for variant in ('bh1', 'bh2'):
        for order in (1, 2, 3):
            s[f'unipc_{variant} order={order}'] = (ours(f'unipc_{variant}', order=order), True, 'x')
    # ours (not published): the methods to beat the published ones with
    s['dpmpp_3m_corrected (ours)'] = (ours('dpmpp_3m_corrected'), 'new', 'x')
    s['eps_abm (ours)'] = (ours('eps_abm'), 'new', 'x')
    s['eps_abm order=4 (ours)'] = (ours('eps_abm', order=4), 'new', 'x')
    s['eps_abm h_damp=inf (ours)'] = (ours('eps_abm', h_damp=math.inf), 'new', 'x')
    s['eps_abm final_correction (ours)'] = (ours('eps_abm', final_correction=True), 'new', 'x')
    s['eps_abm order=4 final_corr. (ours)'] = (ours('eps_abm', order=4, final_correction=True), 'new', 'x')
    if kd is not None:
        s.update({'k-diff euler': (kdiff(kd, 'euler'), False, 'euler'), 'k-diff heun': (kdiff(kd, 'heun'), False, 'heun'),
                  'k-diff dpm_2': (kdiff(kd, 'dpm_2'), False, 'dpm_2'), 'k-diff lms': (kdiff(kd, 'lms'), False, 'x'),
                  'k-diff dpmpp_2m': (kdiff(kd, 'dpmpp_2m'), False, 'x'),
                  'k-diff dpmpp_3m_sde eta=0': (kdiff(kd, 'dpmpp_3m_sde', eta=0.0), False, 'x')})
    if df is not None:
        for variant in ('bh1', 'bh2'):
            for order in (1, 2, 3):
                s[f'diffusers UniPC {variant} order={order}'] = (diffusers_run(
                    df.UniPCMultistepScheduler, tiny_last=variant == 'bh1', prediction_type='sample',
                    solver_type=variant, solver_order=order), False, 'x')
        for order in (2, 3):
            s[f'diffusers DPM++ {order}M'] = (diffusers_run(df.DPMSolverMultistepScheduler, prediction_type='sample',
                                                            solver_order=order), False, 'x')
            s[f'diffusers DEIS order={order}'] = (diffusers_run(df.DEISMultistepScheduler, final_denoise=True,
                                                                prediction_type='epsilon', solver_order=order), False, 'x')
    return s


def stochastic_solvers(kd):
    """name -> (runner, name used for the NFE rule). k-diffusion's Heun draws noise on EVERY step (torch.randn_like,
    used only when gamma > 0), ours only where it churns, so with EDM's S_tmin/S_tmax the two consume the random
    stream differently; the 'all steps' lines (S_tmin = 0, S_tmax = inf: every step churns) share it exactly."""
    churn = dict(S_churn=40, S_tmin=0.05, S_tmax=50)
    s = {'euler_ancestral': (ours('euler_ancestral'), 'euler'), 'heun churn=40': (ours('heun', **churn), 'heun'),
         'heun churn=40 all steps': (ours('heun', S_churn=40), 'heun'),
         'dpmpp_2m_sde': (ours('dpmpp_2m_sde'), 'euler'), 'pc': (ours('pc'), 'pc')}
    if kd is not None:
        s.update({'k-diff euler_ancestral': (kdiff(kd, 'euler_ancestral'), 'euler'),
                  'k-diff heun churn=40': (kdiff(kd, 'heun', s_churn=40, s_tmin=0.05, s_tmax=50), 'heun'),
                  'k-diff heun churn=40 all steps': (kdiff(kd, 'heun', s_churn=40), 'heun'),
                  'k-diff dpmpp_2m_sde': (kdiff(kd, 'dpmpp_2m_sde'), 'euler')})
    return s


# ----------------------------------------------------------------------------------------------------
# The race.

def race_deterministic(pname, gm, x_T, ref, solvers, nfes):
    header = f"{'sampler':<34}" + ''.join(f'{n:>10}' for n in nfes)
    print(f'\n[{pname}] deterministic: RMS distance to the converged ODE solution ({x_T.shape[0]} paths)\n{header}')
    errors = {}
    for name, (run, _, rule) in solvers.items():
        errs = []
        for nfe in nfes:
            sigmas = karras_sigmas(nfe_steps(rule, nfe), SIGMA_MIN, SIGMA_MAX).double()
            out = run(gm, x_T.clone(), sigmas, None)
            errs.append(((out - ref) ** 2).mean().sqrt().item())
        errors[name] = errs
        print(f'{name:<34}' + ''.join(f'{e:>10.2e}' for e in errs))
    # the summary: our best new solver against the best published one at each NFE
    print(f'\n[{pname}] best published (ours of published methods, k-diffusion, diffusers) vs our new solvers')
    for j, nfe in enumerate(nfes):
        pub = min((e[j], n) for n, e in errors.items() if solvers[n][1] != 'new')
        new = min((e[j], n) for n, e in errors.items() if solvers[n][1] == 'new')
        print(f'  NFE {nfe:>3}: best published {pub[0]:.2e} ({pub[1]}); ours {new[0]:.2e} ({new[1]}); '
              f'ratio {new[0] / pub[0]:.2f}')
    return errors


def unipc_parity(gm, x_T, df):
    """Max |ours - diffusers| for UniPC on the same sigmas (driven identically)."""
    worst = 0.0
    for variant in ('bh1', 'bh2'):
        for order in (1, 2, 3):
            for nfe in (5, 10, 20):
                sigmas = karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX).double()
                a = SAMPLERS[f'unipc_{variant}'](gm, x_T.clone(), sigmas, order=order)
                b = diffusers_run(df.UniPCMultistepScheduler, tiny_last=variant == 'bh1', prediction_type='sample',
                                  solver_type=variant, solver_order=order)(gm, x_T.clone(), sigmas, None)
                worst = max(worst, (a - b).abs().max().item())
    return worst


def deis_parity(gm, x_T, df):
    """Max |ours - diffusers| for DEIS (log-rho tAB, orders 2 and 3), both with their default lower-order final steps
    (below 15 steps between the positive sigmas, i.e. at 5 and 10 NFE here)."""
    worst = 0.0
    for order in (2, 3):
        for nfe in (5, 10, 20, 35):
            sigmas = karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX).double()
            a = SAMPLERS['deis_tab'](gm, x_T.clone(), sigmas, order=order)
            b = diffusers_run(df.DEISMultistepScheduler, final_denoise=True, prediction_type='epsilon',
                              solver_order=order)(gm, x_T.clone(), sigmas, None)
            worst = max(worst, (a - b).abs().max().item())
    return worst


def race_stochastic(pname, gm, solvers, n_sde, nfes):
    header = f"{'sampler':<34}" + ''.join(f'{n:>10}' for n in nfes)
    exact = gm.sample(n_sde, generator=torch.Generator().manual_seed(1))[0]
    exact2 = gm.sample(n_sde, generator=torch.Generator().manual_seed(2))[0]
    print(f'\n[{pname}] stochastic: sliced W1 to exact samples ({n_sde} samples, the same noise for every sampler; '
          f'exact vs exact = {sliced_w1(exact, exact2):.3f})\n{header}')
    outs = {}
    for name, (run, rule) in solvers.items():
        dists = []
        for nfe in nfes:
            sigmas = karras_sigmas(nfe_steps(rule, nfe), SIGMA_MIN, SIGMA_MAX).double()
            x = SIGMA_MAX * torch.randn(n_sde, gm.D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            out = run(gm, x, sigmas, torch.Generator().manual_seed(4))
            outs[name, nfe] = out
            dists.append(sliced_w1(out, exact))
        print(f'{name:<34}' + ''.join(f'{d:>10.3f}' for d in dists))
    for name in solvers:
        if ('k-diff ' + name) in solvers:
            diff = max((outs[name, n] - outs['k-diff ' + name, n]).abs().max().item() for n in nfes)
            note = ' (k-diffusion also draws on the steps it does not churn: other streams)' if name == 'heun churn=40' else ''
            print(f'  parity with shared noise: {name} vs k-diffusion: max |difference| {diff:.1e}{note}')


def race_schedules(pname, gm, x_T, ref, nfes=(5, 10), max_evals=600):
    """schedule_search.search_sigmas (a tool, see its docstring) tuned on 64 OTHER noise paths, then measured on the
    race's paths: the error with Karras's schedule against the searched one, at equal NFE."""
    print(f'\n[{pname}] searched schedules (schedule_search.py, tuned on other noise) vs Karras, equal NFE')
    for name, options in (('eps_abm', {}), ('deis_tab', {}), ('unipc_bh2', {'order': 2}), ('dpmpp_2m', {})):
        for nfe in nfes:
            t0 = time.time()
            searched = search_sigmas(gm, nfe, sampler=name, options=options, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                     n_paths=64, max_evals=max_evals, seed=1)
            errs = [((SAMPLERS[name](gm, x_T.clone(), s, **options) - ref) ** 2).mean().sqrt().item()
                    for s in (karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX).double(), searched)]
            print(f'  {name} {options or ""} NFE {nfe:>3}: Karras {errs[0]:.2e} -> searched {errs[1]:.2e} '
                  f'({errs[1] / errs[0]:.2f}x; search {time.time() - t0:.0f}s); sigmas '
                  + ' '.join(f'{v:.3g}' for v in searched[:-1].tolist()))


def race_robustness(nfes=(5, 10, 20, 35), n_paths=64):
    """Each single solver against the best published one PER CELL (problem x NFE), over eleven mixtures: the two of
    the race and nine others the solvers of ours were not tuned on (2-D with 3 and 6 components, 8-D, 64-D and 256-D
    image-like, other seeds). The published side is our implementations (equal to k-diffusion's and diffusers' to
    round-off, see the parity lines above); k-diffusion's LMS, which no implementation of ours repeats, is left out.
    The per-cell best is an oracle no single solver is: which published solver is best changes with problem and NFE."""
    published = {'euler': ('euler', {}), 'dpmpp_2m': ('dpmpp_2m', {}), 'dpmpp_3m': ('dpmpp_3m', {}),
                 'dpmpp_3m lof=False': ('dpmpp_3m', {'lower_order_final': False}), 'ipndm': ('ipndm', {})}
    published.update({f'deis_tab order={o}': ('deis_tab', {'order': o}) for o in (2, 3, 4)})
    published.update({f'deis_tab order={o} lof=False': ('deis_tab', {'order': o, 'lower_order_final': False})
                      for o in (2, 3, 4)})
    published.update({f'unipc_{v} order={o}': (f'unipc_{v}', {'order': o}) for v in ('bh1', 'bh2') for o in (1, 2, 3)})
    new = {'eps_abm (ours)': ('eps_abm', {}), 'eps_abm order=4 (ours)': ('eps_abm', {'order': 4}),
           'dpmpp_3m_corrected (ours)': ('dpmpp_3m_corrected', {})}
    problems = {'2-D K=3 seed 0 (race)': GaussianMixture.random(K=3, D=2, seed=0),
                '64-D image-like seed 0 (race)': image_like_mixture()}
    problems.update({f'2-D K=3 seed {s}': GaussianMixture.random(K=3, D=2, seed=s) for s in (1, 2, 3)})
    problems.update({f'2-D K=6 seed {s}': GaussianMixture.random(K=6, D=2, seed=s) for s in (1, 2)})
    problems['8-D K=4 seed 0'] = GaussianMixture.random(K=4, D=8, seed=0)
    problems.update({f'64-D image-like seed {s}': image_like_mixture(seed=s) for s in (1, 2)})
    problems['256-D image-like seed 0'] = image_like_mixture(D=256)
    ratios = {name: [] for name in {**published, **new}}
    for gm in problems.values():
        x_T = SIGMA_MAX * torch.randn(n_paths, gm.D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ref = reference_ode(gm, x_T, SIGMA_MAX, SIGMA_MIN)
        for nfe in nfes:
            sigmas = karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX).double()
            errs = {name: ((SAMPLERS[fn](gm, x_T.clone(), sigmas, **opts) - ref) ** 2).mean().sqrt().item()
                    for name, (fn, opts) in {**published, **new}.items()}
            best = min(errs[name] for name in published)
            for name, e in errs.items():
                ratios[name].append(e / best)
    cells = len(problems) * len(nfes)
    print(f'\nrobustness: error / best published error of the same cell, over {len(problems)} mixtures x NFE '
          f'{",".join(map(str, nfes))} = {cells} cells (Karras 80 -> 0.002, {n_paths} paths each)')
    print(f"{'solver':<30}{'geo. mean':>10}{'worst':>8}{'cells <= best published':>25}")
    geo = lambda r: math.exp(sum(map(math.log, r)) / len(r))  # noqa: E731
    for name in sorted(ratios, key=lambda n: geo(ratios[n])):
        r = ratios[name]
        print(f'{name:<30}{geo(r):>10.3f}{max(r):>8.2f}{sum(v <= 1 + 1e-12 for v in r):>21d}/{cells}')


def main(args):
    if args.robustness:
        race_robustness()
        return
    df = load_diffusers(args.refs)                 # first: diffusers probes for k_diffusion's spec at import
    kd = load_kdiffusion(args.refs)
    nfes = tuple(int(n) for n in args.nfes.split(','))
    problems = {'2-D, 3 comps': GaussianMixture.random(K=3, D=2, seed=0),
                '64-D, 10 comps, image-like spectrum': image_like_mixture()}
    for pname, gm in problems.items():
        x_T = SIGMA_MAX * torch.randn(args.n_ode, gm.D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        t0 = time.time()
        ref = reference_ode(gm, x_T, SIGMA_MAX, SIGMA_MIN)
        print(f'\n[{pname}] reference ODE solution in {time.time() - t0:.0f}s')
        if df is not None:
            print(f'[{pname}] UniPC parity: max |ours - diffusers| over bh1/bh2, orders 1-3, NFE 5/10/20: '
                  f'{unipc_parity(gm, x_T, df):.1e}')
            print(f'[{pname}] DEIS parity: max |ours deis_tab - diffusers DEIS| orders 2-3, NFE 5/10/20/35: '
                  f'{deis_parity(gm, x_T, df):.1e}')
        race_deterministic(pname, gm, x_T, ref, deterministic_solvers(kd, df), nfes)
        if args.schedules:
            race_schedules(pname, gm, x_T, ref)
        if not args.skip_sde:
            race_stochastic(pname, gm, stochastic_solvers(kd), args.n_sde, nfes)
    if args.png:
        draw_paths(problems['2-D, 3 comps'], args.png)


def draw_paths(gm, path, n_paths=24, size=512):
    """A 2-D picture: exact ODE paths (grey), Euler at 10 NFE (red) and Heun at 11 (blue), from the same points at sigma=3."""
    from PIL import Image, ImageDraw
    g = torch.Generator().manual_seed(5)
    sigma_start = 3.0
    x0 = gm.sample(n_paths, generator=g)[0] + sigma_start * torch.randn(n_paths, 2, generator=g, dtype=torch.float64)

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
    p.add_argument('--refs', default=os.environ.get('REF_PKGS'),
                   help='folder with k_diffusion (and its torchsde, torchdiffeq, trampoline) and/or diffusers installed')
    p.add_argument('--n-ode', type=int, default=64, help='noise samples (paths) for the ODE error')
    p.add_argument('--n-sde', type=int, default=10000, help='samples for the distribution distance')
    p.add_argument('--nfes', default=','.join(map(str, NFES)), help='comma-separated NFE counts')
    p.add_argument('--skip-sde', action='store_true', help='only the deterministic race')
    p.add_argument('--schedules', action='store_true', help='also race searched schedules against Karras (minutes)')
    p.add_argument('--robustness', action='store_true', help='instead of the race: every solver against the per-cell '
                   'best published one over eleven mixtures, nine of them not used to tune ours (about a minute)')
    p.add_argument('--png', default=None, help='write a 2-D picture of sampler paths here')
    main(p.parse_args())
