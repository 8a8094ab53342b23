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


# ----------------------------------------------------------------------------------------------------
# The fast path (issue 31): NHWC convolutions with the batch norms folded in, against the exact path, which is
# pytorch-fid's arithmetic bit for bit (benchmarks/inception_parity.py, benchmarks/speed.py)

@pytest.fixture(scope='module')
def calibrated_weight_file(tmp_path_factory, one_thread_per_module):
    """Random weights under the real key names, with BatchNorm statistics calibrated on random images.

    With PyTorch's default init the activations shrink layer after layer and every feature ends near 0, where any
    two paths agree. Calibrating the running statistics (a train-mode pass with cumulative averages) keeps
    activations at unit scale through all 94 layers, as trained weights do, and random BN affines test the fold's
    gamma and beta. (benchmarks/inception_parity.py does the same on pytorch-fid's module.)"""
    torch.manual_seed(0)
    net = inception.FIDInceptionV3()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    batch = torch.cat([F.interpolate(torch.rand(1, 3, s, s, generator=g), size=(299, 299), mode='bilinear',
                                     align_corners=False) for s in (32, 64, 128, 299)])
    with torch.no_grad():
        net.train()(batch)                                         # forward maps [0, 1] to [-1, 1] itself
    path = tmp_path_factory.mktemp('calibrated') / inception.FID_WEIGHTS_NAME
    torch.save(net.eval().state_dict(), path)
    return str(path)


@pytest.fixture(scope='module')
def exact_and_fast(calibrated_weight_file):
    return (inception.load_inception(calibrated_weight_file, download=False),
            inception.load_inception(calibrated_weight_file, download=False, fast=True))


@pytest.mark.parametrize('shape', [(2, 3, 32, 32), (2, 3, 64, 64), (1, 3, 299, 299), (1, 3, 384, 512)])
def test_fast_path_features_equal_the_exact_ones_within_1e_4(exact_and_fast, shape):
    """load_inception(fast=True) (evaluate.py's default) gives the exact path's features and IS logits within 1e-4
    of the features' scale. The exact path is pytorch-fid's arithmetic bit for bit. The budget is float32
    rounding: on these random weights a one-ulp change of the input, or pytorch-fid itself run in NHWC, moves the
    features by about the same amount (measured 4.5e-5 and 6.9e-5 at 32 px, 1.1e-4 and 1.6e-4 at 299 px, of a
    scale ~2-3; this path 8.3e-5 and 1.6e-4). (Planted and caught: eps 1e-5 in the fold, off by ~1; the fold's
    bias without the running mean.)"""
    exact, fast = exact_and_fast
    assert all(m.bn is None for m in fast.modules() if isinstance(m, inception.BasicConv2d))
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 255).round() / 255   # 8-bit levels
    with torch.inference_mode():
        features, logits = exact(x, return_logits=True)
        features_fast, logits_fast = fast(x, return_logits=True)
    scale = features.abs().max().item()
    assert scale > 0.5 and features.std().item() > 0.05       # not the vacuous near-zero features of a default init
    print(f'{shape}: max |fast - exact| = {(features_fast - features).abs().max().item():.2e}, scale {scale:.2f}')
    assert (features_fast - features).abs().max().item() <= 1e-4 * scale
    assert (logits_fast - logits).abs().max().item() <= 1e-4 * logits.abs().max().item()


def test_pooling_in_nhwc_gives_the_same_numbers_in_the_same_layout():
    """The exact path pools in channels-last on CPU (pool_nhwc): the same numbers as NCHW pooling, bit for bit,
    handed back NCHW so that the next convolution runs pytorch-fid's kernels (planted and caught: the result left
    in NHWC)."""
    x = torch.randn(2, 40, 17, 17)
    pairs = [(inception.avg_pool_3x3(x), F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)),
             (inception.max_pool(x), F.max_pool2d(x, 3, stride=2)),
             (inception.max_pool(x, stride=1, padding=1), F.max_pool2d(x, 3, stride=1, padding=1))]
    for ours, reference in pairs:
        assert torch.equal(ours, reference)
        assert ours.is_contiguous()
    nhwc = x.contiguous(memory_format=torch.channels_last)         # the fast path's input stays NHWC
    assert inception.max_pool(nhwc).is_contiguous(memory_format=torch.channels_last)
