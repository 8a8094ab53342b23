"""Tests of inception.py: the resize protocols (legacy = pytorch-fid by default), TF pooling, the weight file's
layout, loading with clear errors, and finding/downloading/verifying the weights."""
import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inception

# Layout of the real weight file: key count and sha256 of the sorted 'key (shape)' lines of
# pytorch-fid's fid_inception_v3() state dict (printed by benchmarks/inception_parity.py).
FID_FILE_NUM_KEYS = 566
FID_FILE_LAYOUT_SHA256 = '760681d791cb624e1bf7a2e802a68933dd17aa5e3109fcf498d9dfa521bc10d7'


pytestmark = pytest.mark.usefixtures('one_thread_per_module')


# ----------------------------------------------------------------------------------------------------
# Resizing and the Inception network

@pytest.mark.parametrize('size', [16, 64, 400])
def test_clean_resize_matches_pil_bicubic(size):
    # "clean" mode must equal PIL's antialiased bicubic (float mode, per channel) as clean-fid uses it.
    x = torch.rand(1, 3, size, size)
    pil = np.stack([np.asarray(Image.fromarray(x[0, c].numpy(), mode='F').resize((299, 299), Image.BICUBIC))
                    for c in range(3)])
    ours = inception.resize_images(x, 299, 'clean')[0].numpy()
    np.testing.assert_allclose(ours, np.clip(pil, 0, 1), atol=1e-6)


def test_legacy_resize_is_pytorch_fid_bilinear_and_identity_at_299():
    x = torch.rand(2, 3, 40, 40)
    expected = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    assert torch.equal(inception.resize_images(x, 299, 'legacy'), expected)
    y = torch.rand(1, 3, 299, 299)
    assert inception.resize_images(y, 299, 'clean') is y
    with pytest.raises(ValueError, match='resize mode'):
        inception.resize_images(x, 299, 'nearest')


def test_tf_average_pool_ignores_padding():
    # TF's avg_pool divides by the number of in-image cells, so a constant image stays constant at the
    # border (PyTorch's default count_include_pad=True would give 4/9 in the corners).
    out = inception.avg_pool_3x3(torch.ones(1, 1, 5, 5))
    assert torch.allclose(out, torch.ones_like(out))


def test_inception_state_dict_has_the_real_file_layout():
    state = inception.FIDInceptionV3().state_dict()
    lines = sorted(f'{k} {tuple(v.shape)}' for k, v in state.items())
    assert len(lines) == FID_FILE_NUM_KEYS
    assert hashlib.sha256('\n'.join(lines).encode()).hexdigest() == FID_FILE_LAYOUT_SHA256
    assert state['fc.weight'].shape == (1008, 2048)


