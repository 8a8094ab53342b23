"""Tests for c3d.py and the video IS: the UCF-101 weight file's layout and loader, TGANv2's preprocessing, the
forward pass against TGANv2's own chainer code on random weights, and the video Inception Score through evaluate.py.

The layout is a table written here from the papers (Tran et al. 2015, Fig. 3; TGANv2's module names), not from
c3d.py. One C3D clip costs ~2 s on one CPU core, so the network runs on 2 clips only; the IS tests run
evaluate.py's video command with a stand-in for the network's logits (the network's logits themselves are checked
against the reference in the parity test).
"""
import json
import math

import numpy as np
import pytest
import torch

import c3d
import evaluate
import metrics
from c3d import C3D, load_c3d

pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------------------------------
# The layout of conv3d_deepnetA_ucf.npz, written out: chainer keys, PyTorch shapes

CONVS = [('conv1a', 3, 64), ('conv2a', 64, 128), ('conv3a', 128, 256), ('conv3b', 256, 256), ('conv4a', 256, 512),
         ('conv4b', 512, 512), ('conv5a', 512, 512), ('conv5b', 512, 512)]
FCS = [('fc6', 8192, 4096), ('fc7', 4096, 4096), ('fc8', 4096, 101)]    # fc6: 512 x 1 x 4 x 4 after pool5


def official_arrays(generator=None):
    """numpy arrays under the chainer keys of the UCF-101 file; He-scaled random values with a generator (every
    layer keeps unit scale, so the logits depend on the input), else constants."""
    def draw(*shape, scale):
        if generator is None:
            return np.full(shape, 0.01, np.float32)
        return (torch.randn(shape, generator=generator) * scale).numpy().astype(np.float32)
    arrays = {}
    for name, cin, cout in CONVS:
        arrays[f'{name}/W'] = draw(cout, cin, 3, 3, 3, scale=math.sqrt(2 / (27 * cin)))
        arrays[f'{name}/b'] = draw(cout, scale=0.1)
    for name, cin, cout in FCS:
        arrays[f'{name}/W'] = draw(cout, cin, scale=math.sqrt(2 / cin))
        arrays[f'{name}/b'] = draw(cout, scale=0.1)
    return arrays


def random_mean(generator):
    """A mean clip like Caffe's C3D mean: (3, 16, 128, 171), values around 100 in 0-255 units."""
    return (90 + 20 * torch.rand(3, 16, 128, 171, generator=generator)).numpy().astype(np.float32)


def parity_clips():
    """Two 16-frame RGB clips in [0, 1] at 48 x 48 (resized to 112): a coloured square moving over a colour ramp,
    so channel order, resize and frame order all show in the output."""
    t = torch.arange(16, dtype=torch.float32)
    ramp = torch.linspace(0, 1, 48)
    clips = torch.zeros(2, 3, 16, 48, 48)
    clips[:, 0] = ramp.view(1, 1, 1, 48) * 0.8                 # red grows to the right
    clips[:, 2] = ramp.view(1, 1, 48, 1) * 0.5                 # blue grows downwards
    for n, colour in enumerate(([1.0, 0.9, 0.1], [0.1, 1.0, 0.9])):
        for f in range(16):
            x0 = int(4 + 2 * t[f]) if n == 0 else int(36 - 2 * t[f])
            clips[n, :, f, 10 + n * 12:22 + n * 12, x0:x0 + 10] = torch.tensor(colour).view(3, 1, 1)
    return clips


