"""
Discrete diffusion on tokens: absorbing-state ("mask") and uniform corruption, their ELBOs, and the samplers that
turn a token denoiser into images (through a VQ decoder, vae.py).

Papers: Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces" (D3PM),
arXiv:2107.03006; Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data" (MD4),
arXiv:2406.04329; Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM),
arXiv:2406.07524; Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", arXiv:2202.04200;
Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598.

A token takes one of K values; the absorbing process adds a (K+1)-th state m, "mask". alpha(t), t in [0, 1], is the
probability that a token is still clean at time t (alpha(0) = 1, alpha(1) = 0), and with r = alpha_t / alpha_s:
  q(x_t | x_s) = Cat(x_s Q_{t|s}),  Q_{t|s} = r I + (1 - r) 1 e_m^T     absorbing   (D3PM Sec. 3.1, App. A.2.2)
                                    Q_{t|s} = r I + (1 - r) 1 1^T / K   uniform     (D3PM Sec. 3.1, App. A.2.1)
  q(x_t | x0)  = Cat(x0 Qbar_t),    Qbar_t = Q_{t|0}: both families are closed under products (D3PM Eq. 2)
  q(x_s | x_t, x0) = x_t Q_{t|s}^T * x0 Qbar_s / (x0 Qbar_t x_t^T)                               (D3PM Eq. 3)
  p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t)  (the x0-parameterisation, D3PM Sec. 3.3)
Objectives, per sequence of L tokens (nats; bits per token = nats / (L ln 2)):
  L_T   = KL(q(x_1|x0) || p(x_1)) + sum_{i>1} E KL(q(x_s|x_t,x0) || p(x_s|x_t)) - E log p(x0|x_{1/T})
          (D3PM Eq. 1, the ELBO with T steps t = i/T, s = (i-1)/T)
  masked, T steps:   L_T = sum_i (alpha_s - alpha_t) / (1 - alpha_t) E[ sum_{l: x_t^l = m} -log p(x0^l | x_t) ]
  masked, T -> inf:  L   = int_0^1 -alpha'(t) / (1 - alpha(t)) E[ sum_{l: x_t^l = m} -log p(x0^l | x_t) ] dt
          (MD4 Sec. 4, its discrete- and continuous-time ELBOs; MDLM Sec. 3.2, Eq. 10 with the SUBS parameterisation)
  hybrid (uniform):  L_lambda = L_vb + lambda E[-log p(x0 | x_t)]                                 (D3PM Eq. 5)
Samplers: ancestral (unmasking with any number of steps; D3PM's reverse step for the uniform process), MaskGIT's
confidence-ordered parallel decoding with its cosine schedule, and classifier-free guidance on logits.

Conventions: tokens x: (N, L) long, values 0..K-1, the mask is K; t: (N,) float in [0, 1];
denoiser(x_t, t, **cond) -> logits (N, L, K) of p(x0 | x_t) (never the mask).
Usage: process = DiscreteProcess('absorbing', K); x = sample_maskgit(denoiser, process, (N, L), steps=8)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Schedules: alpha(t) = P(a token is still clean at time t), and its derivative (the ELBO's weight needs it)

def alpha_linear(t):
    """alpha(t) = 1 - t (MD4 Table 4, 'linear'): as many tokens corrupted per unit time at every t."""
    return 1 - t


def alpha_linear_derivative(t):
    return -torch.ones_like(t)


def alpha_cosine(t):
    """alpha(t) = 1 - cos(pi/2 (1 - t)) = 1 - sin(pi t / 2) (MD4 Table 4, 'cosine'): MaskGIT's mask ratio
    gamma(r) = cos(pi r / 2) (MaskGIT Sec. 3.3) read in forward time, r = 1 - t."""
    return 1 - torch.sin(math.pi / 2 * t)


def alpha_cosine_derivative(t):
    return -math.pi / 2 * torch.cos(math.pi / 2 * t)


SCHEDULES = {'linear': (alpha_linear, alpha_linear_derivative), 'cosine': (alpha_cosine, alpha_cosine_derivative)}


def bits_per_token(nats, num_tokens):
    """Nats per sequence -> bits per token."""
    return nats / (num_tokens * math.log(2))


# ----------------------------------------------------------------------------
# The forward process: transition matrices, marginals, posteriors

class DiscreteProcess:
    """Absorbing-state or uniform corruption of K-valued tokens under a schedule alpha(t)."""

    def __init__(self,
                 kind,                    # 'absorbing' (adds the mask state K) or 'uniform'
                 num_tokens,              # K, the vocabulary (VQ codebook size)
                 schedule='linear'):      # alpha(t): 'linear' or 'cosine' (SCHEDULES)
        if kind not in ('absorbing', 'uniform'):
            raise ValueError(f"kind must be 'absorbing' or 'uniform', got {kind!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f'unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}')
        self.kind, self.K, self.schedule = kind, num_tokens, schedule
        self.mask_id = num_tokens                                 # only used by the absorbing process
        self.num_states = num_tokens + (kind == 'absorbing')      # S: the states a noisy token can take
        self.alpha_fn, self.alpha_derivative_fn = SCHEDULES[schedule]

    def alpha(self, t):
        return self.alpha_fn(torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else t.dtype))

    def stationary(self, dtype=torch.float64):
        """The distribution at t = 1 (D3PM Sec. 3.1): all mass on m, or uniform over the K tokens."""
        if self.kind == 'absorbing':
            return F.one_hot(torch.tensor(self.mask_id), self.num_states).to(dtype)
        return torch.full((self.K,), 1.0 / self.K, dtype=dtype)

    def transition_matrix(self, alpha_s, alpha_t, dtype=torch.float64):
        """Q_{t|s}, (S, S), rows the state at s, columns the state at t: r I + (1 - r) 1 pi^T with r = alpha_t /
        alpha_s and pi the stationary distribution (D3PM Sec. 3.1; Qbar_t = transition_matrix(1, alpha_t))."""
        r = float(alpha_t) / float(alpha_s) if float(alpha_s) > 0 else 0.0
        eye = torch.eye(self.num_states, dtype=dtype)
        return r * eye + (1 - r) * self.stationary(dtype)[None, :].expand(self.num_states, -1)

    def marginal_matrix(self, alpha_t, dtype=torch.float64):
        """Qbar_t = Q_1 Q_2 ... Q_t in closed form (D3PM Eq. 2): the transition from time 0."""
        return self.transition_matrix(1.0, alpha_t, dtype)

    def q_sample(self, x0, t, generator=None):
        """x_t ~ q(x_t | x0) (D3PM Eq. 2): each token kept with probability alpha(t), otherwise replaced by m
        (absorbing) or by a uniformly drawn token (uniform, which may redraw x0 itself)."""
        alpha = self.alpha(t).to(torch.float32).reshape(-1, *[1] * (x0.dim() - 1))
        keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
        if self.kind == 'absorbing':
            return torch.where(keep, x0, torch.full_like(x0, self.mask_id))
        noise = torch.randint(self.K, x0.shape, generator=generator, device=x0.device)
        return torch.where(keep, x0, noise)

    def x0_probs(self, x_t, logits):
        """p(x0 | x_t) from the network's logits, (N, L, K). For the absorbing process a token that is not masked is
        its own x0 ("carry-over unmasking", MDLM Sec. 3.2.1 SUBS): the network is only asked about masked ones."""
        probs = torch.softmax(logits.double(), dim=-1)
        if self.kind == 'absorbing':
            unmasked = x_t != self.mask_id
            probs = torch.where(unmasked[..., None], F.one_hot(x_t.clamp(max=self.K - 1), self.K).double(), probs)
        return probs

    def reverse_probs(self, x_t, probs_x0, alpha_s, alpha_t):
        """p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t), (N, L, S), with D3PM Eq. 3 written out:
        q(x_t | x_s) q(x_s | x0) / q(x_t | x0). With probs_x0 one-hot this is the posterior q(x_s | x_t, x0).
        (D3PM Eq. 4 sums q(x_s, x_t | x0) p~(x0 | x_t) without the division: the same for the absorbing process,
        where q(x_t = m | x0) does not depend on x0; for the uniform one the division makes an exact denoiser give
        the exact reverse process, which the tests check.)"""
        S, dtype = self.num_states, torch.float64
        p0 = F.pad(probs_x0.to(dtype), (0, S - self.K))                         # (N, L, S): no mass on m
        q_t_given_x0 = self.marginal_matrix(alpha_t, dtype).T[x_t]              # (N, L, S): q(x_t | x0 = j)
        q_t_given_s = self.transition_matrix(alpha_s, alpha_t, dtype).T[x_t]    # (N, L, S): q(x_t | x_s = j)
        # An x0 that cannot have produced x_t (q = 0) has p(x0 | x_t) = 0 for an exact denoiser; drop it.
        w = torch.where(q_t_given_x0 > 0, p0 / q_t_given_x0.clamp_min(1e-300), torch.zeros_like(p0))
        probs = (w @ self.marginal_matrix(alpha_s, dtype)) * q_t_given_s       # (N, L, S)
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-300)


def categorical(probs, generator=None):
    """One draw per row of probs (..., S) -> (...) long."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


