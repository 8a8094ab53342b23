"""Tests of diffusion.py against closed forms: published schedule values, the DDPM moments, round trips between
parameterisations, losses at the exact denoiser, the variational bound, noise-level samplers, and the mixture oracle."""
import math

import numpy as np
import pytest
import torch

from diffusion import (PREDICTIONS, ContinuousVP, Diffusion, DiscreteVP, EDMSchedule, FlowSchedule, GaussianMixture,
                       ImportanceSampler, bits_per_dim, cosine_alpha_bar, discretized_gaussian_log_likelihood,
                       linear_alpha_bar, low_discrepancy_u, normal_kl, preconditioning, prior_kl,
                       training_target, uniform_u, vlb_terms)

SCHEDULE_MAKERS = {'linear': lambda: DiscreteVP.linear(1000), 'cosine': lambda: DiscreteVP.cosine(1000),
                   'vp': ContinuousVP, 'edm': EDMSchedule, 'flow': FlowSchedule}


def sigma_of_c_noise(schedule, c_noise):
    """Invert each schedule's published c_noise (the number the network sees) back to sigma, written independently of
    diffusion.py: DDPM's step index (its code feeds t - 1; fractional indices interpolate log sigma), continuous VP
    (M - 1) t with M = 1000 (Karras et al. Table 1), EDM ln(sigma) / 4 (Table 1), flow 1000 t with t = sigma / (1 + sigma)."""
    c = c_noise.double()
    if isinstance(schedule, DiscreteVP):
        log_sigmas = schedule.sigmas.log().numpy()
        return torch.from_numpy(np.exp(np.interp(c.numpy(), np.arange(len(log_sigmas)), log_sigmas)))
    if isinstance(schedule, ContinuousVP):
        t = c / 999
        return torch.expm1(0.5 * 19.9 * t ** 2 + 0.1 * t).sqrt()
    if isinstance(schedule, EDMSchedule):
        return torch.exp(4 * c)
    t = c / 1000
    return t / (1 - t)


def oracle_net(denoiser, diffusion):
    """The network whose output makes diffusion.denoise_with equal `denoiser` exactly: F = (D - c_skip x) / c_out. Like a
    real network it sees only c_in x and c_noise, and recovers sigma from c_noise (sigma_of_c_noise), so a wrong c_noise
    mapping, or a wrong c_in, makes it answer for the wrong noise level."""
    def net(x_in, c_noise, **cond):
        sigma = sigma_of_c_noise(diffusion.schedule, c_noise)
        c_skip, c_out, c_in = (c[:, None] for c in diffusion.preconditioning(sigma))
        x = x_in / c_in
        return (denoiser(x, sigma, **cond) - c_skip * x) / c_out
    return net


# ---- schedules ----------------------------------------------------------------------------------------

def test_linear_schedule_published_values():
    # Ho et al. 2020: betas 1e-4..0.02 over T=1000; the final alpha_bar is 4.036e-5 (sigma_max = 157.4)
    s = DiscreteVP.linear(1000)
    assert s.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert s.sigma_max == pytest.approx(157.407, rel=1e-4)
    assert s.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-9)
    # T=2000 with betas scaled by 1000/T reaches about the same final noise level
    assert linear_alpha_bar(2000)[-1].item() == pytest.approx(4.0358e-5, rel=0.05)


def test_cosine_schedule_matches_its_formula_and_clip():
    T, s = 1000, 0.008
    abar = cosine_alpha_bar(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in [1, 100, 500, 900]:
        assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    betas = 1 - abar[1:] / abar[:-1]
    assert betas.max().item() == pytest.approx(0.999, abs=1e-12)   # the clip of Nichol & Dhariwal Sec. 3.2


def test_continuous_vp_inverse_and_range():
    s = ContinuousVP()
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    assert torch.allclose(s.t_of_sigma(s.sigma_of_t(t)), t, atol=1e-9)
    assert s.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-12)


