"""Tests of samplers.py on exact denoisers: convergence order against the closed-form probability-flow ODE of a
Gaussian, the DDIM/Euler/DDPM identities, the mixture's moments from every stochastic sampler, schedules and errors."""
import inspect
import math

import numpy as np
import pytest
import torch

from diffusion import DiscreteVP, GaussianMixture
from samplers import (SAMPLERS, SIGMA_SCHEDULES, flow_sigmas, is_stochastic, karras_sigmas, loglinear_sigmas,
                      sampler_options, steps_for_nfe, vp_continuous_sigmas, vp_sigmas)

GAUSS = GaussianMixture(torch.tensor([[0.5, -0.3]]), torch.tensor([[[1.0, 0.6], [0.6, 0.5]]]))


def ode_error(name, n, x_T, sigma_max=80.0, **kwargs):
    """Mean distance to the exact ODE solution from sigma_max down to sigma_min, followed by the same final
    denoising step every sampler takes to sigma = 0."""
    sigmas = karras_sigmas(n, 0.002, sigma_max).double()
    out = SAMPLERS[name](GAUSS, x_T.clone(), sigmas, **kwargs)
    ref = GAUSS.denoise(GAUSS.ode_solution(x_T, sigma_max, sigmas[-2].item()), sigmas[-2].item())
    return (out - ref).norm(dim=1).mean().item()


@pytest.mark.parametrize('name, order, steps', [('euler', 1, (32, 64, 128)), ('ddim', 1, (32, 64, 128)),
                                                 ('heun', 2, (32, 64, 128)), ('dpmpp_2m', 2, (32, 64, 128)),
                                                 ('dpmpp_3m', 2, (128, 256, 512)), ('dpmpp_3m_corrected', 3, (32, 64, 128))])
def test_convergence_order(name, order, steps):
    """Doubling the steps divides the global error by about 2^order (Euler 1st order, Heun and DPM-Solver++(2M)
    2nd, the published DPM-Solver++(3M) only 2nd (its second difference gets half the exact integral; its ratio
    reaches 4 only from ~128 steps on the Karras schedule), our corrected 3M 3rd)."""
    x_T = 80 * torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e1, e2, e3 = (ode_error(name, n, x_T) for n in steps)
    for ratio in (e1 / e2, e2 / e3):
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.4, (name, e1, e2, e3)


