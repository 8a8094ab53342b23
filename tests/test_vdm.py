"""vdm.py: the monotone learned log-SNR keeps its endpoints and its order; the continuous-time bound with the exact
denoiser of a Gaussian mixture equals -log p(x) (the bound is tight for the true score); training the schedule on the
variance of the bound (VDM Sec. 5.2) lowers that variance, which training it on the mean does not; a train.py run
with --objective vdm writes a checkpoint that sample.py samples and that reports its bits/dim."""
import math
import os

import pytest
import torch

import vdm
from diffusion import GaussianMixture, uniform_u
from programs import check_program, run_program


def exact_eps_net(gm):
    """The exact eps prediction of a Gaussian mixture as a 'network' net(z_t, c_noise): c_noise -> gamma -> sigma by
    inverting VDMSchedule.noise_level, x = z / alpha, eps_hat = (x - E[x0 | x]) / sigma. Differentiable in its inputs."""
    def net(z, c_noise, **cond):
        gamma = c_noise / 1000 * (vdm.GAMMA_MAX - vdm.GAMMA_MIN) + vdm.GAMMA_MIN
        sigma = (0.5 * gamma.double()).exp()
        x = z.double() * (1 + sigma[:, None] ** 2).sqrt()
        return (x - gm.denoise(x, sigma)) / sigma[:, None]
    return net


def test_learned_gamma_is_monotone_keeps_fixed_endpoints_and_its_derivative_is_exact():
    # Weights scaled far from their init (negative ones too), so only |w| keeps gamma increasing.
    g = torch.Generator().manual_seed(3)
    gamma = vdm.MonotoneGamma(-10.0, 6.0, n_features=64, learn_endpoints=False)
    with torch.no_grad():
        gamma.w2.copy_(3 * torch.randn(64, generator=g))
        gamma.b2.copy_(5 * torch.randn(64, generator=g))
        gamma.w3.copy_(300 * torch.randn(64, generator=g))
    t = torch.linspace(0, 1, 2001, requires_grad=True)
    value, slope, _ = gamma(t)
    assert abs(value[0].item() + 10) < 1e-4 and abs(value[-1].item() - 6) < 1e-4          # the fixed endpoints
    assert (value[1:] - value[:-1] > 0).all() and (slope > 0).all()                       # strictly increasing
    # the written-out derivative equals autograd's d gamma / dt
    autograd_slope, = torch.autograd.grad(value.sum(), t)
    assert torch.allclose(slope, autograd_slope, rtol=1e-4, atol=1e-4)
    # Training moves the shape but neither endpoint (they are buffers), and keeps the order.
    opt = torch.optim.Adam(gamma.parameters(), lr=0.1)
    for _ in range(20):
        v, _, _ = gamma(torch.rand(64))
        (v ** 2).mean().backward()                                                        # any loss
        opt.step()
        opt.zero_grad()
    value, slope, _ = gamma(torch.linspace(0, 1, 2001))
    assert abs(value[0].item() + 10) < 1e-4 and abs(value[-1].item() - 6) < 1e-4
    assert (value[1:] - value[:-1] > 0).all()


def test_bound_with_the_exact_denoiser_equals_the_exact_nll():
    """Continuous data (Gaussian decoder): with the exact eps the bound is tight up to the endpoint terms, so its mean
    over (x, t, eps) is E[-log p(x)] of the mixture, for the fixed and a (random, untrained) learned schedule alike:
    the continuous-time bound depends on the schedule only through its endpoints (VDM Sec. 5.1)."""
    gm = GaussianMixture.random(K=2, D=2, seed=1)
    x0, _ = gm.sample(300000, generator=torch.Generator().manual_seed(0))
    nll = -gm.log_prob(x0).mean().item() / (2 * math.log(2))                     # bits per dimension
    for schedule in ('linear', 'learned'):
        diff = vdm.VDMDiffusion(schedule, -8.0, 8.0, bins=None, minimise_variance=False)
        if schedule == 'learned':                                                # 32 features: fast on 300k samples
            diff.schedule.gamma = vdm.MonotoneGamma(-8.0, 8.0, n_features=32, seed=4)
        with torch.no_grad():
            bpd, _ = diff.loss(exact_eps_net(gm), x0, generator=torch.Generator().manual_seed(1))
        # the standard error of the mean over 300k samples is 0.016 bits/dim (measured): a 3-sigma tolerance
        assert abs(bpd.mean().item() - nll) < 0.05, (schedule, bpd.mean().item(), nll)