def test_discrete_noise_level_is_the_step_index():
    s = DiscreteVP.cosine(1000)
    idx = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.allclose(s.noise_level(s.sigmas[idx]), idx.double(), atol=1e-6)
    # uniform u in [0, 1) lands on every step equally often
    sig = s.sigma(torch.arange(1000, dtype=torch.float64) / 1000 + 1e-4)
    assert torch.equal(sig, s.sigmas)


def test_lognormal_and_logit_normal_quantiles():
    u = torch.tensor([0.5, 0.8413447460685429], dtype=torch.float64)    # the median and +1 standard deviation
    edm = EDMSchedule(P_mean=-1.2, P_std=1.2).sigma(u)
    assert torch.allclose(edm.log(), torch.tensor([-1.2, 0.0], dtype=torch.float64), atol=1e-6)
    flow = FlowSchedule(logit_mean=0.0, logit_std=1.0).sigma(u).double()
    t = flow / (1 + flow)
    assert torch.allclose(torch.logit(t), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-5)


# ---- the forward process -------------------------------------------------------------------------------

@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0', 'flow'])
def test_q_sample_moments(prediction):
    """Monte Carlo moments of x_t: sqrt(abar) x0 and 1 - abar for VP (Ho et al. Eq. 4); (1-t) x0 and t^2 for flow."""
    diff = Diffusion('linear', prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for i in [0, 250, 600, 999]:
        sigma = diff.schedule.sigmas[i]
        x_t = diff.q_sample(x0, sigma, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        if prediction == 'flow':
            t = sigma / (1 + sigma)
            mean, var = (1 - t) * 0.7, t ** 2
        else:
            abar = diff.schedule.alpha_bar[i]
            mean, var = abar.sqrt() * 0.7, 1 - abar
        assert x_t.mean().item() == pytest.approx(mean.item(), abs=4 * math.sqrt(var / 2e5) + 1e-12)
        assert x_t.var().item() == pytest.approx(var.item(), rel=0.02, abs=1e-12)


# ---- parameterisations ---------------------------------------------------------------------------------

@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_target_round_trip(prediction):
    """target = (x0 - c_skip x) / c_out in closed form, and D(target) gives back x0 exactly (Karras Eq. 7-8)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-2.5, 2.5, 64, dtype=torch.float64)
    x = x0 + sigma[:, None] * noise
    F = training_target(x0, noise, sigma, prediction)
    c_skip, c_out, _ = (c[:, None] for c in preconditioning(sigma, prediction))
    assert torch.allclose(F, (x0 - c_skip * x) / c_out, rtol=1e-9, atol=1e-9)
    assert torch.allclose(c_skip * x + c_out * F, x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('prediction, expected', [
    # (c_skip, c_out, c_in) at sigma = 1 and sigma = 3 (sigma_data = 0.5), worked out by hand from the papers:
    # EDM (Karras et al. 2022, Table 1): sd^2 / (s^2 + sd^2), s sd / sqrt(s^2 + sd^2), 1 / sqrt(s^2 + sd^2)
    ('edm', [(0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)), (0.25 / 9.25, 1.5 / math.sqrt(9.25), 1 / math.sqrt(9.25))]),
    # eps (DDPM, Table 1's VP column): 1, -s, 1 / sqrt(1 + s^2)
    ('eps', [(1.0, -1.0, 1 / math.sqrt(2)), (1.0, -3.0, 1 / math.sqrt(10))]),
    ('x0', [(0.0, 1.0, 1 / math.sqrt(2)), (0.0, 1.0, 1 / math.sqrt(10))]),
    # v (Salimans & Ho 2022): x0 = alpha z - sigma_vp v, alpha = 1/sqrt(1+s^2), z = alpha x  ->  1/(1+s^2), -s/sqrt(1+s^2)
    ('v', [(0.5, -1 / math.sqrt(2), 1 / math.sqrt(2)), (0.1, -3 / math.sqrt(10), 1 / math.sqrt(10))]),
    # flow: t = s/(1+s) (0.5 and 0.75), x_t = (1-t) x, x0 = x_t - t v  ->  1 - t, -t, 1 - t
    ('flow', [(0.5, -0.5, 0.5), (0.25, -0.75, 0.25)]),
])
def test_preconditioning_matches_the_published_table(prediction, expected):
    got = preconditioning(torch.tensor([1.0, 3.0], dtype=torch.float64), prediction, sigma_data=0.5)
    for k, name in enumerate(('c_skip', 'c_out', 'c_in')):
        assert got[k].tolist() == pytest.approx([e[k] for e in expected], rel=1e-12), name


def test_noise_levels_match_the_published_c_noise():
    """c_noise at hand-picked points: DDPM's step index (t - 1 in its code), continuous VP 999 t (Table 1, M = 1000),
    EDM ln(sigma) / 4 (Table 1), flow 1000 t with t = sigma / (1 + sigma)."""
    ddpm = DiscreteVP.linear(1000)
    assert ddpm.noise_level(ddpm.sigmas[[0, 499, 999]]).tolist() == pytest.approx([0, 499, 999], abs=1e-9)
    vp = ContinuousVP()
    sigma_half = math.sqrt(math.expm1(0.5 * 19.9 * 0.25 + 0.05))          # sigma(t = 0.5)
    assert vp.noise_level(torch.tensor([sigma_half], dtype=torch.float64)).item() == pytest.approx(499.5, rel=1e-12)
    assert EDMSchedule().noise_level(torch.tensor([math.e ** 2])).item() == pytest.approx(0.5, rel=1e-6)
    assert FlowSchedule().noise_level(torch.tensor([3.0])).item() == pytest.approx(750.0, rel=1e-6)


def test_conversions_between_predictions():
    """eps, v and x0 describe the same estimate: eps = (x - x0)/sigma, v = alpha eps - sigma_vp x0 (Salimans & Ho)."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-2, 2, 32, dtype=torch.float64)[:, None]
    alpha, sigma_vp = (1 + sigma ** 2).rsqrt(), sigma * (1 + sigma ** 2).rsqrt()
    eps = training_target(x0, noise, sigma[:, 0], 'eps')
    v = training_target(x0, noise, sigma[:, 0], 'v')
    assert torch.allclose(v, alpha * eps - sigma_vp * x0, atol=1e-12)
    x_t = alpha * x0 + sigma_vp * noise                      # DDPM's frame
    assert torch.allclose(alpha * x_t - sigma_vp * v, x0, atol=1e-12)         # x0 from v
    assert torch.allclose(sigma_vp * x_t + alpha * v, eps, atol=1e-12)        # eps from v


@pytest.mark.parametrize('schedule', list(SCHEDULE_MAKERS))
@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_loss_is_zero_for_the_exact_network_on_a_point_mass(prediction, schedule):
    """A point mass has a deterministic denoiser, so the network that outputs the exact answer has zero loss."""
    point = GaussianMixture(torch.tensor([[0.3, -0.6, 0.9]]), torch.zeros(1))
    diff = Diffusion(SCHEDULE_MAKERS[schedule](), prediction)
    g = torch.Generator().manual_seed(3)
    sigma, _, _ = diff.sample_sigma(256, g)
    net = oracle_net(point, diff)
    x0 = point.means.expand(256, 3).clone()
    loss, _ = diff.loss(net, x0, sigma=sigma.double(), generator=g)
    assert loss.max().item() < 1e-12 * (1 + diff.x0_weight(sigma.double()).max().item())


@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_loss_of_the_exact_network_equals_the_posterior_variance(prediction):
    """For Gaussian data N(mu, diag(lam)) the exact denoiser leaves E||D - x0||^2 = sum lam sigma^2/(lam + sigma^2),
    so the expected loss is that times lambda(sigma) = 1/c_out^2 (Karras et al. Eq. 8), per dimension."""
    lam = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    gauss = GaussianMixture(torch.tensor([[0.5, -1.0, 0.0]]), lam[None])
    diff = Diffusion('linear', prediction)
    g = torch.Generator().manual_seed(4)
    for sigma_value in [0.05, 0.7, 3.0]:
        n = 40_000
        sigma = torch.full((n,), sigma_value, dtype=torch.float64)
        net = oracle_net(gauss, diff)
        x0, _ = gauss.sample(n, generator=g)
        loss, _ = diff.loss(net, x0, sigma=sigma, generator=g)
        expected = diff.x0_weight(sigma[:1]).item() * (lam * sigma_value ** 2 / (lam + sigma_value ** 2)).mean().item()
        assert loss.mean().item() == pytest.approx(expected, rel=0.03)


def test_denoise_rejects_mismatched_sigma():
    diff = Diffusion('edm', 'edm')
    with pytest.raises(ValueError, match='sigma must be a scalar or have shape'):
        diff.denoise_with(lambda x, c: x, torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match='unknown prediction'):
        Diffusion('linear', 'epsilon')
    with pytest.raises(ValueError, match='importance'):
        Diffusion('edm', 'edm', t_sampler='importance')


# ---- the variational bound -----------------------------------------------------------------------------

def test_vlb_kl_matches_ddpm_posterior_in_the_unscaled_frame():
    """The sigma-frame KL equals Ho et al.'s KL(q(x_{t-1}|x_t,x0) || p) computed from the betas in DDPM's own frame."""
    sched = DiscreteVP.linear(1000)
    abar = sched.alpha_bar
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([1, 2, 10, 300, 700, 999])
    wrong = lambda x, sigma: 0.8 * x0 + 0.1                 # an imperfect denoiser, so the KL is not zero
    ours = vlb_terms(wrong, x0, sched, index, noise, variance='beta')
    for n, i in enumerate(index.tolist()):
        a_t, a_prev, b = abar[i], abar[i - 1], betas[i]
        x_t = a_t.sqrt() * x0[n] + (1 - a_t).sqrt() * noise[n]
        coef0, coef_t = a_prev.sqrt() * b / (1 - a_t), (1 - b).sqrt() * (1 - a_prev) / (1 - a_t)   # Eq. 7
        var_q = (1 - a_prev) / (1 - a_t) * b
        kl = normal_kl(coef0 * x0[n] + coef_t * x_t, var_q, coef0 * (0.8 * x0[n] + 0.1) + coef_t * x_t, b).sum()
        assert ours[n].item() == pytest.approx(kl.item(), rel=1e-6)
    # with the posterior variance the KL is 1/2 (SNR_{i-1} - SNR_i) ||x0 - D||^2 (Kingma et al. 2021, Eq. 13)
    post = vlb_terms(wrong, x0, sched, index, noise, variance='posterior')
    snr = sched.sigmas ** -2
    expected = 0.5 * (snr[index - 1] - snr[index]) * ((x0 - (0.8 * x0 + 0.1)) ** 2).sum(1)
    assert torch.allclose(post, expected, rtol=1e-6)


@pytest.mark.parametrize('variance', ['posterior', 'beta'])
def test_bits_per_dim_is_iddpms_bound_term_by_term(variance):
    """Every term of the bound, the decoder included, equals improved-diffusion's _vb_terms_bpd written here from its
    formulas in DDPM's unscaled frame on a tiny case (T = 6 linear betas, 8-bit data, an imperfect x0 model):
    posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t), the model log-variance
    log(append(posterior_variance[1], posterior_variance[1:])) ('fixedsmall') or
    log(append(posterior_variance[1], betas[1:])) ('fixedlarge'), the decoder at t = 0 the discretized Gaussian with
    log_scales = 0.5 log-variance, i.e. std sqrt(posterior_variance[1]), not sqrt(beta_1) (0.21 nats per dimension
    apart here). The exact normal CDF is used on both sides (the reference code approximates it with a tanh)."""
    T = 6
    betas = torch.linspace(0.02, 0.3, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    log_var = torch.log(torch.cat([post_var[1:2], post_var[1:] if variance == 'posterior' else betas[1:]]))
    coef_x0, coef_xt = betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    sched = DiscreteVP(abar)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (T, 5), generator=g).double() / 127.5 - 1
    x0[0, :2] = torch.tensor([-1.0, 1.0])                          # the stretched end bins too
    noise = torch.randn(T, 5, generator=g, dtype=torch.float64)
    model = lambda x: 0.9 * x.tanh() + 0.03                         # an imperfect x0 prediction from x (any frame)
    ours = vlb_terms(lambda x, sigma: model(x), x0, sched, torch.arange(T), noise, variance=variance)
    Phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    for t in range(T):
        x_t = abar[t].sqrt() * x0[t] + (1 - abar[t]).sqrt() * noise[t]       # q_sample
        x0_hat = model(x_t / abar[t].sqrt())                              # the same model on the sigma-frame input
        mean = coef_x0[t] * x0_hat + coef_xt[t] * x_t                     # p_mean_variance: q_posterior at x0_hat
        if t == 0:                                                        # discretized_gaussian_log_likelihood
            inv_std = torch.exp(-0.5 * log_var[0])
            cdf_plus, cdf_min = Phi((x0[t] - mean + 1 / 255) * inv_std), Phi((x0[t] - mean - 1 / 255) * inv_std)
            p = torch.where(x0[t] < -0.999, cdf_plus, torch.where(x0[t] > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
            expected = -p.clamp(min=1e-12).log().sum()
        else:
            true_mean = coef_x0[t] * x0[t] + coef_xt[t] * x_t
            expected = normal_kl(true_mean, post_var[t], mean, log_var[t].exp()).sum()
        assert ours[t].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12), t


@pytest.mark.parametrize('discrete', [True, False])
def test_vlb_gradients_are_finite_when_the_batch_holds_index_0(discrete):
    """A hybrid loss differentiates vlb_terms over a batch that often holds index 0 (the decoder term, whose KL branch
    has zero variance): the gradient must be finite and equal the sum of the per-sample gradients."""
    sched = DiscreteVP.linear(100)
    theta = torch.tensor([0.9, 0.05], dtype=torch.float64, requires_grad=True)
    denoiser = lambda x, sigma: theta[0] * x / (1 + sigma[:, None] ** 2) + theta[1]       # a differentiable model
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 3, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 1, 5, 0, 50, 99])
    total, = torch.autograd.grad(vlb_terms(denoiser, x0, sched, index, noise, discrete=discrete).sum(), theta)
    assert torch.isfinite(total).all()
    parts = [torch.autograd.grad(vlb_terms(denoiser, x0[i:i + 1], sched, index[i:i + 1], noise[i:i + 1],
                                           discrete=discrete).sum(), theta)[0] for i in range(6)]
    torch.testing.assert_close(total, torch.stack(parts).sum(0), rtol=1e-10, atol=1e-12)


def test_discretized_gaussian_sums_to_one_over_the_bins():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(0.0, 0.01), (0.93, 0.2), (-1.0, 0.5)]:
        p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(std)).exp().sum()
        assert p.item() == pytest.approx(1.0, abs=1e-6)