def kdiffusion_3m_eta0(denoiser, x, sigmas):
    """DPM-Solver++(3M) written independently in the variables of k-diffusion's sample_dpmpp_3m_sde with eta = 0
    (r0, r1, d1_0, d1_1, d1, d2, phi_2, phi_3), which follows the DPM-Solver reference code's multistep update."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i].expand(x.shape[0]))
        if sigmas[i + 1] == 0:
            return denoised
        h = (sigmas[i] / sigmas[i + 1]).log()
        x = torch.exp(-h) * x - torch.expm1(-h) * denoised
        phi_2 = torch.expm1(-h) / h + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


@pytest.mark.parametrize('steps', [5, 8, 32])
def test_dpmpp_3m_is_the_published_method(steps):
    """The name promises the published DPM-Solver++(3M): with lower_order_final=False it agrees with k-diffusion's
    form to round-off (the variant that halves the whole second-difference term, not only its I2 part, differs by
    ~0.04 on this mixture); from 15 steps on the default is the same method, below it lowers the last step's order
    (its equality with diffusers is tests/test_solvers.py::test_matches_stored_diffusers_values)."""
    gm = GaussianMixture.random(K=3, D=2, seed=0)
    sigmas = karras_sigmas(steps, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kdiff = kdiffusion_3m_eta0(gm, x, sigmas)
    torch.testing.assert_close(SAMPLERS['dpmpp_3m'](gm, x, sigmas, lower_order_final=False), kdiff, rtol=0, atol=1e-10)
    default = SAMPLERS['dpmpp_3m'](gm, x, sigmas)
    if steps >= 15:
        torch.testing.assert_close(default, kdiff, rtol=0, atol=1e-10)
    else:
        assert (default - kdiff).abs().max() > 1e-3


def test_where_the_published_3m_and_the_corrected_3m_win():
    """On this Gaussian the published 3M is more accurate at 32 steps; the corrected variant at 16 and from 64
    (measured: 2.44e-2 vs 1.39e-2, 1.30e-3 vs 2.73e-3, then 6.06e-4 vs 3.73e-4 and 1.80e-4 vs 4.84e-5)."""
    x_T = 80 * torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    published = [ode_error('dpmpp_3m', n, x_T) for n in (16, 32, 64, 128)]
    corrected = [ode_error('dpmpp_3m_corrected', n, x_T) for n in (16, 32, 64, 128)]
    assert corrected[0] < 0.7 * published[0] and published[1] < 0.6 * corrected[1], (published, corrected)
    assert corrected[2] < 0.7 * published[2] and corrected[3] < 0.35 * published[3], (published, corrected)


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
    ('dpmpp_3m_corrected', {}, 20),
])
def test_samplers_reproduce_mixture_moments(name, kwargs, steps):
    """From exact noise, with the exact denoiser, samples have the mixture's mean and covariance (a coarse check of
    multimodal sampling; the noise scales are pinned down by test_stochastic_samplers_reach_the_exact_gaussian and
    test_pc_langevin_corrector_reaches_p_sigma, which this one is too loose to replace)."""
    gm = GaussianMixture.random(K=3, D=2, seed=4)
    g = torch.Generator().manual_seed(5)
    sigmas = karras_sigmas(steps, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(6000, 2, dtype=torch.float64, generator=g)
    if is_stochastic(name, kwargs):
        kwargs = dict(kwargs, generator=g)
    out = SAMPLERS[name](gm, x, sigmas, **kwargs)
    scale = gm.cov().diagonal().sqrt()
    assert ((out.mean(0) - gm.mean()).abs() / scale).max().item() < 0.08
    assert torch.allclose(torch.cov(out.T), gm.cov(), atol=0.1 * scale.max().item() ** 2)


def gaussian_denoiser(mu, C):
    """The exact denoiser of N(mu, C), mu + C (C + sigma^2 I)^-1 (x - mu), in the eigenbasis of C (fast: no mixture)."""
    lam, U = torch.linalg.eigh(C)
    return lambda x, sigma: mu + ((x - mu) @ U * lam / (lam + sigma[:, None] ** 2)) @ U.T


def whitened_moments(out, mu, C):
    """Mean and covariance eigenvalues of C^(-1/2) (out - mu): 0 and 1 for exact samples."""
    L = torch.linalg.cholesky(C)
    w = torch.linalg.solve_triangular(L, (out - mu).T, upper=False).T
    return w.mean(0), torch.linalg.eigvalsh(torch.cov(w.T))


@pytest.mark.parametrize('name, kwargs, low, high', [
    ('ddpm', {}, 0.82, 1.05),                        # measured 0.88, 0.93 (first-order bias of the ancestral step)
    ('ddim', dict(eta=1.0), 0.82, 1.05),             # the same chain as ddpm
    ('euler_ancestral', {}, 0.82, 1.05),             # 0.88, 0.93; with s_noise = 1.2: 1.27, 1.35
    ('dpmpp_2m_sde', {}, 0.93, 1.10),                # 1.01, 1.05; with s_noise = 0.8: 0.64, 0.67
    ('heun', dict(S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.0), 0.93, 1.10),      # 1.04, 1.06
    ('pc', {}, 0.93, 1.10),                          # 1.01, 1.06
])
def test_stochastic_samplers_reach_the_exact_gaussian(name, kwargs, low, high):
    """From exact noise with the exact denoiser of a 2-D Gaussian, 100 steps: whitened samples have mean 0 and
    covariance eigenvalues in [low, high] around 1. The bands are tight enough that the noise scale matters:
    a wrong s_noise (1.2 in euler_ancestral, 0.8 in dpmpp_2m_sde) moves the variance by over 30%."""
    mu, C = torch.tensor([0.5, -0.3], dtype=torch.float64), torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    sigmas = karras_sigmas(100, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(10_000, 2, dtype=torch.float64, generator=g)
    out = SAMPLERS[name](gaussian_denoiser(mu, C), x, sigmas, generator=g, **kwargs)
    mean, eig = whitened_moments(out, mu, C)
    assert mean.abs().max() < 0.05, (name, mean)
    assert low < eig.min() and eig.max() < high, (name, eig)


def test_pc_langevin_corrector_reaches_p_sigma():
    """The corrector alone (Song et al. 2021, Alg. 4) is Langevin dynamics at a fixed sigma: started from the wrong
    distribution, 300 steps bring x to p_sigma = N(mu, C + sigma^2 I); callback shows x after step 0's corrector.
    Its stationary variance is exact up to the step bias (1 - eps / (2 v))^-1 ~ 1.03 here; noise sqrt(eps) instead
    of sqrt(2 eps) would halve it, and snr = 0 (no corrector) leaves the starting variance, 3x too large."""
    mu, C = torch.tensor([0.5, -0.3], dtype=torch.float64), torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    sigma = 1.0
    target = C + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    wrong_start = mu + 1.0 + torch.randn(4000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(3 * target).T
    sigmas = torch.tensor([sigma * (1 + 1e-9), sigma, 0.0], dtype=torch.float64)   # a negligible predictor step
    states = []
    SAMPLERS['pc'](gaussian_denoiser(mu, C), wrong_start, sigmas, snr=0.16, n_corrector=300, generator=g,
                   callback=lambda info: states.append(info['x']))
    mean, eig = whitened_moments(states[1], mu, target)
    assert mean.abs().max() < 0.1, mean
    assert 0.93 < eig.min() and eig.max() < 1.12, eig          # measured 1.00, 1.07; snr = 0 gives 2.95, 3.06


def test_image_shaped_batches_and_conditioning():
    """A sampler treats each sample as one vector: on (N, 3, 2, 2) images it gives exactly what it gives on the same
    numbers as (N, 12) vectors, and `cond` reaches the network: passing labels through cond equals closing over them."""
    gm = GaussianMixture(torch.stack([torch.full((12,), -1.0), torch.full((12,), 1.0)]).double(), torch.tensor([0.3, 0.5]))
    labels = torch.tensor([0, 1, 1, 0])
    on_images = lambda x, sigma, y: gm(x.reshape(x.shape[0], -1), sigma, y=y).reshape(x.shape)
    on_vectors = lambda x, sigma: gm(x, sigma, y=labels)
    sigmas = karras_sigmas(6, 0.01, 10.0).double()
    x = sigmas[0] * torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, fn in SAMPLERS.items():
        seeded = lambda: {'generator': torch.Generator().manual_seed(1)} if is_stochastic(name) else {}
        images = fn(on_images, x, sigmas, cond={'y': labels}, **seeded())
        vectors = fn(on_vectors, x.reshape(4, 12), sigmas, **seeded())
        torch.testing.assert_close(images.reshape(4, 12), vectors, rtol=0, atol=1e-12, msg=name)
        assert (vectors.mean(1) * (2 * labels - 1) > 0.5).all(), name          # each sample went to its class


# ---- the sampler interface -------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(SAMPLERS))
def test_unknown_options_raise_and_name_the_option(name):
    """Options are keyword arguments of each sampler; nothing is passed on to the network by mistake."""
    sigmas = karras_sigmas(3, 0.1, 1.0)
    never = lambda x, sigma, **cond: pytest.fail(f'{name} called the network despite a bad option {cond}')
    with pytest.raises(TypeError, match='bogus_option'):
        SAMPLERS[name](never, torch.zeros(2, 3), sigmas, bogus_option=1)
    with pytest.raises(TypeError, match="'y'"):                      # conditioning belongs in cond=
        SAMPLERS[name](never, torch.zeros(2, 3), sigmas, y=torch.zeros(2))
    if not is_stochastic(name, {}) and name not in ('ddim', 'heun', 'euler_ancestral', 'dpmpp_2m_sde'):
        with pytest.raises(TypeError, match='generator'):             # deterministic solvers take no generator
            SAMPLERS[name](never, torch.zeros(2, 3), sigmas, generator=torch.Generator())
    with pytest.raises(TypeError, match='bogus_option'):
        is_stochastic(name, {'bogus_option': 1})
    with pytest.raises(TypeError, match='cond must be a dict'):
        SAMPLERS[name](never, torch.zeros(2, 3), sigmas, cond=torch.zeros(2))


def test_sampler_options_and_is_stochastic():
    assert sampler_options('heun') == {'S_churn': 0.0, 'S_tmin': 0.0, 'S_tmax': math.inf, 'S_noise': 1.0}
    assert sampler_options('ddim') == {'eta': 0.0} and sampler_options('euler') == {}
    assert sampler_options('pc') == {'snr': 0.16, 'n_corrector': 1}
    assert {n for n in SAMPLERS if is_stochastic(n)} == {'ddpm', 'euler_ancestral', 'dpmpp_2m_sde', 'pc'}
    assert is_stochastic('heun', {'S_churn': 40}) and is_stochastic('ddim', {'eta': 1.0})
    assert not is_stochastic('euler_ancestral', {'eta': 0.0}) and not is_stochastic('dpmpp_2m_sde', {'eta': 0.0})
    with pytest.raises(ValueError, match='unknown sampler'):
        sampler_options('eulr')
    # every sampler that can draw noise takes generator=, and nothing else does
    for name, fn in SAMPLERS.items():
        takes = 'generator' in inspect.signature(fn).parameters
        assert takes == (name in ('ddpm', 'ddim', 'heun', 'euler_ancestral', 'dpmpp_2m_sde', 'pc')), name


@pytest.mark.parametrize('name, options', [(n, {}) for n in SAMPLERS] + [('heun', {'S_churn': 10.0}),
                                                                         ('ddim', {'eta': 1.0})])
def test_callback_sees_every_step(name, options):
    """callback(info) once per step, in order, with sigma = sigmas[i], sigma_next = sigmas[i + 1], x the state at
    the start of the step and denoised the denoiser's output that step uses; the final step returns it."""
    gm = GaussianMixture.random(K=3, D=2, seed=1)
    calls = []                                                       # every denoiser call: (sigma, x, output)

    def recording(x, sigma):
        out = gm(x, sigma)
        calls.append((sigma[0].item(), x.clone(), out.clone()))
        return out

    sigmas = karras_sigmas(7, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    infos = []
    kwargs = dict(options, generator=torch.Generator().manual_seed(1)) if is_stochastic(name, options) else options
    out = SAMPLERS[name](recording, x, sigmas, callback=lambda info: infos.append(dict(info, x=info['x'].clone())), **kwargs)
    assert [info['i'] for info in infos] == list(range(7))
    assert all(info['sigma'] == sigmas[i] and info['sigma_next'] == sigmas[i + 1] for i, info in enumerate(infos))
    torch.testing.assert_close(infos[0]['x'], x, rtol=0, atol=0)
    for info in infos:
        sigma = info.get('sigma_hat', info['sigma'].item())          # Heun with churn evaluates at sigma_hat
        outputs = [o for s, _, o in calls if s == pytest.approx(sigma, rel=1e-12)]
        assert any(torch.equal(info['denoised'], o) for o in outputs), (name, info['i'])
        if name != 'dpmpp_3m_corrected' and 'sigma_hat' not in info:  # they evaluate at the state x itself
            torch.testing.assert_close(info['denoised'], gm(info['x'], info['sigma'].expand(16)), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, infos[-1]['denoised'], rtol=0, atol=1e-12)   # the step to 0 returns D


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


@pytest.mark.parametrize('spacing', ['trailing', 'leading', 'linspace'])
def test_vp_sigmas_every_step_count(spacing):
    """Every n in 1..T gives exactly n of the model's levels, strictly descending, then 0, so every sampler accepts
    them; the indices are the published formulas, computed here with one float64 division per index (exact: a tie
    x.5 is representable and any other quotient is at least 1/(2n) away from one, so numpy's round-half-even cannot
    be misled). The float ramp arange(T, 0, -T/n), which accumulates rounding, gave n + 1 levels for 62 of these n."""
    T = 1000
    table = DiscreteVP.linear(T).sigmas
    for n in range(1, T + 1):
        i = np.arange(n)
        if spacing == 'trailing':          # Lin et al. 2024, Table 2: round(T - i T / n) - 1
            expected = np.round(T * (n - i) / n) - 1
        elif spacing == 'leading':         # DDIM's i * (T // n), counted down (SD adds steps_offset 1)
            expected = (n - 1 - i) * (T // n)
        else:                              # round(linspace(T - 1, 0, n))
            expected = np.round((T - 1) * (n - 1 - i) / (n - 1)) if n > 1 else np.array([T - 1])
        sigmas = vp_sigmas(table, n, spacing)
        assert len(sigmas) == n + 1 and sigmas[-1] == 0, n
        assert torch.equal(sigmas[:-1], table[torch.from_numpy(expected.astype(np.int64))].float()), n
        assert (sigmas[1:] < sigmas[:-1]).all(), n
    assert vp_sigmas(table, 61, 'trailing')[0] == vp_sigmas(table, 1, 'trailing')[0]    # starts at t = T
    with pytest.raises(ValueError, match='1 <= n <= T'):
        vp_sigmas(table, T + 1, spacing)


def test_leading_spacing_with_stable_diffusions_offset():
    """Stable Diffusion's 50 DDIM steps are t = 981, 961, ..., 21, 1 (CompVis make_ddim_timesteps: range(0, 1000, 20)
    + 1; diffusers' DDIMScheduler with steps_offset=1); steps_offset=0 is DDIM's 980, ..., 20, 0."""
    table = DiscreteVP.linear(1000).sigmas
    sd = vp_sigmas(table, 50, 'leading', steps_offset=1)
    torch.testing.assert_close(sd[:-1], table[torch.arange(981, 0, -20)].float(), rtol=0, atol=0)
    torch.testing.assert_close(vp_sigmas(table, 50, 'leading')[:-1], table[torch.arange(980, -1, -20)].float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match='outside'):
        vp_sigmas(table, 1000, 'leading', steps_offset=1)
    with pytest.raises(ValueError, match="'leading' spacing only"):
        vp_sigmas(table, 50, 'trailing', steps_offset=1)


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
