"""
Inverse problems with an unconditional diffusion model: recover x0 from a measurement y = A x0 + s_y * n.

No retraining: every method below is a sampler loop over the same denoiser D(x, sigma) ~ E[x0 | x] (the sigma frame
x = x0 + sigma * noise of ../shared/DESIGN.md) that also looks at y. What they all approximate is the posterior score

    grad_x log p_sigma(x | y) = grad_x log p_sigma(x) + grad_x log p_sigma(y | x)                       (Bayes)

or, as a denoiser, E[x0 | x, y]. The first term is the model's; the second is intractable, and the methods differ in
how they stand in for it:
  replacement  Song et al. 2021, Score SDE (arXiv:2011.13456, Sec. 5 and App. I.2, imputation): after each reverse
               step, overwrite the measured part of x with a noised measurement y_sigma = y + sigma A z.
  ilvr         Choi et al. 2021 (arXiv:2108.02938, Alg. 1): x <- phi(ref_sigma) + (I - phi) x with the low-pass
               phi = A^+ A and ref_sigma = A^+ y + sigma z, applied only while sigma >= sigma_stop.
  pocs         measurement consistency on the denoised estimate, x0_hat <- x0_hat + A^+ (y - A x0_hat): the projection
               onto the convex set {A x = y} (as in CCDF and DDNM, Wang et al. 2023, arXiv:2212.00490).
  ccdf         Chung, Sim & Ye 2022, come-closer-diffuse-faster (arXiv:2112.05146): forward-diffuse an initial guess
               (A^+ y) to a small sigma_start, then run the replacement loop from there: fewer steps for the same error.
  mcg          Chung et al. 2022, manifold constrained gradient (arXiv:2206.00941, Sec. 3): a reverse step, a step
               along -grad_x ||y - A x0_hat(x)||, then the replacement projection.
  reconstruction_guidance  Ho et al. 2022, Video Diffusion Models (arXiv:2204.03458, Eq. 7-8):
               x0_tilde = x0_hat - (w_r / 2) grad_x ||y - A x0_hat(x)||^2, a guided denoiser for any sampler;
               reconstruction_guidance_tweedie is our variant with a noise-level-dependent weight.
  dps          Chung et al. 2023, diffusion posterior sampling (arXiv:2209.14687, Alg. 1): the gradient step of MCG
               without the projection, so it tolerates noisy y.

For a linear A these need four things of the operator: the forward map A x, its adjoint A^T y, the pseudo-inverse
A^+ = A^T (A A^T)^-1, and the projection onto the consistent set, P_y(x) = x + A^+ (y - A x). The two operators here
have A A^T = gram * I on the measured entries (gram = 1 for a mask, 1/k^2 for k x k average pooling), so A^+ is
cheap: the mask itself, or nearest-neighbour upsampling. With a Gaussian prior N(mu, S) the true posterior is
Gaussian (e.g. Bishop 2006, Eq. 2.116-2.117, written with the Kalman gain):

    mean = mu + S A^T (A S A^T + s_y^2 I)^-1 (y - A mu),      cov = S - S A^T (A S A^T + s_y^2 I)^-1 A S

(`gaussian_posterior`), which is how tests/test_inverse.py and benchmarks/inverse.py measure each method's error.

Conventions: x is (N, C, H, W) or flat (N, D) (inpainting only); sigmas descending, ending in 0; x on entry is unit
noise times sigmas[0]; the measurement y has the shape of operator.forward(x). Usage:
    op = make_operator('sr', (1, 28, 28), factor=4);  y = op.measure(x0)
    x = INVERSE_METHODS['dps'](denoiser, sigmas[0] * torch.randn_like(x0), sigmas, op, y, generator=g)
"""
import math

import torch
import torch.nn.functional as F

from samplers import SAMPLERS, ancestral_step, check_inputs, is_stochastic


