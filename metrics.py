"""Metrics of generative models on features: FD/FID, KID, IS, precision/recall and memorisation, from scratch.

A metric compares a set of features of generated images (g) with features of real ones (r); the feature network
(inception.py for FID, or any other) is a separate file, so FID = inception.py + this file, both copyable alone.

  FID     Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", arXiv:1706.08500
          FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})                           (Eq. 6)
          the Frechet (2-Wasserstein) distance of the Gaussians N(mu, S) fitted to each set of features.
  KID     Binkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401 (its section on KID)
          the unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with the kernel k(x, y) = (x.y / d + 1)^3,
          averaged over random subsets of m = 1000 samples:
          MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2
  IS      Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498 (Sec. 4)
          IS = exp( E_x KL(p(y|x) || p(y)) ), p(y) = E_x p(y|x), over 10 splits
          (videos, Saito et al. 2017/2020: C3D's UCF-101 predictions, one score per 2048 clips: IS_c3d)
  P/R     Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric", arXiv:1904.06991
          f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi')|| for some phi' in Phi    (Eq. 1)
          precision = mean_{phi_g} f(phi_g, Phi_r),  recall = mean_{phi_r} f(phi_r, Phi_g)  (Eq. 2), k = 3
  Copies  Gu et al. 2023, "On Memorization in Diffusion Models", arXiv:2310.02664
          a sample x is a near-copy when d(x, NN_1) < d(x, NN_2) / 3 among the training images

Conventions: features are (N, D) arrays or tensors; statistics (mu, S) are float64 numpy; images for the
pixel-space memorisation check are (N, C, H, W), uint8 in [0, 255] or float in [0, 1].
A score's name says how its features were made (metric_name): FID/KID/IS only for the FID Inception network
with its published resize; FD_lenet etc. for another network, never called FID.

Usage:  mu, S = feature_statistics(features); fid = frechet_distance(mu_g, S_g, mu_r, S_r)
        python metrics.py      # closed-form checks, in seconds on a CPU
"""
import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

METRICS = ('fid', 'kid', 'is', 'pr')
# The video IS of TGANv2 (Saito et al. 2020; its scripts/compute_inception_score.py): one score per set of 2048
# generated clips, mean and std over 10 sets. C3D's UCF-101 logits give IS_c3d (c3d.py).
VIDEO_IS_SET_SIZE = 2048


def to_unit_float(x):
    """uint8 [0, 255] -> float [0, 1]; floats are taken to be in [0, 1] already."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------------------------------
# Frechet distance (Heusel et al. 2017, Eq. 6)

def feature_statistics(features):
    """mu (D,) and the unbiased covariance S (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:  # np.cov of one row is NaN ("array must not contain infs")
        raise ValueError(f'a covariance needs at least 2 feature vectors (N, D), got shape {features.shape}: '
                         'score at least 2 images (thousands for a meaningful FID)')
    if not np.isfinite(features).all():
        raise ValueError(f'{int((~np.isfinite(features)).sum())} feature values are NaN or infinite')
    return features.mean(0), np.cov(features, rowvar=False)


def clip_rounding_noise(eigvals):
    """Zero the eigenvalues below the rounding floor D * eps * max|w|: they are 0 up to float error.

    Without this, the ~1e-16 eigenvalues of a singular covariance become ~1e-8 after the square root
    and, summed over hundreds of null directions, bias FD(x, x) away from 0.
    """
    floor = len(eigvals) * np.finfo(np.float64).eps * np.abs(eigvals).max(initial=0.0)
    return np.where(eigvals > floor, eigvals, 0.0)


def trace_sqrt_product(sigma1, sigma2, method='eigh', eps=1e-6):
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    'eigh' (default): S1 S2 is similar to the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}
    (M = S1^{1/2} (S1 S2) S1^{-1/2}), so the trace is sum(sqrt(eig(M))), computed with symmetric
    eigensolvers only. Tiny negative eigenvalues from rounding are clipped to 0, which makes the
    result real and stable even for singular covariances (fewer samples than dimensions).
    'sqrtm': scipy's general matrix square root of S1 S2, as pytorch-fid and the TF code do; when
    the result is not finite, eps is added to both diagonals; imaginary parts from rounding are
    discarded after checking that they are small.
    """
    if method == 'eigh':
        w, V = scipy.linalg.eigh(sigma1)
        sqrt_sigma1 = (V * np.sqrt(clip_rounding_noise(w))) @ V.T  # S1^{1/2}, symmetric
        M = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
        eigvals = scipy.linalg.eigvalsh((M + M.T) / 2)  # symmetrize away rounding asymmetry
        return np.sqrt(clip_rounding_noise(eigvals)).sum()
    if method == 'sqrtm':
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # singular product: regularize (pytorch-fid's fallback)
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3:  # a large imaginary part means the inputs are not covariances
                raise ValueError(f'matrix square root has imaginary component {imag:.3g}; '
                                 'are sigma1 and sigma2 symmetric positive semi-definite?')
            covmean = covmean.real
        return np.trace(covmean)
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")


def frechet_distance(mu1, sigma1, mu2, sigma2, method='eigh'):
    """d^2((mu1, S1), (mu2, S2)) = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})  (Eq. 6).

    The Frechet (2-Wasserstein) distance between two Gaussians; FID when the statistics are of
    Inception pool features.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, '
                         f'mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected (D,) and (D, D)')
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, method)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018)

