"""
The forward process of every diffusion model in one frame: the noise level sigma.

Every process this codebase trains is written (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364, Eq. 4 and Table 1) as

    x_t = s(t) * (x0 + sigma(t) * noise),      noise ~ N(0, I)

and everything downstream (samplers, guidance, inverse solvers) works in the scaled frame x = x_t / s,
where x = x0 + sigma * noise, on a *denoiser* D(x, sigma) ~ E[x0 | x]. The processes:

  VP / DDPM (Ho et al. 2020, arXiv:2006.11239):  x_t = sqrt(abar) x0 + sqrt(1 - abar) noise
      so s = sqrt(abar) and sigma = sqrt((1 - abar) / abar)                       (abar = alpha_bar)
  EDM / VE (Karras et al. 2022):                  s = 1, sigma from a log-normal during training
  Rectified flow (Liu et al. 2022, arXiv:2209.03003): x_t = (1 - t) x0 + t noise,
      so s = 1 - t and sigma = t / (1 - t)

A raw network F is turned into a denoiser by the preconditioning of Karras et al. 2022, Eq. 7:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

and every parameterisation is one row of (c_skip, c_out, c_in) (Table 1 and its extensions):
    eps  (Ho et al. 2020):              c_skip = 1,            c_out = -sigma,            c_in = 1/sqrt(1+sigma^2)
    x0   (predict the data):            c_skip = 0,            c_out = 1,                 c_in = 1/sqrt(1+sigma^2)
    v    (Salimans & Ho 2022, 2202.00512): c_skip = 1/(1+sigma^2), c_out = -sigma/sqrt(1+sigma^2), c_in = 1/sqrt(1+sigma^2)
    edm  (Karras et al. 2022):          c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2)
    flow (velocity v = noise - x0):     c_skip = 1/(1+sigma),  c_out = -sigma/(1+sigma),  c_in = 1/(1+sigma)
The training loss of each paper is the plain MSE of F against its target (x0 - c_skip x) / c_out, which is
the x0-space loss weighted by lambda(sigma) = 1 / c_out^2 (Karras et al. 2022, Eq. 8).

The schedule (which sigmas are trained on, and c_noise, the number the network sees) is a separate choice:
DDPM linear and cosine (discrete T steps), continuous VP (Song et al. 2021), EDM log-normal, and the
logit-normal flow schedule (Esser et al. 2024). Also here: the variational bound of the discrete process
(Ho et al. 2020 Eq. 5) in bits per dimension, the noise-level samplers (uniform, low-discrepancy,
importance, log-normal, logit-normal) and `GaussianMixture`, data whose exact denoiser is known in closed form.

Conventions: x0 is (N, ...) in [-1, 1]; sigma is (N,). Usage:
    diff = Diffusion(schedule=DiscreteVP.linear(1000), prediction='eps')
    loss = diff.loss(net, x0).mean();  denoiser = diff.denoiser(net)   # D(x, sigma, **cond)
"""
import math

import numpy as np
import torch


def append_dims(v, ndim):
    """Reshape a (N,) tensor to (N, 1, ..., 1) so it broadcasts against a tensor with `ndim` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _as_sigma(sigma, x):
    """Accept a float or a (N,) tensor; return a (N,) tensor on x's device."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f'sigma must be a scalar or have shape ({x.shape[0]},) to match x, got {tuple(sigma.shape)}')
    return sigma


# ----------------------------------------------------------------------------------------------------
# Noise schedules. Each maps a time t in [0, 1] to sigma (increasing), says which number the network is
# given as its noise level (c_noise), and how sigma is drawn during training.