def test_bits_per_dim_of_a_point_mass_in_closed_form():
    """Data that is a single 8-bit image: the exact denoiser makes every KL term zero, leaving the prior term and the
    decoder's probability of the right bin, both in closed form."""
    T = 200
    sched = DiscreteVP.linear(T)
    x0 = torch.tensor([[-1.0, 0.0 - 1 / 255, 120 / 127.5 - 1, 1.0]], dtype=torch.float64)
    point = GaussianMixture(x0, torch.zeros(1))
    bpd = bits_per_dim(point, x0, sched, generator=torch.Generator().manual_seed(0))
    abar_1, abar_2 = sched.alpha_bar[0].item(), sched.alpha_bar[1].item()
    std = math.sqrt((1 - abar_2 / abar_1) * (1 - abar_1) / (1 - abar_2))      # the decoder's: sqrt(beta~_2)
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    interior = -math.log(Phi(1 / 255 / std) - Phi(-1 / 255 / std))
    edge = -math.log(Phi(1 / 255 / std))
    abar = sched.alpha_bar[-1].item()
    prior = sum(0.5 * (-math.log(1 - abar) + (1 - abar) + abar * v ** 2 - 1) for v in x0[0].tolist())
    expected = (2 * edge + 2 * interior + prior) / (4 * math.log(2))
    assert bpd.item() == pytest.approx(expected, rel=1e-6)
    assert prior_kl(x0, sched).item() == pytest.approx(prior, rel=1e-9)


