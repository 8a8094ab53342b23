"""sample.py: the one generation routine against closed forms (a network whose denoiser is the exact Gaussian one),
its seeding and batching, sampler options checked before any work, checkpoint loading errors, the PNG layout,
and that sampling never imports training."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import sample
import samplers
from diffusion import Diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MU = torch.tensor([-0.5, 0.4])        # class means of the toy data; the "no class" index 2 has mean 0
S = 0.1                               # per-pixel standard deviation of every class


class ExactGaussianNet(torch.nn.Module):
    """A 'network' whose denoiser is exactly E[x0 | x] for x0 ~ N(mu_y, S^2 I): D = mu + S^2/(S^2 + sigma^2) (x - mu)
    (Tweedie; DESIGN.md's closed form), expressed as the raw output F that EDM preconditioning expects."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion, self.calls = diffusion, 0

    def forward(self, x_in, c_noise, y=None):
        self.calls += 1
        sigma = torch.exp(4 * c_noise)                                  # EDM: c_noise = ln(sigma) / 4
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in self.diffusion.preconditioning(sigma))
        x = x_in / c_in
        mu = torch.cat([MU, torch.zeros(1)])[y].view(-1, 1, 1, 1) if y is not None else 0
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        D = mu + S ** 2 / (S ** 2 + s2) * (x - mu)
        return (D - c_skip * x) / c_out


@pytest.fixture
def toy():
    diffusion = Diffusion('edm', 'edm', sigma_data=0.5)
    return ExactGaussianNet(diffusion), diffusion


def test_generate_draws_each_requested_class_from_its_distribution(toy):
    """The probability-flow ODE of the exact denoiser carries N(0, sigma_max^2) to N(mu_y, S^2): the labels reach
    the network and Heun's 18 steps are accurate. (Planted: labels ignored -> every class has mean 0 -> fails.)"""
    net, diffusion = toy
    labels = torch.tensor([0, 1]).repeat_interleave(200)
    x = sample.generate(net, diffusion, 400, (1, 4, 4), 'cpu', labels, num_classes=2, sampler='heun', steps=18,
                        guidance=1.0, seed=0, batch_size=150)
    assert x.device.type == 'cpu' and x.shape == (400, 1, 4, 4)
    for c in (0, 1):
        xc = x[labels == c]
        assert abs(xc.mean().item() - MU[c].item()) < 0.01, c           # 3200 values: standard error 0.002
        assert abs(xc.std().item() - S) < 0.01, c


def test_batches_are_seeded_by_their_first_index(toy):
    """A sample depends on (seed, batch size, index) only: the second batch of n=6 in batches of 4 is the single
    batch of n=2 with seed + 4. (Planted: every batch seeded with `seed` -> batches repeat -> fails.)"""
    net, diffusion = toy
    kw = dict(labels=torch.tensor([0, 1, 0, 1, 1, 0]), num_classes=2, sampler='euler_ancestral', steps=5)
    full = sample.generate(net, diffusion, 6, (1, 4, 4), 'cpu', seed=3, batch_size=4, **kw)
    kw['labels'] = kw['labels'][4:]
    tail = sample.generate(net, diffusion, 2, (1, 4, 4), 'cpu', seed=7, **kw)
    assert torch.equal(full[4:], tail)
    assert not torch.equal(full[:2], full[4:])


def test_unknown_sampler_option_fails_before_any_sampling(toy):
    net, diffusion = toy
    with pytest.raises(ValueError, match="'euler' has no option 'eta'"):
        sample.generate(net, diffusion, 2, (1, 4, 4), 'cpu', sampler='euler', sampler_options={'eta': 0.5})
    assert net.calls == 0
    with pytest.raises(ValueError, match='unknown sampler'):
        sample.generate(net, diffusion, 2, (1, 4, 4), 'cpu', sampler='eulr')


def test_sampler_options_reach_the_sampler(toy):
    """ddim with eta=1 draws fresh noise (seeded: reproducible), eta=0 does not: the outputs differ. (Planted:
    options dropped -> both runs deterministic DDIM -> equal -> fails.)"""
    net, diffusion = toy
    run = lambda **o: sample.generate(net, diffusion, 4, (1, 4, 4), 'cpu', sampler='ddim', steps=6, seed=1, sampler_options=o)
    assert torch.equal(run(eta=1.0), run(eta=1.0))
    assert not torch.allclose(run(eta=1.0), run(eta=0.0))


def test_callback_sees_every_step_with_its_sigma(toy):
    net, diffusion = toy
    seen = []
    sample.generate(net, diffusion, 2, (1, 4, 4), 'cpu', sampler='heun', steps=7, callback=lambda info: seen.append(info))
    sigmas = samplers.karras_sigmas(7, diffusion.sigma_min, diffusion.sigma_max)
    assert [i['i'] for i in seen] == list(range(7))
    assert torch.allclose(torch.tensor([float(i['sigma']) for i in seen]), sigmas[:-1])


def test_non_finite_samples_are_an_error_not_a_black_image(toy):
    net, diffusion = toy
    with pytest.raises(FloatingPointError, match='non-finite'):
        sample.generate(lambda x, c, **k: x * float('nan'), diffusion, 2, (1, 4, 4), 'cpu', steps=3)
    with pytest.raises(ValueError, match='guidance'):
        sample.generate(net, diffusion, 2, (1, 4, 4), 'cpu', guidance=float('nan'))


def test_save_grid_layout_and_values(tmp_path):
    """Two 1x2x2 images, -1 and +1: a 2-pixel white border around each, -1 -> 0 and +1 -> 255 exactly."""
    from PIL import Image
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    sample.save_grid(images, str(tmp_path / 'g.png'), nrow=2)
    arr = np.asarray(Image.open(tmp_path / 'g.png'))
    assert arr.shape == (6, 10)
    assert (arr[2:4, 2:4] == 0).all() and (arr[2:4, 6:8] == 255).all()
    assert (arr[:2] == 255).all() and (arr[:, 4:6] == 255).all()
    assert not any(f.endswith('.tmp.png') for f in os.listdir(tmp_path))


def test_load_checkpoint_says_what_is_wrong(tmp_path):
    """Checkpoints are user input: wrong objects and missing keys give messages, not KeyError/AttributeError."""
    cases = {'list.pt': [1, 2], 'bare.pt': {'conv.weight': torch.zeros(2)},
             'noema.pt': {'config': {'model': 'unet', 'net': {}, 'diffusion': {}, 'data': {}}, 'model': {}},
             'noconfig.pt': {'config': {'model': 'unet'}, 'model': {}, 'ema': {}}}
    expect = {'list.pt': 'holds a list', 'bare.pt': 'missing config', 'noema.pt': 'missing ema',
              'noconfig.pt': 'missing config.net'}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(SystemExit, match=expect[name]):
            sample.load_checkpoint(str(tmp_path / name))


def test_import_sample_does_not_import_train():
    code = "import sys, sample; assert 'train' not in sys.modules, 'sample imported train'"
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=60)


def test_parse_sampler_options():
    assert sample.parse_sampler_options(['eta=0.5', 'S_churn=40', 'corrector=False', 'variance=fixed_large']) == \
        {'eta': 0.5, 'S_churn': 40, 'corrector': False, 'variance': 'fixed_large'}
    with pytest.raises(ValueError, match='KEY=VALUE'):
        sample.parse_sampler_options(['eta'])


def test_uint8_conversion_is_data_to_uint8():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0])
    assert data.to_uint8(x).tolist() == [0, 0, 128, 255, 255]
