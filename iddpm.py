"""
Learned reverse-process variances: Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
Probabilistic Models", arXiv:2102.09672).

DDPM fixes the variance of p(x_{t-1} | x_t) to beta_t or to the posterior variance beta~_t (Ho et al. 2020,
Sec. 3.2). Improved DDPM lets the network choose, per step and per dimension, a point between the two in log space:

    Sigma_theta(x_t, t) = exp(v log beta_t + (1 - v) log beta~_t)                       (Eq. 15)

where v is the network's second output (a U-Net or DiT with 2C output channels; v = (out + 1) / 2 as in their code,
improved_diffusion/gaussian_diffusion.py p_mean_variance, so a zero output is the geometric middle). L_simple cannot
train v (it does not depend on it), so the variance is trained through the variational bound:

    L_hybrid = L_simple + lambda L_vlb,   lambda = 0.001                                 (Eq. 16, Sec. 3.1)
    L_vlb = L_0 + L_1 + ... + L_{T-1} + L_T,  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (Eq. 4-6)

with a stop-gradient on the mean inside L_vlb (Sec. 3.1: "L_simple is the main source of influence over the mean").
One uniform t estimates L_vlb by T L_t (their code: vb * num_timesteps / 1000 for lambda). Trained on L_vlb alone, the
gradient is very noisy; importance sampling of t (Eq. 18) draws t with p_t proportional to sqrt(E[L_t^2]) from
the last 10 values of each L_t (uniform until every t has 10) and weights L_t / p_t:

    L_vlb = E_{t ~ p_t}[L_t / p_t]                                                        (Eq. 18, Sec. 3.3)

diffusion.ImportanceSampler keeps that history; here it is fed the L_vlb terms, not the MSE.

Sampling (Sec. 4): with a subsequence S of the T steps, alpha_bar_{S_t} is kept and the betas are respaced,
beta_{S_t} = 1 - alpha_bar_{S_t} / alpha_bar_{S_{t-1}}, beta~_{S_t} = (1 - alpha_bar_{S_{t-1}}) / (1 - alpha_bar_{S_t})
beta_{S_t}, and Eq. 15 is applied with the respaced pair and the network's v. All of this is written in the sigma
frame of diffusion.py (x = x_t / sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar), where both variances of a step
from sigma to sigma_prev are divided by alpha_bar_prev; log-interpolation commutes with that common factor.

    diff = LearnedVarianceDiffusion(DiscreteVP.cosine(1000), objective='hybrid')
    loss, sigma = diff.loss(net, x0)            # net outputs 2C channels (UNet out_channels / DiT learn_sigma)
    x = sample_ddpm_learned(diff.denoiser(net), x, sigmas, variance_fraction=lambda x, s, **c: diff.variance_fraction(net, x, s, **c))
"""
import math

import torch
from tqdm import tqdm

from diffusion import (Diffusion, DiscreteVP, _as_sigma, append_dims, discretized_gaussian_log_likelihood,
                       normal_kl, prior_kl)

OBJECTIVES = ('hybrid', 'vlb')      # L_simple + lambda L_vlb (Eq. 16), or L_vlb alone (with importance sampling)
LAMBDA = 1e-3                       # lambda of L_hybrid (Sec. 3.1)


# ----------------------------------------------------------------------------------------------------
# The two fixed variances of one step, and Eq. 15 between them, in the sigma frame.

def step_variances(sigma, sigma_prev):
    """(beta~, beta) of the step sigma -> sigma_prev, both divided by alpha_bar_prev (the sigma frame):
    beta_t = 1 - abar_t / abar_prev with abar = 1 / (1 + sigma^2), so beta / abar_prev =
    (sigma^2 - sigma_prev^2)(1 + sigma_prev^2) / (1 + sigma^2); beta~ / abar_prev = sigma_prev^2 (1 - r), r = sigma_prev^2 / sigma^2
    (Ho et al. 2020, Eq. 7). On DDPM's own table these are the paper's beta_t and beta~_t; on a subsequence they are
    the respaced ones of Sec. 4."""
    r = sigma_prev ** 2 / sigma ** 2
    beta_tilde = sigma_prev ** 2 * (1 - r)
    beta = (sigma ** 2 - sigma_prev ** 2) * (1 + sigma_prev ** 2) / (1 + sigma ** 2)
    return beta_tilde, beta