def linear_alpha_bar(T=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM linear betas (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T=1000). For other T the end points are
    scaled by 1000/T so the process reaches the same noise level (Nichol & Dhariwal 2021, arXiv:2102.09672)."""
    scale = 1000 / T
    if beta_end * scale >= 1:       # beta_T = 1 makes alpha_bar_T = 0, i.e. sigma_max = inf
        raise ValueError(f'T = {T} is too few steps for the scaled linear schedule (beta_T = {beta_end * scale:g} >= 1); '
                         f'use T > {int(1000 * beta_end)} or the cosine schedule')
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)                       # abar_t = prod_{s<=t} (1 - beta_s)


def cosine_alpha_bar(T=1000, s=0.008, max_beta=0.999):
    """Cosine schedule, Nichol & Dhariwal 2021 Eq. 17: abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    with each beta_t = 1 - abar_t/abar_{t-1} clipped to max_beta so the last step is not singular (Sec. 3.2)."""
    f = lambda t: torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    t = torch.arange(T + 1, dtype=torch.float64)
    betas = (1 - f(t[1:]) / f(t[:-1])).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


class DiscreteVP:
    """A VP process with T discrete steps, given by its alpha_bar table (DDPM linear or cosine).

    Index i = 0..T-1 is DDPM's timestep t = i + 1; the network sees c_noise = i, as in DDPM's code.
    """

    def __init__(self, alpha_bar):
        self.alpha_bar = alpha_bar.double()                               # (T,) decreasing
        self.sigmas = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()      # (T,) increasing, sigma frame
        self.T = len(alpha_bar)
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()

    @classmethod
    def linear(cls, T=1000):
        return cls(linear_alpha_bar(T))

    @classmethod
    def cosine(cls, T=1000):
        return cls(cosine_alpha_bar(T))

    def sigma(self, u):
        """u in [0, 1) -> the sigma of the discrete step floor(u T): uniform u gives uniform t."""
        index = (u.double() * self.T).long().clamp(0, self.T - 1)
        return self.sigmas.to(u.device)[index].to(u.dtype)

    def noise_level(self, sigma):
        """c_noise = the (fractional) step index whose sigma this is; interpolated in log sigma so sigmas
        between steps (as some samplers use) get a sensible value (as k-diffusion's DiscreteSchedule does)."""
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.double().clamp(self.sigma_min, self.sigma_max).log()
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.T - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).to(sigma.dtype)


class ContinuousVP:
    """Continuous-time VP SDE of Song et al. 2021 (arXiv:2011.13456, Eq. 11) with linear beta(t):
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [eps_t, 1] (Karras et al. 2022, Table 1).
    The network sees c_noise = (M - 1) t with M = 1000, as in Table 1."""

    def __init__(self, beta_min=0.1, beta_d=19.9, eps_t=1e-5):
        self.beta_min, self.beta_d, self.eps_t = beta_min, beta_d, eps_t  # Song et al.: beta in [0.1, 20]
        self.sigma_min = self.sigma_of_t(torch.tensor(eps_t, dtype=torch.float64)).item()
        self.sigma_max = self.sigma_of_t(torch.tensor(1.0, dtype=torch.float64)).item()

    def sigma_of_t(self, t):
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()

    def t_of_sigma(self, sigma):
        # the positive root of beta_d/2 t^2 + beta_min t = log(1 + sigma^2) (Table 1, sigma^-1)
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def sigma(self, u):
        return self.sigma_of_t(self.eps_t + (1 - self.eps_t) * u)     # t uniform on [eps_t, 1]

    def noise_level(self, sigma):
        return 999 * self.t_of_sigma(sigma)


class EDMSchedule:
    """EDM training noise levels (Karras et al. 2022, Table 1): ln(sigma) ~ N(P_mean, P_std^2), sampled over
    [sigma_min, sigma_max]; the network sees c_noise = ln(sigma) / 4."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0):
        self.P_mean, self.P_std = P_mean, P_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, u):
        # inverse CDF of the log-normal, so low-discrepancy u gives low-discrepancy sigmas too
        z = math.sqrt(2) * torch.erfinv(2 * u.double().clamp(1e-7, 1 - 1e-7) - 1)
        return (self.P_mean + self.P_std * z).exp().to(u.dtype)

    def noise_level(self, sigma):
        return sigma.log() / 4


class FlowSchedule:
    """Rectified flow (Liu et al. 2022): t in (0, 1), sigma = t / (1 - t). Training t is logit-normal,
    t = sigmoid(m + s z) (Esser et al. 2024, arXiv:2403.03206, Eq. 19; m=0, s=1 in their best runs), or uniform
    with logit_std=None. The network sees c_noise = 1000 t. t_max < 1 keeps sigma finite (t=1 is sigma=inf)."""

    def __init__(self, logit_mean=0.0, logit_std=1.0, t_min=1e-3, t_max=1 - 1e-3):
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.t_min, self.t_max = t_min, t_max
        self.sigma_min, self.sigma_max = t_min / (1 - t_min), t_max / (1 - t_max)

    def sigma(self, u):
        u = u.double()
        if self.logit_std is None:
            t = u
        else:
            z = math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-7, 1 - 1e-7) - 1)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        t = t.clamp(self.t_min, self.t_max)
        return (t / (1 - t)).float().to(u.device)

    def noise_level(self, sigma):
        return 1000 * sigma / (1 + sigma)                               # t = sigma / (1 + sigma)


# Training processes (not to be confused with samplers.SIGMA_SCHEDULES, the noise levels a sampler visits).
NOISE_SCHEDULES = {
    'linear': DiscreteVP.linear,
    'cosine': DiscreteVP.cosine,
    'vp': ContinuousVP,
    'edm': EDMSchedule,
    'flow': FlowSchedule,
}


# ----------------------------------------------------------------------------------------------------
# Noise-level sampling for training. A sampler draws u in [0, 1); the schedule maps u to sigma through its
# inverse CDF, so any u-sampler works with any schedule.

def uniform_u(n, generator=None, device='cpu'):
    """Independent uniform u: plain Monte Carlo over noise levels (Ho et al. 2020, Alg. 1)."""
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def low_discrepancy_u(n, generator=None, device='cpu'):
    """Low-discrepancy u (Kingma et al. 2021, VDM, arXiv:2107.00630, Appendix I.1): one shared uniform offset
    u0 and u_i = (u0 + i/n) mod 1. Each u_i is still uniform, so the loss estimate stays unbiased, but the batch
    covers [0, 1) evenly and the variance of the batch-mean loss drops."""
    u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    return (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1


class ImportanceSampler:
    """Importance sampling of discrete steps from the loss history (Nichol & Dhariwal 2021, Sec. 3.3 and Eq. 18):
    p_t proportional to sqrt(E[L_t^2]), estimated from the last `history` losses of each t, and the loss
    reweighted by 1 / (T p_t) so its expectation is unchanged. Uniform until every t has `history` losses.
    Diffusion.loss draws from it, reweights and updates it; train.py saves it through state_dict()."""

    def __init__(self, T, history=10, uniform_mix=1e-3):
        self.T = T                                       # number of discrete steps
        self.history = history                           # losses kept per step (10 in the paper)
        self.uniform_mix = uniform_mix                   # share of uniform probability, so every step stays reachable
        self.losses = np.zeros((T, history))             # ring buffer of recent losses per step
        self.counts = np.zeros(T, dtype=np.int64)        # losses seen per step (the ring buffer's write position)

    def probs(self):
        if (self.counts < self.history).any():
            return np.full(self.T, 1.0 / self.T)
        w = np.sqrt((self.losses ** 2).mean(axis=1))
        p = w / w.sum()
        return p * (1 - self.uniform_mix) + self.uniform_mix / self.T   # keep every step reachable

    def sample(self, n, generator=None):
        """Return step indices (n,) and importance weights 1 / (T p_t) (n,)."""
        p = torch.from_numpy(self.probs())
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, 1.0 / (self.T * p[t])

    def update(self, t, losses):
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            self.losses[ti, self.counts[ti] % self.history] = li
            self.counts[ti] += 1

    def state_dict(self):
        """The loss history as tensors (checkpoints are loaded with weights_only=True)."""
        return {'losses': torch.from_numpy(self.losses.copy()), 'counts': torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state):
        losses, counts = state['losses'].numpy(), state['counts'].numpy()
        if losses.shape != self.losses.shape or counts.shape != self.counts.shape:
            raise ValueError(f'importance history of shape {tuple(losses.shape)} does not fit T={self.T}, '
                             f'history={self.history}; resume with the same schedule')
        self.losses, self.counts = losses.astype(np.float64).copy(), counts.astype(np.int64).copy()


# ----------------------------------------------------------------------------------------------------
# Parameterisations: the preconditioning that turns a raw network into a denoiser (Karras et al. 2022).

PREDICTIONS = ('eps', 'x0', 'v', 'edm', 'flow')


def preconditioning(sigma, prediction, sigma_data=0.5):
    """(c_skip, c_out, c_in) of D(x) = c_skip x + c_out F(c_in x), Karras et al. 2022 Table 1 (see module doc)."""
    if prediction == 'eps':
        return torch.ones_like(sigma), -sigma, (1 + sigma ** 2).rsqrt()
    if prediction == 'x0':
        return torch.zeros_like(sigma), torch.ones_like(sigma), (1 + sigma ** 2).rsqrt()
    if prediction == 'v':
        # x0 = alpha x_t - sigma_vp v with alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma/sqrt(1+sigma^2) (Salimans & Ho, Sec. 4)
        return 1 / (1 + sigma ** 2), -sigma * (1 + sigma ** 2).rsqrt(), (1 + sigma ** 2).rsqrt()
    if prediction == 'edm':
        total = sigma ** 2 + sigma_data ** 2      # variance of x = x0 + sigma n when Var(x0) = sigma_data^2
        return sigma_data ** 2 / total, sigma * sigma_data * total.rsqrt(), total.rsqrt()
    if prediction == 'flow':
        # x_t = (1 - t) x0 + t n with t = sigma/(1+sigma); x0 = x_t - t v
        return 1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma)
    raise ValueError(f'unknown prediction {prediction!r}; choose one of {PREDICTIONS}')


def training_target(x0, noise, sigma, prediction, sigma_data=0.5):
    """What F should output: (x0 - c_skip x) / c_out, written in closed form where it avoids cancellation."""
    s = append_dims(sigma, x0.ndim)
    if prediction == 'eps':
        return noise                                               # Ho et al. 2020, Eq. 14
    if prediction == 'x0':
        return x0
    if prediction == 'v':
        return (noise - s * x0) / (1 + s ** 2).sqrt()             # v = alpha noise - sigma_vp x0
    if prediction == 'flow':
        return noise - x0                                          # dx_t/dt of x_t = (1-t) x0 + t noise
    c_skip, c_out, _ = (append_dims(c, x0.ndim) for c in preconditioning(sigma, prediction, sigma_data))
    return (x0 - c_skip * (x0 + s * noise)) / c_out              # Karras et al. 2022, Eq. 8


class Diffusion:
    """One trainable diffusion model: a parameterisation, a schedule, and the noise-level sampler.

    prediction: 'eps' | 'x0' | 'v' | 'edm' | 'flow'; schedule: a schedule object or a name in NOISE_SCHEDULES;
    t_sampler: 'uniform' | 'low_discrepancy' | 'importance' (importance needs a DiscreteVP schedule).
    """

    def __init__(self, schedule='linear', prediction='eps', t_sampler='uniform', sigma_data=0.5):
        if isinstance(schedule, str) and schedule not in NOISE_SCHEDULES:
            raise ValueError(f'unknown schedule {schedule!r}; choose one of {sorted(NOISE_SCHEDULES)}')
        self.schedule = NOISE_SCHEDULES[schedule]() if isinstance(schedule, str) else schedule
        if prediction not in PREDICTIONS:
            raise ValueError(f'unknown prediction {prediction!r}; choose one of {PREDICTIONS}')
        if t_sampler not in ('uniform', 'low_discrepancy', 'importance'):
            raise ValueError(f"unknown t_sampler {t_sampler!r}; choose 'uniform', 'low_discrepancy' or 'importance'")
        if t_sampler == 'importance' and not isinstance(self.schedule, DiscreteVP):
            raise ValueError("t_sampler='importance' needs a discrete schedule ('linear' or 'cosine')")
        self.prediction, self.t_sampler, self.sigma_data = prediction, t_sampler, sigma_data  # sigma_data: std of the data (EDM)
        self.importance = ImportanceSampler(self.schedule.T) if t_sampler == 'importance' else None

    @property
    def sigma_min(self):
        return self.schedule.sigma_min

    @property
    def sigma_max(self):
        return self.schedule.sigma_max

    def scale(self, sigma):
        """s(sigma) of x_t = s (x0 + sigma noise): what the network's input c_in x would be without normalisation."""
        return self.preconditioning(sigma)[2] if self.prediction != 'edm' else torch.ones_like(sigma)

    def preconditioning(self, sigma):
        return preconditioning(sigma, self.prediction, self.sigma_data)

    def q_sample(self, x0, sigma, noise):
        """x_t = s (x0 + sigma noise): for eps/v/x0 this is DDPM's sqrt(abar) x0 + sqrt(1 - abar) noise (Ho et al.
        2020, Eq. 4), for flow (1 - t) x0 + t noise; the network sees it (EDM instead normalises by c_in)."""
        sigma = _as_sigma(sigma, x0)
        return append_dims(self.scale(sigma), x0.ndim) * (x0 + append_dims(sigma, x0.ndim) * noise)

    def denoise_with(self, net, x, sigma, **cond):
        """One evaluation D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Eq. 7) of the raw
        network `net`; x is in the sigma frame. denoiser(net) wraps this as the callable samplers take."""
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.preconditioning(sigma))
        F = net(c_in * x, self.schedule.noise_level(sigma), **cond)
        return c_skip * x + c_out * F.to(x.dtype)

    def denoiser(self, net):
        """The network as a denoiser D(x, sigma, **cond), the interface of samplers, guidance and inverse solvers."""
        return lambda x, sigma, **cond: self.denoise_with(net, x, sigma, **cond)

    def sample_sigma(self, n, generator=None, device='cpu'):
        """Training noise levels (n,) and per-sample loss weights (importance weights; ones otherwise)."""
        if self.importance is not None:
            t, w = self.importance.sample(n, generator)
            return self.schedule.sigmas[t].float().to(device), w.float().to(device), t
        u = (low_discrepancy_u if self.t_sampler == 'low_discrepancy' else uniform_u)(n, generator)
        return self.schedule.sigma(u).float().to(device), torch.ones(n, device=device), None

    def loss(self, net, x0, sigma=None, noise=None, generator=None, **cond):
        """Per-sample training loss (N,) and the sigmas used (N,): mean over dims of (F - target)^2, each paper's own
        loss, which is ||D - x0||^2 weighted by 1/c_out^2 (Karras et al. 2022, Eq. 8). Returns (loss, sigma).

        sigma=None draws the noise levels from the t_sampler; with t_sampler='importance' this is the one place
        importance sampling happens: the steps are drawn from the history, the history is updated with the raw
        losses, and the returned loss is already reweighted by 1 / (T p_t) (Nichol & Dhariwal 2021, Eq. 18), so
        loss.mean() is an unbiased estimate of the uniform-t loss. Given sigmas are used as they are (weight 1)."""
        weight, t = torch.ones(x0.shape[0], device=x0.device), None
        if sigma is None:
            sigma, weight, t = self.sample_sigma(x0.shape[0], generator, x0.device)
        sigma = _as_sigma(sigma, x0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) if generator is None \
                else torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        _, _, c_in = self.preconditioning(sigma)
        x = x0 + append_dims(sigma, x0.ndim) * noise                  # the sigma frame
        F = net(append_dims(c_in, x0.ndim) * x, self.schedule.noise_level(sigma), **cond)
        target = training_target(x0, noise, sigma, self.prediction, self.sigma_data)
        loss = (F.float() - target.float()).pow(2).flatten(1).mean(1)
        if t is not None:
            self.importance.update(t, loss)                            # history before reweighting
        return loss * weight, sigma

    def state_dict(self):
        """What a resumed run needs: the importance sampler's loss history ({} without one)."""
        return {} if self.importance is None else {'importance': self.importance.state_dict()}

    def load_state_dict(self, state):
        if self.importance is not None and 'importance' in state:
            self.importance.load_state_dict(state['importance'])
        elif self.importance is not None and state:
            raise ValueError('the checkpoint holds no importance-sampling history for this t_sampler=importance run')

    def x0_weight(self, sigma):
        """lambda(sigma) = 1/c_out^2: the weight on ||D - x0||^2 that the loss above implies."""
        return self.preconditioning(sigma)[1] ** -2


