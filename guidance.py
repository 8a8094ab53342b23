"""
Guidance: turn a denoiser into another denoiser that follows its condition more strongly.

Every method here wraps a denoiser D(x, sigma, **cond) ~ E[x0 | x] in the sigma frame x = x0 + sigma * noise
and returns a denoiser with the same signature, so it works with every sampler and every model. With Tweedie's
formula the score is grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2, which is how each method is derived.

Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", arXiv:2105.05233, Alg. 1-2): add the
gradient of a classifier p_phi(y | x, sigma) trained on noisy inputs, with a scale s:
    score_s = grad log p(x) + s grad log p(y | x)   =>   D_s = D + s sigma^2 grad_x log p_phi(y | x, sigma)
With the exact noisy classifier and s = 1 this is exactly the class-conditional denoiser (Bayes' rule).

Classifier-free guidance (Ho & Salimans 2021, arXiv:2207.12598, Eq. 6): one network trained with the label
dropped to a "no class" token (probability p_uncond = 0.1, in train.py) is both D(x|y) and D(x), and
    eps_tilde = (1 + w_HS) eps(x, y) - w_HS eps(x)                       (Ho & Salimans' weight w_HS, 0 = none)
This file uses the other common convention (Imagen, EDM2, Karras et al. 2024): w = 1 + w_HS, so w = 1 is
no guidance, w = 0 is the unconditional model, and
    D_w = D(x|y) + (w - 1) (D(x|y) - D(x))  =  w D(x|y) + (1 - w) D(x).
Because x0 = x - sigma eps and score = (x0 - x) / sigma^2 are affine in the model output at fixed (x, sigma),
the same combination in eps, v, x0 or score space gives the same sampler update. In score space
    score_w = (1 - w) grad log p_sigma(x) + w grad log p_sigma(x|y) = grad log p_sigma(x) + w grad log p_sigma(y|x):
CFG is classifier guidance with the implicit classifier p(y|x) = p(x|y) p(y) / p(x). (It is not the noised
version of the tilted data density p(x)^(1-w) p(x|y)^w, so guided samples follow that density only roughly.)

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv:2406.02507,
Eq. 1) uses the same formula with the unconditional model replaced by a smaller or less trained version
D_0 of the same model:  D_w = w D_1 + (1 - w) D_0.
Guidance schedules make w depend on the noise level: linearly increasing (Chang et al. 2023, Muse,
arXiv:2301.00704), oscillating between high and low after some high steps (Ho et al. 2022, Imagen Video,
arXiv:2210.02303), and an interval (sigma_lo, sigma_hi] outside which w = 1 (Kynkaanniemi et al. 2024,
arXiv:2404.07724). Thresholding (Saharia et al. 2022, Imagen, arXiv:2205.11487, Sec. 2.3) clips x0_hat to
the data range; dynamic thresholding uses the per-sample percentile s of |x0_hat|. Classifier-based rejection
sampling (Razavi et al. 2019, VQ-VAE-2, arXiv:1906.00446, Sec. 3.3) keeps samples a clean-data classifier agrees with.

Conventions: x is (N, ...) (images in [-1, 1]), sigma is (N,), y is (N,) class indices and index `null_class`
(num_classes in DESIGN.md) means "no class". Usage:
    D = Thresholded(ClassifierFreeGuidance(model_denoiser, w=4.0, null_class=1000))
    x = SAMPLERS['heun'](D, sigmas[0] * torch.randn(shape), sigmas, cond={'y': labels})
"""
import math

import numpy as np
import torch


def append_dims(v, ndim):
    """Reshape a (N,) tensor to (N, 1, ..., 1) so it broadcasts against a tensor with `ndim` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _as_sigma(sigma, x):
    """Accept a float or a (N,) tensor; return a (N,) tensor of x's dtype on x's device."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _weight(w, sigma):
    """A guidance weight that is a number or a schedule (a callable of sigma), as a (N,) tensor like sigma."""
    w = w(sigma) if callable(w) else w
    return torch.as_tensor(w, dtype=sigma.dtype, device=sigma.device).expand(sigma.shape)


