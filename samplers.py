"""
Samplers for diffusion models, all in the sigma frame x = x0 + sigma * noise, over a denoiser D(x, sigma).

The probability-flow ODE of every process in this frame is (Karras et al. 2022, arXiv:2206.00364, Eq. 3 with s=1)

    dx/dsigma = (x - D(x, sigma)) / sigma                                  ("d" below)

and the reverse SDE adds Langevin noise to it (Eq. 6). The samplers here are its solvers:
  ddpm             ancestral sampling with DDPM's posterior (Ho et al. 2020, arXiv:2006.11239, Eq. 6-7)
  ddim             DDIM with eta (Song, Meng & Ermon 2021, arXiv:2010.02502, Eq. 12 and 16)
  euler, heun      Karras et al. 2022, Alg. 1 and 2 (Heun with the stochastic "churn" S_churn, S_noise)
  euler_ancestral  Euler step to sigma_down, then fresh noise of std sigma_up (Alg. 2 idea, k-diffusion form)
  dpmpp_2m         DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2)
  dpmpp_2m_sde     its SDE variant (the same paper, Appendix; exact integration of the linear part of the SDE)
  dpmpp_3m         DPM-Solver++(3M) (Lu et al. 2022) with the authors' lower-order final steps below 15 steps (as
                   diffusers); lower_order_final=False is k-diffusion's sample_dpmpp_3m_sde with eta=0
  dpmpp_3m_corrected  ours, not a published method: a 3M-like predictor (whole second difference halved) plus a
                   UniPC-style corrector (Zhao et al. 2023) that reuses the next evaluation and makes it third order
  pc               predictor-corrector with Langevin corrector (Song et al. 2021, arXiv:2011.13456, Alg. 2)
  ipndm            improved PNDM (Zhang & Chen 2023, arXiv:2204.13902): Adams-Bashforth on eps, lower-order warm-up
  deis_tab         DEIS tAB (the same paper, Eq. 14): exact exponential-integrator weights for eps, polynomial in log sigma
  unipc_bh1/_bh2   UniPC (Zhao et al. 2023, arXiv:2302.04867): UniP-p predictor and UniC-p corrector, B(h) = h / e^h - 1
  eps_abm          ours, not a published method: DEIS's predictor plus an exact order+1 Adams-Moulton corrector,
                   damped on large steps

In the sigma frame DDPM and DDIM need only the sigmas: alpha_bar = 1 / (1 + sigma^2). Two facts the tests prove:
DDIM with eta = 0 is exactly Euler in sigma, and DDIM with eta = 1 is exactly DDPM's ancestral step. DPM-Solver++
writes the ODE in lambda = -log(sigma) (the half log-SNR) and integrates the linear part exactly (Lu et al., Eq. 8):

    x(sigma_next) = (sigma_next/sigma) x(sigma) + sigma_next * int_{lambda}^{lambda_next} e^{lambda'} D dlambda'

Every sampler is sample_X(denoiser, x, sigmas, *, <its own options>, cond=None, callback=None, progress=False):
its options are keyword-only, so a misspelt one is a TypeError naming it; `cond` is the dict of network conditioning,
passed on as denoiser(x, sigma, **cond); callback(info) runs once per step with info = {'i', 'sigma', 'sigma_next',
'x' (the state at the start of step i), 'denoised' (the denoiser output the step uses)}. Samplers that draw fresh
noise take generator= (is_stochastic says when they do); deterministic ones do not accept it.

Conventions: x is (N, ...); sigmas is a 1-D descending tensor ending in 0; the first x is unit noise times
sigmas[0]. Usage:
    sigmas = karras_sigmas(18, 0.002, 80.0)
    x = SAMPLERS['heun'](denoiser, sigmas[0] * torch.randn(shape), sigmas, cond={'y': labels})
"""
import inspect
import math

import torch
from tqdm.auto import tqdm


def append_dims(v, ndim):
    """Reshape a (N,) tensor to (N, 1, ..., 1) so it broadcasts against a tensor with `ndim` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# ----------------------------------------------------------------------------------------------------
# Sigma schedules: n noise levels, descending, plus a final 0.

def _append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    rho = 7 spends more steps at low noise, where the ODE curves most (Sec. 3)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho).float()


def loglinear_sigmas(n, sigma_min, sigma_max):
    """Evenly spaced in log sigma (the geometric sequence of Song & Ermon 2019 / Score SDE's VE sampler)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()).float()


def _round_half_even(num, den):
    """round(num / den) for integer tensors in exact integer arithmetic, ties to even as numpy.round does."""
    q, r = num // den, num % den
    return q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1))).long()


