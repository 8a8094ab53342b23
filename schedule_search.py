"""
A TOOL, not a sampler: search the noise levels (sigmas) of a few-step sampler for a given data distribution.

The sampler and the step count are the user's; what is left free is where the steps go. For a Gaussian mixture the
exact denoiser, and hence the exact probability-flow ODE, is known, so the schedule can be tuned against the truth:

    sigmas* = argmin_{sigma_max = s_0 > s_1 > ... > s_{n-1} = sigma_min}  E_{x_T} || sampler(D, x_T, s) - x_exact(x_T) ||^2

where x_exact is a converged solution of the PF-ODE from the same noise (Karras et al. 2022, arXiv:2206.00364, Eq. 3)
followed by the final denoising step D(x, sigma_min) that every sampler takes. Fitting a mixture to the data first
(fit_gaussian_mixture) gives a schedule tuned to that data set, in the spirit of Align Your Steps (Sabour, Fidler &
Kreis 2024, arXiv:2404.14507), which also optimises the sampling schedule for a given solver and data set; theirs
minimises a bound on the KL divergence between the discretised and exact SDE using the trained model; ours is a
direct error on an exact surrogate (no trained model needed, no gradients: the schedule has a few dozen numbers).

Parametrisation: log sigma_i = log sigma_max - (log sigma_max - log sigma_min) * cumsum(softmax(theta))_i, so any
theta is a valid descending schedule with fixed ends; theta starts at the Karras schedule's increments and is
improved by Powell's derivative-free method (scipy). The searched schedule is checked on held-out noise.

fit_schedule does the same for ANY denoiser, a trained network included (no closed form, no dimension attribute):
the target is then a converged numerical solution of the model's own PF-ODE from its own noise draws, computed once
(reference_solutions: many steps of two different published solvers, DEIS tAB3 and Heun; their distance is the floor
below which no schedule can be judged), and the loss is the same RMS distance. How it differs from Align Your Steps
(Sabour et al. 2024, arXiv:2404.14507, Sec. 3): AYS minimises an upper bound on the KL divergence between the
discretised and the true SDE paths (their Eq. 7-10, estimated with the model's denoiser on data samples), by
iterative coordinate refinement and then subdivision of a 10-step schedule; ours minimises the sampler's actual end
point error against the reference ODE solution from the same starting noise (the quantity the benchmark reports),
for the given solver and NFE, without data samples and without gradients: Powell on the log-sigma increments,
coarse to fine (Karras's formula with its own rho and last level, then a few knots of a correction to its increments
on half of the paths, then every increment on all of them). AYS fixes both ends; ours fixes sigma_max and, by default, fits the last level too (free_end: at 5
NFE a last level near 0.1 instead of 0.002 halves the error), while the reference still ends at sigma_min.

Usage:
    gm = fit_gaussian_mixture(data.flatten(1), K=10)                 # or any exact denoiser, e.g. a GaussianMixture
    sigmas = search_sigmas(gm, n=10, sampler='eps_abm')            # n noise levels plus the final 0
    sigmas = fit_schedule(diffusion.denoiser(net), (1, 32, 32), 10, cond={'y': labels})   # a trained network
"""
import math
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import minimize
from tqdm.auto import tqdm

from diffusion import GaussianMixture
from samplers import SAMPLERS, karras_sigmas


# ----------------------------------------------------------------------------------------------------
# The exact target: a converged PF-ODE solution for each starting noise.