def append_dims(v, ndim):
    """Reshape a (N,) tensor to (N, 1, ..., 1) so it broadcasts against a tensor with `ndim` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _report(callback, i, sigmas, x, denoised):
    """callback(info) once per step, as the samplers do: x is the state at the start of step i, denoised = D(x)."""
    if callback is not None:
        callback({'i': i, 'sigma': sigmas[i], 'sigma_next': sigmas[i + 1], 'x': x, 'denoised': denoised})


def _randn_like(x, generator):
    device = 'cpu' if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


# ----------------------------------------------------------------------------------------------------
# Measurement operators. Each is linear, y = A x (+ noise_std * n), with the adjoint, pseudo-inverse and projection.

class Operator:
    """Shared parts; subclasses define forward (A x), adjoint (A^T y) and gram (A A^T = gram * I where measured)."""
    noise_std = 0.0
    gram = 1.0

    def pinv(self, y):
        """A^+ y = A^T (A A^T)^-1 y: the minimum-norm signal that explains y (so A pinv(y) = y)."""
        return self.adjoint(y) / self.gram

    def project(self, x, y):
        """The closest x' to x with A x' = y: x + A^+ (y - A x). Idempotent, and the identity on consistent x."""
        return x + self.pinv(y - self.forward(x))

    def measure(self, x0, generator=None):
        """A noisy measurement y = A x0 + noise_std * n, the noise living only where A measures."""
        y = self.forward(x0)
        if self.noise_std > 0:
            y = y + self.noise_std * self.forward_noise(_randn_like(y, generator))
        return y

    def forward_noise(self, n):
        return n

    def matrix(self, shape, dtype=torch.float64):
        """A as a dense (M, D) matrix on flattened samples of `shape` (for closed forms on small problems)."""
        D = math.prod(shape)
        basis = torch.eye(D, dtype=dtype).reshape(D, *shape)
        return self.forward(basis).reshape(D, -1).T


class Inpaint(Operator):
    """Keep the pixels where mask = 1. A = diag(mask) written in the shape of x, so y has x's shape with zeros in the
    holes; A is then an orthogonal projection: A^T = A = A^+ and A A^T = A (gram 1 on the kept pixels)."""

    def __init__(self, mask, noise_std=0.0):
        self.mask = mask                      # (1, ...) 0/1, broadcast over the batch (and channels if size 1)
        self.noise_std = noise_std            # std of the Gaussian measurement noise (0 = exact measurements)

    def forward(self, x):
        return x * self.mask.to(x)

    def adjoint(self, y):
        return y * self.mask.to(y)

    def forward_noise(self, n):
        return n * self.mask.to(n)            # no measurement, so no noise, in the holes

    def project(self, x, y):
        m = self.mask.to(x)
        return x * (1 - m) + y * m            # the general formula, written out: replace the measured pixels


class AvgPoolSR(Operator):
    """Super-resolution from k x k average pooling. Each low-res pixel averages k^2 pixels, so A A^T = I / k^2 and
    A^+ = k^2 A^T is nearest-neighbour upsampling: A^+ A is the 'low-pass filter' phi of ILVR."""

    def __init__(self, factor=4, noise_std=0.0):
        self.factor = factor                  # k: downsampling factor per side (H and W must be divisible by it)
        self.noise_std = noise_std            # std of the noise added to each low-resolution pixel
        self.gram = 1.0 / factor ** 2

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)                                   # (N, C, H/k, W/k)

    def adjoint(self, y):
        up = y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)
        return up / self.factor ** 2                                          # A^T spreads y_j / k^2 over its block

    def pinv(self, y):
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)


def make_operator(name, shape, generator=None, noise_std=0.0, p=0.5, box=0.5, factor=4):
    """Build an operator by name for samples of `shape` ((C, H, W), or (D,) for inpainting).

    'inpaint_random': drop a fraction p of the pixels at random (the same pixels in every channel);
    'inpaint_box':    drop a centred square covering a fraction `box` of each side;
    'sr':             average-pool by `factor` (super-resolution)."""
    if name == 'sr':
        if len(shape) != 3 or shape[-1] % factor or shape[-2] % factor:
            raise ValueError(f'sr needs (C, H, W) with H, W divisible by factor={factor}, got {tuple(shape)}')
        return AvgPoolSR(factor, noise_std)
    spatial = tuple(shape[-2:]) if len(shape) == 3 else tuple(shape)
    if name == 'inpaint_random':
        keep = (torch.rand(spatial, generator=generator) >= p).double()
    elif name == 'inpaint_box':
        if len(spatial) != 2:
            raise ValueError('inpaint_box needs image shapes (C, H, W)')
        (H, W), keep = spatial, torch.ones(spatial, dtype=torch.float64)
        h, w = round(H * box), round(W * box)
        keep[(H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w] = 0
    else:
        raise ValueError(f"unknown operator {name!r}; choose 'inpaint_random', 'inpaint_box' or 'sr'")
    return Inpaint(keep.reshape((1,) * (len(shape) + 1 - len(spatial)) + spatial), noise_std)


def gaussian_posterior(mean, cov, A, y, noise_std=0.0):
    """The exact posterior of x ~ N(mean, cov) given y = A x + noise_std * n (module docstring), as (mean, cov).
    A: (M, D); y: (M,). Rows of A that are all zero (unmeasured pixels of a mask) carry no information: dropped, so
    the noise-free case stays invertible."""
    keep = A.abs().sum(1) > 0
    A, y = A[keep], y.reshape(-1)[keep]
    S_At = cov @ A.T                                                           # (D, M)
    K = torch.linalg.solve(A @ S_At + noise_std ** 2 * torch.eye(len(y), dtype=cov.dtype), S_At.T).T   # gain (D, M)
    post_cov = cov - K @ S_At.T
    return mean + K @ (y - A @ mean), 0.5 * (post_cov + post_cov.T)           # symmetrised against round-off


# ----------------------------------------------------------------------------------------------------
# Building blocks shared by the loops: one reverse step, the noised measurement, and the measurement gradient.

def _reverse_step(x, x0_hat, sigma, sigma_next, eta, generator):
    """Euler step to sigma_down, then fresh noise of std sigma_up (samplers.ancestral_step): with eta = 1 this is
    DDPM's posterior q(x_next | x, x0 = x0_hat); with eta = 0 it is DDIM."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x_next = x0_hat + (sigma_down / sigma) * (x - x0_hat)                      # x + (sigma_down - sigma) d
    if sigma_up > 0:
        x_next = x_next + sigma_up * _randn_like(x, generator)
    return x_next