# ----------------------------------------------------------------------------
# Objectives

def masked_diffusion_loss(denoiser, process, x0, t=None, generator=None, **cond):
    """The masked-diffusion ELBO in its simple form (MD4 Sec. 4, continuous time; MDLM Eq. 10): a one-sample
    estimate per sequence of int_0^1 -alpha'(t) / (1 - alpha(t)) E[sum over masked tokens of -log p(x0 | x_t)] dt.
    Returns (loss (N,) in nats, t (N,)). t ~ U(0, 1] unless given (never 0, where the weight is infinite)."""
    assert process.kind == 'absorbing', 'the simple masked ELBO belongs to the absorbing process'
    if t is None:
        t = 1 - torch.rand(x0.shape[0], generator=generator, device=x0.device)
    x_t = process.q_sample(x0, t, generator)
    logits = denoiser(x_t, t, **cond)                                            # (N, L, K)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), x0, reduction='none')  # (N, L)
    masked = (x_t == process.mask_id).float()
    alpha, d_alpha = process.alpha_fn(t.double()), process.alpha_derivative_fn(t.double())
    weight = (-d_alpha / (1 - alpha).clamp_min(1e-12)).float()                 # 1 / t for the linear schedule
    return weight * (masked * nll).sum(1), t


def d3pm_hybrid_loss(denoiser, process, x0, T, hybrid_lambda=0.01, generator=None, **cond):
    """D3PM's hybrid loss (Eq. 5) with T steps: one ELBO term per sequence at a uniformly drawn step i, plus lambda
    times the cross-entropy of x0 given x_t. As in D3PM's code the objective averages the terms (L_vb / T);
    the ELBO estimate (nats, unbiased) is T times the term plus the prior term (0 when alpha(1) = 0).
    Returns (objective (N,), elbo estimate (N,))."""
    N = x0.shape[0]
    i = torch.randint(1, T + 1, (N,), generator=generator, device=x0.device)
    t, s = i.double() / T, (i - 1).double() / T
    x_t = process.q_sample(x0, t, generator)
    logits = denoiser(x_t, t.float(), **cond)
    p_x0 = process.x0_probs(x_t, logits)
    terms = torch.zeros(N, dtype=torch.float64, device=x0.device)
    for step in i.unique().tolist():                   # the matrices depend on the step: one group per step
        rows = i == step
        a_s, a_t = process.alpha(torch.tensor((step - 1) / T)), process.alpha(torch.tensor(step / T))
        p = process.reverse_probs(x_t[rows], p_x0[rows], a_s, a_t)
        if step == 1:                                  # L_0 = -log p(x0 | x_{1/T}) (D3PM Eq. 1)
            terms[rows] = -torch.log(p.gather(-1, x0[rows, :, None]).squeeze(-1).clamp_min(1e-30)).sum(1)
        else:                                          # L_{t-1} = KL(q(x_s | x_t, x0) || p(x_s | x_t))
            q = process.reverse_probs(x_t[rows], F.one_hot(x0[rows], process.K).double(), a_s, a_t)
            terms[rows] = (q * (torch.log(q.clamp_min(1e-30)) - torch.log(p.clamp_min(1e-30)))).sum((1, 2))
    ce = F.cross_entropy(logits.transpose(1, 2).float(), x0, reduction='none').sum(1)
    return terms.float() + hybrid_lambda * ce, (T * terms).float()


