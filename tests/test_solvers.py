"""Tests of the multistep solvers of samplers.py: iPNDM, DEIS tAB, UniPC (bh1, bh2) and our eps_abm.

Closed forms used: (1) a single Gaussian, whose probability-flow ODE has an exact solution
(GaussianMixture.ode_solution), to measure each solver's order as the error ratio per doubling of steps;
(2) a denoiser whose noise prediction eps = (x - D)/sigma is a polynomial p in sigma or in log sigma and does not
depend on x, so the ODE dx/dsigma = eps integrates by hand and a step that is exact for that polynomial degree
must reproduce it to round-off. (3) Outputs of diffusers' multistep schedulers on a fixed small problem, stored
here (diffusers is not a test dependency): orders cannot tell apart UniPC's bh1 from bh2, or a DEIS that keeps one
history point too many, but the published numbers can.
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
# raises the first step to second order (local O(h^3)), so UniPC-2/3 and eps_abm-2/3 are third order. eps_abm's
# damping (gamma ~ 0.9 on the largest steps at 32 steps) slows the approach: order 1 gives 3.4, 3.7 (-> 4).
# dpmpp_3m_corrected is third order too (measured 8.26, 8.10); sigma_min = 0.05 is what shows it: its output is D at
# the predicted point into sigma_min, and a first-order predictor there (the old order cap n - 1 - i) made it second
# order (4.75, 4.15), which sigma_min = 0.002 hides (its last step is too small to matter at these step counts).
@pytest.mark.parametrize('name, opts, ratio', [
    ('ipndm', {}, 3.6), ('ipndm', {'order': 2}, 3.6),
    ('deis_tab', {}, 3.6), ('deis_tab', {'order': 2}, 3.6), ('deis_tab', {'order': 3}, 3.6),
    ('unipc_bh1', {}, 7.0), ('unipc_bh2', {}, 7.0), ('unipc_bh2', {'order': 2}, 7.0),
    ('unipc_bh1', {'order': 2}, 7.0), ('unipc_bh1', {'order': 1}, 3.6),
    ('eps_abm', {}, 7.0), ('eps_abm', {'order': 2}, 7.0), ('eps_abm', {'order': 1}, 3.3), ('eps_abm', {'order': 4}, 7.0),
    ('dpmpp_3m_corrected', {}, 7.0),
])
def test_measured_order_on_the_exact_gaussian_ode(name, opts, ratio):
    errs = _order_errors(name, opts)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert min(ratios) > ratio, f'{name} {opts}: errors {errs}, ratios {ratios}'
    assert max(ratios) < 4 * ratio, f'{name} {opts}: suspiciously fast convergence {ratios}'


# Outputs of diffusers 0.42.1's schedulers on a fixed problem, stored so that diffusers is not a test dependency.
# Made by driving each scheduler on these sigmas as benchmarks/samplers.py's drive_diffusers does (VP frame
# x_t = x / sqrt(1 + sigma^2), its `sigmas` overwritten with ours, the exact mixture denoiser as prediction_type=
# 'sample', or 'epsilon' for DEIS, which stops at the last sigma and is followed by D there), in float64 (with
# the DPM scheduler's cast of the sample to float32 disabled); UniPC bh1 with a final sigma of 1e-200 instead of 0
# (diffusers' B(h) = -h is infinite there). DPM: DPMSolverMultistepScheduler(solver_order=3, solver_type='heun',
# lower_order_final=True/False) and (solver_order=2) with its defaults; DEIS: DEISMultistepScheduler(solver_order=2
# or 3, lower_order_final=True/False); UniPC: UniPCMultistepScheduler(solver_type='bh1'/'bh2', solver_order=2/3).
# 6 steps: fewer than 15, so the lowered final orders are part of what is pinned. Ours agreed to <= 5e-15.
PINNED_GM = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.2, 2.0]], dtype=torch.float64),
                            torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.5, 0.05]], dtype=torch.float64),
                            torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
PINNED_X = torch.tensor([[7.0, -3.0], [-2.0, 9.0], [4.0, 4.0]], dtype=torch.float64)
PINNED_SIGMAS = torch.tensor([10.0, 4.0, 1.6, 0.6, 0.2, 0.05, 0.0], dtype=torch.float64)
DIFFUSERS_OUTPUTS = [
    ('dpmpp_3m', {}, [1.735435652484368, -0.524291676778256, -0.582714392949784, 1.639024711625737, -0.202777363964625, 0.877952765436451]),
    ('dpmpp_3m', {'lower_order_final': False}, [1.546925758950552, -0.412621881495687, -0.517674569630295, 1.612364858693391, -0.173142724888365, 0.774763473443038]),
    ('dpmpp_2m', {}, [1.452576413352932, -0.33927036372319, -0.60720483786996, 1.382291014442938, -0.106337338134741, 0.804035647380474]),
    ('deis_tab', {'order': 2}, [1.272444587488149, -0.231154922914893, -0.564980448376532, 1.208519429854085, -0.085245500974613, 0.794647573810603]),
    ('deis_tab', {'order': 3}, [1.31873641923443, -0.262738426568002, -0.563933367142374, 1.267787037187021, -0.083869837255887, 0.816086843594755]),
    ('deis_tab', {'order': 3, 'lower_order_final': False}, [1.309532926706277, -0.256073942857359, -0.556548160237092, 1.279205751408929, -0.09148546507759, 0.744039044756611]),
    ('unipc_bh2', {'order': 2}, [1.506036076971393, -0.376750185090888, -0.590028402632264, 1.473738055495517, -0.11846912339473, 0.811127059007445]),
    ('unipc_bh2', {'order': 3}, [1.753030556973782, -0.54547348364622, -0.540962496185748, 1.698430205459065, -0.208311870166841, 0.898406781072227]),
    ('unipc_bh1', {'order': 3}, [1.895558025634872, -0.638168344067931, -0.530989416744953, 1.834110216133538, -0.250771444794195, 0.90458630538857]),
]


@pytest.mark.parametrize('name, opts, expected', DIFFUSERS_OUTPUTS)
def test_matches_stored_diffusers_values(name, opts, expected):
    """Each published solver equals the diffusers scheduler its docstring names, to round-off, on 6 steps of a
    3-component mixture from fixed starting points (the steps in float64 differ from these only by ~1e-15)."""
    out = SAMPLERS[name](PINNED_GM, PINNED_X.clone(), PINNED_SIGMAS, **opts)
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


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
    exact integrals of the Lagrange basis): the step with a full history must match the hand integral (that step
    is the one into the last sigma, which lower_order_final would take at first order)."""
    coeffs = [0.3, -0.5, 0.2, 0.07][:order]
    sigmas = torch.tensor([9.0, 4.0, 2.5, 1.1, 0.4, 0.0], dtype=torch.float64)[-(order + 2):]
    xs, _ = _states('deis_tab', _poly_denoiser(coeffs, 'log'), sigmas, order=order, lower_order_final=False)
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
    """eps_abm order 1: the corrector through the new and the current point (trapezoid-like, exact weights) is exact
    for eps linear in log sigma, where its order-1 predictor is not. The corrected state at sigma_1 is read back
    from the next predicted state: x_pred(sigma_2) = x_corr(sigma_1) + (sigma_2 - sigma_1) eps(sigma_1)."""
    coeffs = [0.3, -0.5]
    sigmas = torch.tensor([3.0, 0.8, 0.3, 0.0], dtype=torch.float64)
    xs, _ = _states('eps_abm', _poly_denoiser(coeffs, 'log'), sigmas, order=1, h_damp=math.inf)
    eps_1 = coeffs[0] + coeffs[1] * math.log(0.8)
    x_corr = xs[2] - (0.3 - 0.8) * eps_1
    exact = 0.7 + _integral_log_poly(coeffs, 0.8) - _integral_log_poly(coeffs, 3.0)
    assert x_corr == pytest.approx(exact, rel=1e-12)
    assert abs(xs[1] - exact) > 1e-3                         # the predictor alone is not exact: the corrector did it