def _noised_measurement(operator, y, sigma, x, generator):
    """A sample of A x_sigma given A x0 = y: y + sigma A z. This is what the measured part of a sample at noise level
    sigma should look like (Score SDE App. I.2); at sigma = 0 it is y itself, so the final projection is exact."""
    if sigma == 0:
        return y
    return y + sigma * operator.forward(_randn_like(x, generator))


def _measurement_gradient(denoiser, x, sigma, operator, y, cond, squared):
    """x0_hat = D(x, sigma), the residual norm ||y - A x0_hat|| (N,), and the gradient with respect to x of
    ||y - A x0_hat(x)||^2 (squared=True) or of ||y - A x0_hat(x)|| (N, ...). The gradient flows back through the
    network: this is what the samplers' no_grad must not stop, hence enable_grad. Samples are independent, so the
    gradient of the batch sum is each sample's own gradient."""
    sigma = sigma if torch.is_tensor(sigma) else x.new_full((x.shape[0],), float(sigma))      # (N,)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        x0_hat = denoiser(x_in, sigma, **cond)
        norm = (y - operator.forward(x0_hat)).flatten(1).norm(dim=1)          # (N,)
        loss = (norm ** 2 if squared else norm).sum()
        grad, = torch.autograd.grad(loss, x_in)
    return x0_hat.detach(), norm.detach(), grad


def _vp_scale(sigma, sigma_next):
    """DPS and MCG take their gradient step in DDPM's frame x_t = x / sqrt(1 + sigma^2): the gradient with respect to
    x_t is sqrt(1 + sigma^2) grad_x, and the step lands in x_{t-1} = x_next / sqrt(1 + sigma_next^2). Converting
    both keeps the papers' step sizes: a step zeta in their frame is zeta * this factor here."""
    return math.sqrt((1 + sigma ** 2) * (1 + sigma_next ** 2))


# ----------------------------------------------------------------------------------------------------
# Projection methods: the unconditional step, then force consistency with (a noised version of) y.

@torch.no_grad()
def sample_replacement(denoiser, x, sigmas, operator, y, *, eta=1.0, generator=None, cond=None, callback=None):
    """Score SDE imputation: a reverse step (eta = 1: DDPM's ancestral step), then replace the measured part by a
    fresh noised measurement, x <- P_{y_next}(x) with y_next = y + sigma_next A z. Not an exact posterior sampler:
    the unmeasured part is conditioned on a *fresh* noisy copy of y at each step, never on y itself, so it is pulled
    towards the measurement less than the posterior would (tests/test_inverse.py shows the bias)."""
    cond = check_inputs(x, sigmas, cond)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = denoiser(x, x.new_full((x.shape[0],), sigma), **cond)
        _report(callback, i, sigmas, x, x0_hat)
        x = _reverse_step(x, x0_hat, sigma, sigma_next, eta, generator)
        x = operator.project(x, _noised_measurement(operator, y, sigma_next, x, generator))
    return x


