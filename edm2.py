"""
EDM2: the magnitude-preserving U-Net and its training recipe (Karras, Aittala, Lehtinen, Hellsten, Aila, Laine
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696; config G).

The paper rebuilds ADM's U-Net so that every layer keeps the expected magnitude of its activations, weights and
updates (Sec. 2). With unit-magnitude inputs each op below returns unit-magnitude outputs:

    mp_silu(x)    = silu(x) / 0.596                                     (Eq. 81; E[silu(N(0,1))^2] = 0.596^2)
    mp_sum(a, b)  = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)           (Eq. 88)
    mp_cat(a, b)  = [w_a a, w_b b], w_a = sqrt((Na + Nb) / ((1-t)^2 + t^2)) (1 - t) / sqrt(Na), w_b alike with t
                                                                        (Eq. 103)
    MPConv: w_hat = w / ||w_i||  per output channel, times 1 / sqrt(fan_in)   (Eq. 47), and the stored weights
            themselves are re-normalised to ||w_i|| = sqrt(fan_in) during training: forced weight normalisation
            (Eq. 66), so weights cannot grow and the effective learning rate is the one set (Sec. 2.4)
    pixel norm: x / rms over channels, at the start of each encoder block and on q, k, v (cosine attention)
    no biases, no group norms; the output layer and each block's embedding gain are learned scalars from 0.

Preconditioning (EDM, Karras et al. 2022 Table 1; EDM2 Precond): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)
with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = ln(sigma) / 4, sd = sigma_data = 0.5. Training (Sec. 2, App. B):
    sigma ~ exp(N(P_mean, P_std^2))                      ImageNet-512 latents (-0.4, 1.0), ImageNet-64 (-0.8, 1.6)
    L = E_sigma [ lambda(sigma) / exp(u(sigma)) ||D(y + n; sigma) - y||^2 + u(sigma) ]           (Eq. 21)
        lambda(sigma) = 1 / c_out^2; u(sigma) = a learned log-variance, a one-layer MLP on Fourier features of
        c_noise; at the optimum exp(u(sigma)) = the expected weighted loss at sigma, so every noise level's weighted
        loss is driven to 1 (the "uncertainty" weighting of Kendall et al. 2018)
    Adam betas (0.9, 0.99), eps 1e-8; lr alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)), linear ramp-up (Sec. 2.4)

Conventions: x (N, C, H, W); noise_level (N,) is c_noise = ln(sigma) / 4; y (N,) class indices, index num_classes
= "no class" (a zero label vector). Usage:
    net = EDM2UNet(in_channels=1, image_size=28, num_classes=10, **EDM2_CONFIGS['edm2-cpu'])
    F = net(c_in * x, torch.log(sigma) / 4, y);  u = net.logvar(torch.log(sigma) / 4)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Magnitude-preserving operations (App. B.1 - B.5).

def normalize(x, dim=None, eps=1e-4):
    """x scaled to unit root-mean-square over `dim` (default: all but the first): ||x_i|| = sqrt(numel_i).
    Used on weights (each output channel) and as the pixel norm (dim=1, over channels)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # eps on the rms scale: norm / sqrt(n) + eps, written as eps + norm * sqrt(norm.numel() / x.numel())
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):
    """Magnitude-preserving SiLU (Eq. 81): 0.596 = sqrt(E[silu(z)^2]) for z ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving weighted sum (Eq. 88): lerp(a, b, t), rescaled so two independent unit inputs give a
    unit output. t is the share of b (the residual branch: res_balance = 0.3)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation (Eq. 103): each part scaled so the whole has unit magnitude and b
    contributes the share t of it, whatever the channel counts Na and Nb."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([C / math.sqrt(Na) * (1 - t) * a, C / math.sqrt(Nb) * t * b], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features of a scalar (Eq. 75): sqrt(2) cos(2 pi (f x + phi)), f ~ N(0, 1),
    phi ~ U(0, 1), fixed (buffers): unit magnitude over random phases."""

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):                                        # x: (N,) -> (N, num_channels)
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), no bias (Eq. 47), with forced
    weight normalisation (Eq. 66): in training every forward writes the normalised weights back into the
    parameter, and normalize_weights_ does the same after each optimizer step, so ||w_i|| stays sqrt(fan_in)."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.no_grad()
    def normalize_weight_(self):
        """Forced weight normalisation of the stored weight (Eq. 66): each output channel back to unit rms."""
        self.weight.copy_(normalize(self.weight.float()).to(self.weight.dtype))

    def forward(self, x, gain=1.0):
        w = self.weight.float()
        if self.training:
            self.normalize_weight_()                             # forced: the stored weights never drift (Eq. 66)
        w = normalize(w)                                         # and normalised again in the graph, so the
        w = w * (gain / math.sqrt(w[0].numel()))                 # gradient is orthogonal to w; 1/sqrt(fan_in) (Eq. 47)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def resample(x, mode='keep'):
    """2x down (2x2 box filter, stride 2) or up (nearest, the transposed box filter) per channel, or keep."""
    if mode == 'keep':
        return x
    c = x.shape[1]
    f = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)  # the [1, 1] filter, outer product, sum 1
    if mode == 'down':
        return F.conv2d(x, f, groups=c, stride=2)
    return F.conv_transpose2d(x, f * 4, groups=c, stride=2)


