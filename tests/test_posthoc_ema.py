"""Post-hoc EMA (posthoc_ema.py, EDM2 Sec. 3 / App. C): the power-function EMA has the width it promises, and an EMA
reconstructed from two snapshot widths matches one accumulated directly during training."""
import copy

import numpy as np
import pytest
import torch

import posthoc_ema
from posthoc_ema import PowerFunctionEMA, gamma_of_sigma_rel, reconstruct, sigma_rel_of_gamma, solve_coefficients


def test_sigma_rel_and_gamma_are_inverse_and_match_the_paper():
    """Eq. 123 and its inverse; EDM2 quotes gamma = 16.97 for sigma_rel 0.05 and 6.94 for 0.10 (Sec. 3.1)."""
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-10)
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match='sigma_rel'):
        gamma_of_sigma_rel(0.3)                           # wider than a plain mean (gamma = 0: 0.2887)


class Trajectory(torch.nn.Module):
    """A 'network' whose weights we set at each step: the training trajectory theta(tau)."""

    def __init__(self, dim):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))


@pytest.mark.parametrize('sigma_rel', [0.05, 0.10, 0.2])
def test_tracked_ema_has_the_relative_width_it_promises(sigma_rel):
    """Tracking theta(tau) = (tau, tau^2) with beta_t = (1 - 1/t)^(gamma + 1) gives the first two moments of the
    averaging weights over tau; their std / t is sigma_rel (Eq. 123; continuous limit, 0.5% at t = 4000).
    (Planted: exponent gamma instead of gamma + 1 in ema_beta -> 0.0511 vs 0.05 etc. -> fails.)"""
    net, T = Trajectory(2), 4000
    ema = PowerFunctionEMA(net, [sigma_rel])
    for tau in range(1, T + 1):
        net.theta.data = torch.tensor([tau, tau ** 2], dtype=torch.float64)
        ema.update(net)
    m1, m2 = ema.emas[0]['theta'].tolist()
    assert ema.t == T and np.sqrt(m2 - m1 ** 2) / T == pytest.approx(sigma_rel, rel=0.005)


def test_coefficients_of_a_stored_profile_pick_that_profile():
    """Least squares onto a profile that is one of the inputs returns that input alone (closed form: e_k)."""
    times, gammas = [1000, 1000, 2000, 2000], [gamma_of_sigma_rel(0.05), gamma_of_sigma_rel(0.1)] * 2
    x = solve_coefficients(times, gammas, 2000, gamma_of_sigma_rel(0.1))
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-6)


def run_training(T=3000, every=150, sigma_rels=(0.05, 0.10), targets=(0.03, 0.07, 0.15), seed=0):
    """A smooth trajectory with per-step noise (64 dims); snapshots of sigma_rels every `every` steps, and
    EMAs of the target widths accumulated directly alongside."""
    g = torch.Generator().manual_seed(seed)
    freq, phase = torch.rand(64, generator=g, dtype=torch.float64) * 6, torch.rand(64, generator=g, dtype=torch.float64) * 6
    net = Trajectory(64)
    tracker, direct = PowerFunctionEMA(net, sigma_rels), PowerFunctionEMA(net, targets)
    snapshots = []
    for tau in range(1, T + 1):
        smooth = torch.sin(freq * tau / T * 3.14 + phase) * (1 + tau / T)
        net.theta.data = smooth + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)
        tracker.update(net)
        direct.update(net)
        if tau % every == 0:
            snapshots.append(copy.deepcopy(tracker.state_dict()))
    return snapshots, direct


def test_reconstructed_ema_matches_the_one_accumulated_during_training():
    """EMAs of widths 0.03, 0.07, 0.15 rebuilt from 20 snapshots of widths 0.05 and 0.10 match the ones tracked
    directly: relative error below 1% of the distance between the 0.05 and 0.10 averages. A reconstruction with a
    wrong gamma (snapshots read as widths 0.07 and 0.14) misses by far more, so the tolerance can tell.
    (Planted: power_function correlation exponent g_a instead of g_b; gamma + 2 in gamma_of_sigma_rel's cubic -> fails.)"""
    snapshots, direct = run_training()
    scale = (snapshots[-1]['emas'][0]['theta'] - snapshots[-1]['emas'][1]['theta']).norm()
    rebuilt, _ = reconstruct(snapshots, direct.sigma_rels)
    errors = {r: ((rebuilt[r]['theta'] - ema['theta']).norm() / scale).item()
              for r, ema in zip(direct.sigma_rels, direct.emas)}
    assert all(e < 0.01 for e in errors.values()), errors
    wrong = [dict(s, sigma_rels=[0.07, 0.14]) for s in snapshots]   # a wrong gamma for every stored profile
    bad, _ = reconstruct(wrong, [0.07])
    assert ((bad[0.07]['theta'] - direct.emas[1]['theta']).norm() / scale).item() > 0.2


def test_snapshots_are_never_overwritten_and_old_ones_are_set_aside(tmp_path):
    net = Trajectory(3)
    tracker = PowerFunctionEMA(net)
    tracker.update(net)
    path = posthoc_ema.write_snapshot(tracker, str(tmp_path), 5, {'model': 'x'})
    assert torch.load(path, weights_only=True)['t'] == 1
    with pytest.raises(SystemExit, match='never overwritten'):
        posthoc_ema.write_snapshot(tracker, str(tmp_path), 5, {'model': 'x'})
    posthoc_ema.write_snapshot(tracker, str(tmp_path), 9, {'model': 'x'})
    aside = posthoc_ema.set_aside_snapshots(str(tmp_path), after_step=5)   # a resume at step 5: step 9 is stale
    assert [p.split('-')[-1] for p in posthoc_ema.list_snapshots(str(tmp_path))] == ['0000005.pt']
    assert (tmp_path / 'posthoc' / aside.split('/')[-1] / 'snapshot-0000009.pt').exists()