def exact_ode_endpoints(denoiser, x_T, sigma_max, sigma_min, tol=1e-10):
    """Converged PF-ODE solution from sigma_max to sigma_min, then D(x, sigma_min) (every sampler's final step).
    In lambda = -log sigma the ODE dx/dsigma = (x - D)/sigma reads dx/dlambda = D - x (scipy DOP853)."""
    shape = x_T.shape

    def f(lam, y):
        x = torch.from_numpy(y).reshape(shape)
        sigma = torch.full((shape[0],), math.exp(-lam), dtype=torch.float64)
        return (denoiser(x, sigma) - x).reshape(-1).numpy()
    sol = solve_ivp(f, (-math.log(sigma_max), -math.log(sigma_min)), x_T.double().reshape(-1).numpy(),
                    method='DOP853', rtol=tol, atol=tol)
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return denoiser(x, torch.full((shape[0],), sigma_min, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# The schedule: a softmax of free numbers keeps it descending with fixed ends.

def sigmas_from_theta(theta, sigma_min, sigma_max):
    """n-1 free numbers -> n descending sigmas from sigma_max to sigma_min, plus the final 0."""
    w = torch.softmax(torch.as_tensor(theta, dtype=torch.float64), 0)
    frac = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
    frac[-1] = 1.0                                                      # the end lands exactly on sigma_min
    sigmas = (math.log(sigma_max) - (math.log(sigma_max) - math.log(sigma_min)) * frac).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min                        # exact ends, not exp(log(.)) round-off
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def theta_from_sigmas(sigmas):
    """The inverse of sigmas_from_theta (up to an additive constant) for a schedule ending in 0."""
    log_sigma = sigmas[:-1].double().log()
    return (log_sigma[:-1] - log_sigma[1:]).log()


def schedule_error(denoiser, x_T, target, sigmas, sampler, options):
    """RMS distance between the sampler's output and the exact end points."""
    out = SAMPLERS[sampler](denoiser, x_T.clone(), sigmas, **options)
    return ((out - target) ** 2).mean().sqrt().item()


def search_sigmas(denoiser, n, sampler='eps_abm', options=None, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                  n_paths=128, max_evals=None, seed=0, tol=1e-10, verbose=False):
    """Search n noise levels (sigma_max ... sigma_min, plus the final 0) that minimise the sampler's error against
    the exact ODE of `denoiser` (an exact denoiser such as a GaussianMixture: D(x, sigma) with sigma of shape (N,)).
    Starts from karras_sigmas(n, sigma_min, sigma_max, rho); returns float64 sigmas. tol: of the exact ODE solve.
    A deterministic sampler only: the error is measured path by path against the ODE solution from the same noise.
    n_paths noise draws (seed) are the training set; check the result on other noise (the test and benchmark do)."""
    options = dict(options or {})
    if sampler not in SAMPLERS:
        raise ValueError(f'unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}')
    if 'generator' in options or n < 3:
        raise ValueError('search_sigmas needs a deterministic sampler and n >= 3 noise levels (2 are fixed ends)')
    dim = getattr(denoiser, 'D', None)
    if dim is None:
        raise ValueError('the denoiser needs a dimension attribute D (e.g. a diffusion.GaussianMixture)')
    g = torch.Generator().manual_seed(seed)
    x_T = sigma_max * torch.randn(n_paths, dim, generator=g, dtype=torch.float64)
    target = exact_ode_endpoints(denoiser, x_T, sigma_max, sigma_min, tol)
    theta0 = theta_from_sigmas(karras_sigmas(n, sigma_min, sigma_max, rho).double()).numpy()

    def loss(theta):
        return schedule_error(denoiser, x_T, target, sigmas_from_theta(theta, sigma_min, sigma_max), sampler, options)
    result = minimize(loss, theta0, method='Powell',
                      options={'maxfev': max_evals or 200 * len(theta0), 'xtol': 1e-3, 'ftol': 1e-4})
    best = result.x if result.fun < loss(theta0) else theta0           # never worse than the start on these paths
    if verbose:
        print(f'schedule search: {sampler} n={n}: error {loss(theta0):.3e} (Karras) -> {loss(best):.3e} '
              f'after {result.nfev} evaluations')
    return sigmas_from_theta(best, sigma_min, sigma_max)


# ----------------------------------------------------------------------------------------------------
# Any denoiser, a trained network included: the target is a converged numerical solution of its own PF-ODE.

@torch.no_grad()
def reference_solutions(denoiser, x_T, sigma_min=0.002, sigma_max=80.0, cond=None, steps=256, rho=7.0, progress=False):
    """(target, floor) for the starting noises x_T (already times sigma_max): the PF-ODE solved by two different
    published solvers with many steps on Karras's levels (Eq. 5, same ends), each ending with D(x, sigma_min) as
    every sampler does. target: DEIS tAB3 (deis_tab order 4, Zhang & Chen 2023, Eq. 14) on 2 * steps levels;
    check: Heun (Karras et al. 2022, Alg. 1) on `steps` levels (2 steps - 1 evaluations, about the same number).
    floor = RMS(target - check): errors near it cannot be told apart from the reference's own error."""
    cond = cond or {}
    fine = karras_sigmas(2 * steps, sigma_min, sigma_max, rho).to(x_T.dtype).to(x_T.device)
    coarse = karras_sigmas(steps, sigma_min, sigma_max, rho).to(x_T.dtype).to(x_T.device)
    target = SAMPLERS['deis_tab'](denoiser, x_T.clone(), fine, cond=cond, progress=progress)
    check = SAMPLERS['heun'](denoiser, x_T.clone(), coarse, cond=cond, progress=progress)
    return target, ((target - check) ** 2).mean().sqrt().item()


def draw_noise(shape, n_paths, seed, sigma_max, dtype=torch.float32, device='cpu'):
    """The starting noises of fit_schedule (and of held-out checks with another seed): sigma_max * N(0, I), drawn on
    the CPU from torch.Generator().manual_seed(seed), so the same seed gives the same noise on every device."""
    g = torch.Generator().manual_seed(seed)
    return (sigma_max * torch.randn((n_paths, *shape), generator=g, dtype=torch.float64)).to(dtype).to(device)


class _Budget(Exception):
    """Raised inside the loss once max_evals evaluations are spent: the fit keeps the best schedule seen."""


def fit_schedule(denoiser, shape, n, sampler='eps_abm', cond=None, sigma_min=0.002, sigma_max=80.0, seed=0, *,
                 options=None, n_paths=32, rho=7.0, knots=6, max_evals=160, ref_steps=256, reference=None,
                 free_end=True, family_fit=True, dtype=torch.float32, device='cpu', progress=False, return_info=False):
    """Fit n noise levels (sigma_max ... sigma_min, plus the final 0) of `sampler` to the denoiser's own PF-ODE.

    denoiser(x, sigma, **cond): any denoiser, e.g. a trained network (diffusion.denoiser(net)), guided or not;
    shape: one sample's shape (C, H, W) or (D,); cond: the network's conditioning for the n_paths noise draws,
    {name: (n_paths, ...) tensor} (a class-conditional model: {'y': labels}); the noises are draw_noise(shape,
    n_paths, seed, sigma_max). The loss is the RMS distance of the sampler's output to the converged reference
    (reference_solutions, computed once; pass reference=(target, floor) to reuse one for several fits).
    Optimisation (derivative-free, scipy Powell; every schedule it tries is descending with the fixed ends, see
    sigmas_from_theta), coarse to fine: family_fit, Karras's Eq. 5 with a fitted rho and last level (the last level
    first on a grid) on the first half of the paths; then a piecewise-linear correction with `knots` knots to its
    log-sigma increments on that half; then every increment on all paths; max_evals sampler runs in all (one run
    costs n evaluations of the denoiser on half or all of the paths). free_end: the last level is fitted
    too, as sigma_min * exp(u^2) >= sigma_min (at 5 NFE the final D(x, sigma_min = 0.002) is nearly the identity, an
    evaluation spent for nothing; a last level near 0.1 makes it a real denoising step: measured 2x lower error at 5
    NFE on the latent MNIST model); the reference still ends at sigma_min. Returns float64 sigmas (the best of
    Karras and the fits on the fit's own paths), and with return_info also a dict: errors of Karras and of the fit on
    the fit's own noise, floor, sampler runs, CPU and wall seconds. Check the result on other noise (seed)."""
    options = dict(options or {})
    if sampler not in SAMPLERS:
        raise ValueError(f'unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}')
    if 'generator' in options or n < 3:
        raise ValueError('fit_schedule needs a deterministic sampler and n >= 3 noise levels (2 are fixed ends)')
    if not 0 < sigma_min < sigma_max or n_paths < 2:
        raise ValueError(f'need 0 < sigma_min < sigma_max and n_paths >= 2 (got {sigma_min}, {sigma_max}, {n_paths})')
    cond = dict(cond or {})
    for name, value in cond.items():
        if torch.is_tensor(value) and len(value) != n_paths:
            raise ValueError(f'cond[{name!r}] holds {len(value)} rows; it must hold one per noise draw (n_paths={n_paths})')
    t_cpu, t_wall = time.process_time(), time.time()
    x_T = draw_noise(shape, n_paths, seed, sigma_max, dtype, device)
    target, floor = reference if reference is not None else reference_solutions(
        denoiser, x_T, sigma_min, sigma_max, cond, ref_steps, rho)
    half = max(n_paths // 2, 1)
    subsets = {m: (x_T[:m], target[:m], {k: v[:m] if torch.is_tensor(v) else v for k, v in cond.items()})
               for m in (half, n_paths)}
    bar = tqdm(total=max_evals, desc=f'fitting {sampler} n={n}', disable=not progress, leave=False)
    best, runs = {}, [0]                                 # paths -> (error, theta) of the best schedule tried; runs

    @torch.no_grad()
    def loss(theta, m):
        if runs[0] >= max_evals - (m < n_paths):          # the half-path stages leave one run for the check on all
            raise _Budget
        runs[0] += 1
        x, tgt, c = subsets[m]
        sigmas = schedule(theta).to(dtype).to(device)
        out = SAMPLERS[sampler](denoiser, x.clone(), sigmas, cond=c, **options)
        err = ((out - tgt) ** 2).mean().sqrt().item()
        err = err if math.isfinite(err) else 1e30           # a diverging schedule is just very bad
        bar.update(1)
        bar.set_postfix(rms=f'{min(err, best.get(m, (err,))[0]):.3g}')
        if err < best.get(m, (math.inf,))[0]:
            best[m] = (err, np.array(theta, dtype=np.float64))
        return err

    def powell(f, x0, maxfev):
        try:
            minimize(f, x0, method='Powell', options={'maxfev': maxfev, 'xtol': 1e-3, 'ftol': 1e-4})
        except _Budget:
            pass

    # theta: the n - 1 log increments of sigmas_from_theta, then u, the last level's log distance above sigma_min.
    end = lambda u: min(sigma_min * math.exp(u * u), sigma_max / 10) if free_end else sigma_min
    schedule = lambda theta: sigmas_from_theta(theta[:n - 1], end(theta[n - 1]), sigma_max)
    theta_karras = np.append(theta_from_sigmas(karras_sigmas(n, sigma_min, sigma_max, rho).double()).numpy(), 0.0)
    karras_error = loss(theta_karras, n_paths)
    # Family: Karras's Eq. 5 with its own rho and its own last level (2 numbers), on half of the paths; the last
    # level first on a grid (u = 0, the start, is a flat point of sigma_min * exp(u^2), where a line search stalls).
    family = lambda r, u: np.append(theta_from_sigmas(                 # rho within [rho / e^2, rho e^2]
        karras_sigmas(n, end(u), sigma_max, rho * math.exp(min(max(r, -2.0), 2.0))).double()).numpy(), u)
    theta_start = theta_karras
    if family_fit:
        grid = [math.sqrt(math.log(e / sigma_min)) for e in sigma_min * 10 ** np.arange(0.0, 3.0, 0.5)
                if e < sigma_max / 10] if free_end else []
        for u in grid:
            loss(family(0.0, u), half)
        u0 = best[half][1][n - 1] if half in best else 0.0
        powell(lambda p: loss(family(p[0], p[1] if free_end else 0.0), half), np.array([0.0, u0]), max_evals // 5)
        theta_start = best[half][1] if half in best else theta_karras
    # Coarse: a correction to those log increments, linear between k knots, on half of the paths.
    k, pos = min(knots, n - 1), np.linspace(0, 1, n - 1)
    correction = lambda c: np.interp(pos, np.linspace(0, 1, k), c) if k > 1 else np.full(n - 1, c[0])
    powell(lambda c: loss(theta_start + np.append(correction(c[:k]), c[k]), half), np.zeros(k + 1), max_evals // 3)
    theta_coarse = best[half][1] if half in best else theta_karras
    # Fine: every increment on all paths, from the coarse fit (kept only if it is better on all paths).
    start = theta_coarse if runs[0] < max_evals and loss(theta_coarse, n_paths) < karras_error else theta_karras
    powell(lambda th: loss(th, n_paths), start, max_evals)
    bar.close()
    error, theta = best[n_paths]
    sigmas = schedule(theta)
    if not return_info:
        return sigmas
    return sigmas, dict(karras_error=karras_error, fitted_error=error, floor=floor, sampler_runs=runs[0],
                        cpu_seconds=time.process_time() - t_cpu, wall_seconds=time.time() - t_wall)


# ----------------------------------------------------------------------------------------------------
# A Gaussian mixture fitted to data: the exact surrogate to tune a schedule on.

def fit_gaussian_mixture(data, K=10, iters=100, reg=1e-4, seed=0):
    """EM for a full-covariance Gaussian mixture (Dempster, Laird & Rubin 1977; Bishop 2006, Sec. 9.2.2):
    E-step responsibilities r_nk ~ w_k N(x_n; mu_k, C_k); M-step w_k = mean_n r_nk, mu_k and C_k the
    responsibility-weighted mean and covariance (+ reg I so every C_k stays invertible). data: (N, D).
    Returns a diffusion.GaussianMixture, whose exact denoiser search_sigmas uses."""
    x = torch.as_tensor(data, dtype=torch.float64).reshape(len(data), -1)
    N, D = x.shape
    if N < K:
        raise ValueError(f'need at least K={K} data points, got {N}')
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randperm(N, generator=g)[:K]].clone()               # start at K random data points
    covs = (x.var(0).mean() * torch.eye(D, dtype=torch.float64)).expand(K, D, D).clone()
    weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for _ in range(iters):
        log_joint = weights.log() + torch.distributions.MultivariateNormal(means, covs).log_prob(x[:, None])  # (N, K)
        resp = log_joint.softmax(1)                                       # r_nk
        nk = resp.sum(0) + 1e-12
        weights = nk / N
        means = (resp.T @ x) / nk[:, None]
        diff = x[None] - means[:, None]                                   # (K, N, D)
        covs = torch.einsum('nk,kni,knj->kij', resp, diff, diff) / nk[:, None, None] + reg * torch.eye(D, dtype=torch.float64)
    return GaussianMixture(means, covs, weights)


if __name__ == '__main__':
    # Demo: on a 2-D mixture, the searched 6-level schedule beats Karras's on fresh noise for three samplers.
    gm = GaussianMixture.random(K=3, D=2, seed=0)
    x_test = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    target = exact_ode_endpoints(gm, x_test, 80.0, 0.002)
    for name in ('dpmpp_2m', 'deis_tab', 'eps_abm'):
        sigmas = search_sigmas(gm, 6, sampler=name, verbose=True)
        karras = karras_sigmas(6, 0.002, 80.0).double()
        print(f'  held-out error: Karras {schedule_error(gm, x_test, target, karras, name, {}):.3e}, '
              f'searched {schedule_error(gm, x_test, target, sigmas, name, {}):.3e}; sigmas '
              + ' '.join(f'{s:.3g}' for s in sigmas.tolist()))