# ----------------------------------------------------------------------------
# Samplers

def time_grid(steps, device=None):
    """t_0 = 1 > t_1 > ... > t_steps = 0, uniform in t."""
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=device)


def prior_sample(process, shape, device=None, generator=None):
    """x_1: all masks (absorbing) or uniform tokens (uniform)."""
    if process.kind == 'absorbing':
        return torch.full(shape, process.mask_id, dtype=torch.long, device=device)
    return torch.randint(process.K, shape, generator=generator, device=device)


@torch.no_grad()
def sample_ancestral(denoiser, process, shape, steps, cond=None, generator=None, device=None, callback=None):
    """Ancestral sampling x_1 -> x_{t_1} -> ... -> x_0 on a uniform time grid, any number of steps.

    Absorbing: each masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), its value drawn
    from p(x0 | x_t); revealed tokens stay (MD4 Alg. 2; MDLM Sec. 3.3). Uniform: x_s ~ p(x_s | x_t) of D3PM Eq. 3
    averaged over p(x0 | x_t) (DiscreteProcess.reverse_probs). The last step (s = 0) draws every token from p(x0|x_t)."""
    cond = cond or {}
    x = prior_sample(process, shape, device, generator)
    ts = time_grid(steps)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        t_batch = torch.full((shape[0],), float(t), device=device)
        p_x0 = process.x0_probs(x, denoiser(x, t_batch, **cond))            # (N, L, K)
        a_s, a_t = process.alpha(s), process.alpha(t)
        if process.kind == 'absorbing':
            reveal_prob = float((a_s - a_t) / (1 - a_t))                   # 1 at the last step (a_s = 1)
            masked = x == process.mask_id
            reveal = masked & (torch.rand(shape, generator=generator, device=device) < reveal_prob)
            x = torch.where(reveal, categorical(p_x0, generator), x)
        else:
            x = categorical(process.reverse_probs(x, p_x0, a_s, a_t), generator)
        if callback is not None:
            callback(i, float(t), x, p_x0)
    return x


