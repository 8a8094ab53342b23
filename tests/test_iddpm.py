"""iddpm.py: L_vlb with the learned variance at its ends equals diffusion.vlb_terms at the fixed variances; L_hybrid's
L_vlb trains only the variance (stop-gradient on the mean); importance sampling is fed the L_vlb terms; the optimal
learned variance with a mixture's exact mean is Analytic-DPM's closed form; the learned-variance sampler at its ends is
samplers.sample_ddpm; train.py --objective hybrid / vlb writes checkpoints that sample.py samples."""
import math

import pytest
import torch

import iddpm
import samplers
from diffusion import DiscreteVP, GaussianMixture, append_dims, vlb_terms
from programs import check_program, run_program


class FixedOutput(torch.nn.Module):
    """A 'network' whose eps output is a fixed function of its input plus a learnable offset, and whose v output is a
    learnable constant: enough to check which outputs each loss trains."""

    def __init__(self, v=0.0):
        super().__init__()
        self.eps_offset = torch.nn.Parameter(torch.tensor(0.1))
        self.v = torch.nn.Parameter(torch.tensor(float(v)))

    def forward(self, x, noise_level, **cond):
        eps = 0.3 * torch.tanh(x) + self.eps_offset + 0.01 * append_dims(noise_level, x.ndim) / 1000
        return torch.cat([eps, self.v.expand_as(x)], dim=1)