def write_files(folder, generator_seed=1, mean_seed=2):
    np.savez(folder / c3d.C3D_WEIGHTS_NAME, **official_arrays(torch.Generator().manual_seed(generator_seed)))
    np.savez(folder / c3d.C3D_MEAN_NAME, mean=random_mean(torch.Generator().manual_seed(mean_seed)))
    return folder / c3d.C3D_WEIGHTS_NAME, folder / c3d.C3D_MEAN_NAME


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The two files with random weights (314 MB of float32: written once per test run)."""
    return write_files(tmp_path_factory.mktemp('c3d'))


@pytest.fixture(scope='module')
def model(files):
    return load_c3d(*files)


# ----------------------------------------------------------------------------------------------------
# Layout and loader

def test_layout_is_the_ucf101_file():
    """C3D's parameters are exactly the file's tensors (78,409,573 numbers: conv 27.7M, fc 50.8M), and a file in
    that layout loads (strict, every key used)."""
    with torch.device('meta'):
        model = C3D()
    expected = {f'{k[:-2]}.{"weight" if k.endswith("W") else "bias"}': v.shape for k, v in official_arrays().items()}
    assert {k: tuple(v.shape) for k, v in model.named_parameters()} == expected
    assert sum(int(np.prod(s)) for s in expected.values()) == 78409573


def test_wrong_or_missing_files_are_refused_clearly(tmp_path, monkeypatch, files):
    """A Sports-1M port (DavideA/c3d-pytorch keys conv1.weight ... 487 classes), a 487-class fc8, a mean clip of the
    wrong shape, and missing files each stop with a message naming the right file."""
    weights, mean = files
    sports = {'conv1/W': np.zeros(1, np.float32), 'conv2/W': np.zeros(1, np.float32)}   # keys are checked first
    np.savez(tmp_path / 'sports.npz', **sports)
    with pytest.raises(ValueError, match=r'missing keys.*conv1a'):
        load_c3d(tmp_path / 'sports.npz', mean)
    wrong_classes = official_arrays()
    wrong_classes['fc8/W'], wrong_classes['fc8/b'] = np.zeros((487, 4096), np.float32), np.zeros(487, np.float32)
    with torch.device('meta'):
        shapes_only = C3D()
    with pytest.raises(ValueError, match=r'fc8.weight: shape \(487, 4096\)'):
        c3d.chainer_to_torch(wrong_classes, shapes_only, 'c487.npz')
    np.savez(tmp_path / 'flatmean.npz', mean=np.zeros((3, 128, 171), np.float32))
    with pytest.raises(ValueError, match='mean clip'):
        load_c3d(weights, tmp_path / 'flatmean.npz')
    (tmp_path / 'page.npz').write_text('<html>not found</html>')
    with pytest.raises(ValueError, match='could not read'):
        load_c3d(tmp_path / 'page.npz', mean)
    monkeypatch.delenv(c3d.C3D_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(c3d, 'default_cache_dir', lambda: str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='conv3d_deepnetA_ucf.npz') as error:
        load_c3d(None, mean)
    assert c3d.C3D_WEIGHTS_URL in str(error.value) and c3d.C3D_MEAN_URL in str(error.value)
    monkeypatch.setenv(c3d.C3D_WEIGHTS_ENV, str(weights))                  # the environment variable is used
    monkeypatch.setenv(c3d.C3D_MEAN_ENV, str(mean))
    assert load_c3d().fc8.out_features == 101


# ----------------------------------------------------------------------------------------------------
# Preprocessing (TGANv2's pre, resize and mean Bias)

def test_preprocess_bgr_scale_mean_and_aligned_resize(files, model):
    """A constant clip u gives 256 u - mean in BGR order; the resize to 112 keeps the corner pixels (align_corners
    =True, chainer's default) and is linear in between: a ramp 0..47 becomes 0..47 in 111 equal steps.
    (Planted and caught: RGB kept; align_corners=False; the mean cropped at [0:112].)"""
    mean_path = files[1]
    mean = torch.from_numpy(np.load(mean_path)['mean'][:, :, 8:120, 8:120])
    red = torch.tensor([1.0, 0.25, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, 16, 20, 20)
    x = model.preprocess(red)[0]
    torch.testing.assert_close(x[0], 0 - mean[0])                       # B channel: u = 0
    torch.testing.assert_close(x[1], 64 - mean[1])                      # G: 256 * 0.25
    torch.testing.assert_close(x[2], 256 - mean[2])                     # R: 256 * 1
    ramp = (torch.arange(48.0) / 255).view(1, 1, 1, 1, 48).expand(1, 1, 16, 48, 48)
    row = (model.preprocess(ramp)[0, 0, 0, 5] + mean[0, 0, 5]) / 256 * 255   # back to the ramp's units
    torch.testing.assert_close(row, torch.linspace(0, 47, 112), atol=1e-3, rtol=0)


def test_frames_stretched_or_refused():
    with torch.device('meta'):
        model = C3D()
    clip = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 112, 112) / 10
    out = model.preprocess(clip.to('meta'))
    assert model.stretched and out.shape == (1, 3, 16, 112, 112)
    with pytest.raises(ValueError, match='16 frames'):
        model.preprocess(torch.zeros(1, 3, 17, 8, 8, device='meta'))


# ----------------------------------------------------------------------------------------------------
# The forward pass against TGANv2's own code

# Values of TGANv2's C3DVersion1UCF101 (pfnet-research/tgan2 at f892bc4, tgan2/models/c3d/c3d_ucf101.py, run with
# chainer 7.8.1 and numpy 1.23.5 in a separate environment) on the files write_files makes and the input
# 2 * parity_clips() - 1 (TGANv2 feeds [-1, 1]); its extract(x, ['fc7', 'fc8']) in evaluation mode. Nothing of
# c3d.py was used. Projections onto np.random.RandomState(0).randn(4096) and then .randn(101), float64.
REFERENCE_FC8_FIRST = [151.09613, 195.248718, 79.897888, 244.116302, -259.100464, -304.898071, 132.235138, 59.891651]
REFERENCE_FC8_PROJECTION = [-2264.829203791206, -2228.3641383115855]
REFERENCE_FC7_PROJECTION = [2732.136884716466, 2321.670381591677]
REFERENCE_FC7_NORM = [7668.020371716499, 8014.235848908094]   # measured gap of c3d.py: < 1e-5 relative (float32)


def test_features_and_logits_equal_tganv2_on_random_weights(model):
    """fc7 (the FD features) and fc8 (the IS logits) equal the reference's for two clips, end to end: file loading
    under the chainer keys, the preprocessing, every layer, cover_all pooling, the flatten order of fc6.
    (Planted and caught: ceil_mode=False with pool5 padded (0, 1, 1), as Sports-1M ports do; no BGR swap;
    fc7 taken before its ReLU.)"""
    with torch.no_grad():
        fc7, fc8 = model(parity_clips(), return_logits=True)
    fc7, fc8 = fc7.double().numpy(), fc8.double().numpy()
    rng = np.random.RandomState(0)
    p7, p8 = rng.randn(4096), rng.randn(101)
    np.testing.assert_allclose(fc8[0, :8], REFERENCE_FC8_FIRST, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fc8 @ p8, REFERENCE_FC8_PROJECTION, rtol=1e-4)
    np.testing.assert_allclose(fc7 @ p7, REFERENCE_FC7_PROJECTION, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(fc7, axis=1), REFERENCE_FC7_NORM, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The video Inception Score, through evaluate.py's video command

class LogitsByLevel(torch.nn.Module):
    """Stands in for C3D behind the same interface: the class of a clip is its grey level (uint8 value) modulo
    101, predicted with confidence (logit 50 against 0), or one class for every clip (constant=True)."""

    name, resize, input_ndim = 'c3d', 'bilinear-aligned', 5

    def __init__(self, constant=False):
        super().__init__()
        self.constant = constant
        self.calls = 0

    def forward(self, x, return_logits=False):
        self.calls += 1
        level = torch.round(x[:, 0, 0, 0, 0] * 255).long()
        classes = torch.zeros_like(level) if self.constant else level % 101
        logits = 50 * torch.nn.functional.one_hot(classes, 101).double()
        return (logits, logits) if return_logits else logits


def video_is(tmp_path, monkeypatch, clips, constant):
    """IS_c3d of `clips` (uint8 (N, F, H, W, 1) in an .npz) via evaluate.cli --video --metrics vis."""
    np.savez(tmp_path / 'fake.npz', videos=clips)
    np.savez(tmp_path / 'real.npz', videos=clips[:2])
    net = LogitsByLevel(constant)
    monkeypatch.setattr(evaluate, 'load_c3d', lambda *args: net)
    out = tmp_path / f'is_{constant}.json'
    evaluate.cli(['--video', str(tmp_path / 'fake.npz'), str(tmp_path / 'real.npz'), '--metrics', 'vis',
                  '--out', str(out), '--device', 'cpu'])
    return json.loads(out.read_text())['scores'], net


def test_video_is_is_one_for_a_constant_prediction_and_101_for_a_uniform_confident_one(tmp_path, monkeypatch):
    """202 clips, 2 per class: the uniform, confident prediction scores the number of classes, 101; one prediction
    for every clip scores 1. No reference features are computed for an IS (the network sees the generated clips
    only). (Planted and caught: the IS branch limited to Inception; fewer than 2048 clips cut into 10 splits, which
    scored 20.2.)"""
    levels = np.arange(202, dtype=np.uint8)                                # class = level % 101: 2 clips per class
    clips = np.broadcast_to(levels.reshape(202, 1, 1, 1, 1), (202, 16, 4, 4, 1)).copy()
    uniform, net = video_is(tmp_path, monkeypatch, clips, constant=False)
    assert uniform['IS_c3d'] == pytest.approx(101, rel=1e-9) and uniform['IS_c3d_std'] == 0
    assert net.calls == math.ceil(202 / 50)                                 # generated clips only, batches of 50
    constant, _ = video_is(tmp_path, monkeypatch, clips, constant=True)
    assert constant['IS_c3d'] == pytest.approx(1, abs=1e-12)


def test_video_is_scores_sets_of_2048_clips():
    """TGANv2's protocol: one IS per set of 2048 clips, mean and std over the sets (a shorter tail is dropped).
    Set 1 is all one class (IS 1); in set 2 the clips cycle through the 101 classes, so with confident predictions
    its IS is exp(H(p(y))) of the class counts (20 or 21 of each). (Planted and caught: 10 equal splits; p(y)
    taken as the softmax of the mean logits.)"""
    classes = np.concatenate([np.zeros(2048, int), np.arange(2048) % 101, np.zeros(100, int)])
    logits = 50 * np.eye(101)[classes]
    counts = np.bincount(np.arange(2048) % 101, minlength=101) / 2048
    exact = math.exp(-(counts * np.log(counts)).sum())
    mean, std = metrics.inception_score(logits, split_size=metrics.VIDEO_IS_SET_SIZE)
    assert mean == pytest.approx((1 + exact) / 2, rel=1e-9) and std == pytest.approx((exact - 1) / 2, rel=1e-9)
    results = metrics.compute_metrics(logits, {}, logits, ('is',), 'c3d')
    assert results['IS_c3d'] == pytest.approx(mean, rel=1e-12)