def learned_log_variance(frac, log_min, log_max):
    """Eq. 15: log Sigma = v log beta + (1 - v) log beta~, v = frac in [0, 1] (per dimension)."""
    return frac * log_max + (1 - frac) * log_min


def variance_bounds(sigmas, index):
    """(log beta~, log beta) of the training step `index` (N,) on the model's table (sigma frame). Step 0 (DDPM's
    t = 1) has beta~_1 = 0; like iDDPM's posterior_log_variance_clipped it takes beta~ of step 2 instead, which
    is the decoder variance diffusion.vlb_terms uses: beta_1 (1 - sigma_1^2 / sigma_2^2)."""
    sigma, sigma_prev = sigmas[index], sigmas[(index - 1).clamp(min=0)]
    beta_tilde, beta = step_variances(sigma, torch.where(index > 0, sigma_prev, torch.zeros_like(sigma)))
    beta_1 = sigmas[0] ** 2 / (1 + sigmas[0] ** 2)                      # beta_1 / abar_0, abar_0 = 1
    beta_tilde = torch.where(index > 0, beta_tilde, beta_1 * (1 - sigmas[0] ** 2 / sigmas[1] ** 2))
    return beta_tilde.log(), beta.log()


# ----------------------------------------------------------------------------------------------------
# The bound with the learned variance (Eq. 4-6 with Sigma of Eq. 15).

def learned_vlb_terms(x0, x, x0_hat, frac, sigmas, index, discrete=True):
    """One term of L_vlb per sample in nats summed over dimensions (N,): index 0 -> L_0 = -log p(x0 | x_1) with the
    discretised Gaussian of Ho et al. 2020 Eq. 13 and std exp(log Sigma / 2); index >= 1 -> KL(q(x_{i-1}|x_i, x0) ||
    N(x0_hat + r (x - x0_hat), Sigma)). x is the noisy input in the sigma frame (x0 + sigma_i noise); x0_hat the mean's
    estimate (detached by the caller for L_hybrid); frac the network's v in [0, 1], shaped like x."""
    sigma, sigma_prev = sigmas[index], sigmas[(index - 1).clamp(min=0)]
    s, sp = append_dims(sigma, x0.ndim), append_dims(sigma_prev, x0.ndim)
    log_min, log_max = (append_dims(v, x0.ndim) for v in variance_bounds(sigmas, index))
    log_var = learned_log_variance(frac, log_min, log_max)
    r = sp ** 2 / s ** 2
    # step 0 has no KL (its posterior variance is 0): give it 1 before the log so the unused branch stays finite
    has_kl = append_dims(index > 0, x0.ndim)
    var_q = torch.where(has_kl, sp ** 2 * (1 - r), 1.0)
    var_p = torch.where(has_kl, log_var.exp(), 1.0)
    kl = normal_kl(x0 + r * (x - x0), var_q, x0_hat + r * (x - x0_hat), var_p).flatten(1).sum(1)
    std = (0.5 * log_var).exp()
    if discrete:
        nll = -discretized_gaussian_log_likelihood(x0, x0_hat, std).flatten(1).sum(1)
    else:
        nll = (0.5 * ((x0 - x0_hat) / std) ** 2 + 0.5 * math.log(2 * math.pi) + 0.5 * log_var).flatten(1).sum(1)
    return torch.where(index == 0, nll, kl)


# ----------------------------------------------------------------------------------------------------
# The trainable model: eps prediction plus v, trained on L_hybrid or L_vlb.

