"""
Autoencoders for latent diffusion: the KL-regularised autoencoder, VQGAN, and their adversarial training.

Papers:
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752
    (KL- and VQ-regularised first stages, Sec. 3.1 and App. G; the latent scale factor, Sec. 4.3.2 / App. D.1)
  Esser, Rombach & Ommer 2021, "Taming Transformers for High-Resolution Image Synthesis", arXiv:2012.09841 (VQGAN)
  van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning", arXiv:1711.00937 (VQ-VAE)
  Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114 (Gaussian KL, App. B)
  Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks", arXiv:1611.07004 (PatchGAN)
  Dhariwal et al. 2020, "Jukebox", arXiv:2005.00341 (random restarts of dead codes, Sec. 2.3 / App. A;
    a step quantises with the codebook from before its own update, as Jukebox's and Sonnet's code do)
  Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN", arXiv:2110.04627 (l2-normalised,
    low-dimensional code lookup, Sec. 3.2)
  Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696
    (EDM2: per-channel latent mean/std normalisation, App. on latent diffusion)

  KL:  q(z|x) = N(mu(x), diag sigma^2(x));  KL = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)   (Kingma & Welling App. B)
  VQ:  z_q = e_k, k = argmin_j ||z - e_j||;  L_VQ = ||sg[z] - e||^2 + beta ||z - sg[e]||^2     (VQ-VAE Eq. 3)
       straight-through: decoder input z + sg[z_q - z], so dL/dz := dL/dz_q                  (VQ-VAE Sec. 3.2)
       EMA codebook: N_k <- g N_k + (1-g) n_k; m_k <- g m_k + (1-g) sum z; e_k = m_k / N_k   (VQ-VAE App. A.1)
  GAN: L_D = 1/2 (E relu(1 - D(x)) + E relu(1 + D(x_hat)));  L_G = -E D(x_hat)               (hinge loss)
       lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_G]|| + delta), clamped to [0, 1e4]            (VQGAN Eq. 7)
       GL = the decoder's last layer; L = L_rec + reg_weight L_reg + lambda L_G  (GAN from disc_start on);
       delta = 1e-4 and the clamp as taming's calculate_adaptive_weight, on L_rec summed over C*H*W as LDM (KL)
  Latent scale: diffusion runs on z' = (z - shift) * scale, scale = 1 / std(z) on training data (LDM Sec. 4.3.2);
       Stable Diffusion's KL-f8 uses scale 0.18215, shift 0. EDM2 normalises each channel by its own mean and std.

Architecture (LDM's first stage): Encoder = conv_in, per level [ResBlock x num_res_blocks, Downsample], mid
(ResBlock, single-head self-attention, ResBlock), GroupNorm-SiLU-conv_out; the decoder mirrors it with
num_res_blocks + 1 ResBlocks per level and nearest-neighbour Upsample. Downsampling factor f = 2^(levels - 1).
The named configuration 'sd-kl-f8' is the Stable Diffusion VAE (sd-vae-ft-ema / ft-mse); pretrained.load_sd_vae()
maps its public weights (diffusers AutoencoderKL or original LDM layout) into this file's names. The perceptual
loss network (LPIPS) lives in lpips.py and is passed to AutoencoderLoss, so this file imports no sibling.

Tensor conventions: images x: (N, C, H, W) in [-1, 1]; latents z: (N, latent_channels, H/f, W/f).
Usage: ae = create_autoencoder('kl-f4'); z = ae.encode(x); x_hat = ae.decode(z)   # z already scaled for diffusion
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Named configurations (one dict, as DiT's DiT_models)
#
# kind: 'kl' (diagonal Gaussian posterior) or 'vq' (codebook). channels * channel_mult[i] is the width of level i;
# f = 2 ** (len(channel_mult) - 1). scale_factor / shift_factor: the latent normalisation (floats, or one value per
# latent channel), filled in by compute_latent_scale() after training; 1.0 / 0.0 until then.

AUTOENCODER_CONFIGS = {
    # Stable Diffusion's KL-f8 (LDM configs/autoencoder kl-f8; diffusers AutoencoderKL defaults + sd-vae-ft-*): 83.7M
    'sd-kl-f8': dict(kind='kl', in_channels=3, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                     latent_channels=4, norm_groups=32, scale_factor=0.18215, shift_factor=0.0),
    # Small CPU-trainable models for 64x64 images (emoji), widths 16-32-64(-64): f = 4 with 3 latent channels as
    # LDM's KL-f4 / VQ-f4, f = 8 with 4 as its KL-f8. About 0.7M / 1.0M parameters, 2 s per step of 8 on one core.
    'kl-f4': dict(kind='kl', in_channels=3, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                  latent_channels=3, norm_groups=8),
    'kl-f8': dict(kind='kl', in_channels=3, channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                  latent_channels=4, norm_groups=8),
    'vq-f4': dict(kind='vq', in_channels=3, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                  latent_channels=3, norm_groups=8, codebook_size=512, beta=0.25, codebook='ema',
                  ema_decay=0.99, l2_normalize=False, restart_threshold=1.0),
    'vq-f4-l2': dict(kind='vq', in_channels=3, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                     latent_channels=8, norm_groups=8, codebook_size=512, beta=0.25, codebook='loss',
                     ema_decay=0.99, l2_normalize=True, restart_threshold=1.0),
    # Test-sized models (milliseconds per step)
    'tiny-kl': dict(kind='kl', in_channels=3, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    latent_channels=2, norm_groups=4),
    'tiny-vq': dict(kind='vq', in_channels=3, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    latent_channels=2, norm_groups=4, codebook_size=16, beta=0.25, codebook='ema',
                    ema_decay=0.99, l2_normalize=False, restart_threshold=1.0),
}

# Defaults for keys a configuration may leave out
CONFIG_DEFAULTS = dict(kind='kl', in_channels=3, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                       latent_channels=4, norm_groups=32, dropout=0.0, scale_factor=1.0, shift_factor=0.0,
                       codebook_size=512, beta=0.25, codebook='ema', ema_decay=0.99, l2_normalize=False,
                       restart_threshold=1.0)


def autoencoder_config(name_or_config='kl-f4', **overrides):
    """A full config dict (JSON-friendly: lists, not tuples) from a name or a partial dict, plus overrides."""
    if isinstance(name_or_config, str):
        if name_or_config not in AUTOENCODER_CONFIGS:
            raise ValueError(f'unknown autoencoder config {name_or_config!r}; choose from {sorted(AUTOENCODER_CONFIGS)}')
        base = AUTOENCODER_CONFIGS[name_or_config]
    else:
        base = dict(name_or_config)
    unknown = set(base) | set(overrides)
    unknown -= set(CONFIG_DEFAULTS)
    if unknown:
        raise TypeError(f'unknown autoencoder option(s) {sorted(unknown)}; valid: {sorted(CONFIG_DEFAULTS)}')
    config = {**CONFIG_DEFAULTS, **base, **overrides}
    if config['kind'] not in ('kl', 'vq'):
        raise ValueError(f"kind must be 'kl' or 'vq', got {config['kind']!r}")
    if config['codebook'] not in ('ema', 'loss'):
        raise ValueError(f"codebook must be 'ema' or 'loss', got {config['codebook']!r}")
    for key in ('channel_mult', 'scale_factor', 'shift_factor'):
        if isinstance(config[key], (tuple, list)):
            config[key] = [float(v) if key != 'channel_mult' else int(v) for v in config[key]]
    return config


# ----------------------------------------------------------------------------
# Building blocks (LDM's ResnetBlock / AttnBlock / Downsample / Upsample; every GroupNorm has eps 1e-6 as there)

def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """h = conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))))))); out = skip(x) + h. No time embedding: not a denoiser."""

    def __init__(self,
                 in_channels,             # input width
                 out_channels,            # output width; a 1x1 conv projects the skip path when they differ
                 groups,                  # GroupNorm groups
                 dropout=0.0):            # dropout before the second conv
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels, groups), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_channels, groups), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self,
                 channels,                # width; one head of this width
                 groups):                 # GroupNorm groups
        super().__init__()
        self.norm = group_norm(channels, groups)
        # Linear layers on the (N, HW, C) tokens; LDM stores them as 1x1 convs (same numbers, 4-D weights)
        self.q, self.k, self.v = nn.Linear(channels, channels), nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                       # (N, HW, C)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]   # (N, HW, C), scale 1/sqrt(C)
        return x + self.proj(out).transpose(1, 2).reshape(n, c, h, w)


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom, then a 3x3 conv with stride 2 and no padding (as LDM)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution: the only global mixing in the autoencoder."""

    def __init__(self, channels, groups, dropout=0.0):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups, dropout)
        self.attn = AttnBlock(channels, groups)
        self.res2 = ResBlock(channels, channels, groups, dropout)

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """One resolution: a stack of ResBlocks, then an optional resampler (downsample or upsample)."""

    def __init__(self, widths, groups, dropout, resample=None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(a, b, groups, dropout) for a, b in zip(widths[:-1], widths[1:]))
        if resample is not None:
            self.resample = resample

    def forward(self, x):
        for block in self.res:
            x = block(x)
        return self.resample(x) if hasattr(self, 'resample') else x


