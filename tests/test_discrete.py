"""discrete.py against closed forms on small discrete distributions (3 tokens of 3 values: 27 sequences).

Sampler checks draw N = 4000 sequences; sampling noise alone gives a total variation of about
sqrt(27 / (2 pi 4000)) = 0.033 between the empirical and the true distribution, so TV_TOL = 0.06 passes an exact
sampler (measured 0.02-0.04) and fails a wrong one (each test also runs a planted bug that must exceed it).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import discrete
from discrete import DiscreteProcess, empirical_distribution, exact_denoiser, exact_elbo, total_variation

K, L, N, TV_TOL = 3, 3, 4000, 0.06

# One torch thread (tests/conftest.py): tensors of 27-81 rows, where a second thread's synchronisation on a busy
# 2-core machine made the ELBO enumerations 40x slower (75 s instead of 2 s).
pytestmark = pytest.mark.usefixtures('one_thread')


def joint_distribution(seed=0):
    """A correlated distribution over the 27 sequences (tokens are far from independent)."""
    p = torch.rand(K ** L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
    return p / p.sum()


def product_distribution(seed=0):
    """Independent tokens with different marginals: p(x) = prod_l p_l(x^l)."""
    marginals = torch.rand(L, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.2
    marginals /= marginals.sum(1, keepdim=True)
    seqs = discrete.all_sequences(L, K)
    return marginals[torch.arange(L), seqs].prod(1)


def tv_of(x, p):
    """TV between the samples and p over all (K+1)^L sequences: a token left masked counts as an error."""
    S = K + 1
    p_full = torch.zeros(S ** L, dtype=torch.float64)
    p_full[(discrete.all_sequences(L, K) * (S ** torch.arange(L - 1, -1, -1))).sum(1)] = p
    return total_variation(empirical_distribution(x, S), p_full)


# ----------------------------------------------------------------------------
# Forward process

@pytest.mark.parametrize('kind', ['absorbing', 'uniform'])
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_marginals_are_products_of_transition_matrices(kind, schedule):
    """Qbar_t (closed form) = Q_1 Q_2 ... Q_t (D3PM Eq. 2), rows stochastic; q_sample draws from its rows."""
    process = DiscreteProcess(kind, K, schedule)
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    product = torch.eye(process.num_states, dtype=torch.float64)
    for i in range(1, 11):
        step = process.transition_matrix(process.alpha(ts[i - 1]), process.alpha(ts[i]))
        # The one-step matrix from its definition: keep with prob 1 - beta, else jump to the stationary law
        beta = 1 - process.alpha(ts[i]) / process.alpha(ts[i - 1]) if process.alpha(ts[i - 1]) > 0 else 1.0
        # where a corrupted token goes: the mask (index K), or any of the K tokens uniformly (D3PM Sec. 3.1)
        target = (F.one_hot(torch.tensor(K), K + 1).double() if kind == 'absorbing'
                  else torch.full((K,), 1 / K, dtype=torch.float64))
        assert torch.allclose(step, (1 - beta) * torch.eye(process.num_states, dtype=torch.float64)
                              + beta * target[None].expand_as(step), atol=1e-12)
        product = product @ step
        assert torch.allclose(product, process.marginal_matrix(process.alpha(ts[i])), atol=1e-12)
        assert torch.allclose(product.sum(1), torch.ones(process.num_states, dtype=torch.float64))
    # Monte Carlo: frequencies of x_t given x0 = 1 at t = 0.3 match row 1 of Qbar_t (4 sigma of 20000 draws)
    x0 = torch.ones(20000, 1, dtype=torch.long)
    t = torch.full((20000,), 0.3)
    x_t = process.q_sample(x0, t, torch.Generator().manual_seed(0))
    freq = torch.bincount(x_t.flatten(), minlength=process.num_states).double() / 20000
    expected = process.marginal_matrix(process.alpha(torch.tensor(0.3, dtype=torch.float64)))[1]
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / 20000)


def test_exact_denoiser_is_the_posterior():
    """The test fixture itself: exact p(x0^l | x_t) matches the frequencies of x0 among forward samples with x_t."""
    p = joint_distribution()
    process = DiscreteProcess('absorbing', K)
    g = torch.Generator().manual_seed(0)
    x0 = discrete.all_sequences(L, K)[torch.multinomial(p, 200000, True, generator=g)]
    t = torch.full((200000,), 0.5)
    x_t = process.q_sample(x0, t, g)
    query = torch.tensor([K, 0, K])                                  # mask, 0, mask
    hits = (x_t == query).all(1)
    freq = torch.bincount(x0[hits, 0], minlength=K).double() / hits.sum()
    exact = exact_denoiser(p, process, L)(query[None], t[:1]).exp()[0, 0]
    assert (freq - exact).abs().max() < 0.02                         # ~ 4 sigma with ~ 12000 hits


def test_absorbing_reverse_step_is_unmasking():
    """For the absorbing process D3PM Eq. 3 averaged over p(x0 | x_t) is MD4's unmasking step: a masked token stays
    masked with (1 - alpha_s) / (1 - alpha_t), else takes x0 ~ p(x0 | x_t); an unmasked token stays."""
    process = DiscreteProcess('absorbing', K, 'cosine')
    a_s, a_t = process.alpha(torch.tensor(0.3, dtype=torch.float64)), process.alpha(torch.tensor(0.7, dtype=torch.float64))
    p0 = torch.tensor([[[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    x_t = torch.tensor([[K, 1]])
    probs = process.reverse_probs(x_t, p0, a_s, a_t)
    stay = (1 - a_s) / (1 - a_t)
    assert torch.allclose(probs[0, 0], torch.cat([(1 - stay) * p0[0, 0], stay.reshape(1)]), atol=1e-12)
    assert torch.allclose(probs[0, 1], F.one_hot(torch.tensor(1), K + 1).double())


# ----------------------------------------------------------------------------
# Samplers with an exact denoiser reproduce the data

@pytest.mark.parametrize('kind,steps', [('absorbing', 2), ('absorbing', 5), ('uniform', 2), ('uniform', 7)])
def test_ancestral_exact_on_product_data_any_steps(kind, steps):
    """Independent tokens: each token's reverse chain is exact, so any number of steps reproduces the data."""
    p = product_distribution()
    process = DiscreteProcess(kind, K)
    x = discrete.sample_ancestral(exact_denoiser(p, process, L), process, (N, L), steps,
                                  generator=torch.Generator().manual_seed(0))
    assert tv_of(x, p) < TV_TOL