def polynomial_kernel(X, Y, degree=3, coef0=1.0):
    """k(x, y) = (x.y / d + coef0)^degree, the kernel of the KID paper (d = feature dimension)."""
    return (X @ Y.T / X.shape[1] + coef0) ** degree


def mmd2_unbiased(X, Y, degree=3, coef0=1.0):
    """Unbiased MMD^2_u (Gretton et al. 2012, "A Kernel Two-Sample Test"): diagonals k(x_i, x_i) left out.

    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn)
    X, Y: (m, d) and (n, d) arrays or tensors; computed in float64 with torch (whose matmul respects
    torch.set_num_threads, so it behaves on a busy machine).
    """
    X, Y = torch.as_tensor(np.asarray(X), dtype=torch.float64), torch.as_tensor(np.asarray(Y), dtype=torch.float64)
    m, n = len(X), len(Y)
    K_xx, K_yy, K_xy = (polynomial_kernel(A, B, degree, coef0) for A, B in ((X, X), (Y, Y), (X, Y)))
    mmd2 = ((K_xx.sum() - K_xx.diagonal().sum()) / (m * (m - 1))
            + (K_yy.sum() - K_yy.diagonal().sum()) / (n * (n - 1)) - 2 * K_xy.mean())
    return mmd2.item()


def kid(feats_a, feats_b, num_subsets=100, subset_size=1000, degree=3, coef0=1.0, seed=0):
    """KID: mean and standard deviation of MMD^2_u over random subsets of subset_size (without replacement).

    Unbiased, so its expectation is 0 for identical distributions whatever the sample size: this is
    why KID, unlike FID, can be compared across sample counts and is reliable at 1-2k samples.
    A subset as large as a set is that whole set (torch-fidelity allows subset = n); a larger subset size is
    lowered to the smaller set's size, as clean-fid does (m = min(n_a, n_b, subset_size)), with a warning.
    When both sets are used whole, every subset is the same: the mean is MMD^2_u of all features and the std 0.
    """
    feats_a = torch.as_tensor(np.asarray(feats_a), dtype=torch.float64)
    feats_b = torch.as_tensor(np.asarray(feats_b), dtype=torch.float64)
    n = min(len(feats_a), len(feats_b))
    if n < 2:
        raise ValueError(f'KID needs at least 2 samples per set, got {len(feats_a)} and {len(feats_b)}')
    if subset_size < 2:
        raise ValueError(f'KID subset size must be at least 2 (MMD^2_u divides by m(m-1)), got {subset_size}')
    m = min(subset_size, n)
    whole = m == len(feats_a) == len(feats_b)  # every subset is both whole sets: one value, no spread
    if subset_size > n or whole:
        warnings.warn(f'KID subset size {subset_size}'
                      + (f' > the {n} samples of the smaller set: subsets of {n} are used (clean-fid\'s '
                         'm = min(n_a, n_b, subset_size))' if subset_size > n else '')
                      + ('; every subset is both whole sets, so the std is 0, not an error bar' if whole else '')
                      + ' (set it with --kid-subset-size)')
    if whole:
        return mmd2_unbiased(feats_a, feats_b, degree, coef0), 0.0
    g = torch.Generator().manual_seed(seed)
    values = [mmd2_unbiased(feats_a[torch.randperm(len(feats_a), generator=g)[:m]],
                            feats_b[torch.randperm(len(feats_b), generator=g)[:m]], degree, coef0)
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016)