# ----------------------------------------------------------------------------------------------------
# The U-Net of config G (Fig. 21).

class Block(nn.Module):
    """Encoder or decoder block (Fig. 21): resample, (encoder) 1x1 skip conv and pixel norm, a residual branch of
    two 3x3 MPConvs with the noise embedding as a multiplicative gain, mp_sum with the main branch, then optional
    cosine self-attention (pixel-normalised q, k, v) joined by mp_sum; activations clipped at clip_act."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 attention=False, channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))           # learned, from 0: the embedding starts as gain 1
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        # Main branch: the encoder changes width first and pixel-normalises (no group norm anywhere).
        x = resample(x, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                              # pixel norm
        # Residual branch; the embedding scales the features by (1 + gain * linear(emb)).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1         # (N, C)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        # Cosine attention: q, k, v pixel-normalised per head, so the logits are cosines / sqrt(d).
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])   # (N, heads, d, 3, HW)
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(q.shape[2])).softmax(dim=3)   # (N, heads, HW, HW)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """F of D = c_skip x + c_out F(c_in x, c_noise): the magnitude-preserving U-Net of config G (Fig. 21), plus the
    uncertainty head u(c_noise) of Eq. 21 (EDM2 keeps it in its Precond; it is here so that the optimizer, EMA and
    checkpoint hold it with the network). The codebase's network interface: net(x, noise_level, y=None, ...)."""

    def __init__(self,
                 in_channels=3,               # image (or latent) channels
                 image_size=32,               # resolution; halved once per level below the first
                 num_classes=0,               # class labels 0..num_classes-1; index num_classes = no class
                 model_channels=192,          # base width (XS 128, S 192, M 256, L 320, XL 384, XXL 448)
                 channel_mult=(1, 2, 3, 4),   # width multiplier per resolution level
                 num_blocks=3,                # encoder blocks per level (the decoder has one more)
                 attn_resolutions=(16, 8),    # resolutions with self-attention (plus the decoder's first block)
                 channels_per_head=64,        # attention head width
                 dropout=0.0,                 # dropout in the residual branch (0.1 from M up at ImageNet-512)
                 label_balance=0.5,           # mp_sum share of the class embedding against the noise embedding
                 concat_balance=0.5,          # mp_cat share of the skip connections in the decoder
                 res_balance=0.3,             # mp_sum share of each residual branch
                 attn_balance=0.3,            # mp_sum share of each attention branch
                 clip_act=256,                # activation clipping (a guard against fp16 overflow)
                 logvar_channels=128):        # Fourier features of the uncertainty head u(sigma)
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                           attn_resolutions=tuple(attn_resolutions), channels_per_head=channels_per_head,
                           dropout=dropout, label_balance=label_balance, concat_balance=concat_balance,
                           res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
                           logvar_channels=logvar_channels)
        problem = resolution_problem(len(channel_mult), image_size)
        if problem:
            raise ValueError(problem)
        self.num_classes, self.label_balance, self.concat_balance = num_classes, label_balance, concat_balance
        block = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                     attn_balance=attn_balance, clip_act=clip_act)
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.out_gain = nn.Parameter(torch.zeros([]))           # learned output gain, from 0: F = 0 at the start
        # Embedding: Fourier features of c_noise -> MPConv; the class one-hot joins by mp_sum.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(num_classes, cemb, kernel=[]) if num_classes else None
        # Encoder: a constant ones channel is appended to the input (it stands in for the biases).
        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, channels in enumerate(cblock):
            res = image_size >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc',
                                                            attention=res in attn_resolutions, **block)
        # Decoder: two blocks at the lowest resolution (the first with attention), then up and num_blocks + 1 blocks
        # per level, each after mp_cat with the matching encoder output.
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = image_size >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec',
                                                            attention=res in attn_resolutions, **block)
        self.out_conv = MPConv(cout, in_channels, kernel=[3, 3])
        # The uncertainty u(sigma) of Eq. 21: one MPConv on Fourier features of c_noise (EDM2 Precond).
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def embed(self, noise_level, y):
        """The block embedding: noise features, mp_sum with the class (a zero vector for 'no class'), mp_silu."""
        emb = self.emb_noise(self.emb_fourier(noise_level))
        if self.emb_label is not None:
            if y is None:
                y = torch.full((noise_level.shape[0],), self.num_classes, dtype=torch.long, device=emb.device)
            one_hot = F.one_hot(y.long(), self.num_classes + 1)[:, :self.num_classes].to(emb.dtype)   # no class: 0
            emb = mp_sum(emb, self.emb_label(one_hot * math.sqrt(self.num_classes)), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x, noise_level, y=None, context=None, x_cond=None, aug_cond=None):
        if context is not None or x_cond is not None or aug_cond is not None:
            raise ValueError('EDM2UNet takes class labels only (no context, x_cond or aug_cond)')
        emb = self.embed(noise_level, y)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def logvar(self, noise_level):
        """u(sigma) of Eq. 21, (N,): the learned log-variance of the weighted loss at this noise level."""
        return self.logvar_linear(self.logvar_fourier(noise_level)).reshape(-1)

    @torch.no_grad()
    def normalize_weights_(self):
        """Forced weight normalisation of every MPConv (Eq. 66): call after each optimizer step."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.normalize_weight_()


def resolution_problem(levels, image_size):
    """Why image_size does not suit a U-Net of `levels` levels (each halves it), or None."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        return f'resolution {image_size} does not suit an EDM2 U-Net of {levels} levels: it needs a multiple of {factor}'
    return None