def guide(d_good, d_bad, w):
    """The one formula behind CFG and autoguidance: extrapolate from the worse estimate through the better one,
    D_w = d_bad + w (d_good - d_bad), written as d_good + (w - 1)(...) so that w = 1 returns d_good bit for bit."""
    return d_good + (w - 1) * (d_good - d_bad)


# ----------------------------------------------------------------------------------------------------
# Guidance schedules. A schedule is any callable sigma (N,) -> w (N,). Schedules defined over sampling *steps*
# are given the sampler's sigmas and locate the current sigma among them, so they also work for evaluations
# between grid points: Heun's second evaluation (at the next grid sigma) and the churned sigma_hat > sigma_i
# of stochastic samplers (Karras et al. 2022, Alg. 2 l.5).

def sampling_step(sigma, sigmas):
    """Fractional index of each sigma in the descending sampling grid `sigmas` (its final 0 ignored), by linear
    interpolation in log sigma; clamped to [0, n - 1], so sigma above sigmas[0] is step 0 and sigma = 0 the last."""
    grid = sigmas[sigmas > 0].detach().double().cpu().log().numpy()              # descending log sigmas
    log_sigma = sigma.detach().double().cpu().clamp(min=1e-30).log().numpy()
    # np.interp needs increasing abscissae: use -log sigma, which increases along the sampling steps
    index = np.interp(-log_sigma, -grid, np.arange(len(grid), dtype=np.float64))
    return torch.from_numpy(index).to(sigma.device)


class ConstantSchedule:
    """w(sigma) = w at every step: the schedule of the original CFG paper."""

    def __init__(self, w):
        self.w = w                                       # guidance weight (1 = none)

    def __call__(self, sigma):
        return torch.full_like(sigma, self.w)


class LinearSchedule:
    """Guidance weight growing linearly over the sampling steps, w_start at the first (noisiest) step and w_end
    at the last (Muse, Chang et al. 2023). Weak guidance early lets the coarse layout stay diverse;
    strong guidance late sharpens the details. Between grid sigmas the progress is interpolated in log sigma."""

    def __init__(self, sigmas, w_end, w_start=1.0):
        self.sigmas = sigmas                             # the sampler's descending noise levels (final 0 allowed)
        self.w_start = w_start                           # weight at the first step (1 = no guidance)
        self.w_end = w_end                               # weight at the last step
        self.num_steps = int((sigmas > 0).sum())

    def __call__(self, sigma):
        progress = sampling_step(sigma, self.sigmas) / max(self.num_steps - 1, 1)     # 0 at sigma_max, 1 at sigma_min
        return (self.w_start + (self.w_end - self.w_start) * progress).to(sigma.dtype)


class OscillatingSchedule:
    """Imagen Video's oscillating guidance (Ho et al. 2022): a constant high weight for the first
    `num_high` steps, then alternating low, high, low, ... The paper found this keeps the text alignment of a
    high weight while avoiding the saturation artifacts that a constant high weight causes at large resolutions.

    A step is identified by the smallest grid index i with sigma >= sigma_i, so a churned sigma_hat slightly
    above sigma_i still counts as step i. Heun's second evaluation at sigma_{i+1} gets step i+1's weight:
    a schedule in sigma cannot tell which step called it, and this keeps w a function of sigma alone."""

    def __init__(self, sigmas, w_high, w_low=1.0, num_high=0):
        self.sigmas = sigmas                             # the sampler's descending noise levels (final 0 allowed)
        self.w_high = w_high                             # the high weight
        self.w_low = w_low                               # the low weight of the oscillation (1 = no guidance)
        self.num_high = num_high                         # number of initial steps at w_high before oscillating

    def __call__(self, sigma):
        # ceil, with a tolerance for sigmas rounded to float32 on their way through the sampler
        step = torch.ceil(sampling_step(sigma, self.sigmas) - 1e-3).long()
        high = (step < self.num_high) | ((step - self.num_high) % 2 == 1)
        return torch.where(high, self.w_high, self.w_low).to(sigma.dtype)