def test_bound_is_above_the_exact_likelihood():
    """-log p(x0) <= L_T + sum L_t, two-sided: for Gaussian data N(m, v) with its exact denoiser the expected bound is
    known in closed form, since each KL term is 1/2 (SNR_{t-1} - SNR_t) E||x0 - D||^2 and E||x0 - D(x_t)||^2 is the
    posterior variance mmse(sigma) = v sigma^2 / (v + sigma^2); L_0 = E[(x0 - D(x_1))^2] / (2 b) + log(2 pi b) / 2
    with the decoder variance b = beta~_2 = beta_2 (1 - abar_1) / (1 - abar_2)
    and L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)). The Monte-Carlo bound must match that expectation (so a
    doubled KL term fails) and lie above the exact NLL, whose expectation is the entropy log(2 pi e v) / 2."""
    m, v = 0.3, 0.16
    gauss = GaussianMixture(torch.tensor([[m]]), torch.tensor([v]))
    sched = DiscreteVP.cosine(200)
    x0, _ = gauss.sample(2000, generator=torch.Generator().manual_seed(0))
    nats = bits_per_dim(gauss, x0, sched, discrete=False, generator=torch.Generator().manual_seed(1)) * math.log(2)
    sig = sched.sigmas.tolist()
    mmse = lambda s: v * s ** 2 / (v + s ** 2)
    abar_1, abar_2 = sched.alpha_bar[0].item(), sched.alpha_bar[1].item()
    b = (1 - abar_2 / abar_1) * (1 - abar_1) / (1 - abar_2)
    abar_T = sched.alpha_bar[-1].item()
    expected = (0.5 * mmse(sig[0]) / b + 0.5 * math.log(2 * math.pi * b)
                + sum(0.5 * (sig[i - 1] ** -2 - sig[i] ** -2) * mmse(sig[i]) for i in range(1, 200))
                + 0.5 * (-math.log(1 - abar_T) + (1 - abar_T) + abar_T * (m ** 2 + v) - 1))
    stderr = nats.std().item() / math.sqrt(2000)
    assert abs(nats.mean().item() - expected) < 4 * stderr, (nats.mean().item(), expected, stderr)
    exact = -gauss.log_prob(x0)
    assert (nats - exact).mean().item() > 3 * (nats - exact).std().item() / math.sqrt(2000)
    assert expected > 0.5 * math.log(2 * math.pi * math.e * v)


