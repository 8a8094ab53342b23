"""Tests for pretrained.py, without network: where files are looked for, the offline message, size and SHA-256
checks, download-then-verify-then-rename, a registry model loaded end to end as a sigma-frame denoiser, and the
Stable Diffusion VAE loaders (diffusers and LDM layouts into vae.py's names)."""
import hashlib
import io
import math
import os
import urllib.request

import pytest
import torch

import pretrained
import vae
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
    # checkpoints.py's one schema (make_config), readable by its readers as a train.py checkpoint's config
    assert set(config) == {'task', 'model', 'config_name', 'net', 'diffusion', 'data', 'pretrained', 'autoencoder'}
    assert config['task'] == 'diffusion' and config['data']['frames'] == 0 and config['pretrained'] == 'test-dit'
    assert pretrained.checkpoints.config_problem(config) is None
    assert pretrained.checkpoints.build_diffusion(config).schedule.T == 1000
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
    monkeypatch.setattr(pretrained, 'load_sd_vae', lambda path, device='cpu': LinearDecoder())


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


# ----------------------------------------------------------------------------
# Stable Diffusion VAE loaders. The official layouts are written out here independently of pretrained.official_key,
# from the diffusers AutoencoderKL and LDM (ldm/modules/diffusionmodules/model.py) module trees.

def resnet_keys(prefix, cin, cout, shortcut_name):
    keys = {f'{prefix}.norm1.weight': (cin,), f'{prefix}.norm1.bias': (cin,),
            f'{prefix}.conv1.weight': (cout, cin, 3, 3), f'{prefix}.conv1.bias': (cout,),
            f'{prefix}.norm2.weight': (cout,), f'{prefix}.norm2.bias': (cout,),
            f'{prefix}.conv2.weight': (cout, cout, 3, 3), f'{prefix}.conv2.bias': (cout,)}
    if cin != cout:
        keys.update({f'{prefix}.{shortcut_name}.weight': (cout, cin, 1, 1), f'{prefix}.{shortcut_name}.bias': (cout,)})
    return keys


def diffusers_layout(ch, mult, nres, z, old_attention=False):
    widths, keys = [ch * m for m in mult], {}
    q, k, v, o = ('query', 'key', 'value', 'proj_attn') if old_attention else ('to_q', 'to_k', 'to_v', 'to_out.0')

    def mid(prefix, c):
        keys.update(resnet_keys(f'{prefix}.mid_block.resnets.0', c, c, 'conv_shortcut'))
        keys.update(resnet_keys(f'{prefix}.mid_block.resnets.1', c, c, 'conv_shortcut'))
        keys.update({f'{prefix}.mid_block.attentions.0.group_norm.weight': (c,),
                     f'{prefix}.mid_block.attentions.0.group_norm.bias': (c,)})
        for name in (q, k, v, o):
            keys.update({f'{prefix}.mid_block.attentions.0.{name}.weight': (c, c),
                         f'{prefix}.mid_block.attentions.0.{name}.bias': (c,)})

    keys.update({'encoder.conv_in.weight': (ch, 3, 3, 3), 'encoder.conv_in.bias': (ch,)})
    cin = ch
    for i, w in enumerate(widths):
        for j in range(nres):
            keys.update(resnet_keys(f'encoder.down_blocks.{i}.resnets.{j}', cin, w, 'conv_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'encoder.down_blocks.{i}.downsamplers.0.conv.weight': (w, w, 3, 3),
                         f'encoder.down_blocks.{i}.downsamplers.0.conv.bias': (w,)})
    mid('encoder', widths[-1])
    keys.update({'encoder.conv_norm_out.weight': (widths[-1],), 'encoder.conv_norm_out.bias': (widths[-1],),
                 'encoder.conv_out.weight': (2 * z, widths[-1], 3, 3), 'encoder.conv_out.bias': (2 * z,),
                 'quant_conv.weight': (2 * z, 2 * z, 1, 1), 'quant_conv.bias': (2 * z,),
                 'post_quant_conv.weight': (z, z, 1, 1), 'post_quant_conv.bias': (z,),
                 'decoder.conv_in.weight': (widths[-1], z, 3, 3), 'decoder.conv_in.bias': (widths[-1],)})
    mid('decoder', widths[-1])
    cin = widths[-1]
    for i, w in enumerate(widths[::-1]):                              # up_blocks.0 is the deepest level
        for j in range(nres + 1):
            keys.update(resnet_keys(f'decoder.up_blocks.{i}.resnets.{j}', cin, w, 'conv_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'decoder.up_blocks.{i}.upsamplers.0.conv.weight': (w, w, 3, 3),
                         f'decoder.up_blocks.{i}.upsamplers.0.conv.bias': (w,)})
    keys.update({'decoder.conv_norm_out.weight': (ch,), 'decoder.conv_norm_out.bias': (ch,),
                 'decoder.conv_out.weight': (3, ch, 3, 3), 'decoder.conv_out.bias': (3,)})
    return keys