class IntervalSchedule:
    """Guidance only in a limited interval of noise levels (Kynkaanniemi et al. 2024):
    w(sigma) = w for sigma_lo < sigma <= sigma_hi, else 1. At high noise guidance pulls all samples towards a few
    class templates and drops modes; at low noise it barely helps; the paper tunes the interval per model.
    Outside the interval a guided denoiser needs only the conditional evaluation, which saves compute."""

    def __init__(self, w, sigma_lo, sigma_hi):
        self.w = w                                       # guidance weight inside the interval
        self.sigma_lo = sigma_lo                         # lower end (exclusive)
        self.sigma_hi = sigma_hi                         # upper end (inclusive)

    def __call__(self, sigma):
        inside = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)
        return torch.where(inside, self.w, 1.0).to(sigma.dtype)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance: one batched call of the conditional network on [conditional; unconditional] inputs.

def _per_sample(v, n, device, like=None):
    """Bring a keyword value to per-sample form: numbers and 0-d tensors become (n,) tensors, and a tensor that
    lacks the batch dimension of `like` (say a null text context (L, C)) is expanded to like's shape."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = torch.tensor(v, device=device)
    if torch.is_tensor(v):
        if v.ndim == 0:
            return v.expand(n)
        if like is not None and torch.is_tensor(like) and v.shape == like.shape[1:]:
            return v.expand(like.shape)
    return v


class ClassifierFreeGuidance:
    """D_w = D(x|y) + (w - 1)(D(x|y) - D(x|null)), both halves from one call on a batch of 2N.

    The unconditional half uses the keywords in `uncond` (default: y = null_class) and shares every other keyword
    with the conditional half; tensors with a batch dimension are duplicated along it. w may be a number or a
    schedule of sigma. Where w = 1 for the whole batch (outside a guidance interval) only the conditional half runs.
    """

    def __init__(self, denoiser, w=1.0, null_class=None, uncond=None):
        self.denoiser = denoiser                         # conditional denoiser trained with label dropout
        self.w = w                                       # guidance weight, 1 = none (Ho & Salimans' w + 1), or a schedule
        if uncond is None:
            if null_class is None:
                raise ValueError('give null_class (the "no class" index, num_classes) or an uncond dict')
            uncond = {'y': null_class}
        self.uncond = uncond                             # keyword values of the unconditional branch

    def __call__(self, x, sigma, **cond):
        n = x.shape[0]
        sigma = _as_sigma(sigma, x)
        w = append_dims(_weight(self.w, sigma), x.ndim)                             # (N, 1, ..., 1)
        if bool((w == 1).all()):
            return self.denoiser(x, sigma, **cond)        # no guidance anywhere in this batch: skip the second half
        batched = lambda v: torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n
        both = {}
        for key in set(cond) | set(self.uncond):
            if key not in self.uncond:                    # shared by both halves: duplicate per-sample tensors
                both[key] = torch.cat([cond[key], cond[key]]) if batched(cond[key]) else cond[key]
                continue
            a = _per_sample(cond.get(key), n, x.device)
            b = _per_sample(self.uncond[key], n, x.device, like=a)
            if not (batched(a) and torch.is_tensor(b) and b.shape == a.shape):
                raise ValueError(f'cannot batch keyword {key!r} for the conditional and unconditional halves '
                                 f'(conditional value {a!r:.60}); pass it with a batch dimension of {n}')
            both[key] = torch.cat([a, b])                                            # (2N, ...)
        d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        d_cond, d_uncond = d.chunk(2)
        return guide(d_cond, d_uncond, w)


# ----------------------------------------------------------------------------------------------------
# Autoguidance: the same extrapolation, away from a worse version of the same conditional model.

class Autoguidance:
    """D_w = D_1 + (w - 1)(D_1 - D_0) with D_0 a smaller or shorter-trained version of D_1 (Karras et al. 2024).
    The bad model makes the same kind of errors as the good one, only more, so extrapolating away from it
    corrects errors of D_1 rather than only sharpening the class; the paper finds it keeps more diversity than
    CFG. (An exact D_1 has no error to correct, and then autoguidance only sharpens: benchmarks/guidance.py.) Both get
    the same condition (the paper also guides unconditional models this way). The two are different networks,
    so there is no batching trick: two calls. train.py can save the early checkpoint that serves as D_0."""

    def __init__(self, denoiser, bad_denoiser, w=2.0):
        self.denoiser = denoiser                         # the main model D_1
        self.bad_denoiser = bad_denoiser                 # its degraded version D_0
        self.w = w                                       # guidance weight (1 = none), or a schedule of sigma

    def __call__(self, x, sigma, **cond):
        sigma = _as_sigma(sigma, x)
        w = append_dims(_weight(self.w, sigma), x.ndim)
        d_good = self.denoiser(x, sigma, **cond)
        if bool((w == 1).all()):
            return d_good
        return guide(d_good, self.bad_denoiser(x, sigma, **cond), w)


# ----------------------------------------------------------------------------------------------------
# Classifier guidance: the gradient of a noisy-data classifier, in the sigma frame.

def classifier_gradient(log_prob_fn, x, sigma, y):
    """grad_x log p(y | x, sigma) (N, ...) for a classifier log_prob_fn(x, sigma) -> (N, num_classes) log-probs.
    Summing the selected log-probs over the batch gives every sample its own gradient, since sample i's
    log-prob depends only on x_i. Runs under enable_grad because samplers run under no_grad."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_p = log_prob_fn(x_in, sigma)                                              # (N, num_classes)
        selected = log_p.gather(1, y.reshape(-1, 1).to(log_p.device)).sum()
        return torch.autograd.grad(selected, x_in)[0].to(x.dtype)


