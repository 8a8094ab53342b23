"""Tests for pretrained.py, without network: where files are looked for, the offline message, size and SHA-256
checks, download-then-verify-then-rename, and a registry model loaded end to end as a sigma-frame denoiser."""
import hashlib
import io
import os
import urllib.request

import pytest
import torch

import pretrained
from test_dit import official_dit_state_dict


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real weights folder, environment variable or network can leak into a test."""
    monkeypatch.delenv(pretrained.PRETRAINED_ENV, raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('offline (test)')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_files(content=b'weights', **spec):
    return {'w.bin': dict(url='https://example.org/w.bin', sha256=hashlib.sha256(content).hexdigest(),
                          size=len(content), about='7 bytes', **spec)}


def test_missing_files_message_names_each_url_and_exact_path(tmp_path):
    """The offline error says which files to put where: every missing file's URL and full destination path.
    (Planted mistake caught: listing only the first missing file.)"""
    with pytest.raises(FileNotFoundError) as info:
        pretrained.load_pretrained('dit-xl-2-256', weights_dir=str(tmp_path), download=False)
    message = str(info.value)
    for name in ('DiT-XL-2-256x256.pt', 'sd-vae-ft-mse.safetensors'):
        assert pretrained.FILES[name]['url'] in message
        assert os.path.join(str(tmp_path), name) in message
    assert pretrained.PRETRAINED_ENV in message


def test_offline_download_attempt_ends_in_the_same_message(tmp_path):
    with pytest.raises(FileNotFoundError, match='google-ddpm-cifar10-32.bin'):
        pretrained.load_pretrained('ddpm-cifar10', weights_dir=str(tmp_path), download=True)
    assert os.listdir(tmp_path) == []                 # no partial file left behind


def test_local_file_is_found_in_search_order(tmp_path, monkeypatch):
    """argument > $PRETRAINED_WEIGHTS_DIR > torch hub folder. (Planted mistake caught: the env folder first.)"""
    files = fake_files()
    first, second = tmp_path / 'arg', tmp_path / 'env'
    for folder in (first, second):
        folder.mkdir()
        (folder / 'w.bin').write_bytes(b'weights')
    monkeypatch.setenv(pretrained.PRETRAINED_ENV, str(second))
    assert pretrained.find_files(['w.bin'], str(first), False, files) == {'w.bin': str(first / 'w.bin')}
    assert pretrained.find_files(['w.bin'], None, False, files) == {'w.bin': str(second / 'w.bin')}


@pytest.mark.parametrize('content, message', [(b'weightz', 'SHA-256'), (b'weights!', 'bytes')])
def test_a_different_file_is_refused(tmp_path, content, message):
    """Same name, other bytes (same size: the hash catches it; other size: the size check, before hashing).
    (Planted mistake caught: verification skipped for files found locally.)"""
    (tmp_path / 'w.bin').write_bytes(content)
    with pytest.raises(ValueError, match=message):
        pretrained.find_files(['w.bin'], str(tmp_path), False, fake_files())


def test_registry_hash_refuses_a_wrong_ddpm_file(tmp_path):
    (tmp_path / 'google-ddpm-cifar10-32.bin').write_bytes(b'not the DDPM weights')
    with pytest.raises(ValueError, match='SHA-256'):
        pretrained.load_pretrained('ddpm-cifar10', weights_dir=str(tmp_path), download=False)


@pytest.mark.parametrize('served, ok', [(b'weights', True), (b'weightz', False)])
def test_download_is_verified_before_it_gets_its_name(tmp_path, monkeypatch, served, ok):
    """A download is written to a temporary file and renamed only once its hash matches: a bad one leaves nothing.
    (Planted mistake caught: writing straight to the final name.)"""
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout=None: io.BytesIO(served))
    if ok:
        assert pretrained.find_files(['w.bin'], str(tmp_path), True, fake_files()) == {'w.bin': str(tmp_path / 'w.bin')}
        assert (tmp_path / 'w.bin').read_bytes() == served
    else:
        with pytest.raises(ValueError, match='SHA-256'):
            pretrained.find_files(['w.bin'], str(tmp_path), True, fake_files())
        assert os.listdir(tmp_path) == []


def test_unknown_model_name():
    with pytest.raises(ValueError, match='dit-xl-2-256'):
        pretrained.load_pretrained('dit-xl-2')


def test_learned_sigma_dit_becomes_an_eps_denoiser_on_ddpms_linear_schedule(tmp_path, monkeypatch):
    """A small DiT file in the official layout (DiT-tiny/2's shapes), registered like DiT-XL/2, loads as D(x, sigma) = x - sigma eps_hat with
    eps_hat the first C of the 2C output channels, evaluated at c_in x = x / sqrt(1 + sigma^2) and the step index t
    whose sigma this is (DDPM linear, T = 1000); class 1000 is "no class". (Planted mistake caught: the variance
    half taken instead of eps.)"""
    sd = official_dit_state_dict(depth=2, hidden=64)
    torch.save(sd, tmp_path / 'DiT-tiny-2-test.pt')
    digest = pretrained.sha256_of(tmp_path / 'DiT-tiny-2-test.pt')
    monkeypatch.setitem(pretrained.FILES, 'DiT-tiny-2-test.pt', dict(url='https://example.org/x', sha256=digest,
                                                                  size=None, about='1 MB'))
    monkeypatch.setitem(pretrained.PRETRAINED, 'test-dit', dict(kind='dit', weights='DiT-tiny-2-test.pt', vae=None,
                                                                dataset='imagenet', resolution=8, channels=4,
                                                                num_classes=1000))
    net, diffusion, config, vae = pretrained.load_pretrained('test-dit', weights_dir=str(tmp_path), download=False)
    assert vae is None and config['autoencoder'] is None and config['data']['num_classes'] == 1000
    official = pretrained.dit.load_official_dit(sd)
    # DDPM's linear schedule, written out: beta_t = 1e-4 + (0.02 - 1e-4) t / 999, abar_t = prod (1 - beta_s)
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * t / 999 for t in range(1000)], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([10, 500])
    sigma = ((1 - abar[t]) / abar[t]).sqrt().float()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 1000])
    with torch.no_grad():
        eps = official(x / (1 + sigma ** 2).sqrt()[:, None, None, None], t.float(), y)[:, :4]
        expected = x - sigma[:, None, None, None] * eps
        denoised = diffusion.denoiser(net)(x, sigma, y=y)
    torch.testing.assert_close(denoised, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# sample.py --pretrained NAME

class LinearDecoder:
    """A stand-in autoencoder whose decoder is known in closed form: image = 0.01 * z[:, :3], upsampled 2x."""
    config = {'scale_factor': 1.0, 'shift_factor': 0.0}

    def decode(self, z):
        return 0.01 * z[:, :3].repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


def register_latent_test_model(tmp_path, monkeypatch):
    """A tiny official-layout DiT registered as a latent model, with a verified stand-in VAE file."""
    torch.save(official_dit_state_dict(depth=2, hidden=64), tmp_path / 'DiT-tiny-2-test.pt')
    (tmp_path / 'fake-vae.safetensors').write_bytes(b'vae')
    for name in ('DiT-tiny-2-test.pt', 'fake-vae.safetensors'):
        monkeypatch.setitem(pretrained.FILES, name, dict(url=f'https://example.org/{name}', size=None, about='1 MB',
                                                         sha256=pretrained.sha256_of(tmp_path / name)))
    monkeypatch.setitem(pretrained.PRETRAINED, 'test-latent-dit', dict(
        kind='dit', weights='DiT-tiny-2-test.pt', vae='fake-vae.safetensors', dataset='imagenet', resolution=16,
        channels=3, num_classes=1000))
    import vae
    monkeypatch.setattr(vae, 'load_sd_vae', lambda path, device='cpu': LinearDecoder())


def test_sample_cli_pretrained_latent_model_decodes_unclamped_latents(tmp_path, monkeypatch):
    """sample.py --pretrained samples the latents with our sampler and guidance, then decodes them before any
    clamp: with decoder 0.01 z, images reach beyond 0.01 only if the latents were not clamped to [-1, 1] first.
    (Planted mistake caught: decoding the clamped output of generate.)"""
    import numpy as np
    import sample
    register_latent_test_model(tmp_path, monkeypatch)
    out, npz = tmp_path / 'grid.png', tmp_path / 'samples.npz'
    sample.main(sample.parse_args(['--pretrained', 'test-latent-dit', '--weights-dir', str(tmp_path), '--no-download',
                                   '-n', '2', '--sampler', 'euler', '--steps', '3', '--guidance', '3', '--class', '5',
                                   '--out', str(out), '--npz', str(npz)]))
    images = np.load(npz)['samples']
    assert out.is_file() and images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(float) - 127.5).max() > 3          # |x| > 0.02: latents beyond [-1, 1] decoded


@pytest.mark.parametrize('argv, message', [
    ([], 'either --ckpt'),
    (['--pretrained', 'dit-xl-2'], 'must be one of'),
    (['--pretrained', 'ddpm-cifar10', '--inverse', 'dps'], 'checkpoints'),
])
def test_sample_cli_pretrained_flag_checks(argv, message, capsys):
    import sample
    with pytest.raises(SystemExit, match=message):
        sample.main(sample.parse_args(argv))


def test_sample_cli_offline_message(tmp_path):
    import sample
    with pytest.raises(SystemExit, match='google-ddpm-cifar10-32.bin'):
        sample.main(sample.parse_args(['--pretrained', 'ddpm-cifar10', '--weights-dir', str(tmp_path), '--no-download',
                                       '--out', str(tmp_path / 'x.png')]))