# ----------------------------------------------------------------------------
# Encoder and decoder (LDM Sec. 3.1: x (H, W, 3) -> z (H/f, W/f, c) -> x_hat)

class Encoder(nn.Module):
    def __init__(self,
                 in_channels,             # image channels
                 channels,                # base width
                 channel_mult,            # width multiplier per level; f = 2 ** (levels - 1)
                 num_res_blocks,          # ResBlocks per level
                 out_channels,            # 2 * latent (KL: mean and log-variance) or latent (VQ)
                 groups,                  # GroupNorm groups
                 dropout=0.0):            # dropout inside ResBlocks
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, previous = nn.ModuleList(), channels
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(Level([previous] + [width] * num_res_blocks, groups, dropout,
                                   None if last else Downsample(width)))
            previous = width
        self.mid = MidBlock(previous, groups, dropout)
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self,
                 out_channels,            # image channels
                 channels,                # base width
                 channel_mult,            # as the encoder's; levels run deepest first here
                 num_res_blocks,          # the decoder has num_res_blocks + 1 ResBlocks per level (as LDM)
                 in_channels,             # latent channels
                 groups,                  # GroupNorm groups
                 dropout=0.0):            # dropout inside ResBlocks
        super().__init__()
        widths = [channels * m for m in channel_mult][::-1]                     # deepest level first
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups, dropout)
        self.up, previous = nn.ModuleList(), widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.up.append(Level([previous] + [width] * (num_res_blocks + 1), groups, dropout,
                                 None if last else Upsample(width)))
            previous = width
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------
# KL regulariser: the diagonal Gaussian posterior (LDM's DiagonalGaussianDistribution)