@pytest.mark.parametrize('kind', ['absorbing', 'uniform'])
def test_ancestral_exact_on_joint_data_with_many_steps(kind, monkeypatch):
    """Correlated tokens: tokens changed in the same step are drawn independently, so the error vanishes only as
    the steps grow; 64 steps pass, 2 steps fail (the factorised step's error, 0.1-0.2 TV here)."""
    p = joint_distribution()
    process = DiscreteProcess(kind, K)
    denoiser = exact_denoiser(p, process, L)
    sample = lambda steps: discrete.sample_ancestral(denoiser, process, (N, L), steps,
                                                     generator=torch.Generator().manual_seed(0))
    assert tv_of(sample(64), p) < TV_TOL
    assert tv_of(sample(2), p) > TV_TOL
    # Plant: a time grid off by one step (the sampler stops at t = 1/17 instead of 0)
    monkeypatch.setattr(discrete, 'time_grid', lambda steps, device=None:
                        torch.linspace(1, 0, steps + 2, dtype=torch.float64)[:steps + 1])
    assert tv_of(sample(16), p) > TV_TOL


def test_maskgit_random_order_is_exact_with_one_token_per_iteration():
    """MaskGIT's schedule with L iterations reveals exactly one token each (the reference's clipping), so with random
    order it is the any-order chain rule, exact on any joint; revealing two in the first iteration is not."""
    p = joint_distribution()
    process = DiscreteProcess('absorbing', K, 'cosine')
    denoiser = exact_denoiser(p, process, L)
    x = discrete.sample_maskgit(denoiser, process, (N, L), L, order='random', generator=torch.Generator().manual_seed(0))
    assert tv_of(x, p) < TV_TOL
    x = discrete.sample_maskgit(denoiser, process, (N, L), 2, order='random', generator=torch.Generator().manual_seed(0))
    assert tv_of(x, p) > TV_TOL                                      # 2 iterations: two tokens drawn independently