@torch.no_grad()
def sample_ilvr(denoiser, x, sigmas, operator, y, *, sigma_stop=0.0, eta=1.0, generator=None, cond=None, callback=None):
    """ILVR (Choi et al. 2021, Alg. 1): x <- phi(ref_next) + (I - phi) x after each DDPM step, with phi = A^+ A
    (for average pooling: down- then up-sampling, the paper's phi_N) and ref_next = A^+ y + sigma_next z, the
    reference image diffused by q. Since phi A^+ = A^+, this equals replacement step for step (the test checks it
    with a shared generator). What ILVR adds is the range: refining only while sigma >= sigma_stop leaves the fine
    scales to the model, trading fidelity to y for realism (the paper's conditioning-range experiments)."""
    cond = check_inputs(x, sigmas, cond)
    ref = operator.pinv(y)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = denoiser(x, x.new_full((x.shape[0],), sigma), **cond)
        _report(callback, i, sigmas, x, x0_hat)
        x = _reverse_step(x, x0_hat, sigma, sigma_next, eta, generator)
        if sigma_next >= sigma_stop:
            ref_next = ref + sigma_next * _randn_like(x, generator) if sigma_next > 0 else ref
            x = x + operator.pinv(operator.forward(ref_next - x))            # x + phi(ref_next - x)
    return x


@torch.no_grad()
def sample_pocs(denoiser, x, sigmas, operator, y, *, step=1.0, eta=1.0, generator=None, cond=None, callback=None):
    """Measurement consistency on the denoised estimate: x0_c = x0_hat + step A^+ (y - A x0_hat) (step = 1: the
    projection onto {A x = y}, a convex set, hence 'POCS'; DDNM's range-null decomposition A^+ y + (I - A^+ A) x0_hat),
    then DDPM's posterior step q(x_next | x, x0 = x0_c). Unlike replacement it never adds noise to y; a step < 1
    relaxes the projection when y is noisy."""
    cond = check_inputs(x, sigmas, cond)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat = denoiser(x, x.new_full((x.shape[0],), sigma), **cond)
        _report(callback, i, sigmas, x, x0_hat)
        x0_c = x0_hat + step * operator.pinv(y - operator.forward(x0_hat))
        x = _reverse_step(x, x0_c, sigma, sigma_next, eta, generator)
    return x


@torch.no_grad()
def sample_ccdf(denoiser, x, sigmas, operator, y, *, init=None, eta=1.0, generator=None, cond=None, callback=None):
    """Come-closer-diffuse-faster (Chung, Sim & Ye 2022): a good initial guess x0_init (default A^+ y) diffused
    forward to sigmas[0] is already close to the reverse trajectory, so the reverse process can start at a small
    sigma_start = sigmas[0] instead of sigma_max, and take far fewer steps (pass e.g. karras_sigmas(n, 0.002, 2.0)). The loop is
    replacement's. x on entry is unit noise times sigmas[0] as for every sampler, so x_start = x0_init + x."""
    x0_init = operator.pinv(y) if init is None else init
    return sample_replacement(denoiser, x0_init + x, sigmas, operator, y, eta=eta, generator=generator, cond=cond,
                              callback=callback)


# ----------------------------------------------------------------------------------------------------
# Gradient methods: differentiate the measurement error of x0_hat(x) through the denoiser.

@torch.no_grad()
def sample_mcg(denoiser, x, sigmas, operator, y, *, zeta=0.5, eta=1.0, generator=None, cond=None, callback=None):
    """MCG (Chung et al. 2022): x' = reverse step, x'' = x' - zeta_i grad_x ||y - A x0_hat(x)||, then the
    replacement projection x = P_{y_next}(x''). The gradient through the denoiser moves the unmeasured part along
    the data manifold to agree with y, which plain replacement cannot do. The step is normalised by the residual
    norm as in DPS below (zeta times the gradient of ||y - A x0_hat||) and taken in DDPM's frame."""
    cond = check_inputs(x, sigmas, cond)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat, _, grad = _measurement_gradient(denoiser, x, sigma, operator, y, cond, squared=False)
        _report(callback, i, sigmas, x, x0_hat)
        x_next = _reverse_step(x, x0_hat, sigma, sigma_next, eta, generator)
        x_next = x_next - zeta * _vp_scale(sigma, sigma_next) * grad
        x = operator.project(x_next, _noised_measurement(operator, y, sigma_next, x, generator))
    return x