# ---- noise-level sampling ------------------------------------------------------------------------------

def test_low_discrepancy_is_unbiased_and_reduces_loss_variance():
    """Same batch size, same loss: the batch-mean loss has the same mean and a smaller variance (VDM, App. I.1)."""
    gm = GaussianMixture.random(K=3, D=2, seed=0)
    means, variances = {}, {}
    for sampler in ['uniform', 'low_discrepancy']:
        diff = Diffusion('linear', 'eps', t_sampler=sampler)
        net = oracle_net(gm, diff)
        g = torch.Generator().manual_seed(6)
        batch_means = []
        for _ in range(600):
            sigma, _, _ = diff.sample_sigma(32, g)
            x0, _ = gm.sample(32, generator=g)
            batch_means.append(diff.loss(net, x0, sigma=sigma.double(), generator=g)[0].mean())
        batch_means = torch.stack(batch_means)
        means[sampler], variances[sampler] = batch_means.mean().item(), batch_means.var().item()
    assert means['low_discrepancy'] == pytest.approx(means['uniform'], rel=0.1)
    assert variances['low_discrepancy'] < 0.75 * variances['uniform']   # measured: about 0.55
    u = low_discrepancy_u(8, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.sort(u).values.diff(), torch.full((7,), 1 / 8, dtype=torch.float64))