def vp_sigmas(model_sigmas, n, spacing='trailing', steps_offset=0):
    """n of a discrete VP model's own T noise levels (ascending (T,) table), uniform in t.

    'leading'  t_i = (n - 1 - i) * (T // n) + steps_offset: DDIM's code (the first n of range(0, T, T // n)) with
               steps_offset = 0; Stable Diffusion's with steps_offset = 1 (CompVis' make_ddim_timesteps adds 1 "to
               get the final alpha values right"; diffusers' DDIMScheduler config steps_offset = 1). Never t = T.
    'trailing' t_i = round(T - i T/n) - 1 (Lin et al. 2024, arXiv:2305.08891, Table 2; starts at t = T)
    'linspace' t_i = round((T - 1)(n - 1 - i)/(n - 1)), i.e. round(linspace(T - 1, 0, n))
    Each is computed in integers, ties rounding to even as numpy.round does: a float ramp such as
    arange(T, 0, -T/n) returns one step too many for 62 n of T = 1000 (n = 61, 103, ...), whose index -1 would wrap
    to sigma_max, and its accumulated rounding decides some exact ties (x.5) upwards (49 n of T = 1000, where
    diffusers' float formula then differs by one index). Sampling exactly on these levels lets the `ddpm` sampler
    use the model's exact posteriors."""
    T = len(model_sigmas)
    if not 1 <= n <= T:
        raise ValueError(f'vp_sigmas needs 1 <= n <= T = {T} steps, got n = {n}')
    i = torch.arange(n)
    if steps_offset and spacing != 'leading':
        raise ValueError(f"steps_offset is an option of 'leading' spacing only, got spacing {spacing!r}")
    if spacing == 'leading':
        t = (n - 1 - i) * (T // n) + steps_offset
        if t[0] > T - 1 or steps_offset < 0:
            raise ValueError(f'steps_offset {steps_offset} takes leading spacing outside t = 0..{T - 1} at n = {n}')
    elif spacing == 'trailing':
        t = _round_half_even(T * (n - i), n) - 1                   # round(T (n - i) / n) - 1
    elif spacing == 'linspace':
        t = _round_half_even((T - 1) * (n - 1 - i), n - 1) if n > 1 else torch.full((1,), T - 1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose 'leading', 'trailing' or 'linspace'")
    return _append_zero(torch.as_tensor(model_sigmas, dtype=torch.float64)[t]).float()


def vp_continuous_sigmas(n, beta_min=0.1, beta_d=19.9, eps_s=1e-3):
    """Continuous VP (Song et al. 2021): t uniform from 1 to eps_s, sigma(t) = sqrt(e^(beta_d t^2/2 + beta_min t) - 1)
    (Karras et al. 2022, Table 1)."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _append_zero(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()).float()


def flow_sigmas(n, shift=1.0, t_max=1 - 1e-3, t_min=1e-3):
    """Rectified flow: t uniform from t_max to t_min, shifted towards high noise by
    t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, arXiv:2403.03206, Eq. 23; shift=3 for 1024px),
    and sigma = t' / (1 - t'). t_max < 1 keeps sigma finite."""
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return _append_zero(t / (1 - t)).float()


# Sampling noise levels (not to be confused with diffusion.NOISE_SCHEDULES, the training processes).
SIGMA_SCHEDULES = {'karras': karras_sigmas, 'loglinear': loglinear_sigmas, 'vp': vp_sigmas,
                   'vp_continuous': vp_continuous_sigmas, 'flow': flow_sigmas}


# ----------------------------------------------------------------------------------------------------
# Shared plumbing: input checks, the denoiser call with a (N,) sigma, the per-step callback, the progress bar and
# the RNG.

def check_inputs(x, sigmas, cond=None):
    """Clear errors for the mistakes that otherwise surface as silent garbage."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'sigmas must be a 1-D tensor of at least 2 noise levels ending in 0, got {sigmas!r:.80}')
    if sigmas[-1] != 0:
        raise ValueError(f'sigmas must end in 0 (use e.g. karras_sigmas, which appends it); last is {sigmas[-1].item():g}')
    if not torch.isfinite(sigmas).all() or not (sigmas[:-1] > 0).all():
        raise ValueError('sigmas must be finite and positive before the final 0')
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError('sigmas must be strictly descending (from high noise to 0)')
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f'x must be a batch (N, ...) of at least 2 dims, got shape {tuple(getattr(x, "shape", ()))}')
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f'cond must be a dict of keyword arguments for the denoiser (e.g. {{"y": labels}}), '
                        f'got {type(cond).__name__}')
    return {} if cond is None else cond


def _denoise(denoiser, x, sigma, cond):
    """Call D with a (N,) sigma and check that it returns something shaped like x."""
    out = denoiser(x, x.new_full((x.shape[0],), float(sigma)), **cond)
    if out.shape != x.shape:
        raise ValueError(f'the denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}; '
                         'it must return an estimate of x0 shaped like x')
    return out


def _report(callback, i, sigmas, x, denoised, **extra):
    """callback(info) once per step (k-diffusion's convention, plus sigma_next): x is the state at the start of
    step i, denoised the denoiser output that step uses."""
    if callback is not None:
        callback({'i': i, 'sigma': sigmas[i], 'sigma_next': sigmas[i + 1], 'x': x, 'denoised': denoised, **extra})


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device='cpu' if generator is None else generator.device).to(x.device)


def _steps(sigmas, progress):
    return tqdm(range(len(sigmas) - 1), disable=not progress, desc='sampling', leave=False)


def ancestral_step(sigma, sigma_next, eta=1.0):
    """Split a step to sigma_next into a deterministic part to sigma_down and fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2 and sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2:
    eta = 1 is the DDPM posterior variance (derivation in sample_ddim)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


# ----------------------------------------------------------------------------------------------------
# DDPM and DDIM, written as in their papers with alpha_bar = 1 / (1 + sigma^2), then moved to the sigma frame.

@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, variance='posterior', generator=None, cond=None, callback=None, progress=False):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with the model's x0 estimate in the posterior
    q(x_{t-1} | x_t, x0) (Eq. 6-7):
        mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
    variance 'posterior' = beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t, or 'beta' = beta_t (Sec. 3.2).
    Here alpha_t = abar_t / abar_prev over the step actually taken, so any sigma sub-sequence works; on the
    model's own discrete sigmas it is exactly DDPM."""
    cond = check_inputs(x, sigmas, cond)
    if variance not in ('posterior', 'beta'):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        if sigma_next == 0:
            x = x0_hat                                        # the last step returns the mean (Alg. 2, z = 0 at t=1)
            continue
        abar, abar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        alpha, beta = abar / abar_prev, 1 - abar / abar_prev
        x_t = x * math.sqrt(abar)                             # to DDPM's unscaled frame
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0_hat + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x_t
        var = (1 - abar_prev) / (1 - abar) * beta if variance == 'posterior' else beta
        x = (mean + math.sqrt(var) * _noise_like(x, generator)) / math.sqrt(abar_prev)   # back to the sigma frame
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, eta=0.0, generator=None, cond=None, callback=None, progress=False):
    """DDIM (Song et al. 2021, Eq. 12):
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps_hat + s z,
        s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)            (Eq. 16)
    Divided by sqrt(abar_prev) this is x_prev = x0_hat + sigma_down eps_hat + sigma_up z in the sigma frame, with
    sigma_up^2 = eta^2 sigma_prev^2 (sigma^2 - sigma_prev^2) / sigma^2 (ancestral_step). With eps_hat = (x - x0_hat)/sigma,
    eta = 0 is Euler's step and eta = 1 is DDPM's posterior. generator is used only when eta > 0."""
    cond = check_inputs(x, sigmas, cond)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        abar, abar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        eps_hat = (x * math.sqrt(abar) - math.sqrt(abar) * x0_hat) / math.sqrt(1 - abar)   # (x_t - sqrt(abar) x0)/sqrt(1-abar)
        s = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x_prev = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1 - abar_prev - s ** 2, 0.0)) * eps_hat
        if s > 0:
            x_prev = x_prev + s * _noise_like(x, generator)
        x = x_prev / math.sqrt(abar_prev)
    return x