def maskgit_mask_ratio(r):
    """MaskGIT's cosine mask schedule gamma(r) = cos(pi r / 2), r in [0, 1] the decoding progress (Sec. 3.3)."""
    return math.cos(math.pi / 2 * r)


@torch.no_grad()
def sample_maskgit(denoiser, process, shape, steps, temperature=1.0, choice_temperature=4.5, order='confidence',
                   cond=None, generator=None, device=None, callback=None):
    """MaskGIT's iterative decoding (Chang et al. 2022, Sec. 3.2): start from all masks; at iteration k = 1..steps
      1. predict p(x0 | x_t) at every position and draw a token at every masked one (logits / temperature),
      2. confidence = log-probability of the drawn token (known tokens: +inf, they are never masked again),
      3. n = number of tokens to keep masked = N_tokens * gamma(k / steps), gamma the cosine schedule (Sec. 3.3),
      4. mask again the n least confident positions; the last iteration keeps everything.
    Following the reference code (google-research/maskgit, maskgit_utils / parallel_decode): n is
    floor(N_tokens * gamma), clipped to [1, masked - 1] so each iteration reveals at least one token and keeps one
    masked, and the confidences get Gumbel noise scaled by choice_temperature * (1 - k / steps) (4.5 in the
    reference), annealed to 0 at the end. The network is told t with 1 - alpha(t) = the masked fraction.
    order='random' replaces the confidences by uniform noise (not MaskGIT: any-order sampling with MaskGIT's
    schedule, exact for an exact denoiser when each iteration reveals one token)."""
    assert process.kind == 'absorbing', 'MaskGIT decodes masked tokens'
    if order not in ('confidence', 'random'):
        raise ValueError(f"order must be 'confidence' or 'random', got {order!r}")
    cond = cond or {}
    N, L = shape
    x = prior_sample(process, shape, device)
    for k in range(1, steps + 1):
        masked = x == process.mask_id
        t = mask_fraction_to_t(process, masked.float().mean(1))
        logits = denoiser(x, t, **cond).double() / temperature
        log_p = torch.log_softmax(logits, -1)                                          # (N, L, K)
        drawn = torch.where(masked, categorical(log_p.exp(), generator), x)
        if k == steps:                                                                 # last iteration: keep all
            x = drawn
            break
        confidence = log_p.gather(-1, drawn.clamp(max=process.K - 1)[..., None]).squeeze(-1)   # (N, L)
        if order == 'random':
            confidence = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        else:
            u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-16)))
            confidence = confidence + choice_temperature * (1 - k / steps) * gumbel
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))
        n_masked = masked.sum(1)                                                        # (N,)
        n_keep = torch.floor(L * torch.tensor(maskgit_mask_ratio(k / steps), dtype=torch.float64)).long()
        n_keep = torch.maximum(torch.ones_like(n_masked), torch.minimum(n_masked - 1, n_keep.expand(N)))
        rank = confidence.argsort(1).argsort(1)                                         # 0 = least confident
        x = torch.where(rank < n_keep[:, None], torch.full_like(x, process.mask_id), drawn)
        if callback is not None:
            callback(k - 1, float(t[0]), x, log_p.exp())
    return x


