"""
Augmentation with labels: the network is told which transform was applied, so augmentations cannot leak.

Papers:
  Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data" (ADA), arXiv:2006.06676
  Jun et al. 2020, "Distribution Augmentation for Generative Modeling", ICML 2020 (condition on the augmentation)
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), arXiv:2206.00364, App. C.4

  x_aug = A_a(x0),  a ~ p(a)                      a random transform, parameters a (the "augmentation label")
  loss  = || D(x_aug + n, sigma, aug_cond=a) - x_aug ||^2        the denoiser is told a, so it learns p(x | a)
  sample with aug_cond = 0 (a = identity)  ->  p(x | identity) = p(x0): the augmentations cannot "leak"
Without the label the model would learn the mixture sum_a p(A_a x0) and generate flipped/rotated images (ADA Sec. 2.2).

aug_cond layout (AUG_COND_NAMES, AUG_DIM = 10 floats per image; 0 everywhere = "no augmentation"):
  0 xflip       1 if mirrored left-right, else 0
  1 yflip       1 if mirrored top-bottom, else 0
  2 rot90_cos   cos(k pi/2) - 1   } k counter-clockwise quarter turns (torch.rot90), k = 0 gives (0, 0)
  3 rot90_sin   sin(k pi/2)       }   (EDM's cos-1 / sin encoding of an angle, so the identity is zero)
  4 translate_x integer shift right, in pixels / W   (reflect padding at the border, as in ADA/EDM)
  5 translate_y integer shift down,  in pixels / H
  6 log2_scale  log2 of the isotropic zoom about the centre (bilinear resampling, reflect padding)
  7 brightness  b added to every pixel (in the [-1, 1] scale)
  8 log2_contrast    log2 c: x -> c x (about mid-grey 0)
  9 log2_saturation  log2 s: x -> mean_c(x) + s (x - mean_c(x)); 0 for 1-channel images
Applied in this order; invert_augment undoes them in reverse. Colour changes are not clipped, so augmented pixels
may leave [-1, 1] slightly (EDM/ADA do not clip either); that keeps every step exactly invertible.

Tensors: x (N, C, H, W) images or (N, C, F, H, W) videos in [-1, 1] (every frame of a video gets the same
transform); aug_cond (N, AUG_DIM) float.

Usage: x_aug, aug_cond = AugmentPipe(p=0.12)(x_batch, generator=g)      # train with net(..., aug_cond=aug_cond)
       net(..., aug_cond=torch.zeros(n, AUG_DIM))                        # sample: the identity
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Augmentation with labels (ADA's pipeline, EDM App. C.4): sample parameters, apply, invert

AUG_COND_NAMES = ('xflip', 'yflip', 'rot90_cos', 'rot90_sin', 'translate_x', 'translate_y', 'log2_scale',
                  'brightness', 'log2_contrast', 'log2_saturation')
AUG_DIM = len(AUG_COND_NAMES)


def _per_sample(v, x):
    """(N,) -> (N, 1, 1, ...) broadcastable against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _translate(x, tx, ty):
    """Shift each image by integer (tx, ty) pixels (right, down) with reflect padding: gather along W then H."""
    N, H, W = x.shape[0], x.shape[-2], x.shape[-1]

    def reflect(i, n):   # mirror index i into [0, n-1] without repeating the edge pixel (period 2n - 2)
        i = torch.remainder(i, 2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)

    cols = reflect(torch.arange(W, device=x.device)[None] - tx[:, None], W)   # (N, W) source column per output
    rows = reflect(torch.arange(H, device=x.device)[None] - ty[:, None], H)   # (N, H) source row per output
    x = x.gather(-1, cols[:, None, None, :].expand(N, x.shape[1], H, W))
    return x.gather(-2, rows[:, None, :, None].expand(N, x.shape[1], H, W))