def test_eps_abm_damping_scales_the_correction():
    """With damping the corrected state is x_pred + gamma (x_corr - x_pred), gamma = 1/(1 + (h/h_damp)^2), h the
    step in log sigma: checked on the step 3 -> 0.8 against the undamped (exact) correction."""
    coeffs = [0.3, -0.5]
    sigmas = torch.tensor([3.0, 0.8, 0.3, 0.0], dtype=torch.float64)
    eps = lambda s: coeffs[0] + coeffs[1] * math.log(s)
    x_pred = 0.7 + (0.8 - 3.0) * eps(3.0)                                 # the order-1 predictor (DDIM step)
    x_corr = 0.7 + _integral_log_poly(coeffs, 0.8) - _integral_log_poly(coeffs, 3.0)
    gamma = 1 / (1 + (math.log(3.0 / 0.8) / 0.9) ** 2)
    xs, _ = _states('eps_abm', _poly_denoiser(coeffs, 'log'), sigmas, order=1, h_damp=0.9)
    assert xs[2] - (0.3 - 0.8) * eps(0.8) == pytest.approx(x_pred + gamma * (x_corr - x_pred), rel=1e-12)


def test_eps_abm_final_correction():
    """final_correction=True returns D(x_pred) + (x_corr - x_pred) = x_corr - sigma_last eps at the last sigma:
    with eps linear in log sigma and order 1 the corrected state is exact, so the output is too."""
    coeffs = [0.3, -0.5]
    sigmas = torch.tensor([3.0, 0.8, 0.0], dtype=torch.float64)
    _, plain = _states('eps_abm', _poly_denoiser(coeffs, 'log'), sigmas, order=1, h_damp=math.inf)
    _, out = _states('eps_abm', _poly_denoiser(coeffs, 'log'), sigmas, order=1, h_damp=math.inf, final_correction=True)
    exact = 0.7 + _integral_log_poly(coeffs, 0.8) - _integral_log_poly(coeffs, 3.0)
    eps_1 = coeffs[0] + coeffs[1] * math.log(0.8)
    assert out.item() == pytest.approx(exact - 0.8 * eps_1, rel=1e-12)
    assert abs(plain.item() - (exact - 0.8 * eps_1)) > 1e-3           # the default returns D(x_pred)