# ----------------------------------------------------------------------------------------------------
# ODE solvers of Karras et al. 2022 and the ancestral Euler sampler.

@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Euler's method on dx/dsigma = (x - D)/sigma (Karras et al. 2022, Alg. 1 without the Heun correction).
    The last step, to sigma = 0, lands exactly on D(x): x + (0 - sigma)(x - D)/sigma = D."""
    cond = check_inputs(x, sigmas, cond)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        x = x + (sigma_next - sigma) * (x - x0_hat) / sigma
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, S_churn=0.0, S_tmin=0.0, S_tmax=float('inf'), S_noise=1.0, generator=None,
                cond=None, callback=None, progress=False):
    """Heun's 2nd-order method with optional stochastic churn (Karras et al. 2022, Alg. 2).
    S_churn > 0 first raises sigma to t_hat = sigma (1 + gamma) by adding fresh noise (lines 5-6), with
    gamma = min(S_churn / n, sqrt(2) - 1) for sigma in [S_tmin, S_tmax]; S_noise slightly > 1 offsets the
    detail lost by imperfect denoisers (EDM used S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003 on ImageNet).
    With churn the first evaluation is at t_hat, and the callback's info also holds 'sigma_hat' = t_hat."""
    cond = check_inputs(x, sigmas, cond)
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        t_hat = sigma * (1 + gamma)
        x_hat = x
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat ** 2 - sigma ** 2) * S_noise * _noise_like(x, generator)    # Alg. 2 l.6
        x0_hat = _denoise(denoiser, x_hat, t_hat, cond)
        _report(callback, i, sigmas, x, x0_hat, sigma_hat=t_hat)
        d_cur = (x_hat - x0_hat) / t_hat
        x_next = x_hat + (sigma_next - t_hat) * d_cur
        if sigma_next > 0:                     # Heun correction; skipped on the last step since sigma=0 (Alg. 2 l.8)
            d_prime = (x_next - _denoise(denoiser, x_next, sigma_next, cond)) / sigma_next
            x_next = x_hat + (sigma_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, eta=1.0, s_noise=1.0, generator=None, cond=None, callback=None,
                           progress=False):
    """Ancestral Euler: a deterministic Euler step to sigma_down, then noise of std sigma_up (ancestral_step).
    Identical to DDIM(eta) in distribution; written in the ODE form of k-diffusion's sampler."""
    cond = check_inputs(x, sigmas, cond)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        x = x + (sigma_down - sigma) * (x - x0_hat) / sigma
        if sigma_up > 0:
            x = x + sigma_up * s_noise * _noise_like(x, generator)
    return x


# ----------------------------------------------------------------------------------------------------
# Multistep exponential integrators (DPM-Solver++). With lambda = -log(sigma) and h = lambda_next - lambda,
#   x_next = (sigma_next / sigma) x + int_0^h e^{u - h} D(lambda + u) du.
# Replacing D by a polynomial through the last denoiser outputs gives integrals in closed form:
#   int_0^h e^{u-h} du = 1 - e^{-h},  int_0^h e^{u-h} u du = h - 1 + e^{-h},  int_0^h e^{u-h} u^2 du = h^2 - 2h + 2 - 2e^{-h}.

@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): with r = h_prev / h,
        x_next = (sigma_next / sigma) x + (1 - e^{-h}) ((1 + 1/(2r)) D_cur - 1/(2r) D_prev).
    First step and the last (to sigma = 0, where h = inf) are first order (the DDIM step). This equals k-diffusion's
    sample_dpmpp_2m and diffusers' DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type='zero') with
    lower_order_final True or False (at order 2 that flag only lowers diffusers' last step, here the step to
    sigma = 0, first order anyway; tests/test_solvers.py checks it to round-off). The authors' dpm_solver_pytorch.py
    with lower_order_final (below 10 steps) also takes the step into its last time at first order (not offered)."""
    cond = check_inputs(x, sigmas, cond)
    x0_prev, h_prev = None, None
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_cur = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_cur)
        if sigma_next == 0:
            x = x0_cur
            continue
        h = math.log(sigma / sigma_next)
        D = x0_cur
        if x0_prev is not None:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0_cur - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * D
        x0_prev, h_prev = x0_cur, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, eta=1.0, s_noise=1.0, generator=None, cond=None, callback=None,
                        progress=False):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Appendix; eta scales the noise as in k-diffusion). The reverse SDE
    written in lambda has the linear part solved exactly:
        x_next = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + sigma_next sqrt(1 - e^{-2 eta h}) z,
    and the second-order term adds (1 - e^{-(1+eta)h}) / (2r) (D_cur - D_prev) (the midpoint rule of 2M).
    eta = 0 is DPM-Solver++(2M); eta = 1 samples the reverse SDE."""
    cond = check_inputs(x, sigmas, cond)
    x0_prev, h_prev = None, None
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_cur = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_cur)
        if sigma_next == 0:
            x = x0_cur
            continue
        h = math.log(sigma / sigma_next)
        phi = -math.expm1(-(1 + eta) * h)                     # 1 - e^{-(1+eta) h}
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + phi * x0_cur
        if x0_prev is not None:
            r = h_prev / h
            x = x + phi / (2 * r) * (x0_cur - x0_prev)
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * _noise_like(x, generator)
        x0_prev, h_prev = x0_cur, h
    return x