def ldm_layout(ch, mult, nres, z):
    widths, keys = [ch * m for m in mult], {}

    def mid(prefix, c):
        keys.update(resnet_keys(f'{prefix}.mid.block_1', c, c, 'nin_shortcut'))
        keys.update(resnet_keys(f'{prefix}.mid.block_2', c, c, 'nin_shortcut'))
        keys.update({f'{prefix}.mid.attn_1.norm.weight': (c,), f'{prefix}.mid.attn_1.norm.bias': (c,)})
        for name in ('q', 'k', 'v', 'proj_out'):                      # 1x1 convs in LDM
            keys.update({f'{prefix}.mid.attn_1.{name}.weight': (c, c, 1, 1), f'{prefix}.mid.attn_1.{name}.bias': (c,)})

    keys.update({'encoder.conv_in.weight': (ch, 3, 3, 3), 'encoder.conv_in.bias': (ch,)})
    cin = ch
    for i, w in enumerate(widths):
        for j in range(nres):
            keys.update(resnet_keys(f'encoder.down.{i}.block.{j}', cin, w, 'nin_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'encoder.down.{i}.downsample.conv.weight': (w, w, 3, 3),
                         f'encoder.down.{i}.downsample.conv.bias': (w,)})
    mid('encoder', widths[-1])
    keys.update({'encoder.norm_out.weight': (widths[-1],), 'encoder.norm_out.bias': (widths[-1],),
                 'encoder.conv_out.weight': (2 * z, widths[-1], 3, 3), 'encoder.conv_out.bias': (2 * z,),
                 'quant_conv.weight': (2 * z, 2 * z, 1, 1), 'quant_conv.bias': (2 * z,),
                 'post_quant_conv.weight': (z, z, 1, 1), 'post_quant_conv.bias': (z,),
                 'decoder.conv_in.weight': (widths[-1], z, 3, 3), 'decoder.conv_in.bias': (widths[-1],)})
    mid('decoder', widths[-1])
    cin = widths[-1]
    for i in reversed(range(len(widths))):                           # LDM: decoder.up.0 is the shallowest level
        w = widths[i]
        for j in range(nres + 1):
            keys.update(resnet_keys(f'decoder.up.{i}.block.{j}', cin, w, 'nin_shortcut'))
            cin = w
        if i > 0:
            keys.update({f'decoder.up.{i}.upsample.conv.weight': (w, w, 3, 3),
                         f'decoder.up.{i}.upsample.conv.bias': (w,)})
    keys.update({'decoder.norm_out.weight': (ch,), 'decoder.norm_out.bias': (ch,),
                 'decoder.conv_out.weight': (3, ch, 3, 3), 'decoder.conv_out.bias': (3,)})
    return keys


SMALL_SD = dict(channels=8, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, norm_groups=4)


def random_state(layout_keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in layout_keys.items()}


@pytest.mark.parametrize('layout', ['diffusers', 'diffusers-old', 'ldm'])
def test_sd_loader_maps_every_official_key_of_the_full_config(layout):
    """The real sd-kl-f8 shapes (meta tensors: no memory): every key is used, none is missing."""
    args = (128, (1, 2, 4, 4), 2, 4)
    keys = ldm_layout(*args) if layout == 'ldm' else diffusers_layout(*args, old_attention=layout == 'diffusers-old')
    state = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    with torch.device('meta'):
        model = vae.create_autoencoder('sd-kl-f8')
    converted = pretrained.convert_official_state_dict(state, model)
    assert len(converted) == len(keys) == len(model.state_dict())
    assert sum(math.prod(s) for s in keys.values()) == 83_653_863   # diffusers AutoencoderKL's count for this config