@pytest.fixture(scope='module')
def weight_file(tmp_path_factory):
    """Random weights saved under the real file name and key names."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('weights') / inception.FID_WEIGHTS_NAME
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return str(path)


def test_load_inception_and_features(weight_file):
    model = inception.load_inception(weight_file, 'cpu', download=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    gray = torch.rand(1, 1, 24, 24)
    x = torch.cat([torch.rand(1, 3, 24, 24), gray.expand(-1, 3, -1, -1)])
    with torch.no_grad():  # two full forward passes only: ~1 s per image at 299x299 on a CPU core
        feats, logits = model(x, return_logits=True)
        feats_gray = model(gray)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (feats >= 0).all()  # mean-pool of ReLU outputs
    torch.testing.assert_close(logits, model.fc(feats) - model.fc.bias)  # IS logits leave out the bias
    torch.testing.assert_close(feats_gray, feats[1:], atol=1e-4, rtol=1e-4)  # gray = same image in R, G, B


def test_load_inception_accepts_file_without_batchnorm_counters(tmp_path, weight_file):
    state = {k: v for k, v in torch.load(weight_file).items() if not k.endswith('num_batches_tracked')}
    path = tmp_path / 'old.pth'
    torch.save(state, path)
    model = inception.load_inception(str(path), download=False)
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, state['Mixed_7c.branch_pool.conv.weight'])


def test_load_inception_rejects_wrong_files_clearly(tmp_path, weight_file):
    state = torch.load(weight_file)
    bad_key = dict(state)
    bad_key['Mixed_5b.extra.weight'] = bad_key.pop('Mixed_5b.branch1x1.conv.weight')
    bad_shape = dict(state, **{'fc.weight': torch.zeros(1000, 2048)})
    cases = {'key.pth': (bad_key, 'missing keys'), 'shape.pth': (bad_shape, r'fc.weight: shape \(1000, 2048\)'),
             'list.pth': ([1, 2, 3], 'not a state dict')}
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=message) as info:
            inception.load_inception(str(tmp_path / name), download=False)
        assert inception.FID_WEIGHTS_URL in str(info.value)  # the message says where to get the right file
    (tmp_path / 'html.pth').write_text('<html>404</html>')
    with pytest.raises(ValueError, match='could not read'):
        inception.load_inception(str(tmp_path / 'html.pth'), download=False)


def test_missing_weights_message_says_where_to_get_and_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, 'default_cache_dir', lambda: str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError) as info:
        inception.find_inception_weights(None, download=False)
    message = str(info.value)
    assert inception.FID_WEIGHTS_URL in message and inception.FID_WEIGHTS_ENV in message
    assert str(tmp_path / 'cache') in message and '--inception-weights' in message
    with pytest.raises(FileNotFoundError, match='does not exist'):
        inception.find_inception_weights(str(tmp_path / 'nope.pth'))


def test_download_is_verified_before_it_is_kept(tmp_path, monkeypatch):
    import io
    import urllib.error
    payload = b'pretend weights'
    monkeypatch.delenv(inception.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception.urllib.request, 'urlopen', lambda url, timeout: io.BytesIO(payload))
    with pytest.raises(RuntimeError, match='sha256'):  # the real prefix cannot match these bytes
        inception.find_inception_weights(cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # no partial or unverified file left behind
    monkeypatch.setattr(inception, 'FID_WEIGHTS_SHA256_PREFIX', hashlib.sha256(payload).hexdigest()[:8])
    path = inception.find_inception_weights(cache_dir=str(tmp_path))
    assert path == str(tmp_path / inception.FID_WEIGHTS_NAME) and open(path, 'rb').read() == payload

    def offline(url, timeout):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(inception.urllib.request, 'urlopen', offline)
    with pytest.raises(FileNotFoundError, match='could not download') as info:
        inception.find_inception_weights(cache_dir=str(tmp_path / 'empty'))
    assert inception.FID_WEIGHTS_URL in str(info.value)


def test_weights_found_through_environment_and_cache(tmp_path, monkeypatch):
    file = tmp_path / 'w.pth'
    file.write_bytes(b'x')
    monkeypatch.setenv(inception.FID_WEIGHTS_ENV, str(file))
    assert inception.find_inception_weights(download=False) == str(file)
    monkeypatch.delenv(inception.FID_WEIGHTS_ENV)
    cached = tmp_path / inception.FID_WEIGHTS_NAME
    cached.write_bytes(b'x')
    assert inception.find_inception_weights(download=False, cache_dir=str(tmp_path)) == str(cached)


def test_the_default_protocol_is_pytorch_fids_legacy_resize(weight_file):
    # Published FIDs (DDPM, ADM, EDM, DiT) use pytorch-fid's/TF's bilinear resize; the default must be it, so
    # that a plain load_inception() gives comparable numbers. Clean resizing differs visibly at 32x32.
    x = torch.rand(2, 3, 32, 32)
    bilinear = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    assert torch.equal(inception.resize_images(x, 299), bilinear)
    assert (inception.resize_images(x, 299, 'clean') - bilinear).abs().max() > 0.05
    assert inception.load_inception(weight_file, download=False).resize == 'legacy'   # what forward() resizes with
    with torch.device('meta'):
        assert inception.FIDInceptionV3().resize == 'legacy'