def _exp_integral(h, x0_cur, newer=None, older=None, i2_weight=1.0, b_weight=1.0):
    """int_0^h e^{u-h} P(u) du for P through (0, D_cur) and up to two more points (u, D) given as (D, u) pairs:
    P(u) = D_cur + a u + b u (u - u_1) in Newton form, integrated with I0, I1, I2 above:
        I0 D_cur + I1 a + b_weight (i2_weight I2 - u_1 I1) b.
    Both weights 1 give the exact integral of the quadratic. DPM-Solver++(3M) has i2_weight = 1/2 (only the I2 b part
    halved); dpmpp_3m_corrected's predictor has b_weight = 1/2 (the whole second-difference term halved)."""
    e = math.exp(-h)
    I0, I1, I2 = 1 - e, h - 1 + e, h * h - 2 * h + 2 - 2 * e
    out = I0 * x0_cur
    if newer is not None:
        (x0_1, u_1) = newer
        a = (x0_1 - x0_cur) / u_1                                 # first divided difference
        out = out + I1 * a
        if older is not None:
            (x0_2, u_2) = older
            b = ((x0_2 - x0_cur) / u_2 - a) / (u_2 - u_1)          # second divided difference
            out = out + b_weight * (i2_weight * I2 - u_1 * I1) * b  # int e^{u-h} u (u - u_1) du = I2 - u_1 I1
    return out


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, sigmas, *, lower_order_final=True, cond=None, callback=None, progress=False):
    """DPM-Solver++(3M), multistep in data prediction (Lu et al. 2022, arXiv:2211.01095, Sec. 4 and App. B).

    D is the quadratic through the last three outputs at u = 0, -h_1, -h_1 - h_2 (u = lambda - lambda_cur), in
    Newton form D_cur + a u + b u (u - u_1), integrated against e^{u-h}; the published coefficients give the
    I2 b part half its exact integral (k-diffusion's phi_3 d2 is (I2/2) b). That damps the extrapolation at the
    large steps of few-step sampling but leaves the method second order (measured: the error falls ~4x per
    doubling of steps; dpmpp_3m_corrected is third order). The first step is first order and the second uses the
    linear interpolant (exactly integrated) while the history builds up; the step to sigma = 0 returns D.
    lower_order_final (the authors' advice, "a key to stabilizing ... with very few steps"): with fewer than 15
    steps (n = len(sigmas) - 1 < 15), the step into the smallest sigma is second order (the linear interpolant).
    Which published code each setting equals (tests/test_solvers.py and test_samplers.py check both to round-off):
      True (default)  diffusers' DPMSolverMultistepScheduler(solver_order=3, algorithm_type='dpmsolver++',
                      solver_type='heun', lower_order_final=True, final_sigmas_type='zero') on these sigmas;
      False           k-diffusion's sample_dpmpp_3m_sde with eta = 0 (no lowering at any step count); from 15
                      steps on both settings are the same method.
    Not equal: diffusers' default solver_type='midpoint' (and the authors' dpm_solver_pytorch.py,
    solver_type='dpmsolver') take the second-order steps in the midpoint form of 2M (0.5 (1 - e^{-h}) h instead of
    I1 on the first difference); the authors' sample(..., lower_order_final=True) lowers only below 10 steps and
    also takes the step into its last time t_0 at first order (with denoise_to_zero, our last sigma).
    Measured (benchmarks/samplers.py, Karras 80 -> 0.002, RMS error): lowering helps at 5 NFE on the 64-D mixture
    (9.73e-2 vs 1.48e-1) and costs at 10 (5.91e-2 vs 3.69e-2); on the 2-D one 3.86 vs 3.64 and 0.718 vs 0.771."""
    cond = check_inputs(x, sigmas, cond)
    n = len(sigmas) - 1
    history = []                                              # previous (D, u) pairs, newest first
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_cur = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_cur)
        if sigma_next == 0:
            x = x0_cur                                        # the final denoising step
            continue
        h = math.log(sigma / sigma_next)
        points = 1 if lower_order_final and n < 15 and i == n - 2 else 2   # earlier points the polynomial uses
        x = (sigma_next / sigma) * x + _exp_integral(h, x0_cur, *history[:points], i2_weight=0.5)
        # shift the history: the current point moves to u = -h relative to the next step
        history = [(x0_cur, -h)] + [(d, u - h) for d, u in history[:1]]
    return x