def test_sd_loaders_agree_and_place_each_tensor():
    """The same numbers under diffusers names and LDM names give the same model; spot-check where tensors land."""
    diffusers_state = random_state(diffusers_layout(8, (1, 2, 4, 4), 2, 4))
    # the LDM dict holds the same numbers, renamed by hand for a few tensors whose placement is easy to get wrong
    ldm_keys = ldm_layout(8, (1, 2, 4, 4), 2, 4)
    ldm_state = random_state(ldm_keys, seed=1)
    pairs = {'decoder.up.3.block.0.conv1.weight': 'decoder.up_blocks.0.resnets.0.conv1.weight',   # deepest level
             'decoder.up.0.block.2.conv2.weight': 'decoder.up_blocks.3.resnets.2.conv2.weight',   # shallowest
             'decoder.up.1.block.0.nin_shortcut.weight': 'decoder.up_blocks.2.resnets.0.conv_shortcut.weight',
             'encoder.down.1.downsample.conv.weight': 'encoder.down_blocks.1.downsamplers.0.conv.weight',
             'encoder.mid.attn_1.proj_out.bias': 'encoder.mid_block.attentions.0.to_out.0.bias'}
    for ldm_key, diffusers_key in pairs.items():
        ldm_state[ldm_key] = diffusers_state[diffusers_key].clone()
    ldm_state['decoder.mid.attn_1.q.weight'] = diffusers_state['decoder.mid_block.attentions.0.to_q.weight'][:, :, None, None]
    from_diffusers = pretrained.load_sd_vae(diffusers_state, config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    from_ldm = pretrained.load_sd_vae({'first_stage_model.' + k: v for k, v in ldm_state.items()},
                                      config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    assert torch.equal(from_diffusers.decoder.up[0].res[0].conv1.weight,
                       diffusers_state['decoder.up_blocks.0.resnets.0.conv1.weight'])
    for ldm_key, diffusers_key in pairs.items():
        assert torch.equal(from_ldm.state_dict()[_our_name(from_ldm, ldm_key, ldm_state)],
                           from_diffusers.state_dict()[_our_name(from_diffusers, diffusers_key, diffusers_state)])
    assert torch.equal(from_ldm.decoder.mid.attn.q.weight, from_diffusers.decoder.mid.attn.q.weight)
    assert from_ldm.config['scale_factor'] == 0.18215


def _our_name(model, official, state):
    """Which of our parameters holds the tensor stored under `official` (found by identity of values)."""
    matches = [k for k, v in model.state_dict().items() if v.shape == state[official].shape and torch.equal(v, state[official])]
    assert len(matches) == 1, (official, matches)
    return matches[0]


@pytest.mark.parametrize('damage', ['rename', 'drop', 'shape', 'extra'])
def test_sd_loader_rejects_wrong_state_dicts_clearly(damage):
    state = random_state(diffusers_layout(8, (1, 2, 4, 4), 2, 4))
    key = 'decoder.up_blocks.1.resnets.2.conv1.weight'
    if damage == 'rename':
        state['decoder.up_blocks.1.resnets.2.conv_1.weight'] = state.pop(key)
    elif damage == 'drop':
        del state[key]
    elif damage == 'shape':
        state[key] = state[key][:, :, :1, :1]
    else:
        state['decoder.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        pretrained.load_sd_vae(state, config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    message = str(error.value)
    expected = {'rename': ('unexpected keys', 'conv_1'), 'drop': ('missing keys', key),
                'shape': ('wrong shapes', key), 'extra': ('unexpected keys', 'decoder.extra.weight')}[damage]
    assert all(part in message for part in expected), message


def test_safetensors_reader(tmp_path):
    """The file format: 8-byte little-endian header length, JSON header with dtype/shape/offsets, raw data."""
    import json
    import struct
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1.5, -2.0], dtype=torch.float16)
    header = {'a': dict(dtype='F32', shape=[2, 3], data_offsets=[0, 24]),
              'b': dict(dtype='F16', shape=[2], data_offsets=[24, 28]), '__metadata__': {'format': 'pt'}}
    raw = json.dumps(header).encode()
    path = tmp_path / 'x.safetensors'
    path.write_bytes(struct.pack('<Q', len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes())
    state = pretrained.read_safetensors(str(path))
    assert torch.equal(state['a'], a) and torch.equal(state['b'], b) and state['b'].dtype == torch.float16
