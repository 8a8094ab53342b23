"""Tests of metrics.py against closed forms: FD, KID (unbiased MMD^2), IS, precision/recall, memorisation, names."""
import numpy as np
import pytest
import torch

import metrics

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
    fd = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
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
    fd = metrics.frechet_distance(mu1, (Q * a) @ Q.T, mu2, (Q * b) @ Q.T, method=method)
    assert fd == pytest.approx(exact, rel=1e-8)


def test_frechet_distance_scaled_covariance_and_one_dimension():
    # S2 = c^2 S1 gives Tr(S1) (1 - c)^2; in 1-D, FD = (m1 - m2)^2 + (s1 - s2)^2 with standard deviations.
    rng = np.random.RandomState(2)
    S, _, _ = random_spd(20, rng)
    assert metrics.frechet_distance(np.zeros(20), S, np.zeros(20), 9 * S) == pytest.approx(4 * np.trace(S), rel=1e-9)
    assert metrics.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_distance_general_methods_agree_and_symmetric():
    rng = np.random.RandomState(3)
    S1, _, _ = random_spd(50, rng)
    S2, _, _ = random_spd(50, rng)
    mu1, mu2 = rng.randn(50), rng.randn(50)
    fd_eigh = metrics.frechet_distance(mu1, S1, mu2, S2, method='eigh')
    fd_sqrtm = metrics.frechet_distance(mu1, S1, mu2, S2, method='sqrtm')
    assert fd_eigh == pytest.approx(fd_sqrtm, rel=1e-8)
    assert fd_eigh == pytest.approx(metrics.frechet_distance(mu2, S2, mu1, S1), rel=1e-8)


def test_frechet_distance_singular_covariances_from_few_samples():
    # Fewer samples than dimensions: rank-deficient covariances. FD with itself must be ~0 (not NaN or
    # complex), and with a second sample it must be finite, positive, and agree between the methods.
    rng = np.random.RandomState(4)
    a, b = rng.randn(30, 64), rng.randn(30, 64)
    mu_a, S_a = metrics.feature_statistics(a)
    mu_b, S_b = metrics.feature_statistics(b)
    assert np.linalg.matrix_rank(S_a) < 64
    assert abs(metrics.frechet_distance(mu_a, S_a, mu_a, S_a)) < 1e-6
    fd = metrics.frechet_distance(mu_a, S_a, mu_b, S_b)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(metrics.frechet_distance(mu_a, S_a, mu_b, S_b, method='sqrtm'), rel=1e-4)


def test_frechet_distance_rejects_bad_shapes_and_non_psd():
    with pytest.raises(ValueError, match='shapes do not match'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='imaginary'):  # a negative-definite "covariance"
        metrics.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2), method='sqrtm')