def _scale(x, log2_s):
    """Zoom by s = 2^log2_s about the image centre: out(p) = in(p / s), bilinear, reflect padding."""
    todo = torch.nonzero(log2_s != 0).flatten()
    if len(todo) == 0:
        return x
    inv_s = torch.exp2(-log2_s[todo]).to(x.dtype)
    theta = torch.zeros(len(todo), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = inv_s               # grid coords are in [-1, 1] around the centre
    grid = F.affine_grid(theta, (len(todo), *x.shape[1:]), align_corners=False)
    x = x.clone()
    x[todo] = F.grid_sample(x[todo], grid, mode='bilinear', padding_mode='reflection', align_corners=False)
    return x


def _geometric(x, cond, inverse=False):
    """Flips, quarter turns, integer translation and scaling of (N, C', H, W), as recorded in aug_cond."""
    W = x.shape[-1]
    xflip, yflip = cond[:, 0] > 0.5, cond[:, 1] > 0.5
    k = torch.round(torch.atan2(cond[:, 3], cond[:, 2] + 1) / (torch.pi / 2)).long() % 4   # angle -> turns
    tx, ty = torch.round(cond[:, 4] * W).long(), torch.round(cond[:, 5] * x.shape[-2]).long()

    def flips(x):
        x = torch.where(_per_sample(xflip, x).bool(), x.flip(-1), x)
        return torch.where(_per_sample(yflip, x).bool(), x.flip(-2), x)

    def turns(x, sign):
        x = x.clone()
        for turn in (1, 2, 3):   # per-sample quarter turns, one group at a time
            idx = torch.nonzero(k == turn).flatten()
            if len(idx):
                assert x.shape[-1] == x.shape[-2], 'quarter turns need square images'
                x[idx] = torch.rot90(x[idx], sign * turn, dims=(-2, -1))
        return x

    if not inverse:
        return _scale(_translate(turns(flips(x), 1), tx, ty), cond[:, 6])
    return flips(turns(_translate(_scale(x, -cond[:, 6]), -tx, -ty), -1))


def _colour(x, cond, inverse=False):
    """Brightness, contrast (about 0), saturation (about the channel mean) of (N, C, ...).

    Written so that a zero entry is the exact identity in floating point (x + 0, x * 1, x + 0 * (...)),
    which keeps p = 0 and aug_cond = 0 bit-exact no-ops.
    """
    b, c, s = _per_sample(cond[:, 7], x), torch.exp2(_per_sample(cond[:, 8], x)), torch.exp2(_per_sample(cond[:, 9], x))
    saturate = lambda x, s: x + (s - 1) * (x - x.mean(dim=1, keepdim=True))   # the grey axis mean_c(x) is kept
    if not inverse:
        return saturate((x + b) * c, s)
    return saturate(x, 1 / s) / c - b


def apply_augment(x, aug_cond):
    """Apply exactly the transform that aug_cond (N, AUG_DIM) describes to x (N, C, H, W) or (N, C, F, H, W)."""
    shape = x.shape
    x = _geometric(x.reshape(shape[0], -1, *shape[-2:]), aug_cond).reshape(shape)   # frames move together
    return _colour(x, aug_cond)


def invert_augment(x, aug_cond):
    """Undo apply_augment (exact for flips, turns and colour; translation/scaling lose what left the frame)."""
    shape = x.shape
    x = _colour(x, aug_cond, inverse=True)
    return _geometric(x.reshape(shape[0], -1, *shape[-2:]), aug_cond, inverse=True).reshape(shape)


class AugmentPipe:
    """Draws augmentation parameters per image, each transform switched on with probability p (ADA Sec. 2.3).

    p around 0.1-0.2 suits a few thousand images (ADA Fig. 5); the label makes even p = 1 safe for diffusion
    (EDM trains CIFAR-10 with p = 0.12), but too high a p spends capacity on images never sampled.
    Set a strength to 0/False to disable that transform; its aug_cond entries then stay 0.
    """

    def __init__(self, p=0.12,              # probability of each transform, independently per image
                 xflip=True, yflip=True,    # mirror left-right / top-bottom
                 rotate90=True,             # k = 1, 2 or 3 quarter turns
                 translate=0.125,           # max integer shift, as a fraction of the side (ADA's xint_max)
                 scale_std=0.2,             # std of log2 zoom (ADA's scale_std)
                 brightness_std=0.2,        # std of the added offset, [-1, 1] units (ADA)
                 contrast_std=0.5,          # std of log2 contrast (ADA)
                 saturation_std=1.0):       # std of log2 saturation (ADA)
        self.p, self.xflip, self.yflip, self.rotate90 = p, xflip, yflip, rotate90
        self.translate, self.scale_std = translate, scale_std
        self.brightness_std, self.contrast_std, self.saturation_std = brightness_std, contrast_std, saturation_std

    def sample(self, n, channels=3, resolution=32, generator=None):
        """aug_cond (n, AUG_DIM) on the generator's device (CPU by default)."""
        dev = generator.device if generator is not None else 'cpu'
        rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
        randn = lambda *s: torch.randn(*s, generator=generator, device=dev)
        on = lambda enabled: (rand(n) < self.p) & bool(enabled)          # Bernoulli(p) gate per image
        cond = torch.zeros(n, AUG_DIM, device=dev)
        cond[:, 0] = on(self.xflip).float()
        cond[:, 1] = on(self.yflip).float()
        k = torch.where(on(self.rotate90), 1 + (rand(n) * 3).long(), 0)   # 1..3 turns when applied
        angle = k * (torch.pi / 2)
        cond[:, 2], cond[:, 3] = torch.round(torch.cos(angle)) - 1, torch.round(torch.sin(angle))
        m = round(self.translate * resolution)   # max shift in pixels; a shift of 0 may be drawn
        shift = (rand(n, 2) * (2 * m + 1)).long() - m                     # uniform integers in [-m, m]
        cond[:, 4:6] = torch.where(on(m > 0)[:, None], shift, 0) / resolution   # one gate for both axes
        cond[:, 6] = torch.where(on(self.scale_std), randn(n) * self.scale_std, 0)
        cond[:, 7] = torch.where(on(self.brightness_std), randn(n) * self.brightness_std, 0)
        cond[:, 8] = torch.where(on(self.contrast_std), randn(n) * self.contrast_std, 0)
        cond[:, 9] = torch.where(on(self.saturation_std and channels == 3), randn(n) * self.saturation_std, 0)
        return cond

    def __call__(self, x, generator=None):
        """(x_aug, aug_cond) for a batch x (N, C, [F,] H, W) in [-1, 1]; aug_cond = 0 where nothing was applied."""
        cond = self.sample(len(x), x.shape[1], x.shape[-1], generator).to(x.device)
        return apply_augment(x, cond), cond


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # A checkerboard-and-gradient test card, so every transform is visible in the numbers below.
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 16)
    card = torch.stack([ramp[None, :].expand(16, 16), ramp[:, None].expand(16, 16),
                        ((torch.arange(16)[:, None] // 4 + torch.arange(16)[None, :] // 4) % 2) * 2 - 1.0])
    x = card[None].repeat(8, 1, 1, 1)                                        # (8, 3, 16, 16)
    x_aug, cond = AugmentPipe(p=0.5, translate=0, scale_std=0)(x, generator=g)
    for i in range(3):
        print(f'image {i} aug_cond:', {k: round(v, 3) for k, v in zip(AUG_COND_NAMES, cond[i].tolist()) if v})
    print(f'images changed by the pipe: {int(((x_aug - x).flatten(1).abs().max(1).values > 0).sum())} of 8')
    print(f'max |invert(augment(x)) - x| = {(invert_augment(x_aug, cond) - x).abs().max():.2e}  (expect ~1e-6)')
    print(f'aug_cond = 0 is the identity: {torch.equal(apply_augment(x, torch.zeros(8, AUG_DIM)), x)}')
