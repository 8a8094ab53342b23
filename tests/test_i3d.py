"""Tests for i3d.py: the weight file's layout and loader, the FVD preprocessing, and FVD's basic properties.

The layout is checked against a table written here from the published architecture (Carreira & Zisserman 2017,
Fig. 3; channel lists and module names of piergiaj/pytorch-i3d), not against the module itself. FVD properties
use random He-initialised weights (the real file needs a download) and 9-frame clips, the fewest the network
takes without stretching, to stay within seconds.
"""
import io
import urllib.error
import urllib.request

import pytest
import torch

import i3d
from evaluate import feature_statistics, frechet_distance
from i3d import InceptionI3d, he_init_, load_i3d

# ----------------------------------------------------------------------------------------------------
# The official layout, written out independently: stem units and Inception blocks with their channel lists.

STEM = {'Conv3d_1a_7x7': (3, 64, 7), 'Conv3d_2b_1x1': (64, 64, 1), 'Conv3d_2c_3x3': (64, 192, 3)}
BLOCKS = {'Mixed_3b': (192, [64, 96, 128, 16, 32, 32]), 'Mixed_3c': (256, [128, 128, 192, 32, 96, 64]),
          'Mixed_4b': (480, [192, 96, 208, 16, 48, 64]), 'Mixed_4c': (512, [160, 112, 224, 24, 64, 64]),
          'Mixed_4d': (512, [128, 128, 256, 24, 64, 64]), 'Mixed_4e': (512, [112, 144, 288, 32, 64, 64]),
          'Mixed_4f': (528, [256, 160, 320, 32, 128, 128]), 'Mixed_5b': (832, [256, 160, 320, 32, 128, 128]),
          'Mixed_5c': (832, [384, 192, 384, 48, 128, 128])}


def official_state_dict(num_classes=400, generator=None):
    """Tensors under the key names and shapes of i3d_pretrained_400.pt (no BatchNorm counters); random
    values with a generator, else constants (fast, for tests that only look at names and shapes)."""
    state = {}
    randn = torch.randn if generator is not None else lambda *shape, generator=None: torch.full(shape, 0.5)
    rand = torch.rand if generator is not None else lambda *shape, generator=None: torch.full(shape, 0.5)

    def unit(name, cin, cout, k):
        state[f'{name}.conv3d.weight'] = randn(cout, cin, k, k, k, generator=generator) * (2 / (cin * k ** 3)) ** 0.5
        state[f'{name}.bn.weight'] = 1 + 0.1 * randn(cout, generator=generator)
        state[f'{name}.bn.bias'] = 0.1 * randn(cout, generator=generator)
        state[f'{name}.bn.running_mean'] = 0.1 * randn(cout, generator=generator)
        state[f'{name}.bn.running_var'] = 0.5 + rand(cout, generator=generator)

    for name, (cin, cout, k) in STEM.items():
        unit(name, cin, cout, k)
    for name, (cin, c) in BLOCKS.items():
        for branch, bin_, bout, k in (('b0', cin, c[0], 1), ('b1a', cin, c[1], 1), ('b1b', c[1], c[2], 3),
                                      ('b2a', cin, c[3], 1), ('b2b', c[3], c[4], 3), ('b3b', cin, c[5], 1)):
            unit(f'{name}.{branch}', bin_, bout, k)
    state['logits.conv3d.weight'] = randn(num_classes, 1024, 1, 1, 1, generator=generator) * 0.03
    state['logits.conv3d.bias'] = randn(num_classes, generator=generator) * 0.1
    return state


def test_layout_matches_the_published_file_size():
    """287 float32 tensors under the official names fill the 50,939,526-byte file up to zip overhead.

    torch.save's zip archive adds about 310 bytes per tensor (measured for this layout: 89,752 bytes for 287
    tensors); the published file has 321 per tensor. A wrong kernel (5x5x5 branches as in Inception-v1) adds
    megabytes, one wrong channel count in a branch tens of kilobytes (over 100 bytes per tensor)."""
    state = official_state_dict()
    assert len(state) == 287
    tensor_bytes = sum(v.numel() * 4 for v in state.values())
    assert 250 * len(state) < i3d.I3D_WEIGHTS_SIZE - tensor_bytes < 400 * len(state)
    with torch.device('meta'):
        model = InceptionI3d()
    model_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if 'num_batches' not in k)
    assert model_bytes == tensor_bytes


def test_official_layout_loads_and_is_used(tmp_path):
    """A file with the official names/shapes loads; its tensors are the model's; logits use them."""
    state = official_state_dict(generator=torch.Generator().manual_seed(1))
    path = tmp_path / 'i3d_pretrained_400.pt'
    torch.save(state, path)
    model = load_i3d(path, download=False)
    loaded = model.state_dict()
    for k in ('Conv3d_1a_7x7.conv3d.weight', 'Mixed_4e.b2b.bn.running_var', 'logits.conv3d.bias'):
        assert torch.equal(loaded[k], state[k])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('breakage', ['renamed', 'ucf101_head', 'missing', 'not_a_state_dict'])