class DiagonalGaussian:
    """q(z|x) = N(mean, diag exp(logvar)) from the encoder's 2c output channels (first half mean, second logvar)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)                                 # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """Reparameterised sample z = mean + std * eps (Kingma & Welling Sec. 2.4), differentiable in mean/std."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over latent elements: 1/2 sum(mu^2 + var - 1 - log var) (App. B)."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)   # (N,)

    def log_prob(self, z):
        """log q(z|x) per sample (used by the Monte-Carlo test of kl())."""
        return (-0.5 * (math.log(2 * math.pi) + self.logvar + (z - self.mean) ** 2 / self.logvar.exp())).flatten(1).sum(1)


# ----------------------------------------------------------------------------
# VQ regulariser: codebook, straight-through estimator, EMA updates, dead-code restarts

def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (VQ-VAE Sec. 3.1) that reports the VQ loss, perplexity and codebook usage.

    codebook='ema': codes are moving averages of the encoder outputs assigned to them (VQ-VAE App. A.1); the loss
        is then only the commitment term beta ||z - sg[e]||^2.  codebook='loss': codes learn by gradient from
        ||sg[z] - e||^2 (VQ-VAE Eq. 3).
    l2_normalize: look codes up by cosine similarity on unit vectors (ViT-VQGAN Sec. 3.2); with a low code_dim this
        keeps most codes in use.
    Dead codes: an EMA of each code's count per batch; in training, codes whose average falls below
        restart_threshold are moved onto random encoder outputs of the batch (Jukebox's random restarts). The
        batch itself is quantised with the codes from before the step's EMA update and restarts.
    Under DDP the counts and sums are all-reduced and restarted codes are broadcast from rank 0, so every rank
    keeps the same codebook.
    """

    def __init__(self,
                 codebook_size,           # number of codes K
                 code_dim,                # code width D (= latent channels)
                 beta=0.25,               # commitment weight (VQ-VAE Eq. 3; 0.25 there and in VQGAN)
                 codebook='ema',          # 'ema' updates or 'loss' (gradient) updates of the codes
                 ema_decay=0.99,          # gamma of the EMA updates and of the usage statistics
                 l2_normalize=False,      # cosine-similarity lookup on unit vectors (ViT-VQGAN)
                 restart_threshold=1.0,   # a code used fewer times per batch than this (on average) is restarted
                 eps=1e-5):               # Laplace smoothing of the EMA counts
        super().__init__()
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.use_ema, self.ema_decay, self.l2_normalize = codebook == 'ema', ema_decay, l2_normalize
        self.restart_threshold, self.eps = restart_threshold, eps
        embedding = torch.randn(codebook_size, code_dim)
        if l2_normalize:
            embedding = F.normalize(embedding, dim=1)
        if self.use_ema:  # codes are statistics, not parameters: no optimizer touches them
            self.register_buffer('embedding', embedding)
            self.register_buffer('ema_count', torch.ones(codebook_size))
            self.register_buffer('ema_sum', embedding.clone())
        else:
            self.embedding = nn.Parameter(embedding)
        # Starts at the threshold: a code must be picked about once per batch to escape restarting
        self.register_buffer('usage', torch.full((codebook_size,), float(restart_threshold)))

    def codes(self):
        # normalize() keeps its input for backward: a clone, so that a restart later in the step (which rewrites
        # embedding.data) cannot change the gradient of this step's codebook loss
        return F.normalize(self.embedding.clone(), dim=1) if self.l2_normalize else self.embedding

    def nearest(self, z_flat):
        """Index of the nearest code for each row of z_flat (M, D): argmin ||z||^2 - 2 z.e + ||e||^2."""
        codes = self.codes()
        distances = (z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ codes.T + codes.pow(2).sum(1)[None])  # (M, K)
        return distances.argmin(1)

    def forward(self, z):
        """z: (N, D, h, w) -> (z_q with straight-through gradient, vq_loss (scalar), info dict)."""
        z = z.float()                                                          # distances in float32 under AMP
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)              # (M, D), M = N h w
        if self.l2_normalize:
            z_flat = F.normalize(z_flat, dim=1)
        indices = self.nearest(z_flat)                                          # (M,)
        one_hot = F.one_hot(indices, self.codebook_size).type(z_flat.dtype)     # (M, K)
        counts = one_hot.sum(0)                                                 # (K,)
        # The codes these vectors were matched to, read BEFORE this step's update (as Sonnet's VectorQuantizerEMA
        # and Jukebox's BottleneckBlock dequantise before update_k): a code restarted below onto a random encoder
        # output must not replace the nearest code these vectors were assigned to.
        z_q_flat = self.codes()[indices]                                        # (M, D), a copy (advanced indexing)
        if self.training:
            self.update_codebook(z_flat.detach(), one_hot, counts)
        # VQ-VAE Eq. 3: commitment pulls z to its code; with EMA the codebook term is replaced by the updates above
        commitment = F.mse_loss(z_flat, z_q_flat.detach())
        loss = self.beta * commitment if self.use_ema else F.mse_loss(z_q_flat, z_flat.detach()) + self.beta * commitment
        # Straight-through estimator: forward value z_q, gradient of z (VQ-VAE Sec. 3.2)
        z_q_flat = z_flat + (z_q_flat - z_flat).detach()
        z_q = z_q_flat.reshape(z.shape[0], z.shape[2], z.shape[3], self.code_dim).permute(0, 3, 1, 2)
        probs = counts / counts.sum()
        info = dict(indices=indices.reshape(z.shape[0], z.shape[2], z.shape[3]),
                    perplexity=torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),   # exp(entropy); K if uniform
                    usage=(counts > 0).float().mean())                                   # share of codes used
        return z_q.contiguous(), loss, info

    def quantize(self, z):
        """Nearest codes only (no loss, no statistics, no codebook update): the quantiser inside decode()."""
        z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        z_flat = F.normalize(z_flat, dim=1) if self.l2_normalize else z_flat
        z_q = self.codes()[self.nearest(z_flat)]
        return z_q.reshape(z.shape[0], z.shape[2], z.shape[3], self.code_dim).permute(0, 3, 1, 2).to(z.dtype)

    @torch.no_grad()
    def update_codebook(self, z_flat, one_hot, counts):
        """EMA updates (VQ-VAE App. A.1, Eqs. 6-8), usage statistics, and random restarts of dead codes."""
        sums = one_hot.T @ z_flat                                               # (K, D): sum of z assigned to each code
        if distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        g = self.ema_decay
        self.usage.mul_(g).add_(counts, alpha=1 - g)
        if self.use_ema:
            self.ema_count.mul_(g).add_(counts, alpha=1 - g)                     # N_k <- g N_k + (1-g) n_k   (Eq. 6)
            self.ema_sum.mul_(g).add_(sums, alpha=1 - g)                        # m_k <- g m_k + (1-g) sum z (Eq. 7)
            total = self.ema_count.sum()                                        # Laplace smoothing keeps N_k > 0
            smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embedding.copy_(self.ema_sum / smoothed[:, None])              # e_k = m_k / N_k            (Eq. 8)
        self.restart_dead_codes(z_flat)

    @torch.no_grad()
    def restart_dead_codes(self, z_flat):
        dead = self.usage < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = torch.randint(0, z_flat.shape[0], (n_dead,), device=z_flat.device)
        new_codes = z_flat[picks] + 1e-4 * torch.randn(n_dead, self.code_dim, device=z_flat.device)  # break ties
        if distributed():
            full = self.embedding.new_zeros(n_dead, self.code_dim).copy_(new_codes)
            torch.distributed.broadcast(full, 0)
            new_codes = full
        self.embedding.data[dead] = new_codes.to(self.embedding.dtype)
        self.usage[dead] = self.restart_threshold                                # a fresh code gets a grace period
        if self.use_ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = new_codes.to(self.ema_sum.dtype)


# ----------------------------------------------------------------------------
# The autoencoder

class Autoencoder(nn.Module):
    """KL or VQ autoencoder: forward(x) for training; encode(x) / decode(z) on scaled latents for diffusion.

    Latents for diffusion are z' = (z - shift_factor) * scale_factor, with z the posterior mean (KL; a sample when
    encode(..., sample=True)) or the pre-quantisation encoder output (VQ). decode() of a VQ model quantises first:
    the quantiser is part of the decoder, so diffusion works on continuous latents (LDM Sec. 3.1, VQ-reg.).
    """

    def __init__(self, config='kl-f4', **overrides):   # a name or config dict, plus overrides (Autoencoder(**cfg) works)
        super().__init__()
        self.config = config = autoencoder_config(config, **overrides)
        c, kind = config['latent_channels'], config['kind']
        arch = dict(channels=config['channels'], channel_mult=config['channel_mult'],
                    num_res_blocks=config['num_res_blocks'], groups=config['norm_groups'], dropout=config['dropout'])
        self.encoder = Encoder(config['in_channels'], out_channels=2 * c if kind == 'kl' else c, **arch)
        # 1x1 convs between the encoder/decoder and the latent (LDM's quant_conv / post_quant_conv)
        self.quant_conv = nn.Conv2d(2 * c if kind == 'kl' else c, 2 * c if kind == 'kl' else c, 1)
        if kind == 'vq':
            self.quantizer = VectorQuantizer(config['codebook_size'], c, config['beta'], config['codebook'],
                                             config['ema_decay'], config['l2_normalize'], config['restart_threshold'])
        self.post_quant_conv = nn.Conv2d(c, c, 1)
        self.decoder = Decoder(config['in_channels'], in_channels=c, **arch)
        self.register_buffer('latent_scale', torch.ones(c), persistent=False)   # rebuilt from config, see below
        self.register_buffer('latent_shift', torch.zeros(c), persistent=False)
        self.set_latent_scale(config['scale_factor'], config['shift_factor'])

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config['channel_mult']) - 1)

    def set_latent_scale(self, scale_factor, shift_factor=0.0):
        """Store the latent normalisation in the config (what checkpoints record) and in the buffers."""
        c = self.config['latent_channels']
        device = self.quant_conv.weight.device  # new tensors, not copy_: after a meta-device build they are real
        self.latent_scale = torch.as_tensor(scale_factor, dtype=torch.float32, device=device).expand(c).clone()
        self.latent_shift = torch.as_tensor(shift_factor, dtype=torch.float32, device=device).expand(c).clone()
        as_config = lambda v: float(v) if isinstance(v, (int, float)) else [float(t) for t in torch.as_tensor(v).flatten()]
        self.config['scale_factor'], self.config['shift_factor'] = as_config(scale_factor), as_config(shift_factor)

    # --- the raw latent (what the autoencoder is trained on) ---
    def posterior(self, x):
        """KL models: q(z|x) as a DiagonalGaussian."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode_raw(self, x, sample=False, generator=None):
        if self.config['kind'] == 'vq':
            return self.quant_conv(self.encoder(x))
        posterior = self.posterior(x)
        return posterior.sample(generator) if sample else posterior.mean

    def decode_raw(self, z, quantize=True):
        if self.config['kind'] == 'vq' and quantize:
            z = self.quantizer.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    # --- the scaled latent (what diffusion sees) ---
    def encode(self, x, sample=False, generator=None):
        """Images (N, C, H, W) in [-1, 1] -> latents (N, c, H/f, W/f) scaled for diffusion."""
        z = self.encode_raw(x, sample, generator)
        return (z - self.latent_shift[:, None, None]) * self.latent_scale[:, None, None]

    def decode(self, z):
        """Scaled latents -> images (not clamped)."""
        return self.decode_raw(z / self.latent_scale[:, None, None] + self.latent_shift[:, None, None])

    def forward(self, x, sample=True):
        """Training pass: (x_hat, reg_loss, info). reg_loss is the KL per sample (N,) or the VQ loss (scalar)."""
        if self.config['kind'] == 'kl':
            posterior = self.posterior(x)
            z = posterior.sample() if sample else posterior.mean
            return self.decoder(self.post_quant_conv(z)), posterior.kl(), {}
        z_q, vq_loss, info = self.quantizer(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), vq_loss, info

    def last_layer(self):
        """The decoder's last layer weight, where VQGAN's adaptive weight compares gradients (Eq. 7)."""
        return self.decoder.conv_out.weight


