"""Tests of samplers.py on exact denoisers: convergence order against the closed-form probability-flow ODE of a
Gaussian, the DDIM/Euler/DDPM identities, the mixture's moments from every stochastic sampler, schedules and errors."""
import math

import pytest
import torch

from diffusion import DiscreteVP, GaussianMixture
from samplers import (SAMPLERS, STOCHASTIC, flow_sigmas, karras_sigmas, loglinear_sigmas, steps_for_nfe,
                      vp_continuous_sigmas, vp_sigmas)

GAUSS = GaussianMixture(torch.tensor([[0.5, -0.3]]), torch.tensor([[[1.0, 0.6], [0.6, 0.5]]]))


def ode_error(name, n, x_T, sigma_max=80.0, **kwargs):
    """Mean distance to the exact ODE solution from sigma_max down to sigma_min, followed by the same final
    denoising step every sampler takes to sigma = 0."""
    sigmas = karras_sigmas(n, 0.002, sigma_max).double()
    out = SAMPLERS[name](GAUSS, x_T.clone(), sigmas, **kwargs)
    ref = GAUSS.denoise(GAUSS.ode_solution(x_T, sigma_max, sigmas[-2].item()), sigmas[-2].item())
    return (out - ref).norm(dim=1).mean().item()


@pytest.mark.parametrize('name, order, kwargs', [('euler', 1, {}), ('ddim', 1, {}), ('heun', 2, {}), ('dpmpp_2m', 2, {}),
                                                  ('dpmpp_3m', 3, {}), ('dpmpp_3m', 2, dict(corrector=False))])
def test_convergence_order(name, order, kwargs):
    """Doubling the steps divides the global error by about 2^order (Euler 1st order, Heun and DPM-Solver++(2M)
    2nd, dpmpp_3m 3rd; without its corrector, i.e. with the published 3M coefficients, only 2nd)."""
    x_T = 80 * torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e32, e64, e128 = (ode_error(name, n, x_T, **kwargs) for n in (32, 64, 128))
    for ratio in (e32 / e64, e64 / e128):
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.4, (name, e32, e64, e128)


def test_the_3m_corrector_is_more_accurate():
    x_T = 80 * torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = [ode_error('dpmpp_3m', n, x_T, corrector=False) for n in (16, 32, 64)]
    corrected = [ode_error('dpmpp_3m', n, x_T) for n in (16, 32, 64)]
    assert all(c < 0.6 * p for c, p in zip(corrected, plain)), (plain, corrected)   # measured: 0.53, 0.32, 0.18