@pytest.mark.parametrize('Lbig,T,expected', [(16, 6, [15, 13, 11, 8, 4]), (4, 8, [3, 2, 1, 1, 1, 1, 1])])
def test_maskgit_reveals_tokens_on_the_cosine_schedule(Lbig, T, expected):
    """Masked tokens after iteration k: clip(floor(L cos(pi k / 2T)), 1, masked - 1) (MaskGIT Sec. 3.2-3.3 and its
    reference code; the clip matters in the second case), none at the end; revealed tokens never change."""
    process = DiscreteProcess('absorbing', K, 'cosine')
    history = []
    denoiser = lambda x, t, **c: torch.zeros(*x.shape, K)
    x = discrete.sample_maskgit(denoiser, process, (2, Lbig), T, generator=torch.Generator().manual_seed(0),
                                callback=lambda k, t, x, p: history.append(x.clone()))
    masked, by_formula = Lbig, []
    for k in range(1, T):
        masked = max(1, min(masked - 1, math.floor(Lbig * math.cos(math.pi / 2 * k / T))))
        by_formula.append(masked)
    assert [int((h == process.mask_id).sum(1)[0]) for h in history] == by_formula == expected
    for before, after in zip(history, history[1:] + [x]):
        known = before != process.mask_id
        assert torch.equal(after[known], before[known])
    assert (x != process.mask_id).all()


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_ancestral_unmasking_follows_the_forward_marginal(schedule):
    """After the step to time s the share of still-masked tokens is 1 - alpha(s) (the reverse chain has the forward
    process's marginals, MD4 Sec. 3), within 4 sigma on 4000 x 16 tokens; unmasked tokens never change."""
    process = DiscreteProcess('absorbing', K, schedule)
    shares, history = [], []
    logits = torch.randn(1, 16, K, generator=torch.Generator().manual_seed(1))
    denoiser = lambda x, t, **c: logits.expand(x.shape[0], -1, -1)
    discrete.sample_ancestral(denoiser, process, (4000, 16), 8, generator=torch.Generator().manual_seed(0),
                              callback=lambda i, t, x, p: history.append(x.clone()))
    for i, x in enumerate(history):
        s = torch.tensor(1 - (i + 1) / 8, dtype=torch.float64)
        expected = 1 - process.alpha(s).item()
        assert abs((x == process.mask_id).double().mean().item() - expected) < 4 * math.sqrt(0.25 / x.numel()) + 1e-12
    for before, after in zip(history, history[1:]):
        known = before != process.mask_id
        assert torch.equal(after[known], before[known])


def test_x0_probs_carry_over_unmasked_tokens():
    """SUBS (MDLM Sec. 3.2.1): whatever the network says, an unmasked token's p(x0 | x_t) is one-hot on itself;
    masked tokens get the softmax of the logits."""
    process = DiscreteProcess('absorbing', K)
    x_t = torch.tensor([[K, 2, 0]])
    logits = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    probs = process.x0_probs(x_t, logits)
    assert torch.allclose(probs[0, 0], torch.softmax(logits[0, 0].double(), -1))
    assert torch.equal(probs[0, 1:], F.one_hot(torch.tensor([2, 0]), K).double())


def test_maskgit_confidence_order_favours_likely_tokens():
    """The published confidence ordering is not an exact sampler: with the Gumbel noise off (choice_temperature 0)
    a token that came out unlikely is masked again and redrawn, so on independent tokens the likely values are
    over-represented (MaskGIT trades diversity for fidelity)."""
    p = product_distribution()
    process = DiscreteProcess('absorbing', K, 'cosine')
    x = discrete.sample_maskgit(exact_denoiser(p, process, L), process, (N, L), L, choice_temperature=0.0,
                                generator=torch.Generator().manual_seed(0))
    assert tv_of(x, p) > TV_TOL
    mode = p.argmax()
    assert empirical_distribution(x, K)[mode] > p[mode] + 0.03


def test_classifier_free_guidance_tilts_by_the_class_likelihood():
    """Guided logits log p_u + w (log p_c - log p_u): w = 1 gives the conditional, w = 0 the unconditional model,
    and on independent tokens sampling gives p(x|y)^w p(x)^(1-w) / Z per token."""
    p_c, p_u = product_distribution(1), product_distribution(2)
    process = DiscreteProcess('absorbing', K)
    den_c, den_u = exact_denoiser(p_c, process, L), exact_denoiser(p_u, process, L)
    denoiser = lambda x, t, y=None: torch.where((y == 0)[:, None, None], den_c(x, t), den_u(x, t))
    x_t, t, y = torch.tensor([[K, 1, K]]), torch.tensor([0.5]), torch.tensor([0])
    for w, target in ((1.0, den_c), (0.0, den_u)):
        guided = discrete.classifier_free_guidance(denoiser, w, null_label=1)(x_t, t, y=y)
        assert torch.allclose(guided.log_softmax(-1), target(x_t, t).log_softmax(-1), atol=1e-9)
    w = 2.0
    tilted = p_c ** w * p_u ** (1 - w)                   # a product of per-token tilts, since both are products
    tilted /= tilted.sum()
    guided = discrete.classifier_free_guidance(denoiser, w, null_label=1)
    x = discrete.sample_ancestral(guided, process, (N, L), 3, cond={'y': torch.zeros(N, dtype=torch.long)},
                                  generator=torch.Generator().manual_seed(0))
    assert tv_of(x, tilted) < TV_TOL
    assert tv_of(x, p_c) > TV_TOL


