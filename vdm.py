"""
Variational Diffusion Models: a learned noise schedule and the continuous-time variational bound (Kingma, Salimans,
Poole & Ho 2021, "Variational Diffusion Models", arXiv:2107.00630).

The process is z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)), so
gamma(t) = -log SNR(t) (Sec. 3.1-3.2, SNR = alpha^2 / sigma^2). In this codebase's sigma frame (diffusion.py) this is
the VP process with sigma(t)^2 = 1 / SNR(t) = exp(gamma(t)), and the network is the usual eps prediction; it sees
c_noise = 1000 (gamma - gamma_min) / (gamma_max - gamma_min), a function of sigma alone (VDM's ScoreUNet input).

The bound, for x with 256 levels (Sec. 3.3-3.5 and 4-5):
    -log p(x) <= L_prior + L_recon + L_inf
    L_prior = KL(q(z_1 | x) || N(0, I))                                                     (prior loss)
    L_recon = E_q(z_0|x)[-log p(x | z_0)], p(x_i | z_0,i) proportional to q(z_0,i | x_i) over the 256 values
                                                                  (factorised decoder of Sec. 3.4 and App. C)
    L_inf = 1/2 E_{eps, t ~ U(0,1)} [gamma'(t) ||eps - eps_hat(z_t; t)||^2]   (continuous-time diffusion loss,
                                                        Sec. 5; -1/2 SNR'(t) ||x - x_hat||^2 written with eps)
Changing variables to v = SNR shows that L_inf depends on the schedule only through its endpoints gamma_0 =
gamma(0) and gamma_1 = gamma(1) (Sec. 5.1: invariance of the continuous-time bound). So the schedule between the
endpoints is free, and VDM uses that freedom to minimise the VARIANCE of the one-sample estimate instead of its mean
(Sec. 5.2): since E[L] does not depend on the shape parameters eta, grad_eta Var[L] = grad_eta E[L^2] = E[2 L grad_eta L],
computed at no extra cost by multiplying the gradient that reaches the schedule's output by 2 L in the backward
pass. The endpoints gamma_0, gamma_1, which do change the bound, get the gradient of the bound itself.

The schedule network (App. H; google-research/vdm model_vdm.py NoiseSchedule_NNet):
    gamma~(t) = l1(t) + l3(phi(l2(l1(t))))     l1: 1 unit, l2: 1024 sigmoid units, l3: 1 unit, all weights positive
    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0))
which is monotone increasing in t for any parameters (a sum of increasing functions), with exactly the given endpoints.

Also here: Fourier features of the input (App. C: sin and cos of 2^n pi z for n = 7, 8, the fine detail of 8-bit data
that a network sees poorly at low noise), the ancestral sampler's noise levels (uniform t: the model's `sigmas`
table, sampled by samplers' ddpm, which is VDM's p(z_s | z_t) = q(z_s | z_t, x = x_hat) step), and bits/dim of any VP
model by the continuous-time bound (vp_bits_per_dim).

    diff = VDMDiffusion('learned')            # net: a U-Net predicting eps, in_channels = data channels
    loss, sigma = diff.loss(net, x0)          # bits/dim per sample; optimise net and diff.parameters() together
"""
import math

import torch
from torch import nn

from diffusion import Diffusion, _as_sigma, append_dims, low_discrepancy_u, uniform_u

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0      # VDM's initial endpoints and the network's c_noise range (configs/cifar10.py)
GAMMAS = ('linear', 'learned')         # the fixed linear log-SNR schedule, or the monotone network
FOURIER_EXPONENTS = (7, 8)             # 2^n pi z for these n (App. C: n in {7, 8} for 8-bit data; sin and cos each)


# ----------------------------------------------------------------------------------------------------
# Schedules gamma(t) = -log SNR(t). Each returns gamma and dgamma/dt (N,), and the tensors that carry the
# gradient of its shape parameters (for the variance trick); a fixed schedule has none.