# ----------------------------------------------------------------------------------------------------
# Preconditioning, noise levels, the uncertainty-weighted loss, the learning rate.

def preconditioning(sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM2's Precond: EDM's (Karras et al. 2022, Table 1) with c_noise = ln(sigma)/4."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data * total.rsqrt(), total.rsqrt(), sigma.log() / 4


def denoise(net, x, sigma, y=None, sigma_data=0.5):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7 with the preconditioning above)."""
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    b = lambda c: c.reshape(-1, *([1] * (x.ndim - 1)))
    return b(c_skip) * x + b(c_out) * net(b(c_in) * x, c_noise, y)


def sample_sigma(n, P_mean=-0.4, P_std=1.0, generator=None):
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM Sec. 5; EDM2 App. B uses (-0.4, 1.0) for
    ImageNet-512 latents and (-0.8, 1.6) for ImageNet-64 pixels)."""
    return (torch.randn(n, generator=generator) * P_std + P_mean).exp()


def uncertainty_weighted_loss(weighted_loss, logvar):
    """EDM2 Eq. 21, per sample: lambda(sigma) ||D - y||^2 / exp(u(sigma)) + u(sigma). weighted_loss is the
    lambda-weighted (= 1/c_out^2) squared error, the plain EDM loss; minimising over u gives exp(u) = E[weighted_loss
    at sigma], so each noise level's loss / exp(u) goes to 1 and every sigma gets the same share of the gradient."""
    return weighted_loss / logvar.exp() + logvar