# ----------------------------------------------------------------------------
# Objectives: the ELBO bounds the exact NLL and tightens with steps

@pytest.mark.parametrize('kind', ['absorbing', 'uniform'])
def test_elbo_upper_bounds_nll_and_approaches_it(kind):
    p = joint_distribution()
    nll = -(p * p.log()).sum().item()
    process = DiscreteProcess(kind, K)
    denoiser = exact_denoiser(p, process, L)
    bounds = [exact_elbo(p, process, L, T, denoiser) for T in (1, 4, 16, 48)]
    assert all(b >= nll - 1e-9 for b in bounds)
    assert all(a > b for a, b in zip(bounds, bounds[1:]))                 # tighter with more steps
    assert bounds[-1] - nll < 0.1 * (bounds[0] - nll)                    # the gap closes (continuous time: tight)
    # A wrong (too confident) denoiser still gives an upper bound, but a looser one
    sharp = lambda x, t, **c: 2 * denoiser(x, t)
    assert exact_elbo(p, process, L, 4, sharp) > bounds[1] + 1e-3


def test_masked_elbo_simple_form_equals_the_kl_form():
    """MD4's T-step ELBO, sum_i (alpha_s - alpha_t)/(1 - alpha_t) E[masked cross-entropy], equals D3PM's KL sum for
    the absorbing process (computed exactly, both by enumeration), and the continuous-time training loss
    (masked_diffusion_loss, Monte Carlo) estimates the T -> inf limit, which is the exact NLL for an exact denoiser."""
    p = joint_distribution()
    nll = -(p * p.log()).sum().item()
    process = DiscreteProcess('absorbing', K, 'cosine')
    denoiser = exact_denoiser(p, process, L)
    T = 8
    seqs, states = discrete.all_sequences(L, K), discrete.all_sequences(L, K + 1)
    simple = 0.0
    for i in range(1, T + 1):
        a_s, a_t = process.alpha(torch.tensor((i - 1) / T)), process.alpha(torch.tensor(i / T))
        logp = denoiser(states, torch.full((len(states),), i / T))                       # (S^L, L, K)
        for x0, p0 in zip(seqs, p):
            q_t = process.marginal_matrix(a_t)[x0[None], states].prod(1)                  # (S^L,)
            ce = -(logp.gather(-1, x0.expand(len(states), L)[..., None]).squeeze(-1) * (states == K)).sum(1)
            simple += float(p0 * (a_s - a_t) / (1 - a_t) * (q_t * ce)[q_t > 0].sum())   # the x_t that x0 can give
    assert abs(simple - exact_elbo(p, process, L, T, denoiser)) < 1e-9
    g = torch.Generator().manual_seed(0)
    x0 = seqs[torch.multinomial(p, 40000, True, generator=g)]
    t = (torch.arange(40000) + torch.rand(1, generator=g)) / 40000               # stratified t (low discrepancy)
    # The exact p(x0 | x_t) of the absorbing process does not depend on t (the (1 - alpha_t) of every masked token
    # cancels), so one Qbar serves all 40000 draws.
    time_free = lambda x, t, **c: denoiser(x, torch.full_like(t, 0.5))
    loss, _ = discrete.masked_diffusion_loss(time_free, process, x0, t=t.clamp_min(1e-6), generator=g)
    assert abs(loss.mean().item() - nll) < 0.03 * nll
    assert loss.mean().item() < exact_elbo(p, process, L, 4, denoiser)


def test_hybrid_loss_estimates_the_elbo():
    """D3PM's hybrid loss: its ELBO estimate (T times the sampled term) averages to the exact T-step ELBO."""
    p = joint_distribution()
    process = DiscreteProcess('uniform', K)
    denoiser = exact_denoiser(p, process, L)
    g = torch.Generator().manual_seed(0)
    x0 = discrete.all_sequences(L, K)[torch.multinomial(p, 20000, True, generator=g)]
    objective, elbo = discrete.d3pm_hybrid_loss(denoiser, process, x0, T=8, hybrid_lambda=0.01, generator=g)
    exact = exact_elbo(p, process, L, 8, denoiser)
    stderr = elbo.double().std().item() / math.sqrt(len(elbo))
    assert abs(elbo.double().mean().item() - exact) < 4 * stderr
    assert (objective >= elbo / 8 - 1e-4).all()                         # the lambda term adds cross-entropy >= 0