class LearnedVarianceDiffusion(Diffusion):
    """A discrete VP Diffusion (eps prediction) whose network outputs 2C channels: eps_hat and v (Eq. 15).

    objective: 'hybrid' (L_simple + LAMBDA L_vlb, stop-gradient on the mean in L_vlb) or 'vlb' (L_vlb alone, through
    the mean too). t_sampler 'importance' applies Eq. 18 to L_vlb; iDDPM uses it for L_vlb only (Sec. 3.3), so with
    'hybrid' it is refused. Every sampler that takes a denoiser sees the mean (denoiser(net)); sample_ddpm_learned
    also uses the variance."""

    def __init__(self, schedule='cosine', objective='hybrid', t_sampler='uniform', lam=LAMBDA):
        super().__init__(schedule, 'eps', t_sampler)
        if not isinstance(self.schedule, DiscreteVP):
            raise ValueError('learned variances interpolate between the betas of a discrete schedule (linear or cosine)')
        if objective not in OBJECTIVES:
            raise ValueError(f'unknown objective {objective!r}; choose one of {OBJECTIVES}')
        if objective == 'hybrid' and t_sampler == 'importance':
            raise ValueError("importance sampling of t is for L_vlb alone (Nichol & Dhariwal 2021, Sec. 3.3); "
                             "L_hybrid trains with uniform or low_discrepancy t")
        self.objective, self.lam = objective, lam                  # which loss; lambda of L_hybrid
        self._cache = None                                         # (x, sigma, frac) of the last denoiser call

    def network_outputs(self, net, x, sigma, **cond):
        """(x0_hat, frac) from one call: D = c_skip x + c_out F (eps prediction) and frac = (v + 1) / 2."""
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.preconditioning(sigma))
        out = net(c_in * x, self.schedule.noise_level(sigma), **cond)
        if out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f'a learned-variance network outputs 2C = {2 * x.shape[1]} channels, got {out.shape[1]}')
        F, v = out.to(x.dtype).chunk(2, dim=1)
        return c_skip * x + c_out * F, (v + 1) / 2

    def denoise_with(self, net, x, sigma, **cond):
        """The mean half as a denoiser, for every sampler; remembers v of this call for variance_fraction."""
        x0_hat, frac = self.network_outputs(net, x, sigma, **cond)
        self._cache = (x, sigma, frac)
        return x0_hat

    def variance_fraction(self, net, x, sigma, **cond):
        """v in [0, 1] (shaped like x) at (x, sigma): from the denoiser call just made on the same x, else a new call."""
        if self._cache is not None and self._cache[0] is x and torch.equal(_as_sigma(self._cache[1], x), _as_sigma(sigma, x)):
            return self._cache[2]
        return self.network_outputs(net, x, sigma, **cond)[1]

    def step_index(self, sigma):
        """The table index of each training sigma (they are table entries, so noise_level is an integer)."""
        return self.schedule.noise_level(sigma).round().long().clamp(0, self.schedule.T - 1)

    def loss(self, net, x0, sigma=None, noise=None, generator=None, **cond):
        """Per-sample loss (N,) and sigmas: L_simple + lambda T L_t (hybrid) or T L_t (vlb), L_t in bits/dim.

        T L_t is the one-sample estimate of L_vlb - L_T (L_T has no parameters); with importance sampling it is
        weighted by 1 / (T p_t) (Eq. 18) and the history gets the unweighted T L_t."""
        weight = torch.ones(x0.shape[0], device=x0.device)
        if sigma is None:
            sigma, weight, _ = self.sample_sigma(x0.shape[0], generator, x0.device)
        sigma = _as_sigma(sigma, x0)
        index = self.step_index(sigma)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = x0 + append_dims(sigma, x0.ndim) * noise                      # the sigma frame
        c_skip, c_out, c_in = (append_dims(c, x0.ndim) for c in self.preconditioning(sigma))
        out = net(c_in * x, self.schedule.noise_level(sigma), **cond).float()
        F, v = out.chunk(2, dim=1)
        L_simple = (F - noise).pow(2).flatten(1).mean(1)                   # Ho et al. 2020, Eq. 14
        # Stop-gradient on the mean for L_hybrid (Sec. 3.1): L_vlb then trains only v.
        F_mean = F.detach() if self.objective == 'hybrid' else F
        x0_hat = c_skip * x + c_out * F_mean
        sigmas = self.schedule.sigmas.to(x0.device, torch.float32)
        L_t = learned_vlb_terms(x0, x, x0_hat, (v + 1) / 2, sigmas, index) / (x0[0].numel() * math.log(2))
        L_vlb = self.schedule.T * L_t                                      # bits/dim; E_t[T L_t] = L_vlb - L_T
        if self.objective == 'hybrid':
            return L_simple + self.lam * L_vlb, sigma
        if self.importance is not None:
            self.importance.update(index, L_vlb)                          # Eq. 18's history: the L_vlb terms
        return L_vlb * weight, sigma