def mask_fraction_to_t(process, fraction):
    """The time t whose expected masked fraction 1 - alpha(t) equals `fraction` (the network's time input)."""
    f = fraction.double().clamp(0, 1)
    t = f if process.schedule == 'linear' else 2 / math.pi * torch.asin(f)    # 1 - alpha = sin(pi t / 2)
    return t.float()


def classifier_free_guidance(denoiser, scale, null_label):
    """A denoiser whose logits are log p_u + scale (log p_c - log p_u) (Ho & Salimans 2022, Eq. 6 written on the
    log-probabilities of x0, as Muse, Chang et al. 2023, arXiv:2301.00704, guides its logits). scale 1: the
    conditional model; 0: the unconditional one. The condition is y (N,), with label null_label = 'no class'."""
    def guided(x_t, t, y=None, **cond):
        if y is None or scale == 1:
            return denoiser(x_t, t, y=y, **cond)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]),
                        **cond).double().log_softmax(-1)
        cond_logp, uncond_logp = both.chunk(2)
        return uncond_logp + scale * (cond_logp - uncond_logp)
    return guided


# ----------------------------------------------------------------------------
# Exact quantities on a small joint distribution (for tests and the demo): enumerate every sequence

def all_sequences(L, K):
    """Every sequence of L tokens in 0..K-1, (K^L, L), in lexicographic order."""
    return torch.cartesian_prod(*[torch.arange(K)] * L).reshape(-1, L)


def exact_denoiser(p_data, process, L):
    """The exact p(x0^l | x_t) of a joint distribution p_data over K^L sequences (all_sequences order): the posterior
    over sequences, p(x0) prod_l q(x_t^l | x0^l) (D3PM Eq. 2), marginalised per token. Returns logits (N, L, K)."""
    seqs = all_sequences(L, process.K)                                         # (M, L)
    one_hot = F.one_hot(seqs, process.K).double()                              # (M, L, K)

    def denoiser(x_t, t, **cond):
        out = torch.empty(*x_t.shape, process.K, dtype=torch.float64)
        for t_value in t.unique():                                             # one Qbar per distinct time
            rows = t == t_value
            Qbar = process.marginal_matrix(process.alpha(t_value.double()))    # (S, S)
            lik = Qbar[seqs[None], x_t[rows][:, None, :]].prod(-1)             # (n, M): q(x_t | x0) per sequence
            post = p_data * lik
            post = post / post.sum(1, keepdim=True)
            out[rows] = torch.einsum('nm,mlk->nlk', post, one_hot)             # per-token marginals
        return torch.log(out.clamp_min(1e-300))
    return denoiser