class ClassifierGuidance:
    """D_s = D + s sigma^2 grad_x log p_phi(y | x, sigma): Dhariwal & Nichol's score shift (Alg. 1 uses
    mu + s Sigma grad log p_phi; Alg. 2 eps - sqrt(1 - abar) s grad log p_phi, the same in the eps frame).

    In the sigma frame x = x_t / s(t) the classifier sees the same information, and sigma^2 converts a score
    into a denoiser offset (D = x + sigma^2 score). With the exact classifier, scale s on the unconditional model
    equals CFG with w = s, and on the conditional model (pass_y=True) it equals CFG with w = 1 + s.
    A classifier trained on the unscaled x_t = s(t) x of a VP model is used through a wrapper,
    log_prob_fn = lambda x, sigma: clf(x * s(sigma), t(sigma)); autograd then gives the gradient in x."""

    def __init__(self, denoiser, log_prob_fn, scale=1.0, pass_y=False):
        self.denoiser = denoiser                         # unconditional (or, with pass_y, conditional) denoiser
        self.log_prob_fn = log_prob_fn                   # (x, sigma) -> (N, num_classes) log p(y | x, sigma)
        self.scale = scale                               # s: 0 = none, 1 = the Bayes conditional; or a schedule
        self.pass_y = pass_y                             # also give y to the denoiser (guiding a conditional model)

    def __call__(self, x, sigma, y, **cond):
        sigma = _as_sigma(sigma, x)
        y = torch.as_tensor(y, device=x.device).reshape(-1).expand(x.shape[0])
        d = self.denoiser(x, sigma, y=y, **cond) if self.pass_y else self.denoiser(x, sigma, **cond)
        scale = append_dims(_weight(self.scale, sigma), x.ndim)
        grad = classifier_gradient(self.log_prob_fn, x, sigma, y)
        return d + scale * append_dims(sigma, x.ndim) ** 2 * grad


# ----------------------------------------------------------------------------------------------------
# Thresholding of the x0 estimate (Imagen). Large guidance weights push x0_hat outside the data range; since
# samplers feed x0_hat back into x, the error compounds into saturated images. Clipping x0_hat to the range
# the model was trained on fixes this "train-test mismatch" (Saharia et al. 2022, Sec. 2.3).

def static_threshold(x0_hat, bound=1.0):
    """Clip every element to [-bound, bound]."""
    return x0_hat.clamp(-bound, bound)