def learning_rate(step, alpha_ref, t_ref, rampup=0):
    """alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)) (EDM2 Sec. 2.4, config F: inverse square root decay once the
    weights are normalised), times a linear ramp-up over the first `rampup` steps (EDM2's 10M images). t counts
    optimizer steps (the paper's t_ref = 70k steps of batch 2048 at ImageNet-512, 35k at ImageNet-64)."""
    lr = alpha_ref / math.sqrt(max(step / t_ref, 1)) if t_ref > 0 else alpha_ref
    return lr * min((step + 1) / rampup, 1) if rampup > 0 else lr


ADAM_BETAS = (0.9, 0.99)             # EDM2 training_loop: Adam with beta2 = 0.99, eps 1e-8, no weight decay


# ----------------------------------------------------------------------------------------------------
# Named configurations (one dict, DiT style).

EDM2_CONFIGS = {
    # The paper's ImageNet-512 sizes (latents 4x64x64, 1000 classes; Table 2): four levels of widths (1, 2, 3, 4)
    # x model_channels, three blocks per level, attention at 16x16 and 8x8; dropout 0.1 from M up.
    'edm2-xs': dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=0.0),
    'edm2-s': dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=0.0),
    'edm2-m': dict(model_channels=256, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=0.1),
    # Not a paper configuration: config G's layers at a size that trains on MNIST/shapes on a CPU in minutes (three
    # levels, one block each, one 32-wide head only in the decoder's first block, which Fig. 21 always gives
    # attention): 0.29M parameters at 28x28 with 10 classes, the size of unet.py's 'micro'.
    'edm2-cpu': dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), channels_per_head=32,
                     dropout=0.0),
}
# Millions of parameters in the paper (Table 2, ImageNet-512, the "Mparams" column), for the test of the sizes.
EDM2_PAPER_MPARAMS = {'edm2-xs': 125, 'edm2-s': 280, 'edm2-m': 498}
# The paper's training settings of each size (ImageNet-512, batch 2048; EDM2 train_edm2.py presets): alpha_ref,
# t_ref in steps, the log-normal of sigma.
EDM2_TRAINING = {'edm2-xs': dict(alpha_ref=0.0120, t_ref=70000, P_mean=-0.4, P_std=1.0),
                 'edm2-s': dict(alpha_ref=0.0100, t_ref=70000, P_mean=-0.4, P_std=1.0),
                 'edm2-m': dict(alpha_ref=0.0090, t_ref=70000, P_mean=-0.4, P_std=1.0)}


if __name__ == '__main__':
    # Demo: the magnitude-preserving ops keep unit rms, and a few Adam steps leave the weight norms where they were.
    torch.manual_seed(0)
    rms = lambda t: t.pow(2).mean().sqrt().item()
    a, b = torch.randn(4096, 64), torch.randn(4096, 32)
    print(f'rms: mp_silu {rms(mp_silu(a)):.3f}  mp_sum {rms(mp_sum(a, a.roll(1, 0), 0.3)):.3f}  '
          f'mp_cat {rms(mp_cat(a, b, t=0.7)):.3f}  MPConv {rms(MPConv(64, 48, [])(a)):.3f}  (all ~1)')
    net = EDM2UNet(in_channels=1, image_size=16, num_classes=3, **EDM2_CONFIGS['edm2-cpu'])
    opt = torch.optim.Adam(net.parameters(), lr=0.05, betas=ADAM_BETAS)
    norm0 = net.enc['16x16_conv'].weight.norm().item()
    for _ in range(3):
        x, sigma = torch.randn(8, 1, 16, 16), sample_sigma(8)
        loss = uncertainty_weighted_loss((denoise(net, x, sigma) - x).pow(2).mean((1, 2, 3)) /
                                         preconditioning(sigma)[1] ** 2, net.logvar(sigma.log() / 4)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.normalize_weights_()
    print(f"{sum(p.numel() for p in net.parameters())} parameters; first conv weight norm {norm0:.3f} -> "
          f"{net.enc['16x16_conv'].weight.norm().item():.3f} after 3 Adam steps (forced weight normalisation)")
    print('lr at steps 0, 99, 1000, 4000 (alpha_ref 0.01, t_ref 1000, ramp-up 100):',
          [round(learning_rate(s, 0.01, 1000, 100), 5) for s in (0, 99, 1000, 4000)])