def create_autoencoder(name_or_config='kl-f4', **overrides):
    return Autoencoder(autoencoder_config(name_or_config, **overrides))


# ----------------------------------------------------------------------------
# Latent scale (LDM Sec. 4.3.2: "rescale the latent ... by the component-wise standard deviation"; EDM2)

@torch.no_grad()
def compute_latent_scale(autoencoder, batches, per_channel=False, target_std=1.0, sample=False):
    """Scale (and shift) that give the latents of `batches` (an iterable of image tensors) std target_std.

    per_channel=False: LDM/SD's single factor scale = 1 / std(z) over all elements, shift 0. per_channel=True:
    EDM2's per-channel mean/std, z' = (z - mean_c) / std_c * target_std. Returns dict(scale_factor=...,
    shift_factor=...). The latents are those encode() gives (the posterior mean), since those are what diffusion
    is trained on here; sample=True measures posterior samples instead, as LDM's scale_by_std did.
    """
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    count, total, total_sq = 0, 0.0, 0.0
    for x in batches:
        z = autoencoder.encode_raw(x.to(autoencoder.latent_scale.device), sample=sample).double()
        count += z.numel() // (z.shape[1] if per_channel else 1)
        total, total_sq = total + z.sum(dims), total_sq + (z ** 2).sum(dims)
    if count == 0:
        raise ValueError('compute_latent_scale needs at least one batch of images')
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    if per_channel:
        return dict(scale_factor=(target_std / std).float().tolist(), shift_factor=mean.float().tolist())
    # single factor: LDM scales without centring (its latents are close to zero-mean), std about the mean
    return dict(scale_factor=float(target_std / std), shift_factor=0.0)