def dynamic_threshold(x0_hat, percentile=0.995, bound=1.0):
    """s = the `percentile` quantile of |x0_hat| per sample, s = max(s, bound); clip to [-s, s] and rescale by
    bound / s. Saturated samples are pulled inwards as a whole instead of being flattened at the bound; samples
    already inside the range (s <= bound) are left untouched. Imagen used percentile 0.995 (Sec. 2.3)."""
    # the quantile with linear interpolation between order statistics (numpy's default), written out because
    # torch.quantile refuses inputs of more than 2^24 elements (a batch of 128 images of 3 x 256 x 256)
    flat = x0_hat.reshape(x0_hat.shape[0], -1).abs().sort(dim=1).values            # (N, M) ascending
    pos = percentile * (flat.shape[1] - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    s = flat[:, lo] if frac == 0 else (1 - frac) * flat[:, lo] + frac * flat[:, lo + 1]        # (N,)
    s = append_dims(s.clamp(min=bound), x0_hat.ndim)
    return x0_hat.clamp(-s, s) * (bound / s)


class Thresholded:
    """Wrap a (guided) denoiser so that its x0 estimate is thresholded. Apply it outside the guidance wrapper:
    thresholding is not linear, so it must act on the final x0_hat."""

    def __init__(self, denoiser, method='dynamic', percentile=0.995, bound=1.0):
        if method not in ('static', 'dynamic'):
            raise ValueError(f"method must be 'static' or 'dynamic', got {method!r}")
        self.denoiser = denoiser                         # the denoiser whose output is clipped
        self.method = method                             # 'static' (clip) or 'dynamic' (percentile clip and rescale)
        self.percentile = percentile                     # quantile of |x0_hat| for dynamic thresholding
        self.bound = bound                               # data range [-bound, bound]

    def __call__(self, x, sigma, **cond):
        x0_hat = self.denoiser(x, sigma, **cond)
        if self.method == 'static':
            return static_threshold(x0_hat, self.bound)
        return dynamic_threshold(x0_hat, self.percentile, self.bound)


# ----------------------------------------------------------------------------------------------------
# Rejection sampling by re-estimating the condition with a classifier of clean samples.

def rejection_sample(x, y, log_prob_fn, top_fraction=None):
    """Keep the samples x (N, ...) generated for classes y (N,) that a clean-data classifier
    log_prob_fn(x) -> (N, num_classes) agrees with. top_fraction=None keeps those whose predicted class is y;
    a number keeps, within each requested class, the ceil(top_fraction * n_class) samples with the highest
    p(y | x) (the VQ-VAE-2 recipe, which trades diversity for fidelity like guidance does).
    Returns (x[keep], y[keep], keep (N,) bool, acceptance rate)."""
    y = torch.as_tensor(y, device=x.device).reshape(-1).expand(x.shape[0])
    log_p = log_prob_fn(x)                                                            # (N, num_classes)
    if top_fraction is None:
        keep = log_p.argmax(1) == y
    else:
        score = log_p.gather(1, y[:, None]).squeeze(1)                                # log p(requested class | x)
        keep = torch.zeros_like(y, dtype=torch.bool)
        for c in y.unique():                                  # rank within each class to keep the classes balanced
            idx = (y == c).nonzero().squeeze(1)
            # ceil, so a class is never left with fewer than the fraction asked for (and a small class keeps one);
            # rounded first, since 0.07 * 100 is 7.000000000000001 in floating point and must keep 7, not 8
            k = math.ceil(round(top_fraction * len(idx), 9))
            keep[idx[score[idx].topk(k).indices]] = True
    return x[keep], y[keep], keep, keep.float().mean().item()


def sample_with_rejection(generate, log_prob_fn, n, top_fraction=None, max_rounds=100):
    """Call generate() -> (x, y) until n samples are accepted; return (x, y, overall acceptance rate).
    The cost of rejection sampling is 1 / acceptance rate generations per kept sample."""
    kept_x, kept_y, tried, accepted = [], [], 0, 0
    for _ in range(max_rounds):
        x, y = generate()
        x_keep, y_keep, _, _ = rejection_sample(x, y, log_prob_fn, top_fraction)
        kept_x.append(x_keep), kept_y.append(y_keep)
        tried, accepted = tried + x.shape[0], accepted + x_keep.shape[0]
        if accepted >= n:
            break
    else:
        raise RuntimeError(f'only {accepted} of {n} samples accepted after {max_rounds} rounds')
    return torch.cat(kept_x)[:n], torch.cat(kept_y)[:n], accepted / tried


if __name__ == '__main__':
    # Demo on two overlapping 2-D Gaussian classes N(mu_c, s^2 I), whose denoisers are known in closed form:
    # CFG with w = 1 is the conditional denoiser, classifier guidance with the exact classifier equals CFG, and
    # a larger w makes more samples land where the exact classifier agrees, at the cost of a narrower spread.
    torch.manual_seed(0)
    mu, s, null = torch.tensor([[-0.5, 0.0], [0.5, 0.0]], dtype=torch.float64), 0.4, 2

    def log_joint(x, sigma):                          # log p(x_sigma, c) + const, (N, 2): equal class priors
        var = s ** 2 + sigma[:, None] ** 2
        return -((x[:, None, :] - mu) ** 2).sum(-1) / (2 * var)

    def toy(x, sigma, y):                             # exact E[x0 | x, y]; y == null averages over the classes
        shrink = (s ** 2 / (s ** 2 + sigma ** 2))[:, None, None]
        per_class = mu + shrink * (x[:, None, :] - mu)                               # (N, 2, D)
        resp = log_joint(x, sigma).softmax(1)
        resp = torch.where((y == null)[:, None], resp, torch.nn.functional.one_hot(y.clamp(max=1), 2).double())
        return (resp[:, :, None] * per_class).sum(1)

    x, sigma, y = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 0.7, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    d_cond, d_uncond = toy(x, sigma, y), toy(x, sigma, torch.full_like(y, null))
    print(f'|CFG(w=1) - D(x|y)| = {(ClassifierFreeGuidance(toy, 1.0, null)(x, sigma, y=y) - d_cond).abs().max():.1e}')
    print(f'|CFG(w=0) - D(x)|   = {(ClassifierFreeGuidance(toy, 0.0, null)(x, sigma, y=y) - d_uncond).abs().max():.1e}')
    classifier = lambda x, sigma: log_joint(x, sigma).log_softmax(1)
    cg = ClassifierGuidance(lambda x, sigma: toy(x, sigma, torch.full((x.shape[0],), null)), classifier, scale=3.0)
    print(f'|classifier guidance(s=3) - CFG(w=3)| = {(cg(x, sigma, y=y) - ClassifierFreeGuidance(toy, 3.0, null)(x, sigma, y=y)).abs().max():.1e}')
    print(f'dynamic threshold of [[0.5, -3, 2, 1]] at p=0.5: {[round(v, 4) for v in dynamic_threshold(torch.tensor([0.5, -3.0, 2.0, 1.0])[None], 0.5)[0].tolist()]}')

    # Heun on dx/dsigma = (x - D)/sigma over 32 Karras noise levels, all samples requested as class 0. With two
    # classes grad log p(0 | x) = (1 - p(0 | x)) grad logit: guidance pushes hardest where the classifier is unsure,
    # so class 0 moves away from class 1 and narrows along the axis between them: fidelity up, spread down.
    sigmas = (80 ** (1 / 7) + torch.linspace(0, 1, 32, dtype=torch.float64) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    sigmas, y = torch.cat([sigmas, sigmas.new_zeros(1)]), torch.zeros(4000, dtype=torch.long)
    print('   w   fidelity (exact classifier: class 0)   mean, std of x[:, 0] (true -0.5, 0.4)')
    for w in [1.0, 2.0, 4.0, 8.0]:
        D = ClassifierFreeGuidance(toy, w, null)
        x = sigmas[0] * torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            d_cur = (x - D(x, sigma, y=y)) / sigma
            x_next = x + (sigma_next - sigma) * d_cur
            if sigma_next > 0:                        # Heun's correction (Karras et al. 2022, Alg. 1)
                x_next = x + (sigma_next - sigma) * 0.5 * (d_cur + (x_next - D(x_next, sigma_next, y=y)) / sigma_next)
            x = x_next
        fidelity = (log_joint(x, torch.zeros(4000, dtype=torch.float64)).argmax(1) == 0).double().mean()
        print(f'{w:4.1f}   {fidelity:.3f}                                  {x[:, 0].mean():+.3f}, {x[:, 0].std():.3f}')