class LinearGamma(nn.Module):
    """The fixed schedule of VDM's baseline: gamma(t) = gamma_0 + (gamma_1 - gamma_0) t (model_vdm.py
    NoiseSchedule_FixedLinear), a log-SNR linear in t."""

    def __init__(self, gamma_0=GAMMA_MIN, gamma_1=GAMMA_MAX):
        super().__init__()
        self.register_buffer('gamma_0', torch.tensor(float(gamma_0)))
        self.register_buffer('gamma_1', torch.tensor(float(gamma_1)))

    def forward(self, t):
        slope = self.gamma_1 - self.gamma_0
        return self.gamma_0 + slope * t, slope.expand_as(t), ()


class MonotoneGamma(nn.Module):
    """VDM's monotone network (App. H), normalised to the endpoints gamma_0, gamma_1 (learned, or fixed buffers).

    Positive weights are |w| of free parameters (model_vdm.py DenseMonotone); phi is the sigmoid. The derivative
    dgamma/dt is written out, not taken by autograd, so the diffusion loss stays differentiable in the parameters."""

    def __init__(self, gamma_0=GAMMA_MIN, gamma_1=GAMMA_MAX, n_features=1024, learn_endpoints=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # l1 starts as gamma_0 + (gamma_1 - gamma_0) t, so gamma~ starts near the linear schedule (their init)
        self.w1 = nn.Parameter(torch.tensor([gamma_1 - gamma_0], dtype=torch.float32))   # l1 weight (kept > 0 by abs)
        self.b1 = nn.Parameter(torch.tensor([gamma_0], dtype=torch.float32))             # l1 bias
        self.w2 = nn.Parameter(torch.randn(n_features, generator=g))                      # l2 weights (N(0, 1) init)
        self.b2 = nn.Parameter(torch.zeros(n_features))                                   # l2 biases
        self.w3 = nn.Parameter(torch.randn(n_features, generator=g))                      # l3 weights, no bias
        self.n_features = n_features
        endpoints = torch.tensor([gamma_0, gamma_1], dtype=torch.float32)
        if learn_endpoints:
            self.endpoints = nn.Parameter(endpoints)               # gamma_0, gamma_1: trained on the bound itself
        else:
            self.register_buffer('endpoints', endpoints)           # fixed: only the shape between them is learned

    @property
    def gamma_0(self):
        return self.endpoints[0]

    @property
    def gamma_1(self):
        return self.endpoints[1]

    def unnormalised(self, t):
        """gamma~(t) = l1(t) + l3(phi(l2(l1(t)))) / n_features and its derivative in t (N,) each."""
        w1, w2, w3 = self.w1.abs(), self.w2.abs(), self.w3.abs()
        h = w1 * t[:, None] + self.b1                                      # l1(t)          (N, 1)
        phi = torch.sigmoid(h * w2 + self.b2)                              # phi(l2(l1(t))) (N, n_features)
        value = h[:, 0] + (phi * w3).sum(1) / self.n_features              # / n_features as model_vdm.py does
        # d/dt: w1 + sum_k w3_k phi_k (1 - phi_k) w2_k w1 / n_features
        slope = w1[0] + (phi * (1 - phi) * w2 * w3).sum(1) * w1[0] / self.n_features
        return value, slope

    def forward(self, t):
        value, slope = self.unnormalised(t)
        ends, _ = self.unnormalised(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        shape = (value - ends[0]) / (ends[1] - ends[0])                    # in [0, 1], 0 at t = 0, 1 at t = 1
        shape_slope = slope / (ends[1] - ends[0])
        span = self.gamma_1 - self.gamma_0
        return self.gamma_0 + span * shape, span * shape_slope, (shape, shape_slope)


# ----------------------------------------------------------------------------------------------------
# The schedule as diffusion.py sees it: sigma = exp(gamma / 2), the network's c_noise, and a table of noise levels.

class VDMSchedule(nn.Module):
    """sigma(u) for training, noise_level(sigma) for the network, sigma_min/max and the `sigmas` table (gamma at
    t = (i + 1) / table_size, increasing, as diffusion.DiscreteVP's), so knobs' vp-* sampling schedules take
    uniform-t steps of the learned schedule (vp-trailing with n steps visits t = 1, (n-1)/n, ..., 1/n)."""

    def __init__(self, gamma='learned', gamma_0=GAMMA_MIN, gamma_1=GAMMA_MAX, learn_endpoints=True, table_size=1000):
        super().__init__()
        if gamma not in GAMMAS:
            raise ValueError(f'unknown VDM schedule {gamma!r}; choose one of {GAMMAS}')
        if not gamma_0 < gamma_1:
            raise ValueError(f'gamma_0 = {gamma_0} must be below gamma_1 = {gamma_1} (gamma = -log SNR rises with t)')
        self.gamma = LinearGamma(gamma_0, gamma_1) if gamma == 'linear' else \
            MonotoneGamma(gamma_0, gamma_1, learn_endpoints=learn_endpoints)
        self.table_size = table_size

    def forward(self, t):
        return self.gamma(t)

    @torch.no_grad()
    def gamma_of(self, t):
        return self.gamma(t.float())[0]

    @property
    def sigma_min(self):
        return math.exp(0.5 * float(self.gamma.gamma_0.detach()))

    @property
    def sigma_max(self):
        return math.exp(0.5 * float(self.gamma.gamma_1.detach()))

    @property
    def sigmas(self):
        t = torch.arange(1, self.table_size + 1, dtype=torch.float32) / self.table_size
        return (0.5 * self.gamma_of(t)).exp().double()

    def sigma(self, u):
        return (0.5 * self.gamma_of(u.float().to(self.gamma.gamma_0.device))).exp().to(u.device)

    @torch.no_grad()
    def t_of_sigma(self, sigma, iterations=40):
        """The t with gamma(t) = 2 log sigma, by bisection (gamma is monotone); sigmas outside the range clamp."""
        target = 2 * sigma.float().log()
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            below = self.gamma_of(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    @staticmethod
    def noise_level(sigma):
        # VDM's ScoreUNet: t = (gamma - gamma_min) / (gamma_max - gamma_min), times 1000 in its timestep embedding
        return 1000 * (2 * sigma.log() - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN)


def fourier_features(z, exponents=FOURIER_EXPONENTS):
    """sin and cos of 2^n pi z for each n (App. C, model_vdm.py Base2FourierFeatures): (N, 2 len(exponents) C, ...)."""
    feats = [f(2 ** n * math.pi * z) for n in exponents for f in (torch.sin, torch.cos)]
    return torch.cat(feats, dim=1)


# ----------------------------------------------------------------------------------------------------
# The bound's three terms, in nats per sample (N,).

def prior_kl(x0, gamma_1):
    """L_prior = KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed over dimensions, alpha_1^2 = sigmoid(-gamma_1)."""
    var_1 = torch.sigmoid(gamma_1)
    return 0.5 * ((1 - var_1) * x0 ** 2 + var_1 - var_1.log() - 1).flatten(1).sum(1)


def reconstruction_nll(x0, eps_0, gamma_0, bins=256):
    """L_recon = -log p(x | z_0) for z_0 / alpha_0 = x + exp(gamma_0 / 2) eps_0. With bins (x on `bins` levels in
    [-1, 1]), the factorised decoder p(x_i | z_0) = softmax_k(-(z_i - v_k)^2 / (2 exp(gamma_0))) over the levels v_k
    (Sec. 3.4; model_vdm.py EncDec.decode); bins=None: the Gaussian N(x; z_0 / alpha_0, exp(gamma_0)) of continuous data."""
    z = x0 + (0.5 * gamma_0).exp() * eps_0                             # z_0 rescaled by 1 / alpha_0
    if bins is None:
        return (0.5 * eps_0 ** 2 + 0.5 * (math.log(2 * math.pi) + gamma_0)).flatten(1).sum(1)
    levels = torch.linspace(-1, 1, bins, device=x0.device, dtype=x0.dtype)
    logits = -0.5 * (z[..., None] - levels) ** 2 * (-gamma_0).exp()   # (N, ..., bins)
    index = ((x0 + 1) / 2 * (bins - 1)).round().long().clamp(0, bins - 1)
    log_p = logits.log_softmax(-1).gather(-1, index[..., None])[..., 0]
    return -log_p.flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------------
# The trainable model.

class VDMDiffusion(Diffusion):
    """A continuous-time VP model trained on the VDM bound (bits/dim), with the fixed linear or the learned schedule.

    gamma: 'linear' | 'learned'; learn_endpoints: train gamma_0, gamma_1 on the bound (else fixed); minimise_variance:
    train the learned shape on Var[L] (Sec. 5.2; False trains it on the mean, for comparison); bins: levels of the data
    (None: continuous data, Gaussian decoder); fourier: give the network Fourier features of z_t as x_cond (App. C)."""

    def __init__(self, gamma='learned', gamma_0=GAMMA_MIN, gamma_1=GAMMA_MAX, learn_endpoints=True,
                 t_sampler='low_discrepancy', minimise_variance=True, bins=256, fourier=False):
        if t_sampler not in ('uniform', 'low_discrepancy'):
            raise ValueError("VDM draws t uniformly: t_sampler 'uniform' or 'low_discrepancy' (VDM App. I.1)")
        super().__init__(VDMSchedule(gamma, gamma_0, gamma_1, learn_endpoints), 'eps', t_sampler)
        self.minimise_variance, self.bins, self.fourier = minimise_variance, bins, fourier

    def parameters(self):
        """The schedule's parameters (none for 'linear'): train.py adds them to the optimizer."""
        return list(self.schedule.parameters())

    def state_dict(self):
        return {'gamma': self.schedule.state_dict()}

    def load_state_dict(self, state):
        if 'gamma' in state:
            self.schedule.load_state_dict(state['gamma'])

    def to(self, device):
        self.schedule.to(device)
        return self

    def network_input(self, x, sigma, cond):
        """c_in x (= z_t) and the conditioning, with Fourier features of z_t as x_cond when asked."""
        z = append_dims((1 + sigma ** 2).rsqrt(), x.ndim) * x
        return z, dict(cond, x_cond=fourier_features(z)) if self.fourier else cond

    def denoise_with(self, net, x, sigma, **cond):
        sigma = _as_sigma(sigma, x)
        z, cond = self.network_input(x, sigma, cond)
        eps_hat = net(z, self.schedule.noise_level(sigma), **cond).to(x.dtype)
        return x - append_dims(sigma, x.ndim) * eps_hat                   # x0_hat = x - sigma eps_hat

    def bound_terms(self, net, x0, t, noise, eps_0, **cond):
        """(diffusion, prior, reconstruction) in nats per sample, and the schedule-shape tensors of this t."""
        gamma_t, dgamma_t, shape = self.schedule(t)
        sigma = (0.5 * gamma_t).exp()
        x = x0 + append_dims(sigma, x0.ndim) * noise                       # the sigma frame: z_t / alpha_t
        z, cond = self.network_input(x, sigma, cond)
        eps_hat = net(z, self.schedule.noise_level(sigma), **cond).float()
        diffusion = 0.5 * dgamma_t * (noise - eps_hat).pow(2).flatten(1).sum(1)   # L_inf's integrand (Sec. 5)
        gamma = self.schedule.gamma
        return (diffusion, prior_kl(x0, gamma.gamma_1), reconstruction_nll(x0, eps_0, gamma.gamma_0, self.bins)), \
            shape, sigma

    def loss(self, net, x0, sigma=None, noise=None, generator=None, **cond):
        """The bound in bits/dim per sample (N,) (L_prior + L_recon + one-sample L_inf) and the sigmas used.
        Given sigmas (a fixed evaluation batch) are turned back into times; given noise also serves as eps_0."""
        n, dims = x0.shape[0], x0[0].numel()
        if sigma is None:
            t = (low_discrepancy_u if self.t_sampler == 'low_discrepancy' else uniform_u)(n, generator).float()
        else:
            t = self.schedule.t_of_sigma(_as_sigma(sigma, x0))
        t = t.to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            eps_0 = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        else:
            eps_0 = noise
        (diffusion, prior, recon), shape, sigma = self.bound_terms(net, x0, t, noise, eps_0, **cond)
        to_bpd = 1 / (dims * math.log(2))
        if self.minimise_variance:
            # Sec. 5.2: the shape parameters see grad E[L^2] = E[2 L grad L] (L_inf alone: the other two terms do not
            # depend on the shape, and E[L_inf | x] does not either, so this is the gradient of Var[L]).
            scale = 2 * diffusion.detach() * to_bpd
            for s in shape:
                if s.requires_grad:
                    s.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))
        return (diffusion + prior + recon) * to_bpd, sigma.detach()


# ----------------------------------------------------------------------------------------------------
# Bits/dim of any VP model (a VDM, or continuous VP / DDPM eps, x0, v models) by the continuous-time bound.

@torch.no_grad()
def vp_bits_per_dim(denoiser, x0, gamma_0, gamma_1, n_t=64, gamma_fn=None, bins=256, generator=None, **cond):
    """The VDM bound in bits/dim (N,) for any denoiser D(x, sigma) of a VP model, with n_t network calls per image.
    L_inf = 1/2 int_{gamma_0}^{gamma_1} exp(-gamma) E||x0 - D(x0 + exp(gamma/2) eps)||^2 dgamma (Sec. 5.1: the
    bound depends on the schedule only through its endpoints), estimated at n_t low-discrepancy points: in gamma
    itself, or in t through gamma_fn(t) -> (gamma, dgamma/dt) (a VDM's own schedule: its lower-variance estimate)."""
    total = prior_kl(x0, torch.tensor(float(gamma_1))) + reconstruction_nll(
        x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device), torch.tensor(float(gamma_0)), bins)
    u0 = torch.rand((), generator=generator, dtype=torch.float64)
    for j in range(n_t):
        u = ((u0 + (torch.arange(x0.shape[0]) + j * x0.shape[0]) / (n_t * x0.shape[0])) % 1).float().to(x0.device)
        if gamma_fn is None:
            gamma, dgamma = gamma_0 + (gamma_1 - gamma_0) * u, torch.full_like(u, gamma_1 - gamma_0)
        else:
            gamma, dgamma = gamma_fn(u)[:2]
        sigma = (0.5 * gamma).exp()
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x0_hat = denoiser(x0 + append_dims(sigma, x0.ndim) * eps, sigma, **cond)
        total = total + 0.5 * dgamma * (-gamma).exp() * (x0 - x0_hat).pow(2).flatten(1).sum(1) / n_t
    return total / (x0[0].numel() * math.log(2))