def quantised(n, shape=(1, 4, 4), seed=0):
    """8-bit data in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,) + shape, generator=g).float() / 255 * 2 - 1


@pytest.mark.parametrize('v, variance', [(-1.0, 'posterior'), (1.0, 'beta')])
def test_learned_vlb_terms_equal_diffusion_vlb_terms_at_the_same_variance(v, variance):
    """v = -1 (frac 0) is beta~, v = +1 (frac 1) is beta (Eq. 15): the learned bound must equal diffusion.vlb_terms
    with that fixed variance, for every step. Exception, as in iDDPM's code: the decoder L_0 with frac 1 has variance
    beta_1, while DDPM's fixed 'beta' decoder keeps beta~_2 (vlb_terms' docstring), so L_0 is compared for v = -1."""
    schedule = DiscreteVP.cosine(40)
    T = schedule.T
    x0 = quantised(2 * T)
    index = torch.arange(2 * T) % T
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    net = FixedOutput(v)
    diff = iddpm.LearnedVarianceDiffusion(schedule, 'vlb')
    reference = vlb_terms(diff.denoiser(net), x0, schedule, index, noise, variance=variance)
    sigma = schedule.sigmas[index].float()
    with torch.no_grad():
        loss, _ = diff.loss(net, x0, sigma, noise)                  # T L_t in bits/dim (weights 1: given sigmas)
    learned = loss * x0[0].numel() * math.log(2) / T                # back to nats summed over dimensions
    check = index > 0 if variance == 'beta' else torch.ones_like(index, dtype=torch.bool)
    assert torch.allclose(learned[check], reference[check].float(), rtol=1e-4, atol=1e-4)


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    """Stop-gradient on the mean inside L_vlb (Sec. 3.1): the eps output's gradient of L_hybrid equals that of
    L_simple alone, while v gets lambda times the gradient of T L_t. Under L_vlb alone the mean is trained too."""
    schedule = DiscreteVP.cosine(40)
    x0 = quantised(64)
    sigma = schedule.sigmas[torch.arange(64) % 40].float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for objective in ('hybrid', 'vlb'):
        net = FixedOutput(0.2)
        diff = iddpm.LearnedVarianceDiffusion(schedule, objective)
        diff.loss(net, x0, sigma, noise)[0].mean().backward()
        grads[objective] = (net.eps_offset.grad.item(), net.v.grad.item())
    net = FixedOutput(0.2)
    x = x0 + append_dims(sigma, 4) * noise                           # the network input of Diffusion.loss
    out = net(x / append_dims(1 + sigma ** 2, 4).sqrt(), schedule.noise_level(sigma))[:, :1]
    ((out - noise) ** 2).flatten(1).mean(1).mean().backward()       # L_simple alone
    simple = net.eps_offset.grad.item()
    assert grads['hybrid'][0] == pytest.approx(simple, rel=1e-5)
    assert abs(grads['hybrid'][1]) > 0                              # v is trained by lambda L_vlb
    assert grads['vlb'][1] == pytest.approx(grads['hybrid'][1] / iddpm.LAMBDA, rel=1e-4)
    assert abs(grads['vlb'][0] - simple) > 1e-3 * abs(simple)       # L_vlb alone moves the mean differently


def test_importance_sampling_is_fed_the_vlb_terms():
    """--objective vlb --t-sampler importance: the history of each t holds the unweighted T L_t values (Eq. 18 is
    about L_vlb), i.e. the returned per-sample loss while the sampler is still uniform (weights 1)."""
    schedule = DiscreteVP.cosine(30)
    diff = iddpm.LearnedVarianceDiffusion(schedule, 'vlb', 'importance')
    net = FixedOutput(0.0)
    x0 = quantised(16)
    with torch.no_grad():
        loss, sigma = diff.loss(net, x0, generator=torch.Generator().manual_seed(3))
    index = diff.step_index(sigma)
    stored = torch.tensor([diff.importance.losses[i, 0] for i in index.tolist()])
    # a step drawn twice keeps its first value in slot 0: compare the first occurrence of each step
    first = torch.tensor([index.tolist().index(i) == k for k, i in enumerate(index.tolist())])
    assert torch.allclose(stored[first], loss[first].double(), rtol=1e-6)
    with pytest.raises(ValueError, match='L_vlb alone'):
        iddpm.LearnedVarianceDiffusion(schedule, 'hybrid', 'importance')


def test_optimal_learned_variance_is_the_analytic_dpm_optimum():
    """With the exact mean of a Gaussian mixture, minimising L_vlb over one learned v per step (L-BFGS) gives Bao et al. 2022's
    optimal reverse variance (Analytic-DPM, arXiv:2201.06503, Thm 1 with lambda_n^2 = beta~_n, in their notation):
        sigma*_n^2 = beta~_n + (sqrt(betabar_n / alpha_n) - sqrt(betabar_{n-1} - beta~_n))^2 (1 - E||eps_hat||^2 / d)
    with betabar = 1 - alpha_bar, eps_hat = E[eps | x_n] (their betabar_n E||grad log q_n||^2 = E||eps_hat||^2), clipped to
    [beta~_n, beta_n] (their Thm 2 bounds; iDDPM's range). Within 3% (Monte Carlo on 4000 samples per step)."""
    gm = GaussianMixture.random(K=3, D=2, scale=0.5, seed=2)
    schedule = DiscreteVP.cosine(20)
    T, sigmas = schedule.T, schedule.sigmas
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(1, T)
    index = steps.repeat_interleave(4000)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        x0, _ = gm.sample(len(index), generator=gen)
        x = x0 + sigmas[index][:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        return x0, x, gm.denoise(x, sigmas[index])
    # fit one v per step by Adam on the learned bound (continuous data: Gaussian decoder, unused for t >= 1)
    x0, x, x0_hat = draw(1)
    v = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=60, line_search_fn='strong_wolfe')      # one v per step: a smooth 19-d problem

    def closure():
        opt.zero_grad()
        frac = ((v[index] + 1) / 2)[:, None].expand_as(x0)
        loss = iddpm.learned_vlb_terms(x0, x, x0_hat, frac, sigmas, index, discrete=False).mean()
        loss.backward()
        return loss
    opt.step(closure)
    log_min, log_max = iddpm.variance_bounds(sigmas, steps)
    learned = iddpm.learned_log_variance((v.detach()[steps] + 1) / 2, log_min, log_max).exp()
    # Analytic-DPM on fresh samples, in DDPM's unscaled frame, then divided by alpha_bar_{n-1} (the sigma frame)
    _, x, x0_hat = draw(2)
    eps_hat = (x - x0_hat) / sigmas[index][:, None]
    mean_sq = (eps_hat ** 2).sum(1).reshape(T - 1, -1).mean(1) / 2
    abar = schedule.alpha_bar
    abar_n, abar_prev = abar[steps], abar[steps - 1]
    alpha_n, beta_n = abar_n / abar_prev, 1 - abar_n / abar_prev
    beta_tilde = (1 - abar_prev) / (1 - abar_n) * beta_n
    optimum = beta_tilde + ((1 - abar_n) / alpha_n).sqrt().sub((1 - abar_prev - beta_tilde).sqrt()) ** 2 * (1 - mean_sq)
    optimum = torch.minimum(torch.maximum(optimum, beta_tilde), beta_n) / abar_prev
    assert torch.allclose(learned, optimum, rtol=0.03), torch.stack([learned, optimum], 1)
    # and the optimum is not at either end for most steps: the test measures the interpolation, not a clip
    assert ((optimum > 1.05 * beta_tilde / abar_prev) & (optimum < 0.95 * beta_n / abar_prev)).sum() >= (T - 1) // 2


@pytest.mark.parametrize('v, variance', [(-1.0, 'posterior'), (1.0, 'beta')])
def test_learned_sampler_at_its_ends_is_samplers_ddpm_on_a_respaced_subsequence(v, variance):
    """On 10 of 100 steps (iDDPM Sec. 4 respacing), v = -1 / +1 gives exactly samplers.sample_ddpm with the posterior
    / beta variance of the respaced steps (same noise draws); v = 0 takes the geometric mean of the two variances."""
    schedule = DiscreteVP.cosine(100)
    sigmas = samplers.vp_sigmas(schedule.sigmas, 10, 'linspace')
    gm = GaussianMixture.random(K=2, D=2, seed=0)
    denoiser = lambda x, s, **c: gm.denoise(x, s).float()
    x = sigmas[0] * torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    fraction = lambda x_, s, **c: torch.full_like(x_, (v + 1) / 2)
    ours = iddpm.sample_ddpm_learned(denoiser, x, sigmas, variance_fraction=fraction, generator=torch.Generator().manual_seed(1))
    ref = samplers.sample_ddpm(denoiser, x, sigmas, variance=variance, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours, ref, atol=1e-4)
    # one step from sigmas[3] to sigmas[4] with v = 0: the spread around the mean is sqrt(beta~ beta) (sigma frame)
    beta_tilde, beta = iddpm.step_variances(sigmas[3].double(), sigmas[4].double())
    half = lambda x_, s, **c: torch.full_like(x_, 0.5)
    steps_taken = []
    iddpm.sample_ddpm_learned(lambda x_, s, **c: torch.zeros_like(x_), torch.zeros(20000, 2),
                              torch.stack([sigmas[3], sigmas[4], torch.tensor(0.0)]), variance_fraction=half,
                              generator=torch.Generator().manual_seed(2), callback=lambda info: steps_taken.append(info['x']))
    var = steps_taken[1].var().item()                                # x after the one noisy step (mean 0)
    assert var == pytest.approx(math.sqrt(beta_tilde * beta), rel=0.03)


def test_sample_generate_uses_the_learned_variance_unless_a_fixed_one_is_asked_for():
    """sample.generate (sample.py, evaluate.py, the benchmarks) with --sampler ddpm on a learned-variance model runs
    iddpm.sample_ddpm_learned; with variance= given it runs samplers.sample_ddpm with that fixed variance."""
    import sample
    schedule = DiscreteVP.cosine(40)
    diff = iddpm.LearnedVarianceDiffusion(schedule, 'hybrid')
    # eps_hat = the input: samples end near 0, so generate's final clamp to [-1, 1] hides little
    net = lambda x_in, noise_level, **c: torch.cat([x_in, torch.full_like(x_in, 0.4)], dim=1)
    sigmas = samplers.vp_sigmas(schedule.sigmas, 8, 'linspace')

    def start():
        # generate's batch generator (seed + first index) draws the initial noise, then the sampler's noise
        g = torch.Generator().manual_seed(7)
        return sigmas[0] * torch.randn((4, 1, 4, 4), generator=g), g
    with torch.no_grad():
        frac = lambda x_, s, **c: diff.variance_fraction(net, x_, s, **c)
        x, g = start()
        learned = iddpm.sample_ddpm_learned(diff.denoiser(net), x, sigmas, variance_fraction=frac, generator=g)
        x, g = start()
        fixed = samplers.sample_ddpm(diff.denoiser(net), x, sigmas, variance='posterior', generator=g)
        for options, expected in (({}, learned), ({'variance': 'posterior'}, fixed)):
            out = sample.generate(net, diff, 4, (1, 4, 4), 'cpu', sampler='ddpm', sigmas=sigmas, seed=7,
                                  sampler_options=options)
            assert torch.allclose(out, expected.clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(learned.clamp(-1, 1), fixed.clamp(-1, 1), atol=1e-3)      # v = 0.4 is not beta~


def test_hybrid_and_vlb_objectives_train_and_sample(tmp_path):
    common = ['--resolution', '16', '--batch-size', '8', '--sample-every', '0', '--sample-steps', '3', '--warmup', '1',
              '--no-progress', '--steps', '2', '--memorization-below', '0', '--prediction', 'eps', '--T', '30',
              '--bpd-images', '2', '--val-every', '0']
    # L_hybrid on the U-Net (out_channels 2C), L_vlb with importance sampling on the DiT (learn_sigma)
    for objective, extra in (('hybrid', ['--model-channels', '8']),
                             ('vlb', ['--t-sampler', 'importance', '--model', 'dit', '--config', 'DiT-tiny/2'])):
        out = tmp_path / objective
        result = run_program('train.py', common + ['--objective', objective, '--out', str(out)] + extra)
        assert 'bits/dim (variational bound, 2 held-out images, T = 30)' in result.stdout
        config = torch.load(out / 'ckpt.pt', weights_only=True)['config']
        assert config['diffusion']['objective'] == objective
        assert config['net'].get('out_channels') == 6 or config['net'].get('learn_sigma') is True
        run_program('sample.py', ['--ckpt', out / 'ckpt.pt', '--num', '2', '--sampler', 'ddpm', '--steps', '5',
                                  '--schedule', 'vp-linspace', '--out', tmp_path / f'{objective}.png'])
        assert (tmp_path / f'{objective}.png').stat().st_size > 0
    # Combinations that cannot work are refused before training, naming the fix.
    for extra, message in ((['--objective', 'hybrid', '--t-sampler', 'importance'], 'L_vlb alone'),
                           (['--objective', 'vlb', '--schedule', 'vp'], 'linear or cosine'),
                           (['--objective', 'hybrid', '--vdm-fourier'], 'apply to --objective vdm')):
        with pytest.raises(SystemExit, match=message):
            check_program('train.py', common + extra)
    with pytest.raises(SystemExit, match='add --prediction eps'):
        check_program('train.py', ['--objective', 'hybrid'])