@torch.no_grad()
def sample_dpmpp_3m_corrected(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Ours, not a published method: a predictor-corrector multistep method in the manner of UniPC (Zhao et al. 2023,
    arXiv:2302.04867) built on the integrals of DPM-Solver++. It is third order at one evaluation per step, where
    the published dpmpp_3m is second order. How it differs from dpmpp_3m:
      - predictor: the same quadratic through u = 0, -h_1, -h_1 - h_2, but with the whole second-difference term
        (I2 - u_1 I1) b halved, not only its I2 b part (this predictor once stood here under the name dpmpp_3m);
      - corrector: once D(x_pred) at sigma_next is known (the next step needs it anyway, so no extra evaluation),
        redo the step with the exact integral of the quadratic through u = h, 0, -h_1 (the Adams-Moulton
        counterpart of the predictor's Adams-Bashforth extrapolation); this is what makes it third order;
      - the predictor's order is capped by the steps left (n - i, as UniPC's lower_order_final): the step into the
        smallest sigma is predicted at second order, because the output is D at that predicted point; a first-order
        predictor there (the cap n - 1 - i this file once had) makes the whole method second order;
      - the next step reuses D(x_pred) rather than D at the corrected x (as UniPC does), so the callback's
        'denoised' for step i > 0 is the denoiser output at the predicted point.
    Where it wins (mean distance to the exact ODE solution, exact denoisers, Karras schedule 0.002..80, dpmpp_3m
    with its default lower_order_final): on the 2-D Gaussian of tests/test_samplers.py dpmpp_3m is more accurate at
    32 steps, this one at 8, 16, 64 and 128; on six random 2-D mixtures (GaussianMixture.random, seeds 0-5) this one
    wins at 8, 16 and 64 steps on all six and at 32 on three. Neither dominates."""
    cond = check_inputs(x, sigmas, cond)
    n = len(sigmas) - 1
    history = []                                              # previous (D, u) pairs, newest first
    x0_cur = _denoise(denoiser, x, sigmas[0].item(), cond)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        _report(callback, i, sigmas, x, x0_cur)
        if sigma_next == 0:
            x = x0_cur                                        # the final denoising step
            break
        h = math.log(sigma / sigma_next)
        order = min(3, len(history) + 1, n - i)
        x_pred = (sigma_next / sigma) * x + _exp_integral(h, x0_cur, *history[:order - 1], b_weight=0.5)
        x0_next = _denoise(denoiser, x_pred, sigma_next, cond)
        x = (sigma_next / sigma) * x + _exp_integral(h, x0_cur, (x0_next, h), *history[:min(order, 2) - 1])
        history = [(x0_cur, -h)] + [(d, u - h) for d, u in history[:1]]
        x0_cur = x0_next
    return x


# ----------------------------------------------------------------------------------------------------
# Score SDE's predictor-corrector sampler.

@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, snr=0.16, n_corrector=1, generator=None, cond=None, callback=None,
              progress=False):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2 for VE SDEs), with score = (D - x) / sigma^2:
    predictor (reverse diffusion): x <- x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z,
    corrector (Langevin, Alg. 4): eps = 2 (snr ||z|| / ||score||)^2, x <- x + eps score + sqrt(2 eps) z,
    run n_corrector times at sigma_next. snr = 0.16 is the paper's CIFAR-10 value. The step to sigma = 0 returns D."""
    cond = check_inputs(x, sigmas, cond)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        if sigma_next == 0:
            x = x0_hat
            continue
        score = (x0_hat - x) / sigma ** 2
        x = x + (sigma ** 2 - sigma_next ** 2) * score + math.sqrt(sigma ** 2 - sigma_next ** 2) * _noise_like(x, generator)
        for _ in range(n_corrector):
            score = (_denoise(denoiser, x, sigma_next, cond) - x) / sigma_next ** 2
            z = _noise_like(x, generator)
            # step size from the ratio of noise and score norms (Alg. 4 line 5), each averaged over the batch as
            # in the paper's code: per-sample norms make the step explode where a low-dimensional score is ~0
            z_norm, score_norm = z.flatten(1).norm(dim=1).mean(), score.flatten(1).norm(dim=1).mean()
            eps = 2 * (snr * z_norm / score_norm.clamp(min=1e-12)) ** 2
            x = x + eps * score + (2 * eps).sqrt() * z
    return x


# ----------------------------------------------------------------------------------------------------
# Multistep solvers of the DEIS and UniPC papers, and an exponential-integrator predictor-corrector of ours.
# All step in lambda = -log(sigma) with h = lambda_next - lambda and u = lambda' - lambda, using the exact
# solution of the linear part of the ODE (variation of constants):
#   data prediction:   x_next = (sigma_next/sigma) x + int_0^h e^{u-h} D(lambda + u) du          (Lu et al., Eq. 8)
#   noise prediction:  x_next = x - sigma int_0^h e^{-u} eps(lambda + u) du,  eps = (x - D)/sigma
# (the second is DEIS's Eq. 11 in the scaled variable rho = sigma: dx/drho = eps, with drho = -sigma e^{-u} du).
# phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k are the coefficients of exponential integrators (Hochbruck &
# Ostermann 2010, Acta Numerica, Eq. 2.10); phi_1(z) = (e^z - 1)/z.

def _phi(k, z):
    """phi_k(z), by its power series sum_m z^m/(m+k)! where the closed form would cancel (|z| < 1)."""
    if abs(z) < 1:
        return sum(z ** m / math.factorial(m + k) for m in range(30))
    return (math.exp(z) - sum(z ** j / math.factorial(j) for j in range(k))) / z ** k


def _eps_weights(nodes, h):
    """w_j = int_0^h e^{-u} L_j(u) du for the Lagrange basis L_j through `nodes` (u = 0 the current point, u < 0
    earlier ones): the exact weights of the noise-prediction integral for a polynomial in lambda, any step sizes.
    Built from the moments int_0^h e^{-u} u^k du = k! (1 - e^{-h} sum_{m<=k} h^m/m!) = k! h^{k+1} e^{-h} phi_{k+1}(h),
    so that V w = moments with V_kj = u_j^k (h = inf, the step to sigma = 0, gives k!)."""
    n = len(nodes)
    if math.isinf(h):
        moments = [float(math.factorial(k)) for k in range(n)]
    else:
        moments = [math.factorial(k) * h ** (k + 1) * math.exp(-h) * _phi(k + 1, h) for k in range(n)]
    V = torch.tensor([[u ** k for u in nodes] for k in range(n)], dtype=torch.float64)
    return torch.linalg.solve(V, torch.tensor(moments, dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, order=4, cond=None, callback=None, progress=False):
    """iPNDM, the improved pseudo numerical method of Zhang & Chen 2023 (DEIS paper, arXiv:2204.13902, Sec. 4 and
    App. "iPNDM"): PNDM's linear multistep combination of noise predictions (Liu et al. 2022, arXiv:2202.09778,
    Eq. 12, the Adams-Bashforth coefficients for equal steps)
        eps' = eps_i (order 1),  (3 eps_i - eps_{i-1})/2,  (23 eps_i - 16 eps_{i-1} + 5 eps_{i-2})/12,
               (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3})/24 (order 4),
    inserted in the DDIM step, which in the sigma frame is x_next = x + (sigma_next - sigma) eps'. Unlike PNDM it
    warms up with these lower orders instead of Runge-Kutta steps (one evaluation per step throughout), and uses
    the same fixed (equal-step) coefficients on every step, whatever the step sizes. The paper stops at a small
    time t_min; the step from the last sigma to 0 here returns D(x), the final denoising step every sampler of
    this file takes (so all are compared against the same end point)."""
    cond = check_inputs(x, sigmas, cond)
    if order not in (1, 2, 3, 4):
        raise ValueError(f'iPNDM order must be 1, 2, 3 or 4, got {order!r}')
    coeffs = ([1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])
    eps_hist = []                                            # noise predictions, newest first
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        if sigma_next == 0:
            x = x0_hat
            break
        eps_hist = [(x - x0_hat) / sigma] + eps_hist[:order - 1]
        c = coeffs[len(eps_hist) - 1]                         # lower order while the history fills (warm-up)
        x = x + (sigma_next - sigma) * sum(cj * e for cj, e in zip(c, eps_hist))
    return x


@torch.no_grad()
def sample_deis_tab(denoiser, x, sigmas, *, order=4, lower_order_final=True, cond=None, callback=None, progress=False):
    """DEIS tAB (Zhang & Chen 2023, arXiv:2204.13902, Eq. 14-15): the exponential integrator of the noise
    prediction with eps extrapolated by the Lagrange polynomial through its last `order` values in the time
    variable t, integrated exactly:  x_next = x + sum_j C_ij eps_{i-j},  C_ij = int_{rho_i}^{rho_i+1} L_j(t(rho)) drho.
    Here the time is t = log sigma (up to an affine map, the time of the VE SDE, sigma(t) = sigma_min
    (sigma_max/sigma_min)^t, and the 'deis' of diffusers' DEISMultistepScheduler), so C_ij = -sigma_i w_j with the
    exact weights of _eps_weights; exact for any step sizes. order = r + 1 where the paper's tABr uses a degree-r
    polynomial: the default order=4 is tAB3, the paper's choice. Warm-up with lower orders (the paper's). The paper
    integrates to a small time t_min; the step from the last sigma to 0 here returns D(x), the final denoising step
    every sampler of this file takes.
    lower_order_final: with fewer than 15 steps between the positive sigmas (n - 1 < 15, n = len(sigmas) - 1), the
    order is capped by the steps left to the smallest sigma: the step into it is first order, the one before second.
    Which published code each setting equals (tests/test_solvers.py checks orders 2 and 3 to round-off; diffusers
    has no order 4, where the cap is the same rule): True (default) is diffusers' DEISMultistepScheduler(
    solver_order=order, lower_order_final=True) run to the last sigma, followed by D there; False is the
    paper's tAB (and the authors' code, which lowers no step), and diffusers' with lower_order_final=False.
    Measured (benchmarks/samplers.py, Karras 80 -> 0.002): on these exact mixtures lowering mostly costs accuracy:
    order 4 at 5 / 10 NFE 7.32e-2 / 1.39e-2 vs 5.37e-2 / 1.19e-2 (64-D), 0.705 / 0.102 vs 0.660 / 0.109 (2-D)."""
    cond = check_inputs(x, sigmas, cond)
    if order not in (1, 2, 3, 4):
        raise ValueError(f'DEIS tAB order must be 1, 2, 3 or 4 (tAB0..tAB3), got {order!r}')
    n = len(sigmas) - 1
    hist = []                                                # (eps, lambda), newest first
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        lam = -math.log(sigma)
        hist = [((x - x0_hat) / sigma, lam)] + hist[:order - 1]
        if sigma_next == 0:
            x = x0_hat
            break
        p = min(len(hist), n - 1 - i) if lower_order_final and n - 1 < 15 else len(hist)
        h = math.log(sigma / sigma_next)
        w = _eps_weights([l - lam for _, l in hist[:p]], h)
        x = x - sigma * sum(wj * e for wj, (e, _) in zip(w, hist[:p]))
    return x


def _unipc_rhos(h, rks, variant):
    """UniPC's coefficients a = R^-1 g / B(h) (Zhao et al. 2023, arXiv:2302.04867, Thm. 3.1 and Alg. 5-6, data
    prediction, so the paper's h enters as hh = -h): R_kj = r_j^k (k = 0..p-1) for the ratios r_j =
    (lambda_j - lambda_i)/h of the points used, g_k = hh k! phi_{k+1}(hh) (k = 1..p), and B(h) = hh (bh1) or
    e^hh - 1 (bh2). One point is the paper's (and the reference code's) special case a = 1/2, the h -> 0 limit."""
    hh = -h
    B = hh if variant == 'bh1' else math.expm1(hh)
    if len(rks) == 1:
        return [0.5]
    g = [hh * math.factorial(k) * _phi(k + 1, hh) for k in range(1, len(rks) + 1)]
    R = torch.tensor([[r ** k for r in rks] for k in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64) / B).tolist()


def _unipc(denoiser, x, sigmas, order, variant, lower_order_final, cond, callback, progress):
    """UniPC-p in data prediction (Zhao et al. 2023, Alg. 5 with UniC, Alg. 6):
    predictor UniP-p:  x_pred = (sigma_next/sigma) x + (1 - e^{-h}) D_i + B'(h) sum_{m=1}^{p-1} a_m D_m,
    with D_m = (D_{i-m} - D_i) / r_m and B'(h) = -B(h) (h or 1 - e^{-h}) in our sign convention; a from the first
    p-1 equations (a = 1/2 for p = 2, the reference code's simplification);
    corrector UniC-p:  once D(x_pred) at sigma_next is known, redo the step with one more point, r = 1, the new
    output (a from all p equations; a = 1/2 for p = 1). This raises the order by one at no extra evaluation: the
    next predictor uses D(x_pred), evaluated at the uncorrected point, but steps from the corrected x.
    The order builds up over the first steps, and lower_order_final caps it at the number of steps left (the
    reference code's default); the step to sigma = 0 is first order: its output is D(x) at the last sigma."""
    cond = check_inputs(x, sigmas, cond)
    if order not in (1, 2, 3):
        raise ValueError(f'UniPC order must be 1, 2 or 3, got {order!r}')
    n = len(sigmas) - 1
    hist = []                                                # (D, lambda), newest first
    last = None                                              # (x, sigma, predictor order) of the previous step
    B_of = (lambda h: h) if variant == 'bh1' else (lambda h: -math.expm1(-h))
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        lam = -math.log(sigma)
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        if last is not None:                                 # UniC: correct the step just taken (Alg. 6)
            x_prev, sigma_prev, p = last
            D0, lam0 = hist[0]
            h = lam - lam0
            rks = [(l - lam0) / h for _, l in hist[1:p]] + [1.0]
            a = _unipc_rhos(h, rks, variant)
            corr = a[-1] * (x0_hat - D0) + sum(am * (D - D0) / r for am, (D, _), r in zip(a[:-1], hist[1:p], rks))
            x = (sigma / sigma_prev) * x_prev - math.expm1(-h) * D0 + B_of(h) * corr
        hist = [(x0_hat, lam)] + hist[:order - 1]
        if sigma_next == 0:
            x = x0_hat
            break
        h = math.log(sigma / sigma_next)
        p = min(order, len(hist), n - i if lower_order_final else order)
        last = (x, sigma, p)
        x_next = (sigma_next / sigma) * x - math.expm1(-h) * x0_hat   # UniP-1 = DDIM / DPM-Solver++(1)
        if p > 1:
            rks = [(l - lam) / h for _, l in hist[1:p]]
            a = _unipc_rhos(h, rks, variant) if p > 2 else [0.5]
            x_next = x_next + B_of(h) * sum(am * (D - x0_hat) / r for am, (D, _), r in zip(a, hist[1:p], rks))
        x = x_next
    return x


@torch.no_grad()
def sample_unipc_bh1(denoiser, x, sigmas, *, order=3, lower_order_final=True, cond=None, callback=None, progress=False):
    """UniPC with B(h) = h (Zhao et al. 2023, Sec. 3.3, "B1(h)"); see _unipc. order=3 is UniPC-3."""
    return _unipc(denoiser, x, sigmas, order, 'bh1', lower_order_final, cond, callback, progress)


@torch.no_grad()
def sample_unipc_bh2(denoiser, x, sigmas, *, order=3, lower_order_final=True, cond=None, callback=None, progress=False):
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023, Sec. 3.3, "B2(h)"); see _unipc. order=3 is UniPC-3."""
    return _unipc(denoiser, x, sigmas, order, 'bh2', lower_order_final, cond, callback, progress)


@torch.no_grad()
def sample_eps_abm(denoiser, x, sigmas, *, order=3, h_damp=1.2, final_correction=False, cond=None, callback=None,
                   progress=False):
    """Ours (not a published method): an exponential-integrator Adams-Bashforth-Moulton pair on the noise
    prediction, with exact weights for any step sizes and a corrector damped on large steps.
    Predictor: DEIS's tAB in t = log sigma with `order` points (the exact weights of _eps_weights; order 3 is tAB2).
    Corrector: once D(x_pred) at sigma_next is known, redo the step with the Lagrange polynomial through the new
    point and the last `order` old ones (order + 1 points, the Adams-Moulton counterpart, integrated exactly),
    as UniC does but with the exact integral instead of UniPC's B(h) coefficients. The next step uses the noise
    prediction at the uncorrected point (no extra evaluation).
    Damping: the state becomes x_pred + gamma (x_corr - x_pred) with gamma = 1 / (1 + (h / h_damp)^2). At large steps
    (h ~ 1-4 at 5-10 NFE) the full correction extrapolates a poorly resolved eps and costs accuracy; as h -> 0,
    1 - gamma = O(h^2) while x_corr - x_pred = O(h^(order+1)), so the damped step keeps the corrector's order (the
    tests measure it). h_damp = inf is the undamped pair; h_damp = 1.2 was chosen on the two mixtures of
    benchmarks/samplers.py among 0.5-3 (a tuned constant: 1.0-2.0 are within a few % of it at 10-100 NFE).
    The order builds up over the first steps and is capped by the steps left (lower order final, as UniPC); the
    step to sigma = 0 returns D(x) at the last sigma, or, with final_correction=True, D(x_pred) + (x - x_pred): the
    last correction carried into the output by a first-order Taylor step of D, whose Jacobian is ~I at the smallest
    sigma (UniPC discards that correction; measured: up to 7% smaller error; off by default so that the last step
    is the same final denoising step as every other sampler's).
    How it differs from UniPC: noise instead of data prediction, exact weights instead of B(h), an order + 1
    corrector, the damping; from DEIS: the corrector (third order overall; DEIS is second: the tests measure both).
    Measured (benchmarks/samplers.py, Karras 80 -> 0.002, rho 7, shared noise): on the 64-D image-like mixture the
    most accurate of all solvers, published ones included, at 5, 10, 20, 35 and 50 NFE (order=4 also at 100); on
    the 2-D mixture it LOSES at 5-35 NFE (to iPNDM at 5 and 20 NFE by 1.16x and 1.07x, to DEIS tAB2 without
    lower_order_final at 10 by 1.5x, to k-diffusion's LMS at 35 by 2%) and wins from 35 (order=4) / 50 NFE on.
    Tried and not kept (worse somewhere at 5-35 NFE): data prediction with the same exact weights (x2-4 worse at
    5-10 NFE); switching from noise to data prediction below a sigma; polynomials in sigma instead of log sigma;
    an exponential integrator whose linear part is the denoiser of a Gaussian with variance sigma_data^2 (between
    data and noise prediction); the corrector only on small steps (the switch itself costs accuracy); the noise
    of the corrected point in the history; a constant damping gamma = 0.3-0.5 (helps at 5 NFE, loses the order);
    per-sample order selection from the differences of successive orders (Shampine-Gordon style); eps interpolated
    in u = sigma^(1/r) (r = 1, 2, 3, 5, 7, 10; r = 1 is a polynomial in sigma) instead of log sigma, with the exact
    integral against d sigma: the power variables trade the two mixtures against each other (r = 1 wins on the 2-D
    one at 10-35 NFE and loses 1.1-1.3x on the 64-D one; the best worst case over both problems at 5-35 NFE is 1.12x
    the best published, r = 2); bounded variables (sigma / sqrt(sigma^2 + c^2), the exact one for a Gaussian of
    variance c^2, and arctan(sigma / c), c = 0.1-2): their nodes crowd near the bound at large sigma and the
    extrapolation blows up (x10-10^7 at order 3); damping 1/(1 + (h/h_damp)^p) with p = 1 or 4 and h_damp 0.6-4; a
    corrector with as many points as the predictor (UniC's count); the correction damped per sample by its size
    relative to sigma, 1/(1 + (rms(x_corr - x_pred) / (0.04 sigma))^2), aimed at the real cause of the 2-D loss (the
    next step uses D evaluated at x_pred, not at the corrected point): at most 1.02x the best published on the two
    race mixtures, but up to 3.1x the best published on 2-D mixtures it was not tuned on (eps_abm: within 1.5x
    there), a fit to the race. None beats every published solver on both mixtures at 5-35 NFE. Over eleven mixtures x 5/10/20/35 NFE (benchmarks/samplers.py --robustness), the
    error relative to the best published solver of each cell: geometric mean 1.030 and worst 1.51 (order 3), 0.953
    and 4.14 (order 4); DEIS tAB3, the best published single solver there, 1.067 and 1.70 (lower_order_final=False;
    1.262 and 2.65 with it)."""
    cond = check_inputs(x, sigmas, cond)
    if order not in (1, 2, 3, 4):
        raise ValueError(f'eps_abm order must be 1, 2, 3 or 4, got {order!r}')
    n = len(sigmas) - 1
    hist = []                                                # (eps, lambda), newest first
    last = None                                              # (x, sigma, lambda, points) of the previous step
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        lam = -math.log(sigma)
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigmas, x, x0_hat)
        eps = (x - x0_hat) / sigma
        x_pred = x
        if last is not None:                                 # corrector: order + 1 points, the new one at u = h
            x_prev, sigma_prev, lam_prev, q = last
            pts = [(eps, lam)] + hist[:q - 1]
            w = _eps_weights([l - lam_prev for _, l in pts], lam - lam_prev)
            x_corr = x_prev - sigma_prev * sum(wj * e for wj, (e, _) in zip(w, pts))
            gamma = 1 / (1 + ((lam - lam_prev) / h_damp) ** 2)  # damped on large steps, -> 1 as h -> 0
            x = x_pred + gamma * (x_corr - x_pred)
        hist = [(eps, lam)] + hist[:order]
        if sigma_next == 0:
            x = x0_hat + (x - x_pred) if final_correction else x0_hat       # final denoising step (see docstring)
            break
        p = min(order, len(hist), n - i)
        last = (x, sigma, lam, min(order + 1, len(hist) + 1))
        h = math.log(sigma / sigma_next)
        w = _eps_weights([l - lam for _, l in hist[:p]], h)
        x = x - sigma * sum(wj * e for wj, (e, _) in zip(w, hist[:p]))
    return x


# ----------------------------------------------------------------------------------------------------
# The registry, the options each sampler takes, and when it draws noise.

SAMPLERS = {
    'ddpm': sample_ddpm,
    'ddim': sample_ddim,
    'euler': sample_euler,
    'heun': sample_heun,
    'euler_ancestral': sample_euler_ancestral,
    'dpmpp_2m': sample_dpmpp_2m,
    'dpmpp_2m_sde': sample_dpmpp_2m_sde,
    'dpmpp_3m': sample_dpmpp_3m,
    'dpmpp_3m_corrected': sample_dpmpp_3m_corrected,
    'pc': sample_pc,
    'ipndm': sample_ipndm,
    'deis_tab': sample_deis_tab,
    'unipc_bh1': sample_unipc_bh1,
    'unipc_bh2': sample_unipc_bh2,
    'eps_abm': sample_eps_abm,
}

# Keywords every sampler takes: they are not solver options.
_COMMON = ('cond', 'callback', 'progress', 'generator')


def _sampler(name):
    if name not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}')
    return SAMPLERS[name]


def sampler_options(name):
    """The solver's own keyword options and their defaults, read from its signature, e.g.
    sampler_options('heun') -> {'S_churn': 0.0, 'S_tmin': 0.0, 'S_tmax': inf, 'S_noise': 1.0}."""
    params = inspect.signature(_sampler(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY and p.name not in _COMMON}


def is_stochastic(name, options=None):
    """Whether sampler `name` with these options draws fresh noise (and so wants generator=). Samplers without a
    generator argument never do; DDIM, ancestral Euler and SDE-DPM-Solver++ only with eta > 0 (and s_noise > 0),
    Heun only with churn; DDPM and PC always. An option the sampler does not take is a TypeError naming it."""
    defaults = sampler_options(name)
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise TypeError(f'sampler {name!r} got unknown option(s) {unknown}; its options are {sorted(defaults)}')
    o = {**defaults, **(options or {})}
    if 'generator' not in inspect.signature(SAMPLERS[name]).parameters:
        return False
    if 'S_churn' in o:
        return o['S_churn'] > 0 and o['S_noise'] != 0
    if 'eta' in o:
        return o['eta'] > 0 and o.get('s_noise', 1.0) != 0
    return True


def steps_for_nfe(name, nfe):
    """The number of sigmas (before the final 0) that makes a sampler use about `nfe` denoiser evaluations. Most
    samplers evaluate once per step; Heun twice except on the last step, PC 1 + n_corrector (here 1)."""
    if name == 'heun':
        return (nfe + 1) // 2 + (1 if nfe % 2 == 0 else 0) if nfe > 1 else 1    # 2(n-1) + 1 evaluations
    if name == 'pc':
        return max(nfe // 2 + 1, 1)                                          # 2(n-1) + 1 with one corrector step
    return nfe


if __name__ == '__main__':
    # Demo: sample a 1-D Gaussian N(mu, s^2) with its exact denoiser; every sampler should give mean ~mu, std ~s.
    mu, s = 1.5, 0.5
    denoiser = lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma[:, None] ** 2) * (x - mu)
    sigmas = karras_sigmas(30, 0.002, 80.0)
    g = torch.Generator().manual_seed(0)
    x_T = sigmas[0] * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    print(f'target: mean {mu}, std {s};  {len(sigmas) - 1} steps on the Karras schedule')
    for name, fn in SAMPLERS.items():
        kwargs = {'generator': torch.Generator().manual_seed(1)} if is_stochastic(name) else {}
        out = fn(denoiser, x_T.clone(), sigmas.double(), **kwargs)
        print(f'{name:>18}: mean {out.mean():.4f}, std {out.std():.4f}')