def diffusion_bits_per_dim(diffusion, net, x0, n_t=64, generator=None, **cond):
    """vp_bits_per_dim of a trained model: a VDM with its own schedule, any other VP model (sigma_min..sigma_max of
    its schedule, in gamma)."""
    gamma_0, gamma_1 = 2 * math.log(diffusion.sigma_min), 2 * math.log(diffusion.sigma_max)
    gamma_fn = diffusion.schedule.gamma if isinstance(diffusion, VDMDiffusion) else None
    bins = diffusion.bins if isinstance(diffusion, VDMDiffusion) else 256
    with torch.no_grad():
        return vp_bits_per_dim(diffusion.denoiser(net), x0, gamma_0, gamma_1, n_t, gamma_fn, bins, generator, **cond)


if __name__ == '__main__':
    # Demo: a 2-D Gaussian mixture and its exact eps. The bound's mean equals -log p(x) for the fixed and the learned
    # schedule alike (Sec. 5.1), but the spread of the one-sample estimate depends on the schedule (Sec. 5.2).
    from diffusion import GaussianMixture
    gm = GaussianMixture.random(K=2, D=2, seed=1)

    def exact_eps(z, c_noise, **cond):
        sigma = (0.5 * (c_noise.double() / 1000 * (GAMMA_MAX - GAMMA_MIN) + GAMMA_MIN)).exp()
        x = z.double() * (1 + sigma[:, None] ** 2).sqrt()
        return (x - gm.denoise(x, sigma)) / sigma[:, None]
    x0, _ = gm.sample(100000, generator=torch.Generator().manual_seed(0))
    print(f'exact -log p(x): {-gm.log_prob(x0).mean().item() / (2 * math.log(2)):.3f} bits/dim')
    for name in GAMMAS:
        diff = VDMDiffusion(name, -8.0, 8.0, bins=None)
        if name == 'learned':
            diff.schedule.gamma = MonotoneGamma(-8.0, 8.0, n_features=32)
        with torch.no_grad():
            bpd, _ = diff.loss(exact_eps, x0, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.0, 0.5, 1.0])
        print(f'{name:>7} schedule: gamma(0, 0.5, 1) = {[round(v, 2) for v in diff.schedule.gamma_of(t).tolist()]}; '
              f'bound {bpd.mean().item():.3f} +- {bpd.std().item() / len(x0) ** 0.5:.3f} bits/dim, one-sample std {bpd.std().item():.2f}')
