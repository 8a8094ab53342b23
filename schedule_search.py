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

Usage:
    gm = fit_gaussian_mixture(data.flatten(1), K=10)                 # or any exact denoiser, e.g. a GaussianMixture
    sigmas = search_sigmas(gm, n=10, sampler='eps_abm')            # n noise levels plus the final 0
"""
import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import minimize

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