# ----------------------------------------------------------------------------------------------------
# The variational bound of the discrete process (Ho et al. 2020, Eq. 5), computed in the sigma frame.
# The KL between Gaussians is invariant to rescaling both, so the scaled frame x = x_t / s gives the same numbers.
# There, DDPM's chain x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) noise, and its posterior is
#   q(x_{i-1} | x_i, x0) = N(x0 + r (x_i - x0), sigma_{i-1}^2 (1 - r)),   r = sigma_{i-1}^2 / sigma_i^2.

def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x0, mean, std, bins=256):
    """log P(x0) for data quantised to `bins` levels in [-1, 1], under N(mean, std^2) integrated over each bin,
    the end bins stretched to infinity (Ho et al. 2020, Eq. 13). The exact normal CDF; DDPM's and iDDPM's code use
    the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) (iDDPM losses.py approx_standard_normal_cdf)."""
    normal = torch.distributions.Normal(mean, std)
    half = 1.0 / (bins - 1)                                        # half a bin width
    cdf_hi = torch.where(x0 > 1 - 1e-3, torch.ones_like(x0), normal.cdf(x0 + half))
    cdf_lo = torch.where(x0 < -1 + 1e-3, torch.zeros_like(x0), normal.cdf(x0 - half))
    return torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))