def test_importance_sampling_reduces_the_variance_of_the_bound():
    """Estimate the bound sum_t L_t from one t per sample: T L_t with uniform t, L_t / p_t with importance sampling
    (Nichol & Dhariwal 2021, Eq. 18). Both are unbiased; importance sampling has far lower variance."""
    T = 100
    sched = DiscreteVP.linear(T)
    gm = GaussianMixture.random(K=2, D=3, seed=1)
    g = torch.Generator().manual_seed(7)
    x0, _ = gm.sample(2000, generator=g)
    sampler = ImportanceSampler(T)
    t = torch.arange(T).repeat(10)                          # warm-up: fill every step's loss history
    sampler.update(t, vlb_terms(gm, x0[:len(t)], sched, t, torch.randn(len(t), 3, generator=g, dtype=torch.float64)))
    assert sampler.probs().max() > 5 / T                    # no longer uniform
    t_uni = torch.randint(0, T, (2000,), generator=g)
    est_uni = T * vlb_terms(gm, x0, sched, t_uni, torch.randn(2000, 3, generator=g, dtype=torch.float64))
    t_imp, w = sampler.sample(2000, g)
    est_imp = T * w * vlb_terms(gm, x0, sched, t_imp, torch.randn(2000, 3, generator=g, dtype=torch.float64))
    assert est_imp.mean().item() == pytest.approx(est_uni.mean().item(), rel=0.15)
    assert est_imp.var().item() < 0.2 * est_uni.var().item()


