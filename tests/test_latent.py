"""End-to-end latent diffusion through the command lines: train.py --task autoencoder, train.py --autoencoder CKPT,
then sample.py decoding the latents to pixels; exact resume of the autoencoder task (discriminator included)."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoints
import sample
from programs import check_program, run_program, weights

# Tiny autoencoder (f = 2, 2 latent channels) and a micro U-Net on 16x16 shapes: seconds on a CPU.
FAST = ['--resolution', '16', '--batch-size', '8', '--log-every', '2', '--sample-every', '0', '--warmup', '2',
        '--no-progress', '--bpd-images', '0']
AE = ['--task', 'autoencoder', '--vae-config', 'tiny-kl', '--lr', '1e-3', '--gan-start', '1', '--val-every', '2']


pytestmark = pytest.mark.usefixtures('one_thread')


def run(tmp_path, name, *extra):
    """python train.py FAST EXTRA --out tmp_path/name (--task autoencoder: train_autoencoder.py, which has no
    bits/dim to switch off)."""
    fast = FAST[:-2] if '--task' in extra else FAST
    return run_program('train.py', fast + ['--out', str(tmp_path / name)] + list(extra))


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def autoencoder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('latent')
    torch.set_num_threads(1)
    run(tmp, 'ae', *AE, '--steps', '4')
    return tmp


def test_autoencoder_task_logs_psnr_gan_and_stores_the_latent_scale(autoencoder_run):
    out = autoencoder_run / 'ae'
    records = read_log(out / 'log.jsonl')
    assert [r['step'] for r in records if 'val_psnr' in r] == [2, 4]
    parts = [r['loss_parts'] for r in records if 'loss_parts' in r]
    assert 'gan_weight' in parts[-1] and 'd_loss' in parts[-1]          # the GAN is on from --gan-start 1
    assert (out / 'samples_0000004.png').exists()                     # originals next to reconstructions
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['task'] == 'autoencoder' and 'discriminator' in ckpt and 'gan_optimizer' in ckpt
    # the stored scale gives the EMA model's latents of training images unit variance
    ae = checkpoints.load_autoencoder(str(out / 'ckpt.pt'))
    assert ae.config['scale_factor'] == ckpt['config']['net']['scale_factor'] != 1.0
    import data
    dataset = data.load_dataset('shapes', resolution=16)
    train_index, _ = data.holdout_split(len(dataset))
    z = ae.encode(dataset.batch(train_index[:1024])[0])
    assert abs(z.std(unbiased=False).item() - 1) < 1e-3


def test_latent_diffusion_then_sample_decodes_to_pixels(autoencoder_run, tmp_path):
    ae_ckpt = str(autoencoder_run / 'ae' / 'ckpt.pt')
    run(tmp_path, 'ld', '--autoencoder', ae_ckpt, '--model-channels', '8', '--steps', '2', '--val-every', '2',
        '--sample-steps', '3')
    ckpt = torch.load(tmp_path / 'ld' / 'ckpt.pt', weights_only=True)
    record = ckpt['config']['autoencoder']
    assert record['latent_shape'] == [2, 8, 8] and ckpt['config']['net']['in_channels'] == 2
    assert record['config']['scale_factor'] == torch.load(ae_ckpt, weights_only=True)['config']['net']['scale_factor']
    assert ckpt['config']['data']['resolution'] == 16                 # the data config describes the images
    assert (tmp_path / 'ld' / 'samples_0000002.png').exists()
    # sample.py decodes without extra flags: 16x16 RGB images, not 8x8 latents
    npz = tmp_path / 's.npz'
    sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'ld' / 'ckpt.pt'), '-n', '3', '--steps', '3',
                                   '--out', str(tmp_path / 's.png'), '--npz', str(npz)]))
    assert np.load(npz)['samples'].shape == (3, 16, 16, 3)
    # decoding equals the autoencoder's decode of the sampled latents (not a clamp of latents)
    net, diffusion, config = checkpoints.load_model(str(tmp_path / 'ld' / 'ckpt.pt'))
    latents = sample.generate(net, diffusion, 2, checkpoints.sample_shape(config), 'cpu', sampler='euler', steps=3)
    images = sample.generate(net, diffusion, 2, checkpoints.sample_shape(config), 'cpu', sampler='euler', steps=3,
                             decode=checkpoints.latent_decoder(config))
    ae = checkpoints.load_autoencoder(ae_ckpt)
    raw = sample.generate(net, diffusion, 2, checkpoints.sample_shape(config), 'cpu', sampler='euler', steps=3,
                          decode=lambda z: z / 100) * 100                # the same noise, latents not clamped
    assert torch.allclose(images, ae.decode(raw).clamp(-1, 1), atol=1e-5)
    assert latents.shape == (2, 2, 8, 8) and images.shape == (2, 3, 16, 16)
    # the autoencoder file is checked: replaced (or retrained in place) and missing are refused
    import shutil
    record_path = record['path']
    shutil.copy(record_path, tmp_path / 'backup.pt')
    try:
        with open(record_path, 'ab') as f:
            f.write(b'\0')
        with pytest.raises(SystemExit, match='not the autoencoder'):
            checkpoints.latent_decoder(config)
        os.remove(record_path)
        with pytest.raises(SystemExit, match='missing'):
            checkpoints.latent_decoder(config)
    finally:
        shutil.copy(tmp_path / 'backup.pt', record_path)
    assert checkpoints.latent_decoder(config) is not None
    # inverse problems act on pixels: refused for a latent model, with the reason
    with pytest.raises(SystemExit, match='pixel-space'):
        sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'ld' / 'ckpt.pt'), '--inverse', 'dps',
                                       '--out', str(tmp_path / 'inv.png')]))


def test_generate_decodes_latents_before_clamping_them():
    """x0-prediction with a constant network: every sample is the latent 3 everywhere (D = F, Euler's last step
    returns D). decode(z) = z / 10 must see 3, giving images 0.3; clamping the latents first would give 0.1."""
    from diffusion import Diffusion
    net = lambda x, noise_level, **cond: torch.full_like(x, 3.0)     # noqa: E731
    diffusion = Diffusion('cosine', 'x0')
    images = sample.generate(net, diffusion, 2, (2, 4, 4), 'cpu', sampler='euler', steps=3, decode=lambda z: z / 10)
    assert torch.allclose(images, torch.full((2, 2, 4, 4), 0.3))


def test_autoencoder_resume_is_exact(tmp_path):
    """4 steps straight vs 2 + resume 2, with the GAN on from step 1 (discriminator and its Adam restored)."""
    run(tmp_path, 'a', *AE, '--steps', '4', '--ckpt-every', '2')
    run(tmp_path, 'b', *AE, '--steps', '2', '--ckpt-every', '2')
    run(tmp_path, 'b', *AE, '--steps', '4', '--ckpt-every', '2', '--resume', 'auto')
    for a, b in zip(weights(tmp_path / 'a' / 'ckpt.pt', 'model'), weights(tmp_path / 'b' / 'ckpt.pt', 'model')):
        assert torch.equal(a, b)
    a = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    for k in a['discriminator']:
        assert torch.equal(a['discriminator'][k], b['discriminator'][k]), k


def test_autoencoder_flags_are_checked_before_work(tmp_path):
    with pytest.raises(SystemExit, match='vae-config'):                 # the programs' checks before any work, in-process
        check_program('train_autoencoder.py', FAST[:-2] + ['--vae-config', 'kl-f16', '--out', str(tmp_path / 'x')])
    with pytest.raises(SystemExit, match='does not exist'):
        check_program('train.py', FAST + ['--autoencoder', str(tmp_path / 'nothing.pt'), '--out', str(tmp_path / 'x')])
    with pytest.raises(SystemExit, match='unrecognized arguments: --aug-p'):   # a diffusion flag: not ignored
        run(tmp_path, 'x', '--task', 'autoencoder', '--aug-p', '0.5')