@torch.no_grad()
def sample_dps(denoiser, x, sigmas, operator, y, *, zeta=0.5, eta=1.0, generator=None, cond=None, callback=None):
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1): p(y | x) ~ p(y | x0 = x0_hat(x)), so
    grad log p(y | x) ~ -grad_x ||y - A x0_hat||^2 / (2 s_y^2). After each DDPM step, x -= zeta grad_x ||y - A x0_hat||,
    which is Alg. 1's zeta_i grad ||y - A x0_hat||^2 with zeta_i = zeta' / ||y - A x0_hat|| and zeta' = zeta / 2 (the
    form of the authors' code). No projection, so measurement noise is not fitted; the price is that y is met only
    approximately, and the step size zeta must be tuned per problem: the normalised step has the same size in any
    dimension, and 0.5 is best on the 16-d Gaussian problems of tests/test_inverse.py but ~4 for 4x SR of 32 x 32
    images (benchmarks/inverse.py). The last step lands on x0_hat plus the final gradient step."""
    cond = check_inputs(x, sigmas, cond)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0_hat, _, grad = _measurement_gradient(denoiser, x, sigma, operator, y, cond, squared=False)
        _report(callback, i, sigmas, x, x0_hat)
        x = _reverse_step(x, x0_hat, sigma, sigma_next, eta, generator)
        x = x - zeta * _vp_scale(sigma, sigma_next) * grad
    return x


def reconstruction_guided(denoiser, operator, y, w_r=1.0, weighting='ho', sigma_data=0.5, cond=None):
    """Reconstruction guidance as a guided denoiser, usable with any sampler:
        D_y(x) = x0_hat - (w / 2) grad_x ||y - A x0_hat(x)||^2,        over all of x.

    weighting='ho' (the default) is Ho et al. 2022's method: Eq. 7 approximates q(x^a | z_t) by
    N(x0_hat^a, sigma_t^2 / alpha_t^2 I) and gets x0_tilde = x0_hat - (w_r alpha_t / 2) grad_{z_t} ||x^a - x0_hat^a||^2,
    with w_r = 1 from the approximation and w_r > 1 found to sample better. Here z_t = alpha_t x, so
    alpha_t grad_{z_t} = grad_x and w = w_r exactly. The gradient covers all of x as in their Eq. 8 (the form they give
    for spatial super-resolution, where x^a is a downsampled x); for a mask, Eq. 7 would differentiate with respect
    to the unobserved x^b only (this version also moves the observed pixels of x0_hat towards y).

    weighting='tweedie' is ours (not in the paper): w = w_r sigma^2 / (r^2 gram + s_y^2) with
    r^2 = sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2), the weight that makes
    D_y = x0_hat + sigma^2 grad log N(y; A x0_hat, (r^2 A A^T + s_y^2) I), i.e. Tweedie's formula for the posterior
    with x0 | x taken as N(x0_hat, r^2 I) and the measurement noise s_y included. It grows like sigma^2 where Ho's
    stays flat, and near sigma = 0 (with s_y = 0) it moves x0_hat onto A x = y, as a projection would. On the
    Gaussian problems of tests/test_inverse.py it is 4-7x closer to the posterior mean than Ho's weighting at w_r = 1."""
    if weighting not in ('ho', 'tweedie'):
        raise ValueError(f"weighting must be 'ho' (Ho et al. 2022, Eq. 7) or 'tweedie' (ours), got {weighting!r}")
    cond = cond or {}

    def guided(x, sigma, **unused):
        x0_hat, _, grad = _measurement_gradient(denoiser, x, sigma, operator, y, cond, squared=True)
        if weighting == 'ho':
            w = torch.full_like(sigma, w_r)
        else:
            r2 = sigma ** 2 * sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
            w = w_r * sigma ** 2 / (r2 * operator.gram + operator.noise_std ** 2)
        return x0_hat - append_dims(w, x.ndim) / 2 * grad

    return guided