def test_importance_probabilities_follow_the_root_mean_square_loss():
    """Nichol & Dhariwal 2021, Eq. 18: p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of each t (here mixed
    with 1e-3 of uniform); uniform until every t has 10 losses. Numbers worked out by hand: t = 0 has nine losses 0 and
    one 10 (mean 1, root mean square sqrt(10)), the others ten losses of 1, so p_0 = sqrt(10) / (sqrt(10) + 3)."""
    sampler = ImportanceSampler(4)
    others = torch.tensor([1, 2, 3]).repeat(10)
    sampler.update(others, torch.ones(30))
    sampler.update(torch.zeros(9, dtype=torch.long), torch.zeros(9))
    assert sampler.probs().tolist() == [0.25] * 4                      # t = 0 has only 9 losses: still uniform
    sampler.update(torch.tensor([0]), torch.tensor([10.0]))
    w = math.sqrt(10) / (math.sqrt(10) + 3)
    expected = [0.999 * w + 0.00025] + [0.999 * (1 - w) / 3 + 0.00025] * 3
    assert sampler.probs().tolist() == pytest.approx(expected, rel=1e-12)           # p_0 = 0.5134, not 0.25
    # only the last 10 losses count: ten more 1s at t = 0 push the 10 out of the window, and p is uniform again
    sampler.update(torch.zeros(10, dtype=torch.long), torch.ones(10))
    assert sampler.probs().tolist() == pytest.approx([0.25] * 4, rel=1e-12)