def exact_elbo(p_data, process, L, T, denoiser):
    """The T-step ELBO L_T (D3PM Eq. 1) in nats, averaged over p_data, computed exactly by enumerating x_t."""
    seqs, S = all_sequences(L, process.K), process.num_states
    states = all_sequences(L, S)                                               # every possible x_t
    total = 0.0
    for x0, p0 in zip(seqs, p_data):
        if p0 == 0:
            continue
        loss = 0.0
        prior = process.stationary()
        q1 = process.marginal_matrix(process.alpha(torch.tensor(1.0)))[x0]       # (L, S): q(x_1 | x0)
        loss += (q1 * (torch.log(q1.clamp_min(1e-300)) - torch.log(prior.clamp_min(1e-300)))).sum()
        for i in range(1, T + 1):
            a_s, a_t = process.alpha(torch.tensor((i - 1) / T)), process.alpha(torch.tensor(i / T))
            q_t = process.marginal_matrix(a_t)[x0[None, :], states].prod(1)    # (S^L,) q(x_t | x0)
            keep = q_t > 0
            x_t, w = states[keep], q_t[keep]
            p = process.reverse_probs(x_t, process.x0_probs(x_t, denoiser(x_t, torch.full((len(x_t),), i / T))), a_s, a_t)
            if i == 1:
                term = -torch.log(p.gather(-1, x0.expand(len(x_t), L)[..., None]).squeeze(-1).clamp_min(1e-300)).sum(1)
            else:
                q = process.reverse_probs(x_t, F.one_hot(x0.expand(len(x_t), L), process.K).double(), a_s, a_t)
                term = (q * (torch.log(q.clamp_min(1e-300)) - torch.log(p.clamp_min(1e-300)))).sum((1, 2))
            loss += (w * term).sum()
        total += float(p0) * float(loss)
    return total


def empirical_distribution(samples, K):
    """Frequencies of the sequences in samples (N, L), in all_sequences order."""
    L = samples.shape[1]
    index = (samples * (K ** torch.arange(L - 1, -1, -1))).sum(1)
    return torch.bincount(index, minlength=K ** L).double() / len(samples)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


# ----------------------------------------------------------------------------
# The network: a class-conditional transformer over the token grid, adaLN-Zero blocks (DiT, Peebles & Xie 2023,
# arXiv:2212.09748, Sec. 3.2), a few lines of dit.py carried here so the file copies alone.

