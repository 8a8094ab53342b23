"""Tests of guidance.py against closed forms on the Gaussian mixture of diffusion.py, whose conditional and
unconditional denoisers, noisy classifier and densities are all exact."""
import math

import numpy as np
import pytest
import torch

from diffusion import GaussianMixture
from guidance import (Autoguidance, ClassifierFreeGuidance, ClassifierGuidance, ConstantSchedule, IntervalSchedule,
                      LinearSchedule, OscillatingSchedule, Thresholded, classifier_gradient, dynamic_threshold, guide,
                      rejection_sample, sample_with_rejection, sampling_step, static_threshold)
from samplers import SAMPLERS, karras_sigmas

SIGMAS = [0.05, 0.3, 1.0, 4.0]


pytestmark = pytest.mark.usefixtures('one_thread_per_module')


@pytest.fixture
def gm():
    """Six components in two classes (three each), full covariances: class posteriors are far from trivial."""
    return GaussianMixture.random(K=6, D=2, num_classes=2, scale=1.0, seed=3)


def noisy_points(gm, sigma, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, _ = gm.sample(n, generator=g)
    sigma = torch.full((n,), sigma, dtype=torch.float64)
    x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, gm.num_classes, (n,), generator=g)
    return x, sigma, y


def exact_log_classifier(gm):
    return lambda x, sigma: gm.class_posterior(x, sigma).clamp(min=1e-300).log()


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance

@pytest.mark.parametrize('sigma', SIGMAS)
def test_cfg_weight_one_is_conditional_and_zero_unconditional(gm, sigma):
    x, s, y = noisy_points(gm, sigma)
    null = gm.num_classes
    assert torch.equal(ClassifierFreeGuidance(gm, 1.0, null)(x, s, y=y), gm(x, s, y=y))          # the same call: bit for bit
    # force the batched path (w = 1 skips the unconditional half) with a schedule that is 1 only for sample 0
    w_one_first = lambda sig: torch.cat([sig.new_ones(1), sig.new_full((len(sig) - 1,), 3.0)])
    # a row of a 128-row batched call against the same row of a 64-row call: the same math, not the same call, so
    # the rounding may differ (by 4e-17 on AVX512 CPUs); compare to float64 rounding
    torch.testing.assert_close(ClassifierFreeGuidance(gm, w_one_first, null)(x, s, y=y)[0], gm(x, s, y=y)[0],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ClassifierFreeGuidance(gm, 0.0, null)(x, s, y=y), gm(x, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize('w', [0.5, 2.0, 5.0])
def test_cfg_score_is_the_tilted_score(w):
    """With one Gaussian per class, (D_w - x) / sigma^2 must equal grad_x [(1 - w) log p_sigma(x) + w log p_sigma(x|y)],
    computed here by autograd through the mixture's log-density, independently of its denoiser."""
    gm = GaussianMixture.random(K=3, D=2, num_classes=3, scale=1.0, seed=5)
    for sigma in SIGMAS:
        x, s, y = noisy_points(gm, sigma, n=32)
        guided = ClassifierFreeGuidance(gm, w, null_class=gm.num_classes)(x, s, y=y)
        x_in = x.clone().requires_grad_(True)
        tilted = (1 - w) * gm.log_prob(x_in, s) + w * gm.log_prob(x_in, s, y=y)
        score = torch.autograd.grad(tilted.sum(), x_in)[0]
        torch.testing.assert_close((guided - x) / sigma ** 2, score, rtol=1e-7, atol=1e-8)


def test_cfg_is_the_same_in_eps_space(gm):
    """Ho & Salimans guide an eps-network in DDPM's frame: eps~ = (1 + w_HS) eps(z, y) - w_HS eps(z) (Eq. 6), then a
    deterministic DDIM step z' = sqrt(abar') x0~ + sqrt(1 - abar') eps~ with x0~ = (z - sqrt(1 - abar) eps~) / sqrt(abar)
    (Song et al. Eq. 12). Written here in that frame, two such steps land where our sampler lands with the x0-space
    ClassifierFreeGuidance (w = 1 + w_HS) in the sigma frame."""
    x, s, y = noisy_points(gm, 2.0)
    w_hs = 2.5
    sigmas = torch.tensor([2.0, 0.7, 0.2], dtype=torch.float64)
    abar = 1 / (1 + sigmas ** 2)                                   # alpha_bar of each sigma
    z = abar[0].sqrt() * x                                         # DDPM's latent
    for i in range(2):
        x_frame = z / abar[i].sqrt()                               # what the sigma-frame model sees
        sig = sigmas[i].expand(len(x))
        eps = lambda d: (z - abar[i].sqrt() * d) / (1 - abar[i]).sqrt()     # an eps-network from the denoiser
        eps_tilde = (1 + w_hs) * eps(gm(x_frame, sig, y=y)) - w_hs * eps(gm(x_frame, sig))
        x0_tilde = (z - (1 - abar[i]).sqrt() * eps_tilde) / abar[i].sqrt()
        z = abar[i + 1].sqrt() * x0_tilde + (1 - abar[i + 1]).sqrt() * eps_tilde
    states = []
    SAMPLERS['ddim'](ClassifierFreeGuidance(gm, 1 + w_hs, gm.num_classes), x, torch.cat([sigmas, sigmas.new_zeros(1)]),
                     cond={'y': y}, callback=lambda info: states.append(info['x']))
    torch.testing.assert_close(states[2], z / abar[2].sqrt(), rtol=1e-10, atol=1e-10)     # after two steps


def test_cfg_makes_one_batched_call_and_duplicates_other_keywords():
    calls = []

    def fake(x, sigma, y, context, flag):
        calls.append((x.shape[0], sigma.shape, y.clone(), context.clone(), flag))
        return x * (1 + y[:, None].double()) + context.sum(1)    # depends on y and on context, per sample

    x, sigma = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    context = torch.randn(3, 4, 2, dtype=torch.float64)
    null_context = torch.zeros(4, 2, dtype=torch.float64)               # no batch dim: expanded for the uncond half
    y = torch.tensor([0, 1, 2])
    out = ClassifierFreeGuidance(fake, 2.0, uncond={'y': 5, 'context': null_context})(x, sigma, y=y, context=context, flag=True)
    assert len(calls) == 1 and calls[0][0] == 6 and calls[0][1] == (6,) and calls[0][4] is True
    assert calls[0][2].tolist() == [0, 1, 2, 5, 5, 5]
    assert torch.equal(calls[0][3][:3], context) and torch.equal(calls[0][3][3:], null_context.expand(3, 4, 2))
    d_cond = x * (1 + y[:, None].double()) + context.sum(1)
    d_uncond = x * 6                                                     # y = 5, zero context
    torch.testing.assert_close(out, 2 * d_cond - d_uncond)
    # an integer label and a float sigma are accepted too (broadcast to the batch)
    calls.clear()
    ClassifierFreeGuidance(fake, 2.0, null_class=5)(x, 0.5, y=1, context=context, flag=False)
    assert calls[0][2].tolist() == [1, 1, 1, 5, 5, 5] and torch.equal(calls[0][3][3:], context)


# ----------------------------------------------------------------------------------------------------
# Classifier guidance

@pytest.mark.parametrize('sigma', SIGMAS)
def test_classifier_guidance_with_exact_classifier_is_the_conditional_denoiser(gm, sigma):
    x, s, y = noisy_points(gm, sigma)
    guided = ClassifierGuidance(gm, exact_log_classifier(gm), scale=1.0)(x, s, y=y)
    torch.testing.assert_close(guided, gm(x, s, y=y), rtol=0, atol=1e-6)


def test_classifier_guidance_equals_cfg(gm):
    """grad log p(y|x) = score(x|y) - score(x): scale s on the unconditional model is CFG with w = s, and on the
    conditional model (pass_y) CFG with w = 1 + s, the 1 + w form of Ho & Salimans."""
    x, s, y = noisy_points(gm, 0.6)
    log_cls = exact_log_classifier(gm)
    for scale in [0.0, 2.5]:
        cfg = ClassifierFreeGuidance(gm, scale, gm.num_classes)(x, s, y=y)
        torch.testing.assert_close(ClassifierGuidance(gm, log_cls, scale)(x, s, y=y), cfg, rtol=0, atol=1e-6)
        cfg_plus_one = ClassifierFreeGuidance(gm, 1 + scale, gm.num_classes)(x, s, y=y)
        torch.testing.assert_close(ClassifierGuidance(gm, log_cls, scale, pass_y=True)(x, s, y=y), cfg_plus_one,
                                   rtol=0, atol=1e-6)


def test_classifier_gradient_matches_finite_differences(gm):
    x, s, y = noisy_points(gm, 0.5, n=8)
    log_cls = exact_log_classifier(gm)
    grad = classifier_gradient(log_cls, x, s, y)
    h = 1e-6
    for d in range(2):
        e = torch.zeros_like(x)
        e[:, d] = h
        fd = (log_cls(x + e, s).gather(1, y[:, None]) - log_cls(x - e, s).gather(1, y[:, None])).squeeze(1) / (2 * h)
        torch.testing.assert_close(grad[:, d], fd, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Schedules

def test_sampling_step_interpolates_in_log_sigma():
    sigmas = torch.tensor([8.0, 4.0, 1.0, 0.0])
    sigma = torch.tensor([100.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    expected = [0.0, 0.0, 1.0, 1.5, 2.0, 2.0, 2.0]                 # 2 is halfway between 4 and 1 in log sigma
    torch.testing.assert_close(sampling_step(sigma, sigmas), torch.tensor(expected, dtype=torch.float64))


def test_constant_and_linear_schedules():
    sigmas = karras_sigmas(11, 0.002, 80.0)
    grid = sigmas[:-1]
    assert torch.equal(ConstantSchedule(3.0)(grid), torch.full_like(grid, 3.0))
    lin = LinearSchedule(sigmas, w_end=5.0, w_start=1.0)
    torch.testing.assert_close(lin(grid), torch.linspace(1.0, 5.0, 11), rtol=0, atol=1e-5)
    # beyond the ends it clamps: a churned sigma above sigma_max is the first step, sigma = 0 the last
    torch.testing.assert_close(lin(torch.tensor([200.0, 0.0])), torch.tensor([1.0, 5.0]))
    # a Heun midpoint-like sigma between grid points 4 and 5 (geometric mean) gets the average weight
    mid = (grid[4] * grid[5]).sqrt()[None]
    torch.testing.assert_close(lin(mid), torch.tensor([1.0 + 4.0 * 4.5 / 10]), rtol=0, atol=1e-5)


def test_oscillating_schedule():
    sigmas = karras_sigmas(10, 0.002, 80.0)
    osc = OscillatingSchedule(sigmas, w_high=7.0, w_low=1.0, num_high=3)
    assert osc(sigmas[:-1]).tolist() == [7, 7, 7, 1, 7, 1, 7, 1, 7, 1]
    # a churned sigma_hat just above sigma_i (Karras Alg. 2: sigma_i (1 + gamma), gamma <= sqrt(2) - 1) is step i
    churned = sigmas[:-1] * 1.4
    assert osc(churned).tolist() == [7, 7, 7, 1, 7, 1, 7, 1, 7, 1]


def test_interval_schedule_and_cfg_outside_the_interval(gm):
    interval = IntervalSchedule(4.0, sigma_lo=0.3, sigma_hi=2.0)
    sig = torch.tensor([0.1, 0.3, 0.31, 1.0, 2.0, 2.01, 50.0])
    assert interval(sig).tolist() == [1.0, 1.0, 4.0, 4.0, 4.0, 1.0, 1.0]
    calls = []
    counting = lambda x, sigma, **cond: calls.append(x.shape[0]) or gm(x, sigma, **cond)
    D = ClassifierFreeGuidance(counting, interval, gm.num_classes)
    for sigma, guided in [(0.1, False), (1.0, True), (5.0, False)]:
        calls.clear()
        x, s, y = noisy_points(gm, sigma, n=16)
        out = D(x, s, y=y)
        if guided:
            assert calls == [32]
            torch.testing.assert_close(out, guide(gm(x, s, y=y), gm(x, s), 4.0))
        else:
            assert calls == [16] and torch.equal(out, gm(x, s, y=y))       # no unconditional call at all


# ----------------------------------------------------------------------------------------------------
# Thresholding

def test_static_threshold():
    x0 = torch.tensor([[0.5, -3.0], [1.25, -0.25]])
    assert static_threshold(x0).tolist() == [[0.5, -1.0], [1.0, -0.25]]


def test_dynamic_threshold_by_hand():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0],       # |x0| sorted 0.5, 1, 2, 3: the median (p = 0.5) is s = 1.5
                       [0.2, -0.9, 0.4, 0.1]])      # s < 1: left untouched
    out = dynamic_threshold(x0, percentile=0.5)
    torch.testing.assert_close(out[0], torch.tensor([0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5]))
    assert torch.equal(out[1], x0[1])
    # p = 0.995 of [0, 1, ..., 100] / 20 is 99.5 / 20 by linear interpolation: scale so that maps to 1
    ramp = torch.arange(101.0)[None] / 20
    out = dynamic_threshold(ramp)
    s = 99.5 / 20
    torch.testing.assert_close(out, ramp.clamp(max=s) / s)
    assert out.abs().max() <= 1.0
    # image-shaped input: the per-sample s is numpy's percentile of |x0| over all of that sample's elements
    x0 = 2 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = np.maximum(np.percentile(x0.abs().reshape(4, -1).numpy(), 99.5, axis=1), 1.0)[:, None, None, None]
    torch.testing.assert_close(dynamic_threshold(x0), torch.from_numpy(np.clip(x0.numpy(), -s, s) / s))


def test_thresholded_wrapper():
    big = lambda x, sigma, **cond: 3 * x
    x = torch.tensor([[0.5, -0.1]])
    assert Thresholded(big, 'static')(x, 1.0).tolist() == [[1.0, pytest.approx(-0.3)]]
    torch.testing.assert_close(Thresholded(big, 'dynamic', percentile=1.0)(x, 1.0), torch.tensor([[1.0, -0.2]]))


# ----------------------------------------------------------------------------------------------------
# Autoguidance

def test_autoguidance_formula(gm):
    bad = GaussianMixture(gm.means, gm.covs * 2.0, gm.weights, gm.classes)        # a broader, "worse" model
    x, s, y = noisy_points(gm, 0.7)
    d_good, d_bad = gm(x, s, y=y), bad(x, s, y=y)
    assert torch.equal(Autoguidance(gm, bad, 1.0)(x, s, y=y), d_good)
    torch.testing.assert_close(Autoguidance(gm, bad, 0.0)(x, s, y=y), d_bad, rtol=0, atol=1e-12)
    torch.testing.assert_close(Autoguidance(gm, bad, 2.5)(x, s, y=y), d_bad + 2.5 * (d_good - d_bad))
    torch.testing.assert_close(Autoguidance(gm, gm, 6.0)(x, s, y=y), d_good)     # guiding by itself changes nothing


# ----------------------------------------------------------------------------------------------------
# Rejection sampling

def test_rejection_acceptance_rate_is_the_known_probability():
    """Classes N(-1, 1) and N(+1, 1): samples of class 0 are classified correctly iff x < 0, prob Phi(1)."""
    gm = GaussianMixture([[-1.0], [1.0]], [1.0, 1.0])
    x, _ = gm.sample(40000, y=0, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(40000, dtype=torch.long)
    clean = lambda x: gm.class_posterior(x, 0.0).log()
    x_kept, y_kept, keep, rate = rejection_sample(x, y, clean)
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))                              # 0.8413
    assert abs(rate - phi_1) < 4 * math.sqrt(phi_1 * (1 - phi_1) / 40000)
    assert (x_kept < 0).all() and torch.equal(keep, x[:, 0] < 0)


def test_rejection_top_fraction_keeps_the_most_confident_per_class():
    gm = GaussianMixture([[-1.0], [1.0]], [1.0, 1.0])
    g = torch.Generator().manual_seed(1)
    x = torch.cat([gm.sample(100, y=0, generator=g)[0], gm.sample(60, y=1, generator=g)[0]])
    y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(60, dtype=torch.long)])
    clean = lambda x: gm.class_posterior(x, 0.0).log()
    _, y_kept, keep, rate = rejection_sample(x, y, clean, top_fraction=0.25)
    assert (y_kept == 0).sum() == 25 and (y_kept == 1).sum() == 15 and rate == 40 / 160
    # class 0's p(0|x) decreases with x: the kept ones are exactly its 25 smallest x
    assert torch.equal(keep[:100].nonzero().squeeze(1).sort().values, x[:100, 0].argsort()[:25].sort().values)
    x_out, y_out, rate = sample_with_rejection(lambda: (x, y), clean, 50, top_fraction=0.25)
    assert x_out.shape == (50, 1) and rate == 0.25