def vlb_terms(denoiser, x0, schedule, index, noise=None, variance='posterior', discrete=True, **cond):
    """One term of the bound per sample, in nats summed over dimensions (N,):
    index 0 -> L_0 = -log p(x0 | x_1) (decoder), index i >= 1 -> L_i = KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i)).

    p(x_{i-1} | x_i) has the posterior mean with x0 replaced by D(x_i) and variance 'posterior' (beta tilde) or
    'beta' (Ho et al. 2020, Sec. 3.2). With the posterior variance the KL is 1/2 (SNR_{i-1} - SNR_i) ||x0 - D||^2
    (Kingma et al. 2021, Eq. 13). discrete=False uses a Gaussian density for continuous-valued data.

    The decoder p(x0 | x_1) = N(D(x_1), beta~_2) has the posterior variance of the *second* step,
    beta~_2 = beta_2 (1 - abar_1) / (1 - abar_2), for both variance choices, as the reference code does: DDPM's
    diffusion_utils_2.py and iDDPM's improved_diffusion/gaussian_diffusion.py take the decoder's log-variance from
    posterior_log_variance_clipped = log(append(posterior_variance[1], posterior_variance[1:])) ('fixedsmall') or
    log(append(posterior_variance[1], betas[1:])) ('fixedlarge'), since beta~_1 = 0, and pass it to
    discretized_gaussian_log_likelihood (_vb_terms_bpd). (std sqrt(beta_1) instead changes the decoder term on 8-bit
    data at linear T = 1000 by +0.41 bits/dim for an exact x0 estimate, by -0.11 for one off by 0.01.)
    Unlike their calc_bpd_loop (clip_denoised=True) this does not clip D to [-1, 1] first: the bound of the model
    as the samplers use it, unclipped."""
    sigmas = schedule.sigmas.to(x0.device, x0.dtype)
    sigma = sigmas[index]
    if noise is None:
        noise = torch.randn_like(x0)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    x0_hat = denoiser(x, sigma, **cond)
    sigma_prev = sigmas[(index - 1).clamp(min=0)]
    s, sp = append_dims(sigma, x0.ndim), append_dims(sigma_prev, x0.ndim)
    r = sp ** 2 / s ** 2
    var_q = sp ** 2 * (1 - r)
    var_p = var_q if variance == 'posterior' else (s ** 2 - sp ** 2) * (1 + sp ** 2) / (1 + s ** 2)   # beta_i / abar_{i-1}
    # index 0 has no KL term, and its variances are 0 (sigma_prev = sigma): give them 1 before the log, so that the
    # discarded branch of the torch.where below has finite gradients (0 * inf = NaN would poison the whole batch)
    has_kl = append_dims(index > 0, x0.ndim)
    var_q, var_p = torch.where(has_kl, var_q, 1.0), torch.where(has_kl, var_p, 1.0)
    kl = normal_kl(x0 + r * (x - x0), var_q, x0_hat + r * (x - x0_hat), var_p).flatten(1).sum(1)
    # decoder p(x0 | x_1) = N(D(x_1), beta~_2): the mean of DDPM's p at t = 1 is exactly x0_hat (abar_0 = 1); the
    # variance is the posterior variance of step 2 in DDPM's unscaled frame (see the docstring), which in sigmas is
    # beta~_2 = sigma_1^2 (1 - sigma_1^2 / sigma_2^2) / (1 + sigma_1^2) = beta_1 (1 - r_2), r_2 = sigma_1^2 / sigma_2^2
    beta_1 = sigmas[0] ** 2 / (1 + sigmas[0] ** 2)
    decoder_var = beta_1 * (1 - sigmas[0] ** 2 / sigmas[1] ** 2)
    if discrete:
        nll = -discretized_gaussian_log_likelihood(x0, x0_hat, decoder_var.sqrt()).flatten(1).sum(1)
    else:
        nll = (0.5 * (x0 - x0_hat) ** 2 / decoder_var + 0.5 * torch.log(2 * math.pi * decoder_var)).flatten(1).sum(1)
    return torch.where(index == 0, nll, kl)


