"""Tests of cascade.py: the noise-augmentation corruption against its formula, the level reaching the network,
a cascade's resolution and seeding, the truncated variant against the Gaussian closed form, and a tiny trained SR
stage against bicubic upsampling."""
import json
import math

import pytest
import torch

import cascade
import diffusion
import samplers
import unet


def tiny_unet(channels=1, cond_channels=1, aug_dim=0, image_size=16, perturb=True, seed=0):
    """A one-level U-Net (no attention); perturbed so its zero-initialised output layer passes signal."""
    torch.manual_seed(seed)
    net = unet.UNet(in_channels=channels, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                    attention_resolutions=(), image_size=image_size, norm_groups=4, cond_channels=cond_channels,
                    aug_dim=aug_dim)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def rectangles(n, generator, size=16):
    """Binary (+-1) images of one axis-aligned rectangle with corners on the pixel grid: after 2x area averaging the
    low-resolution image still pins every edge down, so a good SR stage is nearly exact while bicubic blurs."""
    lo = torch.randint(0, size - 4, (n, 2), generator=generator)
    hi = (lo + torch.randint(3, size // 2 + 1, (n, 2), generator=generator)).clamp(max=size)
    r = torch.arange(size)
    rows = (r[None] >= lo[:, :1]) & (r[None] < hi[:, :1])                   # (n, size)
    cols = (r[None] >= lo[:, 1:]) & (r[None] < hi[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None] * 2 - 1    # (n, 1, size, size)


# ----------------------------------------------------------------------------------------------------
# The corruption at a given level

@pytest.mark.parametrize('t', [0.1, 0.3, 0.5, 0.8])
def test_noise_augment_moments_match_formula(t):
    # z_t = cos(pi t/2) z + sin(pi t/2) eps: mean alpha z, variance s^2, for every pixel value z.
    g = torch.Generator().manual_seed(1)
    z = torch.tensor([-1.0, -0.3, 0.4, 1.0]).view(1, 4, 1, 1).expand(40000, 4, 1, 1)
    zt = cascade.noise_augment(z, t, torch.randn(z.shape, generator=g))
    alpha, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    n = z.shape[0]
    mean, var = zt.mean(0).flatten(), zt.var(0).flatten()
    assert torch.allclose(mean, alpha * z[0].flatten(), atol=5 * s / math.sqrt(n))           # 5 standard errors
    assert torch.allclose(var, torch.full_like(var, s ** 2), rtol=5 * math.sqrt(2 / n))
    # Variance preserving: for unit-variance data the corrupted data keeps variance 1 at every level.
    unit = torch.randn(n, 1, generator=g)
    assert abs(cascade.noise_augment(unit, t, torch.randn(n, 1, generator=g)).var().item() - 1) < 5 * math.sqrt(2 / n)


def test_level_convention_sigma_and_snr():
    # The same corruption read in the sigma frame of DESIGN.md: z_t / alpha = z + tan(pi t / 2) eps, SNR = cot^2.
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    for t in (0.05, 0.25, 0.5, 0.9):
        alpha, s = (float(v) for v in cascade.aug_alpha_sigma(t))
        sigma = float(cascade.aug_sigma(t))
        assert sigma == pytest.approx(math.tan(math.pi * t / 2), rel=1e-12)
        assert alpha ** 2 / s ** 2 == pytest.approx(1 / sigma ** 2, rel=1e-9)             # SNR = 1 / sigma^2
        assert torch.allclose(cascade.noise_augment(z, t, eps) / alpha, z + sigma * eps, atol=1e-5)
        assert float(cascade.aug_level_of_sigma(sigma)) == pytest.approx(t, abs=1e-12)
    assert float(cascade.aug_sigma(0.5)) == pytest.approx(1.0)                             # t = 1/2: SNR 1
    assert math.isinf(float(cascade.aug_sigma(1.0)))
    # Level 0 changes nothing, level 1 keeps nothing of z.
    assert torch.equal(cascade.noise_augment(z, 0.0, eps), z)
    assert torch.allclose(cascade.noise_augment(z, 1.0, eps), eps, atol=1e-6)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        cascade.noise_augment(z, 1.5, eps)


def test_training_condition_draws_levels_uniformly_and_corrupts_accordingly():
    # t ~ U[0, max_level] per sample; the conditioning image of each sample has exactly its own level's noise.
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4000, 1, 4, 4)                               # z = 0, so x_cond is pure scaled noise
    cond = cascade.training_condition(x, 2, max_level=0.6, aug_dim=2, generator=g, mode='nearest')
    # aug_cond[:, 0] = sin(pi t / 2) recovers t; pixel variance of x_cond must then be sin^2(pi t/2).
    t = torch.asin(cond['aug_cond'][:, 0]) * 2 / math.pi
    assert 0 <= t.min() and t.max() <= 0.6
    assert abs(t.mean().item() - 0.3) < 0.02 and abs(t.var().item() - 0.6 ** 2 / 12) < 0.003      # U[0, 0.6]
    resid = cond['x_cond'][..., ::2, ::2].flatten(1) / torch.sin(math.pi * t / 2)[:, None].clamp(min=1e-3)
    keep = t > 0.05
    assert abs(resid[keep].var().item() - 1) < 0.05


# ----------------------------------------------------------------------------------------------------
# The level reaches the network

def test_aug_embedding_zero_means_none_and_level_changes_output():
    emb = cascade.aug_embedding(torch.tensor([0.0, 0.1, 0.2, 0.9]), 8)
    assert torch.equal(emb[0], torch.zeros(8))                    # t = 0 -> zero vector
    assert torch.cdist(emb[1:], emb[1:]).triu(1)[torch.triu(torch.ones(3, 3), 1).bool()].min() > 0.1   # distinct

    net = tiny_unet(aug_dim=8)
    denoiser = diffusion.Diffusion(schedule='edm', prediction='edm').denoiser(net)
    g = torch.Generator().manual_seed(4)
    z, x = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    sigma = torch.full((2,), 1.0)
    x_cond = cascade.upsample(z, 16)
    with torch.no_grad():
        out = {t: denoiser(x, sigma, x_cond=x_cond, aug_cond=cascade.aug_embedding(t, 8, n=2)) for t in (0.0, 0.2, 0.4)}
        no_aug = denoiser(x, sigma, x_cond=x_cond)
    assert torch.equal(out[0.0], no_aug)                          # level 0 == no augmentation input at all
    assert (out[0.2] - out[0.0]).abs().max() > 1e-3               # with x_cond fixed, the level alone moves D
    assert (out[0.4] - out[0.2]).abs().max() > 1e-3


def test_cascade_passes_its_levels_to_each_sr_stage():
    # A spy denoiser records what each stage's network is given during a real sampler run.
    seen = {}

    def spy(name, shape_out):
        def denoiser(x, sigma, **cond):
            seen.setdefault(name, []).append({k: v.clone() for k, v in cond.items()})
            return torch.zeros_like(x)                            # x0_hat = 0: every stage outputs 0 exactly
        return denoiser

    sig = samplers.karras_sigmas(3, 0.01, 10.0)
    stages = [cascade.Stage(spy('base', 4), (1, 4, 4), samplers.sample_euler, sig),
              cascade.Stage(spy('sr1', 8), (1, 8, 8), samplers.sample_euler, sig, aug_level=0.3, aug_dim=4,
                            upsample_mode='nearest'),
              cascade.Stage(spy('sr2', 16), (1, 16, 16), samplers.sample_euler, sig, aug_level=0.0, aug_dim=4)]
    outs = cascade.run_cascade(stages, n=500, seed=0)
    assert [tuple(o.shape) for o in outs] == [(500, 1, 4, 4), (500, 1, 8, 8), (500, 1, 16, 16)]
    assert 'x_cond' not in seen['base'][0] and 'aug_cond' not in seen['base'][0]
    for call in seen['sr1']:
        assert torch.allclose(call['aug_cond'], cascade.aug_embedding(0.3, 4, n=500))
        # base output is 0, so x_cond = nearest-upsampled 0.3-level noise: std sin(0.15 pi)
        assert abs(call['x_cond'][..., ::2, ::2].std().item() - math.sin(0.15 * math.pi)) < 0.03
    for call in seen['sr2']:                                       # level 0: zero embedding, sr1's zeros unchanged
        assert torch.equal(call["aug_cond"], torch.zeros(500, 4)) and call["x_cond"].abs().max() < 1e-6
    with pytest.raises(ValueError, match='aug_dim=0'):
        cascade.superres_condition(torch.zeros(1, 1, 4, 4), 8, level=0.2, aug_dim=0)


# ----------------------------------------------------------------------------------------------------
# A cascade: final resolution, reproducible from its seed

def test_cascade_resolution_and_seed():
    diff = diffusion.Diffusion(schedule='edm', prediction='edm')
    base, sr = tiny_unet(cond_channels=0, image_size=8, seed=1), tiny_unet(aug_dim=4, seed=2)
    sig = samplers.karras_sigmas(4, 0.002, 80.0)
    stages = [cascade.Stage(diff.denoiser(base), (1, 8, 8), samplers.sample_heun, sig),
              cascade.Stage(diff.denoiser(sr), (1, 16, 16), samplers.sample_euler_ancestral, sig, stochastic=True,
                            aug_level=0.25, aug_dim=4)]
    with torch.no_grad():
        first = cascade.run_cascade(stages, n=3, seed=7)
        torch.manual_seed(123)                                      # the global RNG must not matter
        again = cascade.run_cascade(stages, n=3, seed=7)
        other = cascade.run_cascade(stages, n=3, seed=8)
    assert first[-1].shape == (3, 1, 16, 16) and first[0].shape == (3, 1, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert (first[-1] - other[-1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# Truncated conditioning augmentation (CDM) against the Gaussian closed form

def test_truncated_conditioning_has_the_augmented_distribution():
    # Base data z ~ N(mu, s^2) per pixel with its exact denoiser; the probability-flow ODE carries N(mu, s^2) at
    # sigma_max to N(mu, s^2 + sigma^2) at every sigma, so the base stopped at sigma_aug(t) and scaled by alpha
    # must have mean alpha mu and variance alpha^2 s^2 + sin^2(pi t/2): the law of noise_augment(z, t).
    mu, s, t = 0.4, 0.3, 0.3
    exact = lambda x, sigma, **cond: mu + s ** 2 / (s ** 2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)
    captured = {}

    def sr(x, sigma, **cond):
        captured['x_cond'] = cond['x_cond']
        return torch.zeros_like(x)

    sig = samplers.karras_sigmas(40, 0.002, 80.0)
    # sigma_max = 80 >> s: the start x = 80 eps is N(0, 80^2), close to N(mu, s^2 + 80^2) up to mu/80.
    stages = [cascade.Stage(exact, (1, 2, 2), samplers.sample_heun, sig),
              cascade.Stage(sr, (1, 4, 4), samplers.sample_euler, sig, aug_level=t, aug_dim=2, truncated=True,
                            upsample_mode='nearest')]
    cascade.run_cascade(stages, n=5000, seed=0)
    z_t = captured['x_cond'][..., ::2, ::2]
    alpha, sin = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    assert abs(z_t.mean().item() - alpha * mu) < 0.02
    assert abs(z_t.var().item() - (alpha ** 2 * s ** 2 + sin ** 2)) < 0.015
    with pytest.raises(ValueError, match='truncated'):
        cascade.run_cascade([stages[0], cascade.Stage(sr, (1, 4, 4), samplers.sample_euler, sig, truncated=True)], 2)


# ----------------------------------------------------------------------------------------------------
# A tiny trained SR stage beats bicubic upsampling

def test_trained_sr_stage_beats_bicubic_psnr():
    g = torch.Generator().manual_seed(0)
    train, test = rectangles(256, g), rectangles(64, torch.Generator().manual_seed(1))
    net = tiny_unet(perturb=False).train()
    diff = diffusion.Diffusion(schedule='edm', prediction='edm')
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(150):                                          # a few seconds on one idle CPU core
        x = train[torch.randint(0, len(train), (16,), generator=g)]
        loss, _ = diff.loss(net, x, generator=g, **cascade.training_condition(x, 8, generator=g))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    net.eval()
    z = cascade.downsample(test, 8)
    bicubic = cascade.upsample(z, 16).clamp(-1, 1)
    sig = samplers.karras_sigmas(8, 0.002, 80.0)
    with torch.no_grad():
        x = cascade.super_resolve(cascade.Stage(diff.denoiser(net), (1, 16, 16), samplers.sample_heun, sig), z,
                                  generator=g).clamp(-1, 1)
    psnr_sr, psnr_bicubic = cascade.psnr(x, test).mean().item(), cascade.psnr(bicubic, test).mean().item()
    assert psnr_sr > psnr_bicubic + 2.0, (psnr_sr, psnr_bicubic)


# ----------------------------------------------------------------------------------------------------
# The command lines: train.py --task superres, sample.py --cascade

def test_train_superres_then_sample_a_cascade(tmp_path):
    import numpy as np
    import sample
    from programs import check_program, run_program
    fast = ['--model-channels', '8', '--batch-size', '8', '--log-every', '2', '--val-every', '2', '--sample-every', '0',
            '--sample-steps', '2', '--warmup', '2', '--no-progress', '--unconditional', '--steps', '2']
    run_program('train.py', fast + ['--resolution', '8', '--out', str(tmp_path / 'base')])
    run_program('train.py', fast + ['--resolution', '16', '--task', 'superres', '--low-res', '8',
                                    '--noise-aug-max', '0.5', '--noise-aug-dim', '4', '--out', str(tmp_path / 'sr')])
    ckpt = torch.load(tmp_path / 'sr' / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['superres'] == {'low_res': 8, 'noise_aug_max': 0.5, 'aug_dim': 4, 'upsample': 'bicubic'}
    assert ckpt['config']['net']['cond_channels'] == 3 and ckpt['config']['net']['aug_dim'] == 4
    log = [json.loads(line) for line in open(tmp_path / 'sr' / 'log.jsonl')]
    assert all(math.isfinite(r['val_loss']) for r in log if 'val_loss' in r) and any('val_loss' in r for r in log)

    def cascade_npz(name, seed, stages='[{"ckpt": "%s", "aug_level": 0.2, "steps": 2, "sampler": "euler_ancestral"}]'):
        npz = tmp_path / f'{name}.npz'
        sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'base' / 'ckpt.pt'), '--steps', '2', '-n', '3',
                                       '--batch', '2', '--seed', str(seed), '--out', str(tmp_path / f'{name}.png'),
                                       '--npz', str(npz), '--cascade', stages % (tmp_path / 'sr' / 'ckpt.pt')]))
        return np.load(npz)['samples']
    a, b, c = cascade_npz('a', 0), cascade_npz('b', 0), cascade_npz('c', 1)
    assert a.shape == (3, 16, 16, 3)                               # the final resolution, (N, H, W, C) uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The stage's aug_level reaches it also when the stage is not truncated (issue 22: a plant that passed 0 for
    # non-truncated stages went unnoticed): the same seed at level 0 gives other samples.
    plain = cascade_npz('p', 0, '[{"ckpt": "%s", "aug_level": 0.0, "steps": 2, "sampler": "euler_ancestral"}]')
    assert not np.array_equal(a, plain)
    truncated = cascade_npz('t', 0, '[{"ckpt": "%s", "aug_level": 0.3, "truncated": true, "steps": 2}]')
    assert truncated.shape == (3, 16, 16, 3)
    # Mistakes stop before any work, with the reason.
    with pytest.raises(SystemExit, match='super-resolution stage'):
        sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'sr' / 'ckpt.pt'), '--out', str(tmp_path / 'x.png')]))
    with pytest.raises(SystemExit, match='aug_level'):
        cascade_npz('bad', 0, '[{"ckpt": "%s", "aug_level": 1.5}]')
    with pytest.raises(SystemExit, match='--low-res'):                  # train.py's checks before any work, in-process
        check_program('train.py', fast + ['--task', 'superres', '--out', str(tmp_path / 'bad')])
    with pytest.raises(SystemExit, match='--aug-p'):
        check_program('train.py', fast + ['--task', 'superres', '--low-res', '8', '--aug-p', '0.2',
                                        '--out', str(tmp_path / 'bad')])