@pytest.mark.parametrize('n, top_fraction, kept', [(101, 0.25, 26), (61, 0.3, 19), (3, 0.1, 1), (100, 0.07, 7),
                                                    (7, 1 / 7, 1)])
def test_rejection_top_fraction_rounds_up(n, top_fraction, kept):
    """ceil(top_fraction * n) per class: 101 * 0.25 = 25.25 keeps 26 (rounding down would keep 25), a class of 3
    at 0.1 keeps one sample, not none; a product that is a whole number up to floating-point error (0.07 * 100 =
    7.000000000000001) keeps exactly that number."""
    gm = GaussianMixture([[-1.0], [1.0]], [1.0, 1.0])
    x, _ = gm.sample(n, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(n, dtype=torch.long)
    clean = lambda x: gm.class_posterior(x, 0.0).log()
    _, y_kept, keep, rate = rejection_sample(x, y, clean, top_fraction=top_fraction)
    assert len(y_kept) == kept and keep.sum() == kept and rate == pytest.approx(kept / n)
    # the kept ones are the most confident: class 0's p(0|x) decreases with x
    assert x[keep, 0].max() < x[~keep, 0].min()


# ----------------------------------------------------------------------------------------------------
# Whole samplers: guided denoisers are plain denoisers

@pytest.mark.parametrize('sampler', ['heun', 'dpmpp_2m'])
def test_classifier_guided_sampling_reproduces_conditional_sampling(gm, sampler):
    sigmas = karras_sigmas(12, 0.002, 40.0).double()
    x_T = sigmas[0] * torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(256) % 2
    conditional = SAMPLERS[sampler](gm, x_T, sigmas, cond={'y': y})
    guided = SAMPLERS[sampler](ClassifierGuidance(gm, exact_log_classifier(gm), 1.0), x_T, sigmas, cond={'y': y})
    torch.testing.assert_close(guided, conditional, rtol=0, atol=1e-5)


def test_schedules_work_inside_heun_with_churn(gm):
    """An interval covering every noise level is constant guidance; one covering none is the conditional model;
    the churned sigma_hat of Heun's stochastic variant is handled like any other sigma."""
    sigmas = karras_sigmas(10, 0.002, 40.0).double()
    x_T = sigmas[0] * torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(128) % 2
    run = lambda D: SAMPLERS['heun'](D, x_T, sigmas, S_churn=5.0, generator=torch.Generator().manual_seed(1), cond={'y': y})
    null = gm.num_classes
    torch.testing.assert_close(run(ClassifierFreeGuidance(gm, IntervalSchedule(3.0, 0.0, math.inf), null)),
                               run(ClassifierFreeGuidance(gm, 3.0, null)), rtol=0, atol=0)
    assert torch.equal(run(ClassifierFreeGuidance(gm, IntervalSchedule(3.0, 100.0, 200.0), null)), run(gm))


def test_guidance_raises_fidelity_on_the_mixture(gm):
    """The point of guidance: more samples land where the exact classifier agrees with the requested class."""
    sigmas = karras_sigmas(16, 0.002, 40.0).double()
    x_T = sigmas[0] * torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(2000) % 2
    fidelity = {}
    for w in [1.0, 4.0]:
        x = SAMPLERS['heun'](ClassifierFreeGuidance(gm, w, gm.num_classes), x_T, sigmas, cond={'y': y})
        fidelity[w] = (gm.class_posterior(x, 0.0).argmax(1) == y).double().mean().item()
    assert fidelity[4.0] > fidelity[1.0] + 0.02, fidelity