def test_importance_sampling_inside_the_training_loss():
    """Diffusion.loss draws t from the history, stores the raw loss and returns it reweighted by 1 / (T p_t). The
    network here outputs noise + t / T (it recovers the noise from x when x0 = 0), so the raw loss of step t is
    (t / T)^2 exactly: early steps have small losses, get rarely drawn, and are weighted up."""
    T = 50
    diff = Diffusion(DiscreteVP.linear(T), 'eps', t_sampler='importance')
    sigmas = diff.schedule.sigmas
    step_of = lambda c_noise: c_noise.double().round()
    net = lambda x_in, c_noise: x_in / (sigmas[step_of(c_noise).long()] / (1 + sigmas[step_of(c_noise).long()] ** 2).sqrt())[:, None] \
        + (step_of(c_noise) / T)[:, None]
    x0 = torch.zeros(64, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):                                     # 2560 losses: every step's history fills
        p_before = diff.importance.probs()
        loss, sigma = diff.loss(net, x0, generator=g)
        t = torch.searchsorted(sigmas, sigma.double() * (1 - 1e-6))
        raw = (t.double() / T) ** 2
        torch.testing.assert_close(loss.double(), raw / (T * torch.from_numpy(p_before)[t]), rtol=1e-4, atol=1e-6)
    assert (diff.importance.counts >= 10).all()
    p = diff.importance.probs()
    rms = (np.arange(T) / T) ** 2                          # sqrt(E[L_t^2]) = L_t = (t / T)^2
    assert p.tolist() == pytest.approx((0.999 * rms / rms.sum() + 0.001 / T).tolist(), rel=1e-6)
    # unbiased: the reweighted loss averages to the uniform mean of (t / T)^2
    losses = torch.cat([diff.loss(net, x0, generator=g)[0] for _ in range(10)])
    uniform_mean = ((torch.arange(T, dtype=torch.float64) / T) ** 2).mean().item()
    assert losses.mean().item() == pytest.approx(uniform_mean, rel=0.01)             # measured within 1e-4


def test_importance_state_round_trip():
    """A resumed run draws the same steps with the same weights: the history travels through state_dict(), as
    tensors (so checkpoints load with weights_only=True); a history of the wrong shape is refused."""
    diff = Diffusion(DiscreteVP.linear(30), 'eps', t_sampler='importance')
    net = lambda x, c: 0.1 * c[:, None] * x
    for seed in range(40):
        diff.loss(net, torch.randn(16, 2), generator=torch.Generator().manual_seed(seed))
    state = diff.state_dict()
    assert all(torch.is_tensor(v) for v in state['importance'].values())
    resumed = Diffusion(DiscreteVP.linear(30), 'eps', t_sampler='importance')
    resumed.load_state_dict(state)
    a, b = (d.sample_sigma(64, torch.Generator().manual_seed(9)) for d in (diff, resumed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].std() > 0
    assert Diffusion('linear', 'eps').state_dict() == {}
    with pytest.raises(ValueError, match='does not fit'):
        Diffusion(DiscreteVP.linear(40), 'eps', t_sampler='importance').load_state_dict(state)
    with pytest.raises(ValueError, match='too few steps'):
        DiscreteVP.linear(20)                                # beta_T = 1: sigma_max would be infinite


# ---- the Gaussian-mixture oracle -----------------------------------------------------------------------

def test_mixture_score_is_the_gradient_of_its_log_density():
    gm = GaussianMixture.random(K=4, D=3, num_classes=2, seed=2)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    for sigma in [0.0, 0.3, 2.0]:
        grad, = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
        if sigma > 0:
            assert torch.allclose(gm.score(x.detach(), sigma), grad, atol=1e-9)
        for y in range(2):
            grad_y, = torch.autograd.grad(gm.log_prob(x, max(sigma, 1e-3), y=y).sum(), x)
            assert torch.allclose(gm.score(x.detach(), max(sigma, 1e-3), y=y), grad_y, atol=1e-7)


def test_mixture_samples_and_class_posterior():
    gm = GaussianMixture.random(K=3, D=2, num_classes=2, seed=3)
    x, y = gm.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), gm.mean(), atol=0.03)
    assert torch.allclose(torch.cov(x.T), gm.cov(), atol=0.06)
    xq = torch.randn(8, 2, dtype=torch.float64)
    post = gm.class_posterior(xq, 0.5)
    prior = torch.stack([gm.weights[gm.classes == c].sum() for c in range(2)])
    bayes = (torch.stack([gm.log_prob(xq, 0.5, y=c) for c in range(2)], 1) + prior.log()).softmax(1)
    assert torch.allclose(post, bayes, atol=1e-12)
