"""
Cascaded diffusion: a base model samples small images, then super-resolution (SR) stages upsample them.

Papers:
  Ho, Saharia, Chan, Fleet, Norouzi & Salimans 2021, "Cascaded Diffusion Models for High Fidelity Image
    Generation", arXiv:2106.15282 (CDM: the cascade, conditioning augmentation, its truncated and non-truncated
    forms; ablations in Sec. 4.3)
  Saharia, Ho, Chan, Salimans, Fleet & Norouzi 2021, "Image Super-Resolution via Iterative Refinement",
    arXiv:2104.07636 (SR3: the low-resolution image, bicubic-upsampled, concatenated to the network's input)
  Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding",
    arXiv:2205.11487 (Imagen, Sec. 2.4 "robust cascaded diffusion models": noise conditioning augmentation,
    variance preserving, with aug_level in [0, 1] drawn at random in training and swept at inference)

A cascade factorises p(x) = p(z) p(x | z), z the low-resolution image. The base stage is an ordinary model of z;
an SR stage is a conditional denoiser D(x, sigma | z) whose network sees upsample(z) as extra input channels
(x_cond, SR3). Trained on real z, an SR stage meets the base model's imperfect z at sampling time; CDM found
that corrupting z during training ("conditioning augmentation") prevents this compounding error.

Noise conditioning augmentation, the convention of this file. The level is a diffusion time t in [0, 1]
(Imagen's aug_level); the corruption is variance preserving (Imagen Sec. 2.4), on a cosine schedule:

    z_t = alpha(t) z + s(t) eps,   alpha(t) = cos(pi t / 2),  s(t) = sin(pi t / 2),  eps ~ N(0, I)
    in the sigma frame of DESIGN.md:  z_t / alpha = z + sigma_aug eps,   sigma_aug = tan(pi t / 2)
    SNR(t) = alpha^2 / s^2 = cot^2(pi t / 2)   (t = 0: none; t = 1/2: SNR 1; t = 1: pure noise)

(this is Nichol & Dhariwal 2021's cosine schedule, arXiv:2102.09672 Eq. 17, with offset s = 0; the papers do not
fix which schedule maps aug_level to a noise level in their text, so this choice is ours). Training draws
t ~ U[0, t_max] per sample; sampling uses one fixed t for the stage. The network gets t as

    aug_cond = [sin(w_k t), cos(w_k t) - 1]_{k < aug_dim/2},   w_k = (pi / 2) 2^k

sinusoidal features of t (as for the diffusion time) minus their value at t = 0, so t = 0 gives aug_cond = 0,
which the bias-free aug projection of unet.py / dit.py turns into exactly "no augmentation input".
Sampling values: both papers treat the sampling-time level as a hyperparameter swept for the best FID (CDM: the
corruption time s; Imagen: aug_level). Public code defaults for orientation: DeepFloyd IF's SR stage noise_level
250 of 1000 DDPM steps, the Stable Diffusion x4 upscaler 20 of 350 (diffusers pipelines).

Truncated conditioning augmentation (CDM): instead of sampling z fully and corrupting it, stop the base sampler
at sigma_aug(t): its state there, x = z + sigma_aug eps in the sigma frame, times alpha(t) = 1/sqrt(1+sigma_aug^2),
IS a sample of z_t above, so the SR stage trained with the same augmentation takes it with level t unchanged.

Conventions: images (N, C, H, W) in [-1, 1]; the level t is a float or an (N,) tensor; a stage's denoiser is
D(x, sigma, **cond) of diffusion.py, samplers are samplers.SAMPLERS functions (passed in, so this file is a leaf).
Usage:
    cond = training_condition(x_high, low_res=16, max_level=0.5, aug_dim=8, generator=g)   # for Diffusion.loss
    images = run_cascade([Stage(base_D, (1, 16, 16), sample_heun, sigmas),
                          Stage(sr_D, (1, 32, 32), sample_heun, sigmas, aug_level=0.2, aug_dim=8)], n=16, seed=0)[-1]
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Making the low-resolution conditioning image

def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def downsample(x, size):
    """High-resolution images -> the low-resolution image z: area averaging (a k x k box filter when the factor k
    is an integer, the operator of inverse.py's 'sr'), which cannot alias a sharp edge into the low-res image."""
    if x.ndim != 4:
        raise ValueError(f'downsample expects images (N, C, H, W), got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise ValueError(f'downsample expects float images in [-1, 1] (data.to_float converts uint8), got {x.dtype}')
    size = _size(size)
    if size[0] > x.shape[-2] or size[1] > x.shape[-1]:
        raise ValueError(f'low resolution {size} is larger than the images {tuple(x.shape[-2:])}')
    return F.interpolate(x, size=size, mode='area')


def upsample(z, size, mode='bicubic'):
    """z -> the network's x_cond at the output size. SR3 upsamples bicubically; the result can overshoot
    [-1, 1] slightly at edges, which is harmless for an input channel."""
    if mode not in ('bicubic', 'bilinear', 'nearest'):
        raise ValueError(f"upsample mode must be 'bicubic', 'bilinear' or 'nearest', got {mode!r}")
    kw = {} if mode == 'nearest' else {'align_corners': False}
    return F.interpolate(z, size=_size(size), mode=mode, **kw)


# ----------------------------------------------------------------------------------------------------
# Noise conditioning augmentation: the level, the corruption, the embedding

def _level(level, n, device):
    """A float or (N,) tensor of levels -> (N,) float tensor, checked to lie in [0, 1]."""
    t = torch.as_tensor(level, dtype=torch.float32, device=device)
    t = t.expand(n) if t.ndim == 0 else t
    if t.shape != (n,):
        raise ValueError(f'the augmentation level must be a number or have shape ({n},), got {tuple(t.shape)}')
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f'augmentation levels are diffusion times in [0, 1] (0 = none); got {t.min():g}..{t.max():g}')
    return t


def aug_alpha_sigma(level):
    """(alpha, s) = (cos(pi t/2), sin(pi t/2)) of the VP corruption z_t = alpha z + s eps; alpha^2 + s^2 = 1."""
    angle = torch.as_tensor(level, dtype=torch.float64) * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


def aug_sigma(level):
    """The level as a noise level of the sigma frame: sigma_aug = s / alpha = tan(pi t / 2) (inf at t = 1)."""
    alpha, s = aug_alpha_sigma(level)
    return torch.where(alpha > 1e-12, s / alpha, torch.full_like(s, math.inf))


def aug_level_of_sigma(sigma):
    """Inverse of aug_sigma: t = (2 / pi) atan(sigma)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) * (2 / math.pi)


def noise_augment(z, level, noise):
    """z_t = cos(pi t/2) z + sin(pi t/2) noise (variance preserving, Imagen Sec. 2.4); t = 0 returns z exactly."""
    t = _level(level, z.shape[0], z.device)
    alpha, s = aug_alpha_sigma(t)
    shape = (-1,) + (1,) * (z.ndim - 1)
    return alpha.to(z.dtype).view(shape) * z + s.to(z.dtype).view(shape) * noise


def aug_embedding(level, dim, n=None, device='cpu'):
    """aug_cond (N, dim): [sin(w_k t), cos(w_k t) - 1] with w_k = (pi/2) 2^k, zero at t = 0 (no augmentation).

    The lowest frequency pi/2 is monotone over [0, 1], so t is recoverable from the first pair alone; the higher
    ones give the network finer resolution of t, as the sinusoidal time embedding does for the noise level.
    """
    if dim % 2:
        raise ValueError(f'aug_dim must be even (sin/cos pairs), got {dim}')
    t = _level(level, n if n is not None else torch.as_tensor(level).numel(), device)
    w = (math.pi / 2) * 2.0 ** torch.arange(dim // 2, device=t.device, dtype=torch.float32)
    angles = t[:, None] * w[None]                                              # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles) - 1], dim=1)


def sample_aug_level(n, max_level, generator=None, device='cpu'):
    """Training levels t ~ U[0, max_level] per sample (CDM and Imagen draw the level at random in training)."""
    if not 0 <= max_level <= 1:
        raise ValueError(f'max_level must be in [0, 1] (1 = up to pure noise), got {max_level}')
    return (torch.rand(n, generator=generator) * max_level).to(device)


def _randn(shape, generator, device, dtype=torch.float32):
    """Noise from a CPU generator (or the global RNG), moved to device: same numbers on every device."""
    gen_device = 'cpu' if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def superres_condition(z, size, level=0.0, aug_dim=0, noise=None, generator=None, mode='bicubic'):
    """The network keywords of an SR stage: dict(x_cond=upsample(z_t), aug_cond=aug_embedding(t)).

    z: low-resolution images (N, C, h, w); size: the stage's output size; level: t (float or (N,)); aug_dim: the
    width of the network's aug_cond input, 0 for a stage trained without noise conditioning augmentation.
    """
    t = _level(level, z.shape[0], z.device)
    if aug_dim == 0:
        if bool((t > 0).any()):
            raise ValueError('this SR network has no augmentation-level input (aug_dim=0): it was trained without noise '
                             'conditioning augmentation, so it cannot be told a level; use aug level 0')
        return {'x_cond': upsample(z, size, mode)}
    if bool((t > 0).any()):                  # at t = 0 skip the draw: z exactly, and the RNG stream is unchanged
        noise = _randn(z.shape, generator, z.device, z.dtype) if noise is None else noise
        z = noise_augment(z, t, noise)
    return {'x_cond': upsample(z, size, mode), 'aug_cond': aug_embedding(t, aug_dim, device=z.device)}


def training_condition(x, low_res, max_level=0.0, aug_dim=0, generator=None, mode='bicubic'):
    """Conditioning for one training batch of high-resolution images x (N, C, H, W): make z = downsample(x) on the
    fly, draw t ~ U[0, max_level] per sample, corrupt and embed. Pass the result to Diffusion.loss(net, x, **cond)."""
    z = downsample(x, low_res)
    if max_level > 0 and aug_dim == 0:
        raise ValueError('noise conditioning augmentation (max_level > 0) needs a network with an aug_cond input: '
                         'build it with aug_dim > 0')
    t = sample_aug_level(x.shape[0], max_level, generator, x.device) if max_level > 0 else 0.0
    return superres_condition(z, x.shape[-2:], t, aug_dim, generator=generator, mode=mode)


# ----------------------------------------------------------------------------------------------------
# A stage, and running a cascade of them

@dataclass
class Stage:
    """One model of a cascade: the base stage (first) or an SR stage (conditioned on the previous output)."""
    denoiser: callable            # D(x, sigma, **cond) -> x0_hat (guided already, if guidance is wanted)
    shape: tuple                  # (C, H, W) of this stage's output
    sampler: callable             # a samplers.SAMPLERS function: sampler(denoiser, x, sigmas, cond=, **options)
    sigmas: torch.Tensor          # descending noise levels ending in 0
    options: dict = field(default_factory=dict)   # the sampler's own options (S_churn, eta, ...)
    stochastic: bool = False      # the sampler draws noise: pass it the cascade's generator
    aug_level: float = 0.0        # SR: sampling-time augmentation level t of the conditioning image
    aug_dim: int = 0              # SR: width of the network's aug_cond (0 = trained without augmentation)
    truncated: bool = False       # SR: CDM's truncated variant, the previous stage stops at sigma_aug(aug_level)
    upsample_mode: str = 'bicubic'   # SR: how z becomes x_cond
    cond: dict = field(default_factory=dict)      # other network keywords (e.g. class labels y)


def truncate_sigmas(sigmas, sigma_stop):
    """The sigmas above sigma_stop, then sigma_stop, then 0: a sampler run whose state at step len-2 is at sigma_stop
    (the last step to 0 is spent only because samplers require the final 0)."""
    keep = sigmas[:-1][sigmas[:-1] > sigma_stop]
    if len(keep) == 0:
        raise ValueError(f'the truncation level sigma={sigma_stop:g} is above the stage\'s largest sigma '
                         f'{float(sigmas[0]):g}: nothing would be sampled')
    return torch.cat([keep, sigmas.new_tensor([float(sigma_stop), 0.0])])


def sample_stage(stage, n, generator=None, device='cpu', cond=None, stop_sigma=None, progress=False):
    """Run one stage's sampler from fresh noise x = sigmas[0] * eps; `cond` are its network keywords.

    stop_sigma (truncated cascades) returns the state at that noise level instead of the final sample, through the
    sampler's per-step callback (info['x'] is the state at the start of step i, at sigma_i).
    """
    cond = {**stage.cond, **(cond or {})}
    sigmas = stage.sigmas.to(device)
    if stop_sigma is not None:
        sigmas = truncate_sigmas(sigmas, stop_sigma)
    x = _randn((n,) + tuple(stage.shape), generator, device) * sigmas[0]
    options = dict(stage.options, **({'generator': generator} if stage.stochastic else {}))
    if progress:
        options['progress'] = True
    if stop_sigma is None:
        return stage.sampler(stage.denoiser, x, sigmas, cond=cond, **options)
    states = {}

    def keep_state(info):
        if info['i'] == len(sigmas) - 2:                # the step that starts at sigma_stop
            states['x'] = info['x'].clone()
    stage.sampler(stage.denoiser, x, sigmas, cond=cond, callback=keep_state, **options)
    return states['x']


def stage_condition(stage, z, generator=None):
    """The network keywords of an SR stage given the previous stage's output z (N, C, h, w).

    Non-truncated: corrupt z at the stage's aug_level, then upsample (superres_condition). Truncated: z is already
    the previous stage's state at sigma_aug(t), scaled to z_t = alpha (z + sigma_aug eps): no second corruption.
    """
    if not stage.truncated:
        return superres_condition(z, stage.shape[-2:], stage.aug_level, stage.aug_dim, generator=generator,
                                  mode=stage.upsample_mode)
    cond = {'x_cond': upsample(z, stage.shape[-2:], stage.upsample_mode)}
    if stage.aug_dim:
        cond['aug_cond'] = aug_embedding(stage.aug_level, stage.aug_dim, z.shape[0], z.device)
    return cond


def super_resolve(stage, z, generator=None, cond=None, stop_sigma=None, progress=False):
    """One SR stage on given low-resolution images z: its conditioning from z, then its sampler. run_cascade's
    step for every SR stage; used alone to upsample real low-resolution images."""
    sr_cond = stage_condition(stage, z, generator)
    return sample_stage(stage, z.shape[0], generator, z.device, dict(cond or {}, **sr_cond), stop_sigma, progress)


def run_cascade(stages, n, seed=0, device='cpu', cond=None, progress=False):
    """Sample a whole cascade: the base stage, then each SR stage conditioned on the previous output.

    Returns the list of every stage's output (the last is the final images). One torch.Generator seeded with
    `seed` draws everything in a fixed order (base noise, augmentation noise, SR noise, sampler noise), so the
    same seed gives the same images. `cond` are keywords for every stage (e.g. class labels y of a class-
    conditional cascade); a stage's own `cond` adds to them. Before a truncated SR stage the previous stage stops
    at sigma_aug(t) and its state, times alpha(t), is the conditioning image at level t (CDM's truncated variant).
    """
    if not stages:
        raise ValueError('a cascade needs at least a base stage')
    if stages[0].truncated:
        raise ValueError('the base stage has no previous stage to truncate: truncated=True belongs to an SR stage')
    for k, stage in enumerate(stages[1:], start=1):
        if stage.truncated and not 0 < stage.aug_level < 1:
            raise ValueError(f'stage {k} is truncated: its aug_level (the level where stage {k - 1} stops) must be in '
                             f'(0, 1), got {stage.aug_level}')
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for k, stage in enumerate(stages):
        following = stages[k + 1] if k + 1 < len(stages) else None
        stop_sigma = float(aug_sigma(following.aug_level)) if following is not None and following.truncated else None
        if k == 0:
            x = sample_stage(stage, n, generator, device, cond, stop_sigma, progress)
        else:
            x = super_resolve(stage, outputs[-1], generator, cond, stop_sigma, progress)
        if stop_sigma is not None:
            x = float(aug_alpha_sigma(following.aug_level)[0]) * x        # sigma frame -> VP: z_t = alpha x
        outputs.append(x)
    return outputs


def psnr(x, reference, data_range=2.0):
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (range 2): 10 log10(range^2 / MSE)."""
    mse = (x.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # 1. The corruption at level t: mean alpha z, standard deviation s, as the formula says.
    g = torch.Generator().manual_seed(0)
    z = torch.full((20000, 1, 1, 1), 0.8)
    for t in (0.0, 0.1, 0.3, 0.5, 1.0):
        zt = noise_augment(z, t, torch.randn(z.shape, generator=g))
        alpha, s = aug_alpha_sigma(t)
        print(f't={t:.1f}  sigma_aug={float(aug_sigma(t)):7.3f}  mean {zt.mean():.4f} (alpha z = {0.8 * alpha:.4f})  '
              f'std {zt.std():.4f} (s = {s:.4f})')
    # 2. The embedding is zero at t = 0 and distinct for distinct t.
    print('aug_embedding(t, 6) for t = 0, 0.25, 1:\n', aug_embedding(torch.tensor([0.0, 0.25, 1.0]), 6).numpy().round(3))
    # 3. Bicubic upsampling of an area-downsampled image: the baseline an SR stage has to beat.
    x = torch.zeros(1, 1, 16, 16)
    x[..., 4:12, 5:11] = 1.0
    x = 2 * x - 1
    print('PSNR of bicubic 8 -> 16 upsampling of a rectangle:', f'{float(psnr(upsample(downsample(x, 8), 16), x)):.2f} dB')