DISCRETE_CONFIGS = {
    'tiny': dict(dim=32, depth=1, heads=2),          # tests (milliseconds)
    'XS': dict(dim=96, depth=2, heads=4),            # MNIST tokens on a shared CPU core, about 0.3M parameters
    'S': dict(dim=128, depth=4, heads=4),            # MNIST tokens on a CPU, about 0.9M parameters with 512 codes
    'B': dict(dim=256, depth=8, heads=8),
}


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of t * 1000 (DDPM's scale), (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """z += a1 Attn(LN(z)(1 + g1) + b1); z += a2 MLP(LN(z)(1 + g2) + b2), (g, b, a) from the condition (DiT Fig. 3)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(approximate='tanh'),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)           # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, z, c):
        b1, g1, a1, b2, g2, a2 = self.ada(c).chunk(6, dim=1)
        h = modulate(self.norm1(z), b1, g1)
        z = z + a1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return z + a2[:, None] * self.mlp(modulate(self.norm2(z), b2, g2))


class TokenTransformer(nn.Module):
    """logits of p(x0 | x_t) for every token of the grid: net(x_t (N, L) long, t (N,), y (N,) or None) -> (N, L, K).
    The input vocabulary has K + 1 entries (the mask); the class embedding has num_classes + 1 rows, the last being
    "no class" (classifier-free guidance). `config` rebuilds the network: TokenTransformer(**net.config)."""

    def __init__(self,
                 vocab_size,              # K, the VQ codebook size
                 seq_len,                 # L = h * w tokens of the grid
                 num_classes=0,           # class labels (0: unconditional); index num_classes = "no class"
                 dim=128,                 # width
                 depth=4,                 # blocks
                 heads=4,                 # attention heads
                 mlp_ratio=4.0):          # MLP width / dim
        super().__init__()
        self.config = dict(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes, dim=dim, depth=depth,
                           heads=heads, mlp_ratio=mlp_ratio)
        self.num_classes = num_classes
        self.token_embed = nn.Embedding(vocab_size + 1, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)    # learned (MaskGIT's BERT)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x_t, t, y=None):
        c = self.time_embed(timestep_embedding(t, self.token_embed.embedding_dim))           # (N, dim)
        if self.class_embed is not None:
            y = torch.full_like(x_t[:, 0], self.num_classes) if y is None else y
            c = c + self.class_embed(y)
        z = self.token_embed(x_t) + self.pos_embed                                            # (N, L, dim)
        for block in self.blocks:
            z = block(z, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.out(modulate(self.norm(z), shift, scale))                                 # (N, L, K)


# ----------------------------------------------------------------------------
# Demo: an exact denoiser on a small joint distribution over 3 tokens of 3 values

if __name__ == '__main__':
    torch.manual_seed(0)
    K, L = 3, 3
    p_data = torch.rand(K ** L, dtype=torch.float64) ** 3
    p_data /= p_data.sum()
    nll = -(p_data * p_data.log()).sum().item()
    print(f'data: {K ** L} sequences of {L} tokens; exact NLL (entropy) {bits_per_token(nll, L):.4f} bits/token')
    for kind in ('absorbing', 'uniform'):
        process = DiscreteProcess(kind, K, 'linear')
        # Forward marginals: the product of T one-step matrices equals the closed form Qbar (D3PM Eq. 2)
        T, ts = 10, time_grid(10).flip(0)
        product = torch.linalg.multi_dot([process.transition_matrix(process.alpha(ts[i]), process.alpha(ts[i + 1]))
                                          for i in range(4)])
        print(f'{kind}: |Q_1 Q_2 Q_3 Q_4 - Qbar(t=0.4)| = '
              f'{(product - process.marginal_matrix(process.alpha(ts[4]))).abs().max():.1e}')
        denoiser = exact_denoiser(p_data, process, L)
        bounds = [bits_per_token(exact_elbo(p_data, process, L, T, denoiser), L) for T in (1, 4, 16)]
        print(f'  ELBO with T = 1, 4, 16 steps: ' + ', '.join(f'{b:.4f}' for b in bounds) + ' bits/token (>= NLL)')
        for steps in (3, 48):     # several tokens revealed in one step are drawn independently: exact only as steps grow
            x = sample_ancestral(denoiser, process, (4000, L), steps, generator=torch.Generator().manual_seed(0))
            print(f'  ancestral sampling, {steps} steps: TV(samples, data) = '
                  f'{total_variation(empirical_distribution(x, K), p_data):.3f} (4000 samples; sampling noise alone '
                  f'about {math.sqrt(K ** L / (2 * math.pi * 4000)):.3f})')
    process = DiscreteProcess('absorbing', K, 'cosine')
    denoiser = exact_denoiser(p_data, process, L)
    for order in ('random', 'confidence'):
        x = sample_maskgit(denoiser, process, (4000, L), L, order=order, generator=torch.Generator().manual_seed(1))
        print(f'MaskGIT, {L} iterations, order {order}: TV = {total_variation(empirical_distribution(x, K), p_data):.3f}')