def inception_score(logits, splits=10, split_size=None):
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction within each split; mean and std.

    Feed it the 1008 logits of inception.FIDInceptionV3 (return_logits=True). Bounds: 1 (every prediction is the
    same) to the number of classes (confident and evenly spread predictions). split_size: splits of that many
    samples instead (a shorter tail is dropped; fewer samples than that make one split), as the video IS of TGANv2
    scores sets of VIDEO_IS_SET_SIZE clips.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if split_size is not None and len(logits) >= split_size:
        parts = logits[:len(logits) // split_size * split_size].split(split_size)
    else:
        parts = torch.chunk(logits, 1 if split_size is not None else splits)
    scores = []
    for part in parts:
        log_p_yx = F.log_softmax(part, dim=1)  # log p(y|x), (n, K)
        log_p_y = torch.logsumexp(log_p_yx, dim=0) - math.log(len(part))  # log of the marginal p(y), (K,)
        kl = (log_p_yx.exp() * (log_p_yx - log_p_y)).sum(1)  # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)

def pairwise_distances(A, B, chunk=1024):
    """Euclidean distances (len(A), len(B)) in chunks, float64 for exact ties in the tests."""
    A, B = torch.as_tensor(np.asarray(A), dtype=torch.float64), torch.as_tensor(np.asarray(B), dtype=torch.float64)
    return torch.cat([torch.cdist(A[i:i + chunk], B) for i in range(0, len(A), chunk)])


def knn_radii(features, k=3):
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = pairwise_distances(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself at distance 0


def manifold_coverage(queries, support, k=3):
    """Share of queries inside the union of balls B(s, r_k(s)) around support points (Eq. 1-2)."""
    radii = knn_radii(support, k)  # (S,)
    inside = pairwise_distances(queries, support) <= radii[None, :]  # (Q, S)
    return inside.any(1).double().mean().item()


def precision_recall(real_features, fake_features, k=3):
    """Precision: generated samples on the real manifold; recall: real samples on the generated one."""
    return {'precision': manifold_coverage(fake_features, real_features, k),
            'recall': manifold_coverage(real_features, fake_features, k)}


# ----------------------------------------------------------------------------------------------------
# Memorisation (small datasets overfit): nearest training neighbours of each sample, and the loss gap

def nearest_neighbours(queries, reference, k=2):
    """Distances and indices of the k nearest reference rows for each query row (flattened)."""
    q = torch.as_tensor(np.asarray(queries)).flatten(1)
    r = torch.as_tensor(np.asarray(reference)).flatten(1)
    d = pairwise_distances(q, r)
    dist, idx = d.topk(k, dim=1, largest=False)
    return dist.numpy(), idx.numpy()


def memorization_check(samples, train, ratio=1 / 3, sample_features=None, train_features=None):
    """Flag samples whose nearest training neighbour is `ratio` times closer than the second (Gu et al.).

    Checked in pixel space and, if features are given, in feature space. Returns per space the share
    flagged, the flags, the distance ratios and the nearest index of each sample.
    """
    samples, train = to_unit_float(torch.as_tensor(samples)), to_unit_float(torch.as_tensor(train))
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f'samples {tuple(samples.shape[1:])} and training images {tuple(train.shape[1:])} '
                         'must have the same (C, H, W) to be compared in pixel space; resize one of them first')
    spaces = {'pixel': (samples, train)}
    if sample_features is not None:
        spaces['feature'] = (sample_features, train_features)
    report = {}
    for space, (q, r) in spaces.items():
        dist, idx = nearest_neighbours(q, r, k=2)
        nn_ratio = dist[:, 0] / np.maximum(dist[:, 1], 1e-12)  # d(x, NN1) / d(x, NN2)
        flags = nn_ratio < ratio
        report[space] = {'share': float(flags.mean()), 'flags': flags, 'ratio': nn_ratio, 'nearest': idx[:, 0]}
    return report


def loss_gap_report(train_losses, val_losses, window=5):
    """Training vs validation loss: a rising validation loss is a necessary sign of memorization.

    Returns the last gap (val - train) and the least-squares slope of the last `window` validation
    losses; 'val_rising' is True when that slope is positive.
    """
    val = np.asarray(val_losses[-window:], np.float64)
    slope = float(np.polyfit(np.arange(len(val)), val, 1)[0]) if len(val) > 1 else 0.0
    return {'gap': float(val_losses[-1] - train_losses[-1]), 'val_slope': slope, 'val_rising': slope > 0}


def per_class_fd(fake_feats, fake_labels, real_feats, real_labels):
    """Frechet distance within each class present in both sets (noisy at few samples per class)."""
    scores = {}
    for c in np.intersect1d(np.unique(fake_labels), np.unique(real_labels)):
        f, r = fake_feats[fake_labels == c], real_feats[real_labels == c]
        if len(f) > 1 and len(r) > 1:
            scores[int(c)] = frechet_distance(*feature_statistics(f), *feature_statistics(r))
    return scores


# ----------------------------------------------------------------------------------------------------
# Reference statistics: the moments and a subset of the features, with how the features were made

def compute_statistics(features, kid_features=10000, seed=0, network='inception', resize='legacy', network_id=None):
    """mu, sigma and a random subset of the features (float32) for KID and precision/recall.

    How the features were made is stored too (network name, resize mode, hash of the weights): statistics are
    only comparable with features made the same way, and check_statistics_match refuses a mismatch.
    """
    mu, sigma = feature_statistics(features)
    keep = np.random.RandomState(seed).permutation(len(features))[:kid_features]
    stats = {'mu': mu, 'sigma': sigma, 'features': np.asarray(features, np.float32)[np.sort(keep)],
             'num_images': np.int64(len(features)), 'network': np.array(network), 'resize': np.array(resize)}
    if network_id is not None:
        stats['network_id'] = np.array(network_id)
    return stats


def check_statistics_match(stats, network, resize, source, network_id=None):
    """Refuse statistics made by another network, resize mode or set of weights than this run's features."""
    for key, wanted in (('network', network), ('resize', resize)):
        if key in stats and str(stats[key]) != wanted:
            raise ValueError(f'{source} was computed with {key}={stats[key]}, but this run uses {key}={wanted}; '
                             f'scores across the two are not comparable. Use --{key} {stats[key]} or recompute.')
    if network_id is None:
        return
    if 'network_id' not in stats:
        warnings.warn(f'{source} does not record which {network} weights made it (an older file); it is '
                      'trusted to match. Recompute it to have this checked.')
    elif str(stats['network_id']) != network_id:
        raise ValueError(f'{source} was computed with other {network} weights (sha256 {stats["network_id"]}) than '
                         f'this run\'s (sha256 {network_id}): distances between two feature spaces are meaningless. '
                         'Pass the weights the statistics were made with, or recompute them.')


# ----------------------------------------------------------------------------------------------------
# Scores named after how they were made, with the context printed next to them

def metric_name(metric, network='inception', resize='legacy'):
    """The printed and logged name of a score: it names the feature network and, for Inception, the resize.

    FID/KID/IS/precision/recall are reserved for Inception features with the pytorch-fid resize ('legacy'), the
    protocol of published numbers; clean resizing gives 'clean-FID' etc.; another network gives FD_<name>,
    KD_<name>, precision_<name>, ... so that a LeNet distance is never read as an FID.
    """
    base = {'fid': 'FID', 'kid': 'KID', 'is': 'IS', 'precision': 'precision', 'recall': 'recall'}[metric]
    if network.endswith('/frames'):   # an image network on every frame of videos
        return 'frame-' + metric_name(metric, network[:-len('/frames')], resize)
    if network == 'i3d':              # video features: Unterthiner et al.'s FVD, and the KID of them (KVD)
        return {'fid': 'FVD', 'kid': 'KVD'}.get(metric, f'{base}_i3d')
    if network != 'inception':
        return {'fid': f'FD_{network}', 'kid': f'KD_{network}'}.get(metric, f'{base}_{network}')
    return base if resize == 'legacy' else f'{resize}-{base}'


def compute_metrics(fake_feats, ref_stats, fake_logits=None, metrics=METRICS, network='inception',
                    kid_subset_size=1000, resize='legacy'):
    """The requested metrics of generated features against reference statistics (compute_statistics).

    Names come from metric_name: FID/KID/IS for Inception features with the legacy resize, clean-FID etc.
    with clean resizing, FD_<name>/KD_<name> for any other feature network. IS needs the logits.
    """
    name = lambda metric: metric_name(metric, network, resize)  # noqa: E731
    results = {}
    if 'fid' in metrics:
        results[name('fid')] = frechet_distance(*feature_statistics(fake_feats), ref_stats['mu'], ref_stats['sigma'])
    ref_feats = ref_stats.get('features')
    if 'kid' in metrics and ref_feats is not None:
        results[name('kid')], results[name('kid') + '_std'] = kid(fake_feats, ref_feats, subset_size=kid_subset_size)
    if 'is' in metrics and fake_logits is not None and network.split('/')[0] == 'inception':
        results[name('is')], results[name('is') + '_std'] = inception_score(fake_logits)
    if 'is' in metrics and fake_logits is not None and network == 'c3d':   # the video IS (TGAN; c3d.py)
        results[name('is')], results[name('is') + '_std'] = inception_score(fake_logits, split_size=VIDEO_IS_SET_SIZE)
    if 'pr' in metrics and ref_feats is not None:
        n = min(len(fake_feats), len(ref_feats), 10000)  # O(n^2) distances: cap the sample count
        pr = precision_recall(ref_feats[:n], fake_feats[:n])
        results.update({name(k): v for k, v in pr.items()})
    return results


def format_results(results, num_generated, num_reference, resize, reference_split, conditions=None,
                   headline_count=50000):
    """One line per metric with its context; a Frechet distance on fewer than 50k samples is labelled a trend."""
    context = (f'[{f"resize={resize}, " if resize else ""}generated={num_generated}, reference={num_reference} '
               f'({reference_split})' + (f', conditions={conditions}' if conditions else '') + ']')
    lines = []
    for name, value in results.items():
        if name.endswith('_std') or not isinstance(value, (int, float)):
            continue
        text = f'{name:>10s} {value:.6g}'
        if name + '_std' in results:
            text += f' +- {results[name + "_std"]:.3g}'
        if ('FID' in name or name.startswith('FD_')) and num_generated < headline_count:
            text += f'  (trend only: FD is biased upward at n={num_generated} < {headline_count})'
        lines.append(f'{text}  {context}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------
# Demo: every metric against a value known in closed form

def demo():
    """Closed-form checks that need no weights: prints computed vs exact values."""
    rng = np.random.RandomState(0)
    d = 8
    s1, s2 = rng.rand(d) + 0.5, rng.rand(d) + 0.5
    mu1, mu2 = rng.randn(d), rng.randn(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # diagonal covariances
    print(f'FD of diagonal Gaussians: {frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)):.10f} '
          f'exact {exact:.10f}')
    a, b = rng.randn(2000, 16), rng.randn(2000, 16)
    print('KID of two samples of one Gaussian (expect ~0): %.2e +- %.1e' % kid(a, b, 20, 500))
    print('KID after shifting one by 1 in every dim (linear kernel, expect 1.0): %.3f'
          % kid(a, b + 1, 20, 500, degree=1)[0])
    print('IS of uniform logits (expect 1): %.4f; of one-hot logits over 10 classes (expect 10): %.4f'
          % (inception_score(np.zeros((100, 10)), 1)[0], inception_score(100 * np.eye(10)[np.arange(100) % 10], 1)[0]))
    pr = precision_recall(a[:500], a[:500] + 100)  # a far-away copy: off the real manifold, and vice versa
    print(f'precision/recall of a set shifted far away (expect 0/0): {pr["precision"]:.2f}/{pr["recall"]:.2f}; '
          f'of the set itself (expect 1/1): {precision_recall(a[:500], a[:500])["precision"]:.2f}/'
          f'{precision_recall(a[:500], a[:500])["recall"]:.2f}')
    train = torch.rand(50, 1, 4, 4)
    samples = torch.cat([train[:5] + 0.001, torch.rand(15, 1, 4, 4)])  # 5 near-copies among 20 samples
    print(f'share of near-copies d(NN1) < d(NN2)/3 (expect 0.25): {memorization_check(samples, train)["pixel"]["share"]:.2f}')
    print('score names: ' + ', '.join(f'{net}/{resize} -> {metric_name("fid", net, resize)}'
                                      for net, resize in (('inception', 'legacy'), ('inception', 'clean'),
                                                          ('lenet', 'clean'))))


if __name__ == '__main__':
    demo()
