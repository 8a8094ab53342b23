"""Tests of evaluate.py: the pairs picture, conditions, features, statistics files, LeNet and the command line.

The metrics themselves (closed forms) are tested in tests/test_metrics.py."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate

pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def test_save_nearest_pairs_draws_the_closest_pairs(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(200, 3, 8, 8, generator=g)
    samples = torch.cat([(train[:10] + 0.01 * torch.randn(10, 3, 8, 8, generator=g)).clamp(0, 1),
                         torch.rand(30, 3, 8, 8, generator=g)])
    report = evaluate.memorization_check(samples, train)
    path = tmp_path / 'pairs.png'
    evaluate.save_nearest_pairs(samples, train, report['pixel']['nearest'], report['pixel']['ratio'], path, 4)
    img = Image.open(path)
    assert img.size == (2 * 8 + 4, 4 * (8 + 4))  # 4 pairs, each (sample | train) with a 2-px border


# ----------------------------------------------------------------------------------------------------
# Conditions for class-conditional models

def test_choose_conditions_modes():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    assert (evaluate.choose_conditions('fixed', 5, fixed_class=3) == 3).all()
    uniform = evaluate.choose_conditions('uniform', 30000, num_classes=3)
    np.testing.assert_allclose(np.bincount(uniform) / 30000, [1 / 3] * 3, atol=0.02)
    data = evaluate.choose_conditions('data', 30000, num_classes=3, labels=labels)
    np.testing.assert_allclose(np.bincount(data) / 30000, [0.7, 0.2, 0.1], atol=0.02)
    real = evaluate.choose_conditions('real', 100, labels=labels)
    np.testing.assert_array_equal(np.bincount(real), [70, 20, 10])  # exact counts, not just in expectation
    with pytest.raises(ValueError, match='condition mode'):
        evaluate.choose_conditions('balanced', 3, 3)


# ----------------------------------------------------------------------------------------------------
# Feature extraction, statistics cache, reporting

def test_extract_features_uint8_float_and_batching():
    model = evaluate.LeNetFeatures(3, 10, 16).eval()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    a = evaluate.extract_features(images, model, batch_size=3, progress=False)
    b = evaluate.extract_features(images.float() / 255, model, batch_size=7, progress=False)
    assert a.shape == (7, 128) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        evaluate.extract_features(images[0], model)


def test_statistics_cache_is_computed_once(tmp_path):
    calls = []

    def features():
        calls.append(1)
        return np.random.RandomState(0).randn(50, 4)

    path = evaluate.statistics_cache_path(str(tmp_path), 'mnist', 28, 50, 'lenet', 'clean', content_id='0123abcd')
    assert os.path.basename(path) == 'mnist_0123abcd_28px_n50_lenet_clean.npz'
    first = evaluate.cached_statistics(path, features)
    second = evaluate.cached_statistics(path, features)
    assert len(calls) == 1 and int(second['num_images']) == 50
    np.testing.assert_array_equal(first['sigma'], second['sigma'])
    assert second['features'].shape == (50, 4)


# ----------------------------------------------------------------------------------------------------
# Small classifier features (FD_lenet) on real MNIST, and the command line

def load_mnist(shared_data, n):
    root = os.path.join(shared_data, 'mnist')
    x = np.frombuffer(gzip.open(os.path.join(root, 't10k-images-idx3-ubyte.gz')).read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(os.path.join(root, 't10k-labels-idx1-ubyte.gz')).read(), np.uint8, offset=8)
    return torch.from_numpy(x.reshape(-1, 1, 28, 28)[:n].copy()), torch.from_numpy(y[:n].astype(np.int64))


def test_lenet_features_on_mnist(shared_data):
    x, y = load_mnist(shared_data, 3000)
    model = evaluate.train_classifier(x[:2000], y[:2000], steps=50, batch_size=64, lr=3e-3)  # ~2 s of CPU
    with torch.no_grad():
        accuracy = (model(evaluate.to_unit_float(x[2000:]), return_logits=True)[1].argmax(1) == y[2000:]).float().mean()
    assert accuracy > 0.8  # held-out digits: the features carry class information
    real_a = evaluate.extract_features(x[2000:2500], model, progress=False)
    real_b = evaluate.extract_features(x[2500:3000], model, progress=False)
    noise = evaluate.extract_features(torch.rand(500, 1, 28, 28), model, progress=False)
    fd_real = evaluate.frechet_distance(*evaluate.feature_statistics(real_a), *evaluate.feature_statistics(real_b))
    fd_noise = evaluate.frechet_distance(*evaluate.feature_statistics(real_a), *evaluate.feature_statistics(noise))
    assert fd_real < fd_noise / 10


def test_evaluate_generator_during_training():
    # A "generator" that returns held-out real data scores far better than one that returns noise.
    g = torch.Generator().manual_seed(0)
    model = evaluate.LeNetFeatures(1, 10, 8).eval()
    data = lambda n: torch.tanh(torch.randn(n, 1, 8, 8, generator=g) * 0.5 + 0.3)  # noqa: E731  in [-1, 1]
    ref = evaluate.compute_statistics(evaluate.extract_features((data(400) + 1) / 2, model, progress=False))
    good = evaluate.evaluate_generator(data, ref, model, num_samples=300, batch_size=100, kid_subset_size=100)
    bad = evaluate.evaluate_generator(lambda n: torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, ref, model, 300, 100,
                                      kid_subset_size=100)
    assert set(good) == {'FD_lenet', 'KD_lenet', 'KD_lenet_std'}
    assert good['FD_lenet'] < bad['FD_lenet'] / 5 and abs(good['KD_lenet']) < bad['KD_lenet'] / 5


def test_train_lenet_command(shared_data, tmp_path, capsys):
    x, y = load_mnist(shared_data, 1000)
    np.savez(tmp_path / 'mnist.npz', images=x.numpy(), labels=y.numpy())
    weights = str(tmp_path / 'lenet.pth')
    evaluate.main(evaluate.parse_args(['--train-lenet', str(tmp_path / 'mnist.npz'), '--lenet-weights', weights,
                                       '--lenet-steps', '30']))
    assert 'held-out accuracy' in capsys.readouterr().out
    args = evaluate.parse_args(['a.npz', 'b.npz', '--network', 'lenet', '--lenet-weights', weights])
    model = evaluate.build_feature_network(args)  # the architecture is rebuilt from the saved shapes
    assert (model.in_channels, model.image_size, model.feature_dim) == (1, 28, 128)


def test_train_lenet_split_sees_every_class_of_a_sorted_file():
    labels = np.repeat(np.arange(10), 50)                         # sorted by class, as the shared emoji file is
    train, held_out = evaluate.lenet_split(len(labels))
    assert sorted(np.concatenate([train, held_out])) == list(range(500)) and len(held_out) == 50
    assert set(labels[train]) == set(range(10)) and len(set(labels[held_out])) >= 8


def test_load_images_folder_and_npz(tmp_path):
    rng = np.random.RandomState(12)
    images = rng.randint(0, 256, (3, 10, 12, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f'{i}.png')
    np.savez(tmp_path / 'nhwc.npz', arr_0=images)
    np.savez(tmp_path / 'float.npz', images=images.transpose(0, 3, 1, 2) / 127.5 - 1)  # [-1, 1] floats
    # the layout sample.py --npz writes: uint8 NHWC under 'samples', empty 'labels' when unconditional
    np.savez_compressed(tmp_path / 'sample_py.npz', samples=images, labels=np.zeros(0))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for path in [str(tmp_path)] + [str(tmp_path / f) for f in ('nhwc.npz', 'float.npz', 'sample_py.npz')]:
        assert torch.equal(evaluate.load_images(path), expected)
    assert evaluate.load_labels(str(tmp_path / 'sample_py.npz')) is None
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images'):
        evaluate.load_images(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        evaluate.load_images(str(tmp_path / 'no_such_folder'))


def test_command_line_with_lenet_stats_cache_and_memorization(tmp_path, capsys):
    rng = np.random.RandomState(13)
    train = rng.randint(0, 256, (60, 1, 16, 16), dtype=np.uint8)
    generated = np.concatenate([train[:5], rng.randint(0, 256, (35, 1, 16, 16), dtype=np.uint8)])
    labels = np.arange(60) % 2
    np.savez(tmp_path / 'gen.npz', generated, labels=labels[:40])
    np.savez(tmp_path / 'train.npz', train, labels=labels)
    torch.save(evaluate.LeNetFeatures(1, 10, 16).state_dict(), tmp_path / 'lenet.pth')
    common = ['--network', 'lenet', '--lenet-weights', str(tmp_path / 'lenet.pth'), '--metrics', 'fid,kid',
              '--kid-subset-size', '20']
    args = evaluate.parse_args([str(tmp_path / 'gen.npz'), str(tmp_path / 'train.npz'), *common,
                                '--save-stats', str(tmp_path / 'stats.npz'),
                                '--memorization', str(tmp_path / 'train.npz'),
                                '--pairs-png', str(tmp_path / 'pairs.png'), '--conditions', 'real'])
    first = evaluate.main(args)
    out = capsys.readouterr().out
    assert 'FD_lenet' in out and 'FID' not in out and 'generated=40' in out and 'reference=60' in out
    assert '12.50% of samples' in out  # the 5 planted copies out of 40, in pixel space
    assert 'conditions=real' in out and 'per-class FD_lenet' in out and set(first['per_class']) == {0, 1}
    assert os.path.isfile(tmp_path / 'pairs.png')
    # the saved reference statistics give the same Frechet distance without the reference images
    again = evaluate.main(evaluate.parse_args([str(tmp_path / 'gen.npz'), str(tmp_path / 'stats.npz'), *common]))
    assert again['FD_lenet'] == pytest.approx(first['FD_lenet'], rel=1e-9)
    for expect in ('computed and saved to', 'read from'):  # the cache is filled once, then reused
        cached = evaluate.main(evaluate.parse_args([str(tmp_path / 'gen.npz'), str(tmp_path / 'train.npz'), *common,
                                                    '--stats-cache', str(tmp_path / 'cache')]))
        assert expect in capsys.readouterr().out
        assert cached['FD_lenet'] == pytest.approx(first['FD_lenet'], rel=1e-9)
    lenet_hash = evaluate.network_id(evaluate.lenet_from_state_dict(torch.load(tmp_path / 'lenet.pth')))
    content = evaluate.images_id(torch.from_numpy(train))               # keyed by the images, not the name
    assert os.listdir(tmp_path / 'cache') == [f'train_{content}_16px_n60_lenet_{lenet_hash[:8]}_clean.npz']


def test_the_command_line_scores_with_the_pytorch_fid_protocol_by_default():
    # Issue 10: published FIDs use pytorch-fid's resize; flipping the default back to 'clean' must fail here.
    assert evaluate.parse_args(['gen.npz', 'ref.npz']).resize == 'legacy'
    import inception
    assert evaluate.load_inception is inception.load_inception              # the DESIGN.md contract, re-exported
    assert evaluate.metric_name('fid') == 'FID' and evaluate.metric_name('kid') == 'KID'
    assert evaluate.metric_name('fid', 'inception', 'clean') == 'clean-FID'
    assert evaluate.metric_name('fid', 'lenet', 'clean') == 'FD_lenet'      # a different network keeps its name
    stats = evaluate.compute_statistics(np.random.RandomState(0).randn(10, 3))
    assert str(stats['resize']) == 'legacy'                                 # statistics default to it too


def test_inception_is_the_fast_path_by_default_and_exact_on_request(tmp_path):
    """evaluate.py scores with load_inception(fast=True) (batch norm folded, NHWC; within 1e-4, tests/test_inception.py)
    unless --exact-features asks for pytorch-fid's arithmetic bit for bit (issue 31)."""
    import inception
    weights = str(tmp_path / inception.FID_WEIGHTS_NAME)
    torch.save(inception.FIDInceptionV3().state_dict(), weights)
    common = ['a.npz', 'b.npz', '--inception-weights', weights, '--device', 'cpu']
    for extra, folded in (([], True), (['--exact-features'], False)):
        model = evaluate.build_feature_network(evaluate.parse_args(common + extra))
        units = [m for m in model.modules() if isinstance(m, inception.BasicConv2d)]
        assert len(units) == 94 and all((m.bn is None) == folded for m in units)
        assert model.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last) == folded