# ----------------------------------------------------------------------------
# Adversarial training: PatchGAN discriminator, hinge loss, VQGAN's adaptive weight

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, App. 6.1.2; as taming's NLayerDiscriminator): one real/fake logit per patch.

    C64-C128-C256 with 4x4 convs (stride 2, then 1), BatchNorm and LeakyReLU(0.2); output (N, 1, h, w). With
    n_layers=3 the receptive field of each logit is 70x70 pixels.
    """

    def __init__(self,
                 in_channels=3,           # image channels
                 channels=64,             # width of the first layer (doubles per layer, at most 8x)
                 n_layers=3):             # strided layers after the first
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, n_layers + 1):
            previous, width = width, channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(previous, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation, as pix2pix / taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """L_D = 1/2 (E relu(1 - D(x)) + E relu(1 + D(x_hat))) (Lim & Ye 2017; used by VQGAN and LDM)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss, g_loss, last_layer, delta=1e-4, max_weight=1e4):
    """lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_G]|| + delta) (VQGAN Eq. 7), clamped to [0, max_weight] and
    detached: taming-transformers' calculate_adaptive_weight (delta 1e-4, clamp 1e4), which LDM copies."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + delta)).clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """The first-stage objective of LDM (KL) and VQGAN (VQ), per pixel:

        L = mean |x - x_hat| + perceptual_weight * LPIPS  +  reg_weight * L_reg  +  disc_weight * lambda * L_G

    L_reg: the KL summed over latent elements divided by the pixel count of an image, so reg_weight keeps the
    meaning of LDM's kl_weight (LDM sums both over elements; dividing the whole loss by 3HW changes nothing but
    the scale); or the VQ loss (VQGAN, codebook_weight 1). The GAN term starts at step disc_start. LDM's learned
    output log-variance is left out (fixed at 0). The discriminator is trained by discriminator_loss().

    lambda (VQGAN Eq. 7) is measured where the reference code measures it. taming's VQ loss (vqperceptual.py)
    averages the reconstruction loss over elements, as here, so VQ models use adaptive_weight(L_rec, ...) as is.
    LDM's KL loss (contperceptual.py) sums it over the C*H*W elements of an image: KL models measure lambda on
    C*H*W * L_rec, so delta and the clamp at 1e4 act on LDM's lambda, and divide it by C*H*W to weigh this
    per-element loss (LDM's loss divided by C*H*W, term by term).

    The perceptual term is passed in, not imported: lpips.load_lpips() gives LPIPS-VGG, and any module mapping
    (x, x_hat) to (N,) distances works. So vae.py and lpips.py each stay copyable alone; the training program
    that uses both joins them.
    """

    def __init__(self,
                 kind='kl',               # 'kl' or 'vq'
                 reg_weight=None,         # KL weight (default 1e-6, LDM) or codebook weight (default 1.0, VQGAN)
                 disc_weight=0.5,         # scale of the adaptive GAN weight (0.5 in LDM's KL-f8 config; 0 = no GAN)
                 disc_start=0,            # first step with the GAN losses (VQGAN trains without them at first)
                 perceptual=None,         # LPIPS module (lpips.load_lpips()): (x, x_hat) -> (N,); None: L1 + GAN
                 perceptual_weight=1.0,   # weight of the perceptual term when `perceptual` is given
                 in_channels=3,           # image channels (the discriminator's input)
                 disc_channels=64,        # discriminator width
                 disc_layers=3):          # discriminator depth
        super().__init__()
        self.kind = kind
        self.reg_weight = (1e-6 if kind == 'kl' else 1.0) if reg_weight is None else reg_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers)

    def gan_active(self, step):
        return self.disc_weight > 0 and step >= self.disc_start

    def reconstruction_loss(self, x, x_hat):
        rec = (x - x_hat).abs().mean()
        if self.perceptual is not None and self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual(x, x_hat).mean()
        return rec

    def generator_loss(self, x, x_hat, reg_loss, step, last_layer):
        """The autoencoder's loss and a dict of floats to log. The discriminator gets no gradient from it."""
        rec = self.reconstruction_loss(x.float(), x_hat.float())
        reg = reg_loss.mean() / x[0].numel() if self.kind == 'kl' else reg_loss.mean()
        loss = rec + self.reg_weight * reg
        logs = dict(rec=rec.item(), reg=reg.item())
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)                            # no D update from G's loss
            g_loss = -self.discriminator(x_hat.float()).mean()                  # L_G = -E D(x_hat)
            self.discriminator.requires_grad_(True)
            weight = self.gan_weight(rec, g_loss, last_layer, x[0].numel()) if torch.is_grad_enabled() else 0.0
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.item(), gan_weight=float(weight))
        return loss, logs

    def gan_weight(self, rec, g_loss, last_layer, elements):
        """disc_weight * lambda on the reference code's scale (see the class docstring); elements = C*H*W."""
        scale = elements if self.kind == 'kl' else 1                         # LDM: sum over elements; taming: mean
        return self.disc_weight * adaptive_weight(scale * rec, g_loss, last_layer) / scale

    def discriminator_loss(self, x, x_hat, step):
        """Hinge loss of D on real x and detached reconstructions; None before disc_start."""
        if not self.gan_active(step):
            return None, {}
        logits_real = self.discriminator(x.float().detach())
        logits_fake = self.discriminator(x_hat.float().detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, dict(d_loss=loss.item(), logits_real=logits_real.mean().item(),
                          logits_fake=logits_fake.mean().item())


# ----------------------------------------------------------------------------
# Checkpoints (the autoencoder alone; train.py writes its own, with the same config/model keys)

def autoencoder_from_checkpoint(checkpoint, use_ema=True):
    """Rebuild an autoencoder from a dict with 'autoencoder_config' (or 'config') and 'model' / 'ema' weights."""
    config = checkpoint.get('autoencoder_config') or checkpoint['config']
    model = create_autoencoder(config)
    weights = checkpoint.get('ema') if use_ema and checkpoint.get('ema') is not None else checkpoint['model']
    model.load_state_dict(weights)
    return model.eval()


# ----------------------------------------------------------------------------
# Demo: a tiny KL autoencoder learns 16x16 colour blobs, then its latent scale is set

if __name__ == '__main__':
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing='ij')

    def blobs(n):  # a coloured disc at a random place on a grey background
        centre, colour = torch.rand(n, 2, 1, 1) - 0.5, torch.rand(n, 3, 1, 1) * 2 - 1
        inside = ((xs - centre[:, :1]) ** 2 + (ys - centre[:, 1:]) ** 2 < 0.25).float()
        return inside * colour

    ae = create_autoencoder('tiny-kl')
    loss_fn = AutoencoderLoss('kl', disc_weight=0.0)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    print(f"tiny-kl: {sum(p.numel() for p in ae.parameters())} parameters, f = {ae.downsample_factor}")
    for step in range(81):                  # about 3 s on one idle CPU core
        x = blobs(16)
        x_hat, kl, _ = ae(x)
        loss, logs = loss_fn.generator_loss(x, x_hat, kl, step, ae.last_layer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 0:
            psnr = 10 * math.log10(4 / F.mse_loss(x_hat, x).item())
            print(f"step {step:3d}  L1 {logs['rec']:.4f}  KL/pixel {logs['reg']:.3f}  PSNR {psnr:.1f} dB")
    ae.eval()
    ae.set_latent_scale(**compute_latent_scale(ae, [blobs(256)]))
    z = ae.encode(blobs(256))
    print(f"scale_factor {ae.config['scale_factor']:.4f}: scaled latents have std {z.std().item():.3f} (target 1)")