# ----------------------------------------------------------------------------
# The network

def test_token_transformer_learns_a_joint_distribution():
    """A tiny transformer trained on the masked ELBO learns the dependence between tokens: on copies of one token
    (x^2 = x^1, x^3 = x^1 with probability 0.8) its 16-step ELBO comes within 25% of the gap between the exact
    NLL and the independent-token entropy (what a network ignoring the other tokens reaches)."""
    torch.manual_seed(0)
    seqs = discrete.all_sequences(L, K)
    p = ((seqs[:, 1] == seqs[:, 0]).double() * torch.where(seqs[:, 2] == seqs[:, 0], 0.8, 0.1)) / K
    nll = -(p[p > 0] * p[p > 0].log()).sum().item()
    marginals = F.one_hot(seqs, K).double().mul(p[:, None, None]).sum(0)                  # (L, K)
    independent = -(marginals * marginals.log()).sum().item()
    process = DiscreteProcess('absorbing', K)
    net = discrete.TokenTransformer(K, L, num_classes=0, **discrete.DISCRETE_CONFIGS['tiny'])
    assert net(torch.full((2, L), K), torch.rand(2)).shape == (2, L, K)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        x0 = seqs[torch.multinomial(p, 128, True, generator=g)]
        loss, _ = discrete.masked_diffusion_loss(net, process, x0, generator=g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        bound = exact_elbo(p, process, L, 16, lambda x, t, **c: net(x, t.float()).double())
    assert nll <= bound < nll + 0.25 * (independent - nll), (bound, nll, independent)


# ----------------------------------------------------------------------------
# The VQ token path and the command lines

def test_tokens_decode_as_the_autoencoder_reconstructs():
    """decode_tokens(encode_tokens(x)) is the VQ autoencoder's own reconstruction (quantise inside decode_raw)."""
    import sample_discrete
    import vae
    torch.manual_seed(0)
    ae = vae.Autoencoder('tiny-vq').eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    tokens = sample_discrete.encode_tokens(ae, x)
    assert tokens.shape == (3, 8, 8) and tokens.max() < ae.config['codebook_size']
    with torch.no_grad():
        assert torch.allclose(sample_discrete.decode_tokens(ae, tokens), ae.decode_raw(ae.encode_raw(x)), atol=1e-5)


def test_train_then_sample_through_the_command_lines(tmp_path):
    """train_autoencoder.py --vq, train_discrete.py on its tokens (cached once), sample_discrete.py with both
    decoders: the checkpoint records the autoencoder and the token grid, the log the bits per token."""
    import json
    import numpy as np
    from programs import run_program
    ae, run = tmp_path / 'ae', tmp_path / 'discrete'
    fast = ['--resolution', '16', '--batch-size', '8', '--no-progress', '--sample-every', '0']
    run_program('train_autoencoder.py', fast + ['--vq', '--vae-config', 'tiny-vq', '--steps', '2', '--disc-weight', '0',
                                                '--lpips', 'off', '--val-every', '0', '--out', ae])
    argv = fast + ['--autoencoder', ae / 'ckpt.pt', '--config', 'tiny', '--steps', '3', '--log-every', '1',
                   '--val-every', '3', '--sample-steps', '2', '--out', run]
    first = run_program('train_discrete.py', argv)
    assert 'cached in' in first.stdout and list(ae.glob('tokens_shapes_train_16_*.pt'))
    ckpt = torch.load(run / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['task'] == 'discrete' and ckpt['config']['autoencoder']['latent_shape'] == [8, 8]
    assert ckpt['config']['net']['vocab_size'] == 16 and ckpt['step'] == 3
    log = [json.loads(line) for line in open(run / 'log.jsonl')]
    assert [r['step'] for r in log if 'bits_per_token' in r] == [1, 2, 3]
    assert any('val_bits_per_token' in r for r in log) and (run / 'samples_0000003.png').exists()
    second = run_program('train_discrete.py', argv[:-2] + ['--steps', '1', '--out', tmp_path / 'again'])
    assert 'read from' in second.stdout                                  # the tokens were encoded once
    run_program('sample_discrete.py', ['--ckpt', run / 'ckpt.pt', '--decoder', 'maskgit', '--steps', '3', '-n', '5',
                                       '--out', tmp_path / 'maskgit.png', '--npz', tmp_path / 'maskgit.npz'])
    out = np.load(tmp_path / 'maskgit.npz')
    assert out['samples'].shape == (5, 16, 16, 3) and out['samples'].dtype == np.uint8
    assert list(out['labels']) == [i % ckpt['config']['net']['num_classes'] for i in range(5)]   # classes cycling