def test_wrong_file_is_refused_clearly(tmp_path, breakage):
    state = official_state_dict()
    if breakage == 'renamed':       # e.g. a TF-style name
        state['Mixed_3b.Branch_0.weight'] = state.pop('Mixed_3b.b0.conv3d.weight')
    elif breakage == 'ucf101_head':  # a fine-tuned file with 101 classes
        state['logits.conv3d.weight'] = state['logits.conv3d.weight'][:101]
        state['logits.conv3d.bias'] = state['logits.conv3d.bias'][:101]
    elif breakage == 'missing':
        del state['Mixed_5c.b3b.bn.running_mean']
    else:
        state = {'model': state}
    path = tmp_path / 'weights.pt'
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_i3d(path, download=False)
    message = str(info.value)
    assert i3d.I3D_WEIGHTS_URL in message
    expected = {'renamed': 'Mixed_3b.b0.conv3d.weight', 'ucf101_head': '(101, 1024, 1, 1, 1)',
                'missing': 'Mixed_5c.b3b.bn.running_mean', 'not_a_state_dict': 'not a state dict'}[breakage]
    assert expected in message


def test_missing_file_offline_and_bad_download(tmp_path, monkeypatch):
    monkeypatch.delenv(i3d.I3D_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(i3d, 'default_cache_dir', lambda: str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError, match='does not exist'):        # an explicit wrong path
        load_i3d(tmp_path / 'nope.pt')
    with pytest.raises(FileNotFoundError, match=i3d.I3D_WEIGHTS_SHA256):  # download=False says what to fetch
        load_i3d(download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(FileNotFoundError, match='could not download'):
        load_i3d()
    # A download with the wrong bytes is refused and nothing is left in the cache.
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: io.BytesIO(b'<html>quota exceeded</html>'))
    with pytest.raises(RuntimeError, match='sha256'):
        load_i3d()
    assert list((tmp_path / 'cache').iterdir()) == []


# Logits of the reference implementation on the fixed random state dict official_state_dict(seed 1) and the clip
# moving_squares(1, frames=17, size=32, seed=0), computed once (on a CPU, float32) with piergiaj/pytorch-i3d's
# pytorch_i3d.py (commit 05783d1, the module VideoGPT's and TATS's FVD code copy; BatchNorm eps set to their 1e-5),
# fed TATS's FVD preprocessing (tats/fvd/fvd.py preprocess: F.interpolate to 224 x 224, bilinear,
# align_corners=False, then 2 x / 255 - 1) and averaged over time as their InceptionI3d.forward does
# (logits.mean(dim=2)). Nothing of i3d.py was used. 17 frames leave 3 time steps after the network's 8-fold temporal
# stride, so the 2x7x7 pool gives 2 logit steps: fewer frames (9 or 16 leave 2) would hide a 1x7x7 pool (the mean
# of a linear map over the 2 steps is the same) and logits taken at one time step.
REFERENCE_FIRST_LOGITS = [2.018274, 1.72814, -1.143788, -1.660865, 0.64009, 0.670446, 0.836048, -1.221109]
REFERENCE_PROJECTION = -16.704773894812934      # logits (400,) . randn(400, seed 0, float64): all 400 at once
REFERENCE_NORM = 42.393985748291016


def test_logits_equal_the_reference_implementation_on_random_weights(tmp_path):
    """End to end (preprocessing, every layer, the 2x7x7 logits pool, the mean over time) against stored logits of
    the reference implementation. (Planted and caught: logits of the first time step only; a 1x7x7 pool.)"""
    torch.save(official_state_dict(generator=torch.Generator().manual_seed(1)), tmp_path / 'i3d_pretrained_400.pt')
    model = load_i3d(tmp_path / 'i3d_pretrained_400.pt', download=False)
    with torch.no_grad():
        logits = model(moving_squares(1, frames=17, size=32, seed=0))[0].double()
    # measured gap to the reference: 3e-6 (float32 round-off of a different summation order)
    torch.testing.assert_close(logits[:8], torch.tensor(REFERENCE_FIRST_LOGITS, dtype=torch.float64), rtol=0, atol=2e-4)
    projection = logits @ torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert projection.item() == pytest.approx(REFERENCE_PROJECTION, abs=1e-3)
    assert logits.norm().item() == pytest.approx(REFERENCE_NORM, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Preprocessing (no network needed)

def test_preprocess_range_grey_and_stretch():
    with torch.device('meta'):  # preprocessing uses no weights
        model = InceptionI3d()
    level = torch.tensor([0.0, 0.25, 1.0]).view(3, 1, 1, 1, 1)
    x = model.preprocess(level.expand(3, 1, 9, 16, 16))       # grey constant clips
    assert x.shape == (3, 3, 9, 224, 224)
    assert (x - (2 * level - 1)).abs().max() < 1e-6               # [0, 1] -> [-1, 1], R = G = B
    assert not model.stretched
    # 8 frames: each frame twice, in order (a clip at half speed), then the same resizing.
    clip = torch.rand(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    stretched = model.preprocess(clip)
    assert model.stretched
    assert torch.equal(stretched, model.preprocess(clip.repeat_interleave(2, dim=2)))
    with pytest.raises(ValueError, match=r'\(N, 3 or 1, F, H, W\)'):
        model.preprocess(torch.rand(2, 3, 16, 16))            # an image batch, not videos


def test_same_padding_follows_tensorflow():
    """TF 'SAME': out = ceil(n / s), total pad = max((out - 1) s + k - n, 0), the smaller half in front."""
    for n in range(1, 40):
        for k in (1, 2, 3, 7):
            for s in (1, 2):
                total = max((-(-n // s) - 1) * s + k - n, 0)
                assert i3d.same_padding(n, k, s) == (total // 2, total - total // 2), (n, k, s)
    x = torch.zeros(1, 1, 9, 224, 224)
    assert i3d.pad_same(x, (7, 7, 7), (2, 2, 2)).shape[2:] == (9 + 6, 224 + 5, 224 + 5)


def test_resize_is_bilinear_on_a_ramp():
    """Bilinear resizing of a linear ramp is linear in the interior (half-pixel centres, align_corners=False)."""
    with torch.device('meta'):
        model = InceptionI3d(size=224)
    ramp = torch.linspace(0.0, 1.0, 28).view(1, 1, 1, 1, 28).expand(1, 3, 9, 28, 28)
    row = model.preprocess(ramp)[0, 0, 0, 0]                     # (224,)
    x_src = (torch.arange(224) + 0.5) * 28 / 224 - 0.5           # source coordinate of each output pixel
    inside = (x_src >= 0) & (x_src <= 27)
    expected = 2 * (x_src / 27) - 1
    torch.testing.assert_close(row[inside], expected[inside], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# FVD (Unterthiner et al. 2019, Eq. 1) on I3D features with random weights

@pytest.fixture(scope='module')
def random_i3d():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return he_init_(InceptionI3d(), seed=0).eval()


def moving_squares(n, frames=9, size=32, seed=0):
    """Bright squares moving right at 2 px/frame on grey noise: clips with motion, (n, 3, F, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    v = 0.3 + 0.1 * torch.rand(n, 3, 1, size, size, generator=g).expand(-1, -1, frames, -1, -1).clone()
    for i in range(n):
        y0 = int(torch.randint(0, size - 8, (1,), generator=g))
        for f in range(frames):
            x0 = (2 * f + 3 * i) % (size - 8)
            v[i, :, f, y0:y0 + 8, x0:x0 + 8] = 0.9
    return v


def fvd(feats_a, feats_b):
    return frechet_distance(*feature_statistics(feats_a.numpy()), *feature_statistics(feats_b.numpy()))


@pytest.fixture(scope='module')
def real(random_i3d):
    """Two clips (the fewest a covariance needs) and their features, computed in one batch."""
    clips = moving_squares(2)
    feats = i3d.extract_video_features(clips, random_i3d, batch_size=2)
    return clips, feats, feats.square().sum().item() / len(feats)   # scale: mean squared feature norm


def with_second(feats, clip, model):
    """Features of the set {clip 0 of `real`, `clip`}: one network pass instead of two."""
    return torch.cat([feats[:1], i3d.extract_video_features(clip[None], model)])


def test_fvd_zero_for_identical_sets_and_grows_with_noise(random_i3d, real):
    """FVD(A, A) = 0 when a clip is fed alone instead of in a batch (eval-mode BatchNorm: no batch
    statistics); FVD grows with the strength of noise added to one clip of the set."""
    clips, feats, scale = real
    assert abs(fvd(feats, with_second(feats, clips[1], random_i3d))) < 1e-6 * scale
    noise = torch.randn(clips[1].shape, generator=torch.Generator().manual_seed(1))
    scores = [fvd(feats, with_second(feats, (clips[1] + s * noise).clamp(0, 1), random_i3d)) for s in (0.05, 0.3)]
    assert 1e-3 * scale < scores[0] < scores[1]   # clearly above rounding, and growing


def test_fvd_sees_motion(random_i3d, real):
    """One clip played backwards: its frames, hence every frame-wise statistic, are unchanged; FVD is not."""
    clips, feats, scale = real
    assert fvd(feats, with_second(feats, clips[1].flip(1), random_i3d)) > 1e-3 * scale