def test_fid_of_sample_statistics_matches_population_formula():
    # Large samples from two Gaussians: FD of the empirical statistics approaches the exact value.
    rng = np.random.RandomState(5)
    d = 4
    S1, _, _ = random_spd(d, rng)
    L1 = np.linalg.cholesky(S1)
    x = rng.randn(200000, d) @ L1.T
    y = rng.randn(200000, d) @ (2 * L1).T + 1.0  # S2 = 4 S1, mu2 = 1
    exact = d * 1.0 + np.trace(S1) * (1 - 2) ** 2
    fd = metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
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
    assert metrics.mmd2_unbiased(X, Y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_on_identical_distributions():
    # Over many independent draws the unbiased estimate averages to 0 (within 4 standard errors),
    # while the biased V-statistic (diagonals kept) is clearly positive at this small sample size.
    rng = np.random.RandomState(7)
    unbiased, biased = [], []
    for _ in range(300):
        X, Y = rng.randn(20, 8), rng.randn(20, 8)
        unbiased.append(metrics.mmd2_unbiased(X, Y))
        Kxx, Kyy, Kxy = (metrics.polynomial_kernel(A, B) for A, B in ((X, X), (Y, Y), (X, Y)))  # numpy here
        biased.append(Kxx.mean() + Kyy.mean() - 2 * Kxy.mean())
    stderr = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 4 * stderr
    assert np.mean(biased) > 10 * stderr


def test_kid_linear_kernel_closed_form_and_subsets():
    # degree 1: k(x, y) = x.y/d + 1, so MMD^2 = ||mu_a - mu_b||^2 / d exactly in expectation.
    rng = np.random.RandomState(8)
    a, b = rng.randn(2000, 10), rng.randn(2000, 10) + 0.5
    mean, std = metrics.kid(a, b, num_subsets=10, subset_size=1000, degree=1)
    assert mean == pytest.approx(0.25, abs=0.03) and std > 0
    # identical distributions give ~0 with the cubic kernel
    assert abs(metrics.kid(a[:300], a[300:600], num_subsets=10, subset_size=150)[0]) < 0.01
    assert metrics.kid(a, b, seed=3, num_subsets=5) == metrics.kid(a, b, seed=3, num_subsets=5)


def unbiased_mmd2_by_loops(X, Y, d):
    """MMD^2_u with k(x, y) = (x.y / d + 1)^3, written out pair by pair (Gretton et al. 2012, Lemma 6)."""
    k = lambda x, y: (float(np.dot(x, y)) / d + 1) ** 3  # noqa: E731
    m, n = len(X), len(Y)
    xx = sum(k(X[i], X[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(X[i], Y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_with_the_subset_as_large_as_the_sets_is_the_unbiased_mmd_of_all_features():
    # Issue 22: subset_size = n (torch-fidelity allows it) was shrunk to n/2, a different number (rel. 0.42 at
    # n = 100). With subset_size = n every subset is the whole set: KID = MMD^2_u of all features, std 0.
    rng = np.random.RandomState(12)
    a, b = rng.randn(40, 5), 0.8 * rng.randn(40, 5) + 0.3
    exact = unbiased_mmd2_by_loops(a, b, 5)
    with pytest.warns(UserWarning, match='std is 0'):
        mean, std = metrics.kid(a, b, num_subsets=7, subset_size=40)
    assert mean == pytest.approx(exact, rel=1e-10) and std == 0.0
    # A subset size beyond the sets is the whole smaller set (clean-fid's min(n_a, n_b, subset_size)), with a warning.
    with pytest.warns(UserWarning, match='subset size 1000 > the 40 samples'):
        assert metrics.kid(a, b, num_subsets=7, subset_size=1000)[0] == pytest.approx(exact, rel=1e-10)
    # Sets of unequal size: subsets of the larger set still differ, so the std is a real spread.
    mean_unequal, std_unequal = metrics.kid(np.concatenate([a, rng.randn(40, 5)]), b, num_subsets=20, subset_size=40)
    assert std_unequal > 0
    with pytest.raises(ValueError, match='subset size'):
        metrics.kid(a, b, subset_size=1)


# ----------------------------------------------------------------------------------------------------
# Inception Score

def test_inception_score_uniform_and_one_hot():
    assert metrics.inception_score(np.zeros((100, 1008)), splits=5) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = 1000.0 * np.eye(10)[np.arange(200) % 10]  # confident and evenly spread over 10 classes
    assert metrics.inception_score(one_hot, splits=4) == pytest.approx((10.0, 0.0), abs=1e-6)
    # all images confidently the same class: p(y|x) = p(y), KL = 0, IS = 1
    assert metrics.inception_score(1000.0 * np.eye(10)[np.zeros(50, int)], splits=1)[0] == pytest.approx(1.0)


def test_inception_score_mixture_closed_form():
    # Half one-hot over K classes, half uniform: p(y) = 1/K, so E KL = (log K + 0) / 2, IS = sqrt(K).
    K = 16
    logits = np.concatenate([1000.0 * np.eye(K)[np.arange(K * 4) % K], np.zeros((K * 4, K))])
    assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(np.sqrt(K), rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Precision and recall

def test_precision_recall_identical_disjoint_and_mode_collapse():
    rng = np.random.RandomState(9)
    real = np.concatenate([rng.randn(200, 2), rng.randn(200, 2) + 20])  # two well-separated modes
    assert metrics.precision_recall(real, real) == {'precision': 1.0, 'recall': 1.0}
    far = metrics.precision_recall(real, rng.randn(100, 2) + 100)
    assert far == {'precision': 0.0, 'recall': 0.0}
    collapsed = metrics.precision_recall(real, rng.randn(400, 2))  # only the first mode is generated
    assert collapsed['precision'] > 0.95
    assert 0.4 < collapsed['recall'] < 0.55


def test_knn_radii_excludes_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(metrics.knn_radii(points, k=1).numpy(), [1, 1, 2, 4])
    np.testing.assert_allclose(metrics.knn_radii(points, k=2).numpy(), [3, 2, 3, 6])


# ----------------------------------------------------------------------------------------------------
# Memorization

def test_memorization_flags_planted_copies_not_fresh_samples():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(200, 3, 8, 8, generator=g)
    copies = (train[:10] + 0.01 * torch.randn(10, 3, 8, 8, generator=g)).clamp(0, 1)  # near-duplicates
    fresh = torch.rand(30, 3, 8, 8, generator=g)  # new draws from the same distribution
    samples = torch.cat([copies, fresh])
    feats = lambda x: x.flatten(1)[:, :64].numpy() * 3  # noqa: E731  (a stand-in feature map)
    report = metrics.memorization_check(samples, train, sample_features=feats(samples), train_features=feats(train))
    for space in ('pixel', 'feature'):
        flags = report[space]['flags']
        assert flags[:10].all() and not flags[10:].any()
        assert report[space]['share'] == pytest.approx(10 / 40)
    np.testing.assert_array_equal(report['pixel']['nearest'][:10], np.arange(10))
    with pytest.raises(ValueError, match='same'):
        metrics.memorization_check(torch.rand(2, 3, 4, 4), train)


def test_loss_gap_report():
    rising = metrics.loss_gap_report([1.0, 0.8, 0.6, 0.4], [1.0, 1.1, 1.2, 1.3])
    assert rising['val_rising'] and rising['val_slope'] == pytest.approx(0.1)
    assert rising['gap'] == pytest.approx(0.9)
    assert not metrics.loss_gap_report([1.0, 0.9], [1.0, 0.95])['val_rising']


def test_per_class_fd():
    rng = np.random.RandomState(10)
    real, real_y = rng.randn(400, 3), np.repeat([0, 1], 200)
    fake, fake_y = rng.randn(400, 3), np.repeat([0, 1], 200)
    fake[fake_y == 1] += 2.0  # class 1 is shifted by 2 in each of 3 dims: FD ~ 12
    scores = metrics.per_class_fd(fake, fake_y, real, real_y)
    assert scores[0] < 0.2 and scores[1] == pytest.approx(12, rel=0.15)


def test_compute_metrics_names_and_report_context():
    rng = np.random.RandomState(11)
    fake, real = rng.randn(300, 8), rng.randn(300, 8)
    stats = metrics.compute_statistics(real)
    res = metrics.compute_metrics(fake, stats, metrics=('fid', 'kid', 'pr'), network='lenet', kid_subset_size=100)
    assert set(res) == {'FD_lenet', 'KD_lenet', 'KD_lenet_std', 'precision_lenet', 'recall_lenet'}  # never FID
    text = metrics.format_results(res, 300, 300, 'clean', 'test split')
    assert 'trend only' in text and 'resize=clean' in text and 'generated=300' in text and 'test split' in text
    # Inception scores name their protocol: plain FID/KID/IS only for the pytorch-fid resize (the default).
    all_metrics = ('fid', 'kid', 'is', 'pr')
    res_inc = metrics.compute_metrics(fake, stats, np.zeros((300, 1008)), all_metrics, kid_subset_size=100)
    assert set(res_inc) == {'FID', 'KID', 'KID_std', 'IS', 'IS_std', 'precision', 'recall'}
    res_clean = metrics.compute_metrics(fake, stats, np.zeros((300, 1008)), all_metrics, 'inception', 100, 'clean')
    assert set(res_clean) == {'clean-FID', 'clean-KID', 'clean-KID_std', 'clean-IS', 'clean-IS_std',
                              'clean-precision', 'clean-recall'}
    assert res_clean['clean-FID'] == res_inc['FID']                  # same features here: only the name differs
    assert 'trend only' in metrics.format_results(res_clean, 300, 300, 'clean', 'train').splitlines()[0]
    assert 'trend' not in metrics.format_results({'FID': 1.0}, 50000, 50000, 'legacy', 'train')