def prior_kl(x0, schedule):
    """L_T = KL(q(x_T | x0) || N(0, I)) in nats (N,), computed in DDPM's unscaled frame."""
    abar = schedule.alpha_bar[-1].to(x0.device, x0.dtype)
    return normal_kl(abar.sqrt() * x0, 1 - abar, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)


@torch.no_grad()
def bits_per_dim(denoiser, x0, schedule, variance='posterior', discrete=True, generator=None, **cond):
    """The full bound -log p(x0) <= L_T + sum_i L_i, over all T steps (T network calls), in bits per dimension
    (N,). For image data in [-1, 1] quantised to 256 levels this is the number DDPM reports (3.70 on CIFAR-10)."""
    total = prior_kl(x0, schedule)
    for i in range(schedule.T):
        index = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        total = total + vlb_terms(denoiser, x0, schedule, index, noise, variance, discrete, **cond)
    return total / (x0[0].numel() * math.log(2))


# ----------------------------------------------------------------------------------------------------
# A Gaussian mixture: data whose denoiser, score, noisy-class posterior and samples are exact.

class GaussianMixture:
    """p(x0) = sum_k w_k N(x0; mu_k, C_k), each component k labelled with a class.

    Adding noise of level sigma keeps it a mixture: p_sigma(x) = sum_k w_k N(x; mu_k, C_k + sigma^2 I), and
    by Tweedie's formula (Efron 2011) the exact denoiser is a responsibility-weighted sum of linear ones:

        E[x0 | x] = sum_k p(k | x) (mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)).

    means: (K, D); covs: (K, D, D), or (K, D) diagonal, or (K,) isotropic variances; weights: (K,);
    classes: (K,) class of each component (default: component k is class k). Inputs x may be (N, D) or (N, ...)
    with D elements per sample. Internally float64, so tests can demand tight tolerances.
    """

    def __init__(self, means, covs, weights=None, classes=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, D = self.means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 1:
            covs = covs[:, None, None] * torch.eye(D, dtype=torch.float64)
        elif covs.ndim == 2:
            covs = torch.diag_embed(covs)
        self.covs = covs
        self.weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64) / torch.as_tensor(weights, dtype=torch.float64).sum()
        self.classes = torch.arange(K) if classes is None else torch.as_tensor(classes, dtype=torch.long)
        self.num_classes = int(self.classes.max()) + 1
        # C_k = U_k diag(lam_k) U_k^T: every (C_k + sigma^2 I)^-1 is then a cheap diagonal in that basis
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)                     # (K, D), (K, D, D)
        self.eigvals = self.eigvals.clamp(min=0)
        self.K, self.D = K, D

    @classmethod
    def random(cls, K=3, D=2, num_classes=None, scale=2.0, seed=0):
        """A random well-separated test problem with full covariances and unequal weights."""
        g = torch.Generator().manual_seed(seed)
        means = scale * torch.randn(K, D, generator=g, dtype=torch.float64)
        A = torch.randn(K, D, D, generator=g, dtype=torch.float64) * 0.4
        covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(D, dtype=torch.float64)
        weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
        classes = None if num_classes is None else torch.arange(K) % num_classes
        return cls(means, covs, weights, classes)

    def _flat(self, x):
        return x.reshape(x.shape[0], -1).double()

    def _component_mask(self, y, n):
        """(n, K) bool: which components are allowed for each sample (class y; y == num_classes or None: all)."""
        if y is None:
            return torch.ones(n, self.K, dtype=torch.bool)
        y = torch.as_tensor(y).reshape(-1).expand(n).cpu()
        return (self.classes[None, :] == y[:, None]) | (y[:, None] == self.num_classes)

    def sample(self, n, y=None, generator=None):
        """Exact samples (n, D) and their class labels (n,); y (scalar or (n,)) restricts to that class."""
        logits = self.weights.log().expand(n, self.K).masked_fill(~self._component_mask(y, n), -math.inf)
        k = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum('nij,nj->ni', self.eigvecs[k], self.eigvals[k].sqrt() * z)
        return x, self.classes[k]

    def _log_resp_and_means(self, x, sigma):
        """log w_k N(x; mu_k, C_k + sigma^2 I) (N, K) and the per-component posterior means (N, K, D)."""
        xf = self._flat(x)
        sigma = _as_sigma(sigma, xf).double().cpu()
        xf = xf.cpu()
        var = self.eigvals[None] + sigma[:, None, None] ** 2                        # (N, K, D)
        z = torch.einsum('kji,nkj->nki', self.eigvecs, xf[:, None, :] - self.means[None])   # U^T (x - mu)
        log_n = -0.5 * ((z ** 2 / var).sum(-1) + var.log().sum(-1) + self.D * math.log(2 * math.pi))
        post = self.means[None] + torch.einsum('kij,nkj->nki', self.eigvecs, self.eigvals[None] / var * z)
        return self.weights.log()[None] + log_n, post

    def log_prob(self, x, sigma=0.0, y=None):
        """log p_sigma(x) (N,), or log p_sigma(x | y) with a class."""
        log_joint, _ = self._log_resp_and_means(x, sigma)
        mask = self._component_mask(y, x.shape[0])
        log_w = self.weights.log()[None].expand_as(mask).masked_fill(~mask, -math.inf)
        return (log_joint.masked_fill(~mask, -math.inf).logsumexp(1) - log_w.logsumexp(1)).to(x.dtype)

    def denoise(self, x, sigma, y=None):
        """The exact denoiser E[x0 | x, (y)] at noise level sigma, shaped like x."""
        log_joint, post = self._log_resp_and_means(x, sigma)
        resp = log_joint.masked_fill(~self._component_mask(y, x.shape[0]), -math.inf).softmax(1)
        return torch.einsum('nk,nkd->nd', resp, post).reshape(x.shape).to(x.dtype).to(x.device)

    def __call__(self, x, sigma, y=None, **unused):
        """Use the mixture directly as a denoiser D(x, sigma, y=None)."""
        return self.denoise(x, sigma, y)

    def score(self, x, sigma, y=None):
        """grad_x log p_sigma(x) = (E[x0|x] - x) / sigma^2 (Tweedie)."""
        s = append_dims(_as_sigma(sigma, x), x.ndim)
        return (self.denoise(x, sigma, y) - x) / s ** 2

    def class_posterior(self, x, sigma):
        """p(y | x) at noise level sigma (N, num_classes): the exact noisy classifier of classifier guidance."""
        log_joint, _ = self._log_resp_and_means(x, sigma)
        out = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        for c in range(self.num_classes):
            out[:, c] = log_joint[:, self.classes == c].logsumexp(1)
        return out.softmax(1).to(x.device)

    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self):
        """Total covariance: sum_k w_k (C_k + mu_k mu_k^T) - mu mu^T."""
        m = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - m[:, None] * m[None, :]

    def ode_solution(self, x, sigma_from, sigma_to):
        """Exact probability-flow ODE solution for a single Gaussian (K = 1): in the eigenbasis,
        dz/dsigma = sigma z / (lam + sigma^2) (Karras et al. 2022, Eq. 3), so z scales by
        sqrt((lam + sigma_to^2) / (lam + sigma_from^2))."""
        if self.K != 1:
            raise ValueError('ode_solution is closed-form only for one component; integrate numerically otherwise')
        U, lam, mu = self.eigvecs[0], self.eigvals[0], self.means[0]
        z = (self._flat(x).cpu() - mu) @ U
        z = z * ((lam + sigma_to ** 2) / (lam + sigma_from ** 2)).sqrt()
        return (mu + z @ U.T).reshape(x.shape).to(x.dtype)