def test_ddim_eta0_is_euler_and_eta1_is_ddpm():
    gm = GaussianMixture.random(K=3, D=2, seed=0)
    sigmas = torch.tensor([50.0, 10.0, 2.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    x = sigmas[0] * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(SAMPLERS['ddim'](gm, x, sigmas, eta=0.0), SAMPLERS['euler'](gm, x, sigmas), atol=1e-10)
    runs = [SAMPLERS[name](gm, x, sigmas, generator=torch.Generator().manual_seed(2), **kw)
            for name, kw in [('ddim', dict(eta=1.0)), ('ddpm', {}), ('euler_ancestral', {})]]
    assert torch.allclose(runs[0], runs[1], atol=1e-10)
    assert torch.allclose(runs[0], runs[2], atol=1e-10)
    sde0 = SAMPLERS['dpmpp_2m_sde'](gm, x, sigmas, eta=0.0)
    assert torch.allclose(sde0, SAMPLERS['dpmpp_2m'](gm, x, sigmas), atol=1e-10)


def test_ddpm_step_is_the_exact_posterior_on_the_model_steps():
    """On two consecutive discrete steps of the linear schedule, one ddpm step draws from Ho et al.'s Eq. 6-7 posterior,
    computed here from the beta table in DDPM's own frame."""
    sched = DiscreteVP.linear(1000)
    i = 400
    sigmas = torch.stack([sched.sigmas[i], sched.sigmas[i - 1], torch.zeros((), dtype=torch.float64)])
    x0_hat = torch.tensor([[0.3, -0.7]], dtype=torch.float64).expand(50_000, 2)
    seen = []
    def denoiser(x, sigma):
        seen.append(x.clone())
        return x0_hat
    x = sigmas[0] * torch.randn(50_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    SAMPLERS['ddpm'](denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    a_t, a_prev = sched.alpha_bar[i], sched.alpha_bar[i - 1]
    beta = 1 - a_t / a_prev
    x_t = a_t.sqrt() * x
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0_hat + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    resid = a_prev.sqrt() * seen[1] - mean                    # the step's x_{t-1} in DDPM's frame, minus Eq. 7's mean
    beta_tilde = (1 - a_prev) / (1 - a_t) * beta
    assert resid.mean().abs().max().item() < 4 * math.sqrt(beta_tilde / 50_000)
    assert resid.var(0).numpy() == pytest.approx([beta_tilde.item()] * 2, rel=0.03)


@pytest.mark.parametrize('name, kwargs, steps', [
    ('ddpm', {}, 100),
    ('euler_ancestral', {}, 100),
    ('dpmpp_2m_sde', {}, 50),
    ('heun', dict(S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.0), 50),
    ('pc', {}, 100),
    ('euler', {}, 100),
    ('dpmpp_3m', {}, 20),
])
def test_samplers_reproduce_mixture_moments(name, kwargs, steps):
    """From exact noise, with the exact denoiser, samples have the mixture's mean and covariance."""
    gm = GaussianMixture.random(K=3, D=2, seed=4)
    g = torch.Generator().manual_seed(5)
    sigmas = karras_sigmas(steps, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(6000, 2, dtype=torch.float64, generator=g)
    if name in STOCHASTIC or kwargs:
        kwargs = dict(kwargs, generator=g)
    out = SAMPLERS[name](gm, x, sigmas, **kwargs)
    scale = gm.cov().diagonal().sqrt()
    assert ((out.mean(0) - gm.mean()).abs() / scale).max().item() < 0.08
    assert torch.allclose(torch.cov(out.T), gm.cov(), atol=0.1 * scale.max().item() ** 2)


def test_samplers_work_on_image_shaped_batches():
    gm = GaussianMixture(torch.zeros(1, 12), torch.ones(1))
    denoiser = lambda x, sigma, y=None: gm.denoise(x, sigma)   # conditions pass through as keywords
    sigmas = karras_sigmas(6, 0.01, 10.0).double()
    x = sigmas[0] * torch.randn(4, 3, 2, 2, dtype=torch.float64)
    for name, fn in SAMPLERS.items():
        out = fn(denoiser, x.clone(), sigmas, y=None, **({'generator': torch.Generator()} if name in STOCHASTIC else {}))
        assert out.shape == x.shape and torch.isfinite(out).all()


# ---- schedules -----------------------------------------------------------------------------------------

def test_sigma_schedules():
    k = karras_sigmas(10, 0.002, 80.0)
    assert len(k) == 11 and k[-1] == 0 and k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002)
    r = k[:-1].double() ** (1 / 7)
    assert torch.allclose(r.diff(), r.diff()[0].expand(9), rtol=1e-4)          # linear in sigma^(1/rho)
    ll = loglinear_sigmas(5, 0.01, 100.0)
    assert torch.allclose(ll[:-1].log().diff(), torch.full((4,), -math.log(10)), atol=1e-5)
    table = DiscreteVP.linear(1000).sigmas
    trailing, leading = vp_sigmas(table, 10, 'trailing'), vp_sigmas(table, 10, 'leading')
    assert trailing[0].item() == pytest.approx(table[-1].item(), rel=1e-6)        # starts at t = T (Lin et al. 2024)
    assert trailing[-2].item() == pytest.approx(table[99].item(), rel=1e-6)
    assert leading[0].item() == pytest.approx(table[900].item(), rel=1e-6) and leading[-2].item() == pytest.approx(table[0].item(), rel=1e-6)
    f1, f3 = flow_sigmas(8, shift=1.0), flow_sigmas(8, shift=3.0)
    t1 = f1[:-1] / (1 + f1[:-1])
    assert torch.allclose(t1.diff(), t1.diff()[0].expand(7), atol=1e-5)       # uniform in t
    assert (f3[1:-1] > f1[1:-1]).all()                                          # shift > 1 spends steps at high noise
    vc = vp_continuous_sigmas(4)
    assert vc[0].item() == pytest.approx(math.sqrt(math.expm1(10.05)), rel=1e-5)
    assert steps_for_nfe('heun', 35) == 18 and steps_for_nfe('euler', 10) == 10


# ---- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('sigmas, message', [
    (torch.tensor([1.0, 2.0, 0.0]), 'descending'),
    (torch.tensor([2.0, 1.0, 0.5]), 'end in 0'),
    (torch.tensor([[2.0, 0.0]]), '1-D'),
    (torch.tensor([2.0, -1.0, 0.0]), 'positive'),
    (torch.tensor([float('nan'), 1.0, 0.0]), 'finite'),
    ([2.0, 1.0, 0.0], '1-D tensor'),
])
def test_malformed_sigmas_are_rejected(sigmas, message):
    for fn in SAMPLERS.values():
        with pytest.raises(ValueError, match=message):
            fn(lambda x, s: x, torch.zeros(2, 3), sigmas)


def test_mismatched_shapes_are_rejected():
    sigmas = karras_sigmas(3, 0.1, 1.0)
    with pytest.raises(ValueError, match='shaped like x'):
        SAMPLERS['heun'](lambda x, s: x[:, :1], torch.zeros(2, 3), sigmas)
    with pytest.raises(ValueError, match='batch'):
        SAMPLERS['euler'](lambda x, s: x, torch.zeros(3), sigmas)