@torch.no_grad()
def bits_per_dim(diffusion, net, x0, generator=None, **cond):
    """The full bound L_T + L_{T-1} + ... + L_0 with the learned variance (T network calls per image), in bits/dim
    (N,): the number iDDPM reports as NLL (their Table 1), here without clipping x0_hat, like diffusion.bits_per_dim."""
    sigmas = diffusion.schedule.sigmas.to(x0.device, x0.dtype)
    total = prior_kl(x0, diffusion.schedule)
    for i in range(diffusion.schedule.T):
        index = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
        x = x0 + sigmas[i] * torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x0_hat, frac = diffusion.network_outputs(net, x, sigmas[index], **cond)
        total = total + learned_vlb_terms(x0, x, x0_hat, frac, sigmas, index)
    return total / (x0[0].numel() * math.log(2))


# ----------------------------------------------------------------------------------------------------
# Sampling with the learned variance: DDPM's ancestral step on any subsequence, Eq. 15 on the respaced betas.

@torch.no_grad()
def sample_ddpm_learned(denoiser, x, sigmas, *, variance_fraction, generator=None, cond=None, callback=None,
                        progress=False):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with the learned variance of Eq. 15 on the respaced betas
    of the step actually taken (Sec. 4): on the model's T sigmas it is iDDPM's p_sample loop, on a subsequence their
    strided sampler. x_prev = x0_hat + r (x - x0_hat) + sqrt(Sigma) z in the sigma frame; the last step (to
    sigma = 0) returns x0_hat (no noise at t = 0). variance_fraction(x, sigma, **cond) -> v shaped like x."""
    cond = {} if cond is None else cond
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc='sampling', leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_vec = x.new_full((x.shape[0],), float(sigma))
        x0_hat = denoiser(x, sigma_vec, **cond)
        if callback is not None:
            callback({'i': i, 'sigma': sigma, 'sigma_next': sigma_next, 'x': x, 'denoised': x0_hat})
        if sigma_next == 0:
            x = x0_hat
            continue
        frac = variance_fraction(x, sigma_vec, **cond)
        beta_tilde, beta = step_variances(sigma.double(), sigma_next.double())
        log_var = learned_log_variance(frac, beta_tilde.log().item(), beta.log().item())
        r = float(sigma_next ** 2 / sigma ** 2)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x0_hat + r * (x - x0_hat) + (0.5 * log_var).exp() * z
    return x


def learned_sampler(diffusion, net, sampler, options):
    """sample.py's hook: for a learned-variance model, `--sampler ddpm` without a fixed `variance=` option samples with
    the learned variance (iDDPM's p_sample); returns a function with sample.run_sampler's signature, or None."""
    if not isinstance(diffusion, LearnedVarianceDiffusion) or sampler != 'ddpm' or 'variance' in options:
        return None

    def run(name, denoiser, x, sigmas, options, cond, generator=None, progress=False, callback=None):
        fraction = lambda x_, s, **c: diffusion.variance_fraction(net, x_, s, **c)
        return sample_ddpm_learned(denoiser, x, sigmas, variance_fraction=fraction, generator=generator, cond=cond,
                                   callback=callback, progress=progress)
    return run


if __name__ == '__main__':
    # Demo: with a Gaussian mixture's exact mean, the variance that minimises each L_t lies between beta~_t and
    # beta_t (Eq. 15's range): the optimal v per step, from E||x_prev - mu||^2 / d (the KL-optimal isotropic variance).
    from diffusion import GaussianMixture
    gm = GaussianMixture.random(K=3, D=2, scale=0.5, seed=2)
    schedule = DiscreteVP.cosine(20)
    sigmas = schedule.sigmas
    print(' t | beta~ (sigma frame) | beta (sigma frame) | optimal variance | its v in [0, 1]')
    for t in (1, 3, 6, 10, 15, 19):
        x0, _ = gm.sample(20000, generator=torch.Generator().manual_seed(t))
        x = x0 + sigmas[t] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + t), dtype=x0.dtype)
        x0_hat = gm.denoise(x, sigmas[t])
        r = sigmas[t - 1] ** 2 / sigmas[t] ** 2
        beta_tilde, beta = step_variances(sigmas[t], sigmas[t - 1])
        optimum = beta_tilde + (1 - r) ** 2 * ((x0 - x0_hat) ** 2).mean()   # Var(x_prev | x_t) averaged over dimensions
        v = (optimum.log() - beta_tilde.log()) / (beta.log() - beta_tilde.log())
        print(f'{t:>2} | {beta_tilde:19.3e} | {beta:18.3e} | {optimum:16.3e} | {v:.3f}')