def bound_variance(diff, net, x0, seed=5):
    """Variance over samples of the one-sample bound estimate (bits/dim), independent t ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    sigma = diff.schedule.sigma(uniform_u(len(x0), g))
    with torch.no_grad():
        return diff.loss(net, x0, sigma, noise)[0].var().item()


@pytest.mark.parametrize('minimise_variance', [True, False])
def test_training_the_schedule_on_the_variance_lowers_the_variance_of_the_bound(minimise_variance):
    """The fixed problem: three near-points in 2-D (variance 1e-8, like quantised data: the exact denoiser is perfect
    at low noise, so the integrand of L_inf lives at middle noise levels) and their exact denoiser. From VDM's
    near-linear start, 100 Adam steps on the variance objective (Sec. 5.2) take the variance of the one-sample
    estimate well below the fixed linear schedule's (measured: 26.1 -> 10.4); the same steps on the mean of the bound
    (minimise_variance=False: the plant) leave it where it was (26.1), since the mean does not depend on the shape."""
    gm = GaussianMixture(torch.tensor([[-0.8, 0.3], [0.1, -0.5], [0.6, 0.7]]), torch.tensor([1e-8, 1e-8, 1e-8]))
    net = exact_eps_net(gm)
    x0, _ = gm.sample(8000, generator=torch.Generator().manual_seed(0))
    fixed = bound_variance(vdm.VDMDiffusion('linear', bins=None), net, x0)
    diff = vdm.VDMDiffusion('learned', learn_endpoints=False, bins=None, minimise_variance=minimise_variance,
                            t_sampler='uniform')
    diff.schedule.gamma = vdm.MonotoneGamma(n_features=64, learn_endpoints=False)   # 64 features: a fast test
    start = bound_variance(diff, net, x0)
    opt = torch.optim.Adam(diff.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        batch, _ = gm.sample(256, generator=g)
        diff.loss(net, batch, generator=g)[0].mean().backward()
        opt.step()
        opt.zero_grad()
    learned = bound_variance(diff, net, x0)
    if minimise_variance:
        assert learned < 0.6 * fixed, (learned, fixed, start)
    else:
        assert learned > 0.8 * start, (learned, fixed, start)


def test_vdm_objective_trains_samples_and_reports_bits_per_dim(tmp_path):
    out = tmp_path / 'vdm'
    common = ['--resolution', '16', '--model-channels', '8', '--batch-size', '8', '--sample-every', '0', '--sample-steps',
              '3', '--warmup', '1', '--no-progress', '--bpd-images', '2', '--steps', '3', '--memorization-below', '0',
              '--prediction', 'eps', '--objective', 'vdm', '--vdm-fourier']
    result = run_program('train.py', common + ['--out', str(out)])
    assert 'bits/dim (variational bound, 2 held-out images, continuous time)' in result.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['diffusion']['gamma'] == 'learned' and 'gamma' in ckpt['diffusion']
    assert ckpt['config']['net']['cond_channels'] == 12                  # sin, cos at 2 frequencies of 3 channels
    run_program('sample.py', ['--ckpt', out / 'ckpt.pt', '--num', '2', '--sampler', 'ddpm', '--steps', '4',
                              '--schedule', 'vp-trailing', '--out', tmp_path / 's.png'])
    assert os.path.getsize(tmp_path / 's.png') > 0
    # Flags that would do nothing or contradict the objective are refused before training.
    for extra, message in ((['--schedule', 'vp'], 'has its own schedule'), (['--t-sampler', 'importance'], 'uniformly'),
                           (['--vdm-schedule', 'linear', '--vdm-fixed-endpoints'], 'applies to --vdm-schedule learned'),
                           (['--T', '100'], 'schedule vdm is continuous')):
        with pytest.raises(SystemExit, match=message):
            check_program('train.py', common + extra)
    with pytest.raises(SystemExit, match='add --prediction eps'):
        check_program('train.py', ['--objective', 'vdm'])
    with pytest.raises(SystemExit, match='apply to --objective vdm'):
        check_program('train.py', ['--vdm-fourier'])


def test_learned_schedule_is_refused_under_torchrun_and_the_linear_one_is_not(monkeypatch):
    """The learned schedule's parameters live outside the DDP-wrapped network, so their gradients would differ per
    rank: train.py refuses --vdm-schedule learned when WORLD_SIZE > 1, before any work; the fixed linear one trains."""
    common = ['--objective', 'vdm', '--prediction', 'eps']
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match='trains in one process'):
        check_program('train.py', common)
    assert check_program('train.py', common + ['--vdm-schedule', 'linear']).vdm_schedule == 'linear'
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert check_program('train.py', common).vdm_schedule == 'learned'
