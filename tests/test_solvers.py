"""Tests of the multistep solvers of samplers.py: iPNDM, DEIS tAB, UniPC (bh1, bh2) and our eps_abm.

Closed forms used: (1) a single Gaussian, whose probability-flow ODE has an exact solution
(GaussianMixture.ode_solution), to measure each solver's order as the error ratio per doubling of steps;
(2) a denoiser whose noise prediction eps = (x - D)/sigma is a polynomial p in sigma or in log sigma and does not
depend on x, so the ODE dx/dsigma = eps integrates by hand and a step that is exact for that polynomial degree
must reproduce it to round-off. UniPC's agreement with diffusers' UniPCMultistepScheduler (to ~1e-14) is checked
in benchmarks/samplers.py, since diffusers is not a test dependency.
"""
import math

import pytest
import torch

from diffusion import GaussianMixture
from samplers import SAMPLERS, karras_sigmas


def _order_errors(name, opts, steps=(32, 64, 128), sigma_max=10.0, sigma_min=0.05):
    """Errors against the exact ODE solution (then the final D at sigma_min that every sampler takes)."""
    gm = GaussianMixture(torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[1.0, 0.1, 0.01]]))
    x = sigma_max * torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = gm.denoise(gm.ode_solution(x, sigma_max, sigma_min), sigma_min)
    errs = []
    for n in steps:
        out = SAMPLERS[name](gm, x.clone(), karras_sigmas(n, sigma_min, sigma_max).double(), **opts)
        errs.append((out - ref).norm().item())
    return errs


# Expected global orders (ratio 2^k per doubling): the lower-order first steps cap every multistep method here:
# an Euler-like first step has local error O(h^2), so iPNDM, DEIS and UniPC-1 are second order overall; UniC
# raises the first step to second order (local O(h^3)), so UniPC-2/3 and eps_abm-2/3 are third order.
@pytest.mark.parametrize('name, opts, ratio', [
    ('ipndm', {}, 3.6), ('ipndm', {'order': 2}, 3.6),
    ('deis_tab', {}, 3.6), ('deis_tab', {'order': 2}, 3.6), ('deis_tab', {'order': 3}, 3.6),
    ('unipc_bh1', {}, 7.0), ('unipc_bh2', {}, 7.0), ('unipc_bh2', {'order': 2}, 7.0),
    ('unipc_bh1', {'order': 2}, 7.0), ('unipc_bh1', {'order': 1}, 3.6),
    ('eps_abm', {}, 7.0), ('eps_abm', {'order': 2}, 7.0), ('eps_abm', {'order': 1}, 3.6),
])
def test_measured_order_on_the_exact_gaussian_ode(name, opts, ratio):
    errs = _order_errors(name, opts)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert min(ratios) > ratio, f'{name} {opts}: errors {errs}, ratios {ratios}'
    assert max(ratios) < 4 * ratio, f'{name} {opts}: suspiciously fast convergence {ratios}'


def _poly_denoiser(coeffs, var):
    """D(x, sigma) = x - sigma p(t), t = sigma or log sigma: eps = p(t) for every x."""
    def denoiser(x, sigma):
        t = sigma if var == 'sigma' else sigma.log()
        p = sum(c * t ** k for k, c in enumerate(coeffs))
        return x - sigma[:, None] * p[:, None]
    return denoiser


def _integral_log_poly(coeffs, s):
    """Antiderivative of p(log sigma) in sigma: int l^k dsigma = sigma sum_j (-1)^j k!/(k-j)! l^(k-j)."""
    l = math.log(s)
    return s * sum(c * sum((-1) ** j * math.factorial(k) / math.factorial(k - j) * l ** (k - j) for j in range(k + 1))
                   for k, c in enumerate(coeffs))


def _states(name, denoiser, sigmas, **opts):
    """x at the start of every step (the callback's 'x'), plus the output."""
    xs = []
    out = SAMPLERS[name](denoiser, torch.full((1, 1), 0.7, dtype=torch.float64), sigmas,
                         callback=lambda info: xs.append(info['x'].item()), **opts)
    return xs, out


@pytest.mark.parametrize('order', [1, 2, 3, 4])
def test_deis_step_is_exact_for_eps_polynomial_in_log_sigma(order):
    """DEIS tAB with `order` points integrates eps = p(log sigma) of degree order-1 exactly (Eq. 14's C_ij are the
    exact integrals of the Lagrange basis): the step with a full history must match the hand integral."""
    coeffs = [0.3, -0.5, 0.2, 0.07][:order]
    sigmas = torch.tensor([9.0, 4.0, 2.5, 1.1, 0.4, 0.0], dtype=torch.float64)[-(order + 2):]
    xs, _ = _states('deis_tab', _poly_denoiser(coeffs, 'log'), sigmas, order=order)
    s_a, s_b = sigmas[order - 1].item(), sigmas[order].item()
    exact = _integral_log_poly(coeffs, s_b) - _integral_log_poly(coeffs, s_a)
    assert xs[order] - xs[order - 1] == pytest.approx(exact, rel=1e-11, abs=1e-12)


@pytest.mark.parametrize('order', [1, 2, 3, 4])
def test_ipndm_step_is_exact_on_equal_steps(order):
    """iPNDM's fixed coefficients are Adams-Bashforth's for equal steps: with equal sigma steps and eps a polynomial
    in sigma of degree order-1, its order-`order` step is exact."""
    coeffs = [0.3, -0.5, 0.2, 0.07][:order]
    sigmas = torch.cat([torch.arange(order + 1, 0, -1, dtype=torch.float64) * 0.5, torch.zeros(1, dtype=torch.float64)])
    xs, _ = _states('ipndm', _poly_denoiser(coeffs, 'sigma'), sigmas, order=order)
    s_a, s_b = sigmas[order - 1].item(), sigmas[order].item()
    exact = sum(c * (s_b ** (k + 1) - s_a ** (k + 1)) / (k + 1) for k, c in enumerate(coeffs))
    assert xs[order] - xs[order - 1] == pytest.approx(exact, rel=1e-12, abs=1e-13)


def test_eps_abm_corrector_is_exact_for_linear_eps():
    """eps_abm order 1: the corrector through the new and the current point is exact for eps linear in log sigma,
    and the last step returns D(x_pred) + (x_corr - x_pred) = x_corr - sigma_min eps."""
    coeffs = [0.3, -0.5]
    sigmas = torch.tensor([3.0, 0.8, 0.0], dtype=torch.float64)
    _, out = _states('eps_abm', _poly_denoiser(coeffs, 'log'), sigmas, order=1)
    s_a, s_b = 3.0, 0.8
    x_corr = 0.7 + _integral_log_poly(coeffs, s_b) - _integral_log_poly(coeffs, s_a)
    eps_b = coeffs[0] + coeffs[1] * math.log(s_b)
    assert out.item() == pytest.approx(x_corr - s_b * eps_b, rel=1e-12)


def test_unipc_rejects_unsupported_order():
    gm = GaussianMixture.random(K=2, D=2, seed=0)
    with pytest.raises(ValueError, match='order'):
        SAMPLERS['unipc_bh2'](gm, torch.zeros(2, 2, dtype=torch.float64), karras_sigmas(5, 0.1, 10.).double(), order=4)