def sample_reconstruction_guidance(denoiser, x, sigmas, operator, y, *, w_r=1.0, weighting='ho', sigma_data=0.5,
                                   sampler='euler_ancestral', sampler_options=None, generator=None, cond=None,
                                   callback=None):
    """Sample with the reconstruction-guided denoiser (Ho et al. 2022 by default; see reconstruction_guided) and any
    sampler of samplers.py (default: ancestral Euler, which with eta = 1 is DDPM's step, like the other methods
    here). sampler_options is a dict of that sampler's own options; generator goes to it when it draws noise."""
    cond = check_inputs(x, sigmas, cond)
    options = dict(sampler_options or {})
    if is_stochastic(sampler, options):
        options['generator'] = generator
    guided = reconstruction_guided(denoiser, operator, y, w_r, weighting, sigma_data, cond)
    return SAMPLERS[sampler](guided, x, sigmas, callback=callback, **options)


def sample_reconstruction_guidance_tweedie(denoiser, x, sigmas, operator, y, *, w_r=1.0, sigma_data=0.5,
                                           sampler='euler_ancestral', sampler_options=None, generator=None, cond=None,
                                           callback=None):
    """Ours: reconstruction guidance with weighting='tweedie' (see reconstruction_guided); sigma_data is the data's
    standard deviation (0.5 as in EDM for images in [-1, 1])."""
    return sample_reconstruction_guidance(denoiser, x, sigmas, operator, y, w_r=w_r, weighting='tweedie',
                                          sigma_data=sigma_data, sampler=sampler, sampler_options=sampler_options,
                                          generator=generator, cond=cond, callback=callback)


INVERSE_METHODS = {
    'replacement': sample_replacement,
    'pocs': sample_pocs,
    'ilvr': sample_ilvr,
    'ccdf': sample_ccdf,
    'mcg': sample_mcg,
    'reconstruction_guidance': sample_reconstruction_guidance,
    'reconstruction_guidance_tweedie': sample_reconstruction_guidance_tweedie,
    'dps': sample_dps,
}

# Methods that end with a projection onto A x = y: their output meets a noise-free measurement exactly.
CONSISTENT = ('replacement', 'pocs', 'ilvr', 'ccdf', 'mcg')


if __name__ == '__main__':
    # Demo: a correlated Gaussian prior on 4 x 4 images (exact denoiser from diffusion.py), half the pixels observed.
    # Each method's sample mean and covariance are compared with the closed-form posterior; 'oracle' samples the
    # posterior itself with the same ancestral steps, so its errors are the floor (Monte Carlo + step bias).
    from diffusion import GaussianMixture
    from samplers import karras_sigmas
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing='ij'), -1).reshape(16, 2)
    S = 0.25 * torch.exp(-torch.cdist(grid, grid).double() ** 2 / 2) + 0.01 * torch.eye(16, dtype=torch.float64)
    prior = GaussianMixture(torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)[None], S[None])
    x_true = prior.sample(1, generator=g)[0].reshape(1, 1, 4, 4)
    op = make_operator('inpaint_random', (1, 4, 4), generator=g, p=0.5)
    y = op.measure(x_true)
    m_post, C_post = gaussian_posterior(prior.mean(), prior.cov(), op.matrix((1, 4, 4)), y)
    n, steps = 2000, 64
    print(f'{int(op.mask.sum())} of 16 pixels observed; {n} samples per method, {steps} steps; errors relative to the '
          f'posterior (0 = exact)')
    methods = {'oracle': lambda D, x, s, op, y, generator: SAMPLERS['ddpm'](
        GaussianMixture(m_post[None], C_post[None]), x, s, generator=generator), **INVERSE_METHODS}
    for name, fn in methods.items():
        s = karras_sigmas(steps, 0.002, 1.0 if name == 'ccdf' else 20.0).double()   # CCDF starts close to the data
        x = s[0] * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
        out = fn(prior, x, s, op, y.expand(n, -1, -1, -1), generator=g)
        flat = out.reshape(n, 16)
        mean_err = ((flat.mean(0) - m_post).norm() / C_post.trace().sqrt()).item()
        cov_err = ((flat.T.cov() - C_post).norm() / C_post.norm()).item()
        consistency = (op.forward(out) - y).abs().max().item()
        print(f'{name:>24}: mean error {mean_err:.3f}, cov error {cov_err:.3f}, max |A x - y| {consistency:.1e}')