def test_unipc_rejects_unsupported_order():
    gm = GaussianMixture.random(K=2, D=2, seed=0)
    with pytest.raises(ValueError, match='order'):
        SAMPLERS['unipc_bh2'](gm, torch.zeros(2, 2, dtype=torch.float64), karras_sigmas(5, 0.1, 10.).double(), order=4)


# ----------------------------------------------------------------------------------------------------
# schedule_search.py: a tool that tunes the sigmas of a sampler against the exact ODE of a mixture.

def test_exact_target_is_the_ode_solution_then_denoised_at_sigma_min():
    """search_sigmas' target is the PF-ODE solution from sigma_max to sigma_min followed by the final denoising step
    D(x, sigma_min) that every sampler takes; for one Gaussian both are closed forms (GaussianMixture.ode_solution,
    and D = mu + C (C + sigma^2 I)^-1 (x - mu)). At sigma_min = 0.05 and variances down to 0.01 the ODE end point
    itself, without D, is off by up to 20% of its distance to the mean."""
    from schedule_search import exact_ode_endpoints
    gm = GaussianMixture(torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[1.0, 0.1, 0.01]]))
    x_T = 80.0 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_end = gm.ode_solution(x_T, 80.0, 0.05)
    expected = gm.denoise(x_end, 0.05)
    torch.testing.assert_close(exact_ode_endpoints(gm, x_T, 80.0, 0.05), expected, rtol=0, atol=1e-7)
    assert (x_end - expected).abs().max() > 1e-3                     # the test can tell the two apart


def test_searched_schedule_beats_karras_on_held_out_noise():
    """At equal NFE (6 levels, dpmpp_2m) on a 2-D mixture, the searched schedule has a smaller error against the
    exact PF-ODE than Karras's (rho = 7) on noise the search never saw."""
    from schedule_search import exact_ode_endpoints, schedule_error, search_sigmas
    gm = GaussianMixture.random(K=3, D=2, seed=0)
    sigmas = search_sigmas(gm, 6, sampler='dpmpp_2m', n_paths=64, max_evals=200, tol=1e-8)
    assert len(sigmas) == 7 and sigmas[0] == 80.0 and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    x_test = 80.0 * torch.randn(128, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    target = exact_ode_endpoints(gm, x_test, 80.0, 0.002, tol=1e-8)
    karras = schedule_error(gm, x_test, target, karras_sigmas(6, 0.002, 80.0).double(), 'dpmpp_2m', {})
    searched = schedule_error(gm, x_test, target, sigmas, 'dpmpp_2m', {})
    assert searched < 0.8 * karras, (searched, karras)


def test_fit_gaussian_mixture_recovers_a_mixture():
    """EM on samples of a known 2-component mixture recovers its means and covariances (up to the order)."""
    from schedule_search import fit_gaussian_mixture
    true = GaussianMixture(torch.tensor([[-3.0, 0.0], [3.0, 1.0]]), torch.tensor([[0.5, 0.2], [0.3, 0.8]]),
                           torch.tensor([0.3, 0.7]))
    x, _ = true.sample(4000, generator=torch.Generator().manual_seed(0))
    fit = fit_gaussian_mixture(x, K=2, iters=50)
    order = fit.means[:, 0].argsort()
    torch.testing.assert_close(fit.means[order], true.means, atol=0.1, rtol=0)
    torch.testing.assert_close(fit.covs[order], true.covs, atol=0.1, rtol=0)
    torch.testing.assert_close(fit.weights[order], true.weights, atol=0.03, rtol=0)
