"""Tests of evaluate.py: metrics against closed forms, memorization, statistics, score names, command line."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate

pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def random_spd(d, rng, low=0.1, high=2.0):
    """A random symmetric positive-definite matrix Q diag(w) Q^T and its eigen-decomposition."""
    Q, _ = np.linalg.qr(rng.randn(d, d))
    w = rng.uniform(low, high, d)
    return (Q * w) @ Q.T, Q, w


# ----------------------------------------------------------------------------------------------------
# Frechet distance

@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_frechet_distance_diagonal_closed_form(method):
    # Diagonal covariances: FD = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    rng = np.random.RandomState(0)
    s1, s2, mu1, mu2 = rng.rand(16) + 0.1, rng.rand(16) + 0.1, rng.randn(16), rng.randn(16)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    fd = evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert fd == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_frechet_distance_full_commuting_covariances(method):
    # Full (non-diagonal) covariances sharing eigenvectors Q: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T,
    # so (S1 S2)^{1/2} = Q diag(sqrt(ab)) Q^T and FD = ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.RandomState(1)
    d = 32
    Q, _ = np.linalg.qr(rng.randn(d, d))
    a, b = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = evaluate.frechet_distance(mu1, (Q * a) @ Q.T, mu2, (Q * b) @ Q.T, method=method)
    assert fd == pytest.approx(exact, rel=1e-8)


def test_frechet_distance_scaled_covariance_and_one_dimension():
    # S2 = c^2 S1 gives Tr(S1) (1 - c)^2; in 1-D, FD = (m1 - m2)^2 + (s1 - s2)^2 with standard deviations.
    rng = np.random.RandomState(2)
    S, _, _ = random_spd(20, rng)
    assert evaluate.frechet_distance(np.zeros(20), S, np.zeros(20), 9 * S) == pytest.approx(4 * np.trace(S), rel=1e-9)
    assert evaluate.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_distance_general_methods_agree_and_symmetric():
    rng = np.random.RandomState(3)
    S1, _, _ = random_spd(50, rng)
    S2, _, _ = random_spd(50, rng)
    mu1, mu2 = rng.randn(50), rng.randn(50)
    fd_eigh = evaluate.frechet_distance(mu1, S1, mu2, S2, method='eigh')
    fd_sqrtm = evaluate.frechet_distance(mu1, S1, mu2, S2, method='sqrtm')
    assert fd_eigh == pytest.approx(fd_sqrtm, rel=1e-8)
    assert fd_eigh == pytest.approx(evaluate.frechet_distance(mu2, S2, mu1, S1), rel=1e-8)


def test_frechet_distance_singular_covariances_from_few_samples():
    # Fewer samples than dimensions: rank-deficient covariances. FD with itself must be ~0 (not NaN or
    # complex), and with a second sample it must be finite, positive, and agree between the methods.
    rng = np.random.RandomState(4)
    a, b = rng.randn(30, 64), rng.randn(30, 64)
    mu_a, S_a = evaluate.feature_statistics(a)
    mu_b, S_b = evaluate.feature_statistics(b)
    assert np.linalg.matrix_rank(S_a) < 64
    assert abs(evaluate.frechet_distance(mu_a, S_a, mu_a, S_a)) < 1e-6
    fd = evaluate.frechet_distance(mu_a, S_a, mu_b, S_b)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(evaluate.frechet_distance(mu_a, S_a, mu_b, S_b, method='sqrtm'), rel=1e-4)


def test_frechet_distance_rejects_bad_shapes_and_non_psd():
    with pytest.raises(ValueError, match='shapes do not match'):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='imaginary'):  # a negative-definite "covariance"
        evaluate.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2), method='sqrtm')


def test_fid_of_sample_statistics_matches_population_formula():
    # Large samples from two Gaussians: FD of the empirical statistics approaches the exact value.
    rng = np.random.RandomState(5)
    d = 4
    S1, _, _ = random_spd(d, rng)
    L1 = np.linalg.cholesky(S1)
    x = rng.randn(200000, d) @ L1.T
    y = rng.randn(200000, d) @ (2 * L1).T + 1.0  # S2 = 4 S1, mu2 = 1
    exact = d * 1.0 + np.trace(S1) * (1 - 2) ** 2
    fd = evaluate.frechet_distance(*evaluate.feature_statistics(x), *evaluate.feature_statistics(y))
    assert fd == pytest.approx(exact, rel=0.02)


# ----------------------------------------------------------------------------------------------------
# KID

def test_mmd2_unbiased_matches_brute_force():
    rng = np.random.RandomState(6)
    X, Y = rng.randn(7, 5), rng.randn(9, 5) + 0.3
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    xx = sum(k(X[i], X[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(Y[i], Y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(X[i], Y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert evaluate.mmd2_unbiased(X, Y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_on_identical_distributions():
    # Over many independent draws the unbiased estimate averages to 0 (within 4 standard errors),
    # while the biased V-statistic (diagonals kept) is clearly positive at this small sample size.
    rng = np.random.RandomState(7)
    unbiased, biased = [], []
    for _ in range(300):
        X, Y = rng.randn(20, 8), rng.randn(20, 8)
        unbiased.append(evaluate.mmd2_unbiased(X, Y))
        Kxx, Kyy, Kxy = (evaluate.polynomial_kernel(A, B) for A, B in ((X, X), (Y, Y), (X, Y)))  # numpy here
        biased.append(Kxx.mean() + Kyy.mean() - 2 * Kxy.mean())
    stderr = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 4 * stderr
    assert np.mean(biased) > 10 * stderr


def test_kid_linear_kernel_closed_form_and_subsets():
    # degree 1: k(x, y) = x.y/d + 1, so MMD^2 = ||mu_a - mu_b||^2 / d exactly in expectation.
    rng = np.random.RandomState(8)
    a, b = rng.randn(2000, 10), rng.randn(2000, 10) + 0.5
    mean, std = evaluate.kid(a, b, num_subsets=10, subset_size=1000, degree=1)
    assert mean == pytest.approx(0.25, abs=0.03) and std > 0
    # subset_size larger than the sets is reduced, with a warning; identical sets give ~0 with the cubic kernel
    with pytest.warns(UserWarning, match='reduced to 150'):
        mean0, _ = evaluate.kid(a[:300], a[300:600], num_subsets=10, subset_size=5000)
    assert abs(mean0) < 0.01
    assert evaluate.kid(a, b, seed=3, num_subsets=5) == evaluate.kid(a, b, seed=3, num_subsets=5)


# ----------------------------------------------------------------------------------------------------
# Inception Score

def test_inception_score_uniform_and_one_hot():
    assert evaluate.inception_score(np.zeros((100, 1008)), splits=5) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = 1000.0 * np.eye(10)[np.arange(200) % 10]  # confident and evenly spread over 10 classes
    assert evaluate.inception_score(one_hot, splits=4) == pytest.approx((10.0, 0.0), abs=1e-6)
    # all images confidently the same class: p(y|x) = p(y), KL = 0, IS = 1
    assert evaluate.inception_score(1000.0 * np.eye(10)[np.zeros(50, int)], splits=1)[0] == pytest.approx(1.0)


def test_inception_score_mixture_closed_form():
    # Half one-hot over K classes, half uniform: p(y) = 1/K, so E KL = (log K + 0) / 2, IS = sqrt(K).
    K = 16
    logits = np.concatenate([1000.0 * np.eye(K)[np.arange(K * 4) % K], np.zeros((K * 4, K))])
    assert evaluate.inception_score(logits, splits=1)[0] == pytest.approx(np.sqrt(K), rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Precision and recall

def test_precision_recall_identical_disjoint_and_mode_collapse():
    rng = np.random.RandomState(9)
    real = np.concatenate([rng.randn(200, 2), rng.randn(200, 2) + 20])  # two well-separated modes
    assert evaluate.precision_recall(real, real) == {'precision': 1.0, 'recall': 1.0}
    far = evaluate.precision_recall(real, rng.randn(100, 2) + 100)
    assert far == {'precision': 0.0, 'recall': 0.0}
    collapsed = evaluate.precision_recall(real, rng.randn(400, 2))  # only the first mode is generated
    assert collapsed['precision'] > 0.95
    assert 0.4 < collapsed['recall'] < 0.55


def test_knn_radii_excludes_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(evaluate.knn_radii(points, k=1).numpy(), [1, 1, 2, 4])
    np.testing.assert_allclose(evaluate.knn_radii(points, k=2).numpy(), [3, 2, 3, 6])


# ----------------------------------------------------------------------------------------------------
# Memorization

def test_memorization_flags_planted_copies_not_fresh_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(200, 3, 8, 8, generator=g)
    copies = (train[:10] + 0.01 * torch.randn(10, 3, 8, 8, generator=g)).clamp(0, 1)  # near-duplicates
    fresh = torch.rand(30, 3, 8, 8, generator=g)  # new draws from the same distribution
    samples = torch.cat([copies, fresh])
    feats = lambda x: x.flatten(1)[:, :64].numpy() * 3  # noqa: E731  (a stand-in feature map)
    report = evaluate.memorization_check(samples, train, sample_features=feats(samples), train_features=feats(train))
    for space in ('pixel', 'feature'):
        flags = report[space]['flags']
        assert flags[:10].all() and not flags[10:].any()
        assert report[space]['share'] == pytest.approx(10 / 40)
    np.testing.assert_array_equal(report['pixel']['nearest'][:10], np.arange(10))
    path = tmp_path / 'pairs.png'
    evaluate.save_nearest_pairs(samples, train, report['pixel']['nearest'], report['pixel']['ratio'], path, 4)
    img = Image.open(path)
    assert img.size == (2 * 8 + 4, 4 * (8 + 4))  # 4 pairs, each (sample | train) with a 2-px border
    with pytest.raises(ValueError, match='same'):
        evaluate.memorization_check(torch.rand(2, 3, 4, 4), train)


def test_loss_gap_report():
    rising = evaluate.loss_gap_report([1.0, 0.8, 0.6, 0.4], [1.0, 1.1, 1.2, 1.3])
    assert rising['val_rising'] and rising['val_slope'] == pytest.approx(0.1)
    assert rising['gap'] == pytest.approx(0.9)
    assert not evaluate.loss_gap_report([1.0, 0.9], [1.0, 0.95])['val_rising']


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


def test_per_class_fd():
    rng = np.random.RandomState(10)
    real, real_y = rng.randn(400, 3), np.repeat([0, 1], 200)
    fake, fake_y = rng.randn(400, 3), np.repeat([0, 1], 200)
    fake[fake_y == 1] += 2.0  # class 1 is shifted by 2 in each of 3 dims: FD ~ 12
    scores = evaluate.per_class_fd(fake, fake_y, real, real_y)
    assert scores[0] < 0.2 and scores[1] == pytest.approx(12, rel=0.15)


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

    path = evaluate.statistics_cache_path(str(tmp_path), 'mnist', 28, 50, 'lenet', 'clean')
    assert os.path.basename(path) == 'mnist_28px_n50_lenet_clean.npz'
    first = evaluate.cached_statistics(path, features)
    second = evaluate.cached_statistics(path, features)
    assert len(calls) == 1 and int(second['num_images']) == 50
    np.testing.assert_array_equal(first['sigma'], second['sigma'])
    assert second['features'].shape == (50, 4)


def test_compute_metrics_names_and_report_context():
    rng = np.random.RandomState(11)
    fake, real = rng.randn(300, 8), rng.randn(300, 8)
    stats = evaluate.compute_statistics(real)
    res = evaluate.compute_metrics(fake, stats, metrics=('fid', 'kid', 'pr'), network='lenet', kid_subset_size=100)
    assert set(res) == {'FD_lenet', 'KD_lenet', 'KD_lenet_std', 'precision_lenet', 'recall_lenet'}  # never FID
    text = evaluate.format_results(res, 300, 300, 'clean', 'test split')
    assert 'trend only' in text and 'resize=clean' in text and 'generated=300' in text and 'test split' in text
    # Inception scores name their protocol: plain FID/KID/IS only for the pytorch-fid resize (the default).
    all_metrics = ('fid', 'kid', 'is', 'pr')
    res_inc = evaluate.compute_metrics(fake, stats, np.zeros((300, 1008)), all_metrics, kid_subset_size=100)
    assert set(res_inc) == {'FID', 'KID', 'KID_std', 'IS', 'IS_std', 'precision', 'recall'}
    res_clean = evaluate.compute_metrics(fake, stats, np.zeros((300, 1008)), all_metrics, 'inception', 100, 'clean')
    assert set(res_clean) == {'clean-FID', 'clean-KID', 'clean-KID_std', 'clean-IS', 'clean-IS_std',
                              'clean-precision', 'clean-recall'}
    assert res_clean['clean-FID'] == res_inc['FID']                  # same features here: only the name differs
    assert 'trend only' in evaluate.format_results(res_clean, 300, 300, 'clean', 'train').splitlines()[0]
    assert 'trend' not in evaluate.format_results({'FID': 1.0}, 50000, 50000, 'legacy', 'train')


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
    assert os.listdir(tmp_path / 'cache') == [f'train_16px_n60_lenet_{lenet_hash[:8]}_clean.npz']


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