if __name__ == '__main__':
    # Demo: every parameterisation, given the network that outputs its exact target, reproduces the exact
    # denoiser of a Gaussian mixture; and q_sample's moments in the DDPM frame match sqrt(abar) and 1 - abar.
    torch.manual_seed(0)
    gm = GaussianMixture.random(K=3, D=2)
    sched = DiscreteVP.linear(1000)
    print(f'DDPM linear: T=1000, final alpha_bar={sched.alpha_bar[-1]:.4e}, sigma range [{sched.sigma_min:.4f}, {sched.sigma_max:.1f}]')
    x0, _ = gm.sample(4)
    sigma = torch.tensor([0.1, 1.0, 5.0, 50.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * torch.randn_like(x0)
    for pred in PREDICTIONS:
        diff = Diffusion(sched, pred)
        c_skip, c_out, c_in = diff.preconditioning(sigma)
        oracle = lambda x_in, c_noise: (gm.denoise(x_in / c_in[:, None], sigma) - c_skip[:, None] * x_in / c_in[:, None]) / c_out[:, None]
        err = (diff.denoise_with(oracle, x, sigma) - gm.denoise(x, sigma)).abs().max()
        print(f'{pred:>4}: c_skip={c_skip[1]:.3f} c_out={c_out[1]:+.3f} c_in={c_in[1]:.3f} at sigma=1; |D - exact| = {err:.1e}')
