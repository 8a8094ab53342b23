"""
The U-Net denoiser of DDPM and ADM, for images and videos, with every conditioning path.

Papers:
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239 (the network, App. B)
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv:2105.05233 (ADM: multi-head
    attention, BigGAN up/down-sampling residual blocks, adaptive group normalisation, class embedding)
  Saharia et al. 2022, "Image Super-Resolution via Iterative Refinement", arXiv:2104.07636 (x_cond by concatenation)
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752 (cross-attn)
  Ho et al. 2022, "Video Diffusion Models", arXiv:2204.03458 (space-time factorised U-Net, joint video-image training)
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864 (RoPE)

The network maps (x, noise_level, conditions) -> F, a tensor shaped like x. What F means (eps, v, x0, EDM's F,
a flow velocity) is decided by the parameterisation in diffusion.py; this file knows nothing about schedules.

  emb     = MLP(sinusoid(noise_level) + W_aug aug_cond) + E_class[y]       (DDPM App. B; ADM Sec. 3)
  ResBlock: h = conv(SiLU(GN(x))); h = GN(h) * (1 + s) + b, (s, b) = W emb  (AdaGN, ADM Sec. 3, "adaptive norm")
            out = x + conv(dropout(SiLU(h)))                               (DDPM uses h + W emb instead of AdaGN)
  Attention(q, k, v) = softmax(q k^T / sqrt(d)) v                          (via F.scaled_dot_product_attention)
  RoPE: <R(p) q, R(p') k> = <q, R(p' - p) k>                               (RoFormer Sec. 3.2: only offsets matter)

Relative positions: self-attention uses rotary embeddings (RoPE), 2-D over (row, col) in space and 1-D over frame
index in time, rather than a learned relative-position bias table. Both make attention scores depend only on the
offset between two positions, but RoPE (a) has no parameters and no table sized to one resolution, so a network
trained at 32x32 runs at 64x64 or on a longer video; and (b) leaves attn_mask free, so SDPA can pick its fused
flash kernel on GPU (an additive bias must be passed as attn_mask, which rules that kernel out).

Tensor conventions: images x: (N, C, H, W); videos x: (N, C, F, H, W); noise_level: (N,) float; y: (N,) long,
index num_classes = "no class"; context: (N, L, context_dim) with context_mask (N, L) bool, True = keep;
x_cond: (N, cond_channels, [F,] H, W); aug_cond: (N, aug_dim).

Public weights: the 'ddpm-cifar10' configuration computes DDPM's function (its timestep features and
downsampling pad, see ddpm_timestep_embedding and Downsample), and load_diffusers_unet maps the diffusers
UNet2DModel layout of google/ddpm-cifar10-32 into it.

Usage: net = create_unet('tiny'); out = net(x, noise_level)        # out.shape == x.shape
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Small helpers

def feature_dtype(dtype):
    """The dtype the fixed sinusoidal features are computed in for a network of `dtype`: float32 (what published
    weights were trained on, also for float16/bfloat16 networks), or float64 for a float64 network, so that a
    float64 network is float64 throughout (how a solver is checked on a real network: float32 angles would make the
    network a step function of the noise level at the 1e-7 scale). diffusers computes its features in float32 even
    in a float64 model; a float64 parity against it sets unet.feature_dtype = lambda dtype: torch.float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(noise_level, dim, max_period=10000.0, dtype=torch.float32):
    """Sinusoidal features of a scalar per sample (Transformer / DDPM style): (N,) -> (N, dim), computed in `dtype`.

    The frequencies run from 1 down to 1/max_period, so both the integer steps 0..999 of DDPM and EDM's
    c_noise = ln(sigma)/4 in about [-1.6, 1.1] get distinct, smooth codes; the MLP that follows adapts to either.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=noise_level.device, dtype=dtype) / half)
    angles = noise_level.to(dtype)[:, None] * freqs[None]                   # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def ddpm_timestep_embedding(noise_level, dim, dtype=torch.float32):
    """DDPM's own sinusoidal features (Ho et al. 2020, diffusion_tf/nn.py get_timestep_embedding): (N,) -> (N, dim).

    Two details differ from timestep_embedding above: sin comes before cos, and the frequencies are
    exp(-ln(10000) i / (half - 1)), i = 0 .. half - 1, so the last one is exactly 1/10000. The published DDPM
    weights were trained on these features, so the 'ddpm-cifar10' configuration must compute them.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=noise_level.device, dtype=dtype) / (half - 1))
    angles = noise_level.to(dtype)[:, None] * freqs[None]                   # (N, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def zero_module(module):
    """Zero a layer's weights so a residual branch starts as the identity (DDPM's init_scale=0, ADM's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def rope_angles(positions, head_dim, base=10000.0, dtype=torch.float32):
    """Rotation angles for rotary embeddings: positions (L, n_axes) -> (L, head_dim // 2).

    Each axis (row, column, or frame) gets an equal share n of the head_dim // 2 rotation planes, with geometric
    frequencies base^(-i/n) as in RoFormer Sec. 3.2. Leftover planes (if head_dim // 2 is not a multiple of
    n_axes) get angle 0, i.e. they are not rotated. Computed in `dtype` (feature_dtype of the network).
    """
    n_axes = positions.shape[1]
    per_axis = head_dim // 2 // n_axes
    freqs = base ** (-torch.arange(per_axis, device=positions.device, dtype=dtype) / max(per_axis, 1))
    angles = (positions.to(dtype)[:, :, None] * freqs).flatten(1)           # (L, n_axes * per_axis)
    return F.pad(angles, (0, head_dim // 2 - angles.shape[1]))


def apply_rope(x, angles):
    """Rotate pairs (x_i, x_{i+d/2}) of x: (..., L, d) by angles (L, d/2), so <R_p q, R_p' k> depends on p' - p."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def grid_positions(height, width, device):
    """Integer (row, col) of every pixel in raster order: (H*W, 2)."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing='ij')
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def split_heads(t, heads):
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def temporal_mask(batch, frames, num_video_frames, device):
    """Which frames may attend to which, for joint video-and-image training (Video Diffusion Models, Sec. 3).

    Frames [0, k) of sample n form one video (k = num_video_frames[n]); frames [k, F) are independent images
    concatenated along the frame axis, which may attend only to themselves. Returns (N, F, F) bool, True = attend,
    or None when every frame belongs to one video.
    """
    if num_video_frames is None:
        return None
    k = torch.as_tensor(num_video_frames, device=device).expand(batch)       # (N,)
    in_video = torch.arange(frames, device=device)[None] < k[:, None]     # (N, F)
    same_video = in_video[:, :, None] & in_video[:, None, :]              # (N, F, F)
    return same_video | torch.eye(frames, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------
# Residual block and resampling (DDPM App. B; ADM Sec. 3)

class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv (DDPM's resamp_with_conv).

    pad='symmetric' pads one pixel on every side (output pixel i is centred on input pixel 2i). pad='ddpm' pads
    one pixel on the right and bottom only, then convolves with stride 2 and no padding: TensorFlow's 'SAME'
    padding for a stride-2 conv on an even size, which DDPM's code used (output pixel i is centred on 2i + 1).
    """

    def __init__(self,
                 channels,                # channels in and out
                 pad='symmetric'):        # 'symmetric' or 'ddpm' (right/bottom), see above
        super().__init__()
        if pad not in ('symmetric', 'ddpm'):
            raise ValueError(f"unknown downsample pad {pad!r}; choose 'symmetric' or 'ddpm'")
        self.pad = pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1 if pad == 'symmetric' else 0)

    def forward(self, h, cond):
        if self.pad == 'ddpm':
            h = F.pad(h, (0, 1, 0, 1))                                       # (left, right, top, bottom)
        return self.conv(h)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self,
                 channels):               # channels in and out
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h, cond):
        return self.conv(F.interpolate(h, scale_factor=2.0, mode='nearest'))


class ResBlock(nn.Module):
    """GN-SiLU-conv, inject the embedding (additive or AdaGN), GN-SiLU-dropout-conv, plus a skip connection.

    With resample='down'/'up' the block also halves/doubles the resolution inside the residual branch and on the
    skip path, as in BigGAN and ADM ("resblock_updown"), instead of a separate Downsample/Upsample layer.
    """

    def __init__(self,
                 in_channels,             # channels of the input
                 out_channels,            # channels of the output
                 emb_dim,                 # width of the conditioning embedding
                 dropout=0.0,             # dropout before the last conv (DDPM: 0.1 on CIFAR-10)
                 scale_shift_norm=True,   # AdaGN: emb predicts GN scale and shift (ADM); False: emb is added (DDPM)
                 norm_groups=32,          # groups of every GroupNorm
                 resample=None):          # None, 'down' or 'up'
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.resample = resample
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # AdaGN needs a scale and a shift per channel; the DDPM block needs one bias per channel.
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift_norm else 1))
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        # Zero init: each residual branch starts as the identity, which keeps deep U-Nets stable early in training.
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # A 1x1 conv matches channels on the skip path when they change (DDPM's nin_shortcut).
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, t):
        if self.resample == 'down':
            return F.avg_pool2d(t, 2)
        if self.resample == 'up':
            return F.interpolate(t, scale_factor=2.0, mode='nearest')
        return t

    def forward(self, x, cond):
        h = F.silu(self.norm1(x))
        # Resample after the first activation, so the norm sees the full-resolution input (ADM's ResBlock).
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        emb = self.emb_proj(cond['emb'])[:, :, None, None]                   # (B, C or 2C, 1, 1)
        if self.scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift                          # AdaGN (ADM Sec. 3, "adaptive GN")
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# ----------------------------------------------------------------------------
# Attention layers: spatial self-attention, cross-attention, temporal attention

class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W pixels of each frame, with 2-D rotary position embeddings."""

    def __init__(self,
                 channels,                # channels of the feature map
                 head_channels=64,        # channels per head; heads = channels // head_channels (ADM: 64)
                 norm_groups=32,          # groups of the GroupNorm before attention
                 rope=True):              # rotate q and k by (row, col) so scores depend on relative position
        super().__init__()
        self.heads = max(channels // head_channels, 1)
        self.rope = rope
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)                          # one matmul for q, k and v
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, cond):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                     # (B, H*W, C)
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))  # (B, heads, HW, d)
        if self.rope:
            angles = rope_angles(grid_positions(H, W, x.device), q.shape[-1], dtype=feature_dtype(q.dtype))
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        h = F.scaled_dot_product_attention(q, k, v)                          # (B, heads, HW, d)
        h = self.proj(h.transpose(1, 2).flatten(2))                          # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Queries from pixels, keys and values from context tokens (LDM Sec. 3.3), ignoring padded tokens."""

    def __init__(self,
                 channels,                # channels of the feature map
                 context_dim,             # width of each context token (e.g. a text encoder's)
                 head_channels=64,        # channels per head
                 norm_groups=32):         # groups of the GroupNorm before attention
        super().__init__()
        self.heads = max(channels // head_channels, 1)
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, cond):
        context = cond['context']
        if context is None:                  # no context given: the layer is skipped, i.e. unconditional
            return x
        B, C, H, W = x.shape
        q = split_heads(self.q(self.norm(x).flatten(2).transpose(1, 2)), self.heads)     # (B, heads, HW, d)
        k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))   # (B, heads, L, d)
        mask = cond['context_mask']                                          # (B, L) bool or None
        if mask is not None:
            # A sample whose tokens are all padding would give softmax over nothing (NaN): let it attend to all
            # tokens, then drop its result, so it reads as "no context".
            has_any = mask.any(dim=1)                                        # (B,)
            mask = (mask | ~has_any[:, None])[:, None, None, :]              # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # (B, heads, HW, d)
        h = self.proj(h.transpose(1, 2).flatten(2))                          # (B, HW, C)
        if mask is not None:
            h = h * has_any[:, None, None].to(h.dtype)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class TemporalAttention(nn.Module):
    """Attention across the frames at each pixel, with 1-D rotary embeddings (Video Diffusion Models, Sec. 3).

    It uses LayerNorm per token rather than GroupNorm: GroupNorm statistics pooled over frames would leak
    information between independent images of a joint video-image batch, which the frame mask must prevent.
    """

    def __init__(self,
                 channels,                # channels of the feature map
                 head_channels=64,        # channels per head
                 rope=True):              # rotate q and k by frame index (relative positions in time)
        super().__init__()
        self.heads = max(channels // head_channels, 1)
        self.rope = rope
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        # Zero init: a fresh temporal layer is the identity, so the video net starts as a per-frame image net.
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, cond):
        frames, mask = cond['frames'], cond['frame_mask']
        BF, C, H, W = x.shape
        N = BF // frames
        tokens = x.reshape(N, frames, C, H * W).permute(0, 3, 1, 2).reshape(N * H * W, frames, C)  # (N*HW, F, C)
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.norm(tokens)).chunk(3, dim=-1))
        if self.rope:
            positions = torch.arange(frames, device=x.device)[:, None]          # (F, 1): one axis, the frame
            angles = rope_angles(positions, q.shape[-1], dtype=feature_dtype(q.dtype))
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if mask is not None:
            mask = mask.repeat_interleave(H * W, dim=0)[:, None]             # (N*HW, 1, F, F)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # (N*HW, heads, F, d)
        h = self.proj(h.transpose(1, 2).flatten(2))                          # (N*HW, F, C)
        h = h.reshape(N, H * W, frames, C).permute(0, 2, 3, 1).reshape(BF, C, H, W)
        return x + h


# ----------------------------------------------------------------------------
# The U-Net

class UNet(nn.Module):
    """Encoder-decoder with skip connections (DDPM App. B, ADM), for images (N,C,H,W) or videos (N,C,F,H,W).

    Spatial layers run on each frame separately (frames are folded into the batch); temporal attention layers,
    when enabled, mix information across frames. An image input is a one-frame video, so it passes through the
    temporal layers attending only to itself: exactly what an independent image in a joint batch sees.
    """

    def __init__(self,
                 in_channels=3,               # channels of x
                 out_channels=None,           # channels of the output; None = in_channels (2x for learned sigma)
                 model_channels=64,           # channels at the first level (DDPM CIFAR-10: 128)
                 channel_mult=(1, 2, 2, 2),   # channels per level = model_channels * mult; len = number of levels
                 num_res_blocks=2,            # residual blocks per level in the encoder (decoder has one more)
                 attention_resolutions=(16,), # resolutions (of a 32x32 input) with self-attention
                 image_size=32,               # nominal input size, only used to map attention_resolutions to levels
                 dropout=0.0,                 # dropout in residual blocks (DDPM CIFAR-10: 0.1)
                 head_channels=64,            # channels per attention head (ADM: 64; DDPM: one head)
                 norm_groups=32,              # GroupNorm groups
                 scale_shift_norm=True,       # adaptive GroupNorm (ADM) vs additive embedding (DDPM)
                 resblock_updown=False,       # resample inside residual blocks (ADM) vs strided/nearest convs (DDPM)
                 rope=True,                   # rotary relative positions in self-attention (space and time)
                 num_classes=0,               # class labels 0..num_classes-1, plus a learned "no class" index
                 aug_dim=0,                   # width of aug_cond (augmentation labels, noise-augmentation level)
                 cond_channels=0,             # channels of x_cond concatenated to x (super-resolution, inpainting)
                 context_dim=None,            # width of context tokens for cross-attention; None = no cross-attn
                 temporal_attention=False,    # attention across frames after every residual block (video): True at
                                              # every resolution, or a tuple of resolutions (as attention_resolutions)
                 timestep_features='cos_sin', # 'cos_sin': timestep_embedding; 'ddpm': ddpm_timestep_embedding
                 downsample_pad='symmetric'): # 'symmetric' or 'ddpm' (right/bottom, TF 'SAME'), see Downsample
        super().__init__()
        if timestep_features not in ('cos_sin', 'ddpm'):
            raise ValueError(f"unknown timestep_features {timestep_features!r}; choose 'cos_sin' or 'ddpm'")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), image_size=image_size,
                           dropout=dropout, head_channels=head_channels, norm_groups=norm_groups,
                           scale_shift_norm=scale_shift_norm, resblock_updown=resblock_updown, rope=rope,
                           num_classes=num_classes, aug_dim=aug_dim, cond_channels=cond_channels,
                           context_dim=context_dim, temporal_attention=(temporal_attention if isinstance(
                               temporal_attention, bool) else tuple(temporal_attention)),
                           timestep_features=timestep_features, downsample_pad=downsample_pad)
        self.in_channels, self.cond_channels, self.num_classes = in_channels, cond_channels, num_classes
        self.timestep_features = timestep_features
        out_channels = out_channels or in_channels
        emb_dim = 4 * model_channels                                          # DDPM: temb width 4 * ch

        # Conditioning embedding: sinusoid(noise_level) -> MLP, plus class and augmentation embeddings.
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # No bias: aug_cond = 0 (no augmentation) then leaves the embedding exactly as without aug_cond (EDM).
        self.aug_embed = nn.Linear(aug_dim, model_channels, bias=False) if aug_dim else None
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # last row = "no class"

        def res_block(cin, cout, resample=None):
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift_norm, norm_groups, resample)

        def attention_layers(ch):
            layers = [SpatialSelfAttention(ch, head_channels, norm_groups, rope)]
            if context_dim is not None:
                layers.append(CrossAttention(ch, context_dim, head_channels, norm_groups))
            return layers

        def temporal_layers(ch):                                   # reads `resolution`, the level being built
            here = temporal_attention is True or (bool(temporal_attention) and resolution in temporal_attention)
            return [TemporalAttention(ch, head_channels, rope)] if here else []

        # Encoder: each stage is a list of layers whose output is kept as a skip connection.
        self.input_conv = nn.Conv2d(in_channels + cond_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, resolution = [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if resolution in attention_resolutions:
                    layers += attention_layers(ch)
                self.down.append(nn.ModuleList(layers + temporal_layers(ch)))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, 'down') if resblock_updown else Downsample(ch, downsample_pad)
                self.down.append(nn.ModuleList([down]))
                skip_channels.append(ch)
                resolution //= 2

        # Bottleneck: ResBlock, attention, ResBlock (DDPM App. B).
        self.middle = nn.ModuleList([res_block(ch, ch)] + attention_layers(ch) + temporal_layers(ch)
                                    + [res_block(ch, ch)])

        # Decoder: num_res_blocks + 1 blocks per level, each taking one skip connection by concatenation.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if resolution in attention_resolutions:
                    layers += attention_layers(ch)
                layers += temporal_layers(ch)
                if level != 0 and i == num_res_blocks:
                    layers.append(res_block(ch, ch, 'up') if resblock_updown else Upsample(ch))
                    resolution *= 2
                self.up.append(nn.ModuleList(layers))

        self.out_norm = nn.GroupNorm(norm_groups, ch, eps=1e-6)
        # Zero init: a fresh network outputs 0, the mean of the usual targets (eps, v, velocity).
        self.out_conv = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    def embed(self, noise_level, y, aug_cond):
        """emb = MLP(sinusoid(noise_level) + W_aug aug_cond) + E[y]: (N, 4 * model_channels)."""
        sinusoid = ddpm_timestep_embedding if self.timestep_features == 'ddpm' else timestep_embedding
        dtype = self.time_mlp[0].weight.dtype                                # the network's own dtype
        features = sinusoid(noise_level, self.time_mlp[0].in_features, dtype=feature_dtype(dtype)).to(dtype)
        if self.aug_embed is not None and aug_cond is not None:
            features = features + self.aug_embed(aug_cond.to(dtype))
        emb = self.time_mlp(features)
        if self.class_embed is not None:
            if y is None:                    # no labels: every sample gets the learned "no class" embedding
                y = torch.full((noise_level.shape[0],), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.class_embed(y)
        return emb

    def forward(self, x, noise_level, y=None, context=None, x_cond=None, aug_cond=None, context_mask=None,
                num_video_frames=None):
        """Return F(x; noise_level, conditions), shaped like x (out_channels channels).

        num_video_frames (int or (N,) long, video only): frames [0, k) of each sample form one video and frames
        [k, F) are independent images that attend only to themselves (joint training, VDM Sec. 3). None = all F
        frames are one video. x_cond = None with cond_channels > 0 means zeros (e.g. "nothing known" for
        inpainting). A context_mask row that is all False reads as no context for that sample.
        """
        video = x.dim() == 5
        N, frames = x.shape[0], (x.shape[2] if video else 1)
        if self.cond_channels:
            if x_cond is None:
                x_cond = x.new_zeros((N, self.cond_channels) + x.shape[2:])
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)
        if video:                            # fold frames into the batch: (N, C, F, H, W) -> (N*F, C, H, W)
            x = x.transpose(1, 2).flatten(0, 1)
        if self.out_conv.weight.is_contiguous(memory_format=torch.channels_last):
            # The activations' layout follows the weights'. After net.to(memory_format=torch.channels_last)
            # (checkpoints.build_network does it) every activation is NHWC: oneDNN convolutions and GroupNorm then
            # need no reorder, and the attention's (B, C, HW) <-> (B, HW, C) transposes are views, not copies.
            # The same function; only float32 rounding differs (~1e-7 relative). ~1.1x a training step of the
            # small configs on CPU, ~1.0x at ddpm-cifar10, whose convolutions run near the core's peak either way.
            x = x.contiguous(memory_format=torch.channels_last)
        noise_level = torch.as_tensor(noise_level, device=x.device).expand(N)

        # Compute SiLU(emb) once: every ResBlock applies it before its own projection (DDPM's nonlinearity(temb)).
        emb = F.silu(self.embed(noise_level, y, aug_cond)).repeat_interleave(frames, dim=0)   # (N*F, E)
        if context is not None:
            context = context.repeat_interleave(frames, dim=0)               # (N*F, L, context_dim)
            if context_mask is not None:
                context_mask = context_mask.bool().repeat_interleave(frames, dim=0)
        cond = dict(emb=emb, context=context, context_mask=context_mask, frames=frames,
                    frame_mask=temporal_mask(N, frames, num_video_frames, x.device) if video else None)

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, cond)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, cond)
        for stage in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in stage:
                h = layer(h, cond)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if video:
            out = out.unflatten(0, (N, frames)).transpose(1, 2)              # back to (N, C, F, H, W)
        return out


# ----------------------------------------------------------------------------
# Named configurations

UNET_CONFIGS = {
    # train.py's default: 0.3M parameters; 1000 steps of batch 64 on 32x32 images take about 8 minutes on 2 CPU cores.
    'micro': dict(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                  head_channels=32, norm_groups=8, dropout=0.0),
    # A small model for 32x32 images: 1.2M parameters (about 3x slower per step than 'micro').
    'tiny': dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                 head_channels=32, norm_groups=8, dropout=0.0),
    # Ho et al. 2020, CIFAR-10 (App. B): ch=128, mult (1,2,2,2), 2 blocks, attention at 16x16, dropout 0.1, one
    # head, additive time embedding, no classes: 35.7M parameters. It computes DDPM's own function, so the public
    # weights load (load_diffusers_unet): DDPM's timestep features and right/bottom downsampling pad, and no
    # position encoding in attention. The other configurations keep this file's choices (cos-sin features,
    # symmetric pad, RoPE), which the DDPM-named one must not silently inherit.
    'ddpm-cifar10': dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), dropout=0.1, head_channels=256, scale_shift_norm=False,
                         rope=False, timestep_features='ddpm', downsample_pad='ddpm'),
    # Not a paper configuration: ADM's architecture choices (Dhariwal & Nichol 2021: 3 blocks, attention at 16 and
    # 8 with 64-channel heads, AdaGN, resampling residual blocks) at a CIFAR-10 size, class-conditional.
    'adm-32': dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                   attention_resolutions=(16, 8), dropout=0.1, head_channels=64, scale_shift_norm=True,
                   resblock_updown=True, num_classes=10),
    # A small video model in the style of Video Diffusion Models: 16x16 frames with temporal attention.
    'tiny-video': dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                       image_size=16, head_channels=32, norm_groups=8, temporal_attention=True),
    # The same with temporal attention only at 8x8 (at 16 px: the lower level and the bottleneck), not at 16x16.
    'tiny-video-t8': dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                          image_size=16, head_channels=32, norm_groups=8, temporal_attention=(8,)),
}


def create_unet(name='tiny', **overrides):
    """Build a named configuration, with any constructor argument overridden (e.g. num_classes=10)."""
    return UNet(**{**UNET_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------
# Public DDPM weights in the diffusers UNet2DModel layout (google/ddpm-cifar10-32, diffusion_pytorch_model.bin)
#
# The same network under other names: down_blocks.L.resnets.J / attentions.J / downsamplers.0 for encoder level L,
# mid_block, up_blocks.K (K = 0 is the deepest level), ResnetBlock2D's time_emb_proj and conv_shortcut, and
# attention as separate q, k, v linears (to_q/to_k/to_v/to_out.0, or query/key/value/proj_attn in files written
# before diffusers 0.14), which this file keeps as one qkv matmul.

def _diffusers_names(net):
    """Map each layer prefix of ours to its diffusers prefix, walking the U-Net in construction order."""
    levels, blocks = len(net.config['channel_mult']), net.config['num_res_blocks']
    names = {'input_conv': 'conv_in', 'time_mlp.0': 'time_embedding.linear_1',
             'time_mlp.2': 'time_embedding.linear_2', 'out_norm': 'conv_norm_out', 'out_conv': 'conv_out'}

    def stage(ours, layers, theirs, j):
        for i, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                names[f'{ours}.{i}'] = f'{theirs}.resnets.{j}'
            elif isinstance(layer, SpatialSelfAttention):
                names[f'{ours}.{i}'] = f'{theirs}.attentions.{j}'
            elif isinstance(layer, Downsample):
                names[f'{ours}.{i}'] = f'{theirs}.downsamplers.0'
            elif isinstance(layer, Upsample):
                names[f'{ours}.{i}'] = f'{theirs}.upsamplers.0'
            else:
                raise ValueError(f'diffusers UNet2DModel has no counterpart of {type(layer).__name__}')
    s = 0
    for level in range(levels):                  # encoder: blocks residual stages, then a Downsample stage
        for j in range(blocks + (level != levels - 1)):
            stage(f'down.{s}', net.down[s], f'down_blocks.{level}', j)
            s += 1
    for i, layer in enumerate(net.middle):       # ResBlock, attention, ResBlock
        names[f'middle.{i}'] = f'mid_block.resnets.{(i + 1) // 2}' if isinstance(layer, ResBlock) \
            else 'mid_block.attentions.0'
    for s in range(len(net.up)):                 # decoder: blocks + 1 stages per level, deepest level first
        stage(f'up.{s}', net.up[s], f'up_blocks.{s // (blocks + 1)}', s % (blocks + 1))
    return names


# Parameter names inside one layer: ours -> diffusers (attention qkv is assembled from three tensors).
_DIFFUSERS_LEAVES = {'norm1': 'norm1', 'conv1': 'conv1', 'emb_proj': 'time_emb_proj', 'norm2': 'norm2',
                     'conv2': 'conv2', 'skip': 'conv_shortcut', 'norm': 'group_norm', 'conv': 'conv'}
_DIFFUSERS_ATTENTION = {'new': (('to_q', 'to_k', 'to_v'), 'to_out.0'), 'old': (('query', 'key', 'value'), 'proj_attn')}


def convert_diffusers_unet(state_dict, net):
    """Rename a diffusers UNet2DModel state dict to this file's names, checking everything first.

    net must compute DDPM's function (the 'ddpm-cifar10' settings: additive time embedding, DDPM timestep
    features and downsampling pad, one attention head, no RoPE), or the same weights would give another
    network. Refuses (ValueError, naming the keys) unknown keys, missing keys and shape mismatches.
    """
    c = net.config
    wrong = [f'{k}={c[k]!r} (needs {v!r})' for k, v in dict(scale_shift_norm=False, resblock_updown=False, rope=False,
             timestep_features='ddpm', downsample_pad='ddpm', num_classes=0, aug_dim=0, cond_channels=0,
             context_dim=None, temporal_attention=False).items() if c[k] != v]
    wrong += [f'{m.heads} attention heads (needs 1)' for m in net.modules()
              if isinstance(m, SpatialSelfAttention) and m.heads != 1][:1]
    if wrong:
        raise ValueError('this U-Net does not compute diffusers UNet2DModel / DDPM\'s function: ' + ', '.join(wrong)
                         + "; build it with create_unet('ddpm-cifar10')")
    layout = 'old' if any('.query.' in k for k in state_dict) else 'new'
    (q, k, v), out = _DIFFUSERS_ATTENTION[layout]
    prefixes = _diffusers_names(net)
    converted, used, missing, wrong_shape = {}, set(), [], []
    for name, param in net.state_dict().items():
        layer, leaf, kind = name.rsplit('.', 2) if name.count('.') >= 2 else ('', *name.split('.'))
        if name.rsplit('.', 1)[0] in prefixes:           # a top-level layer: input_conv.weight, time_mlp.0.bias, ...
            sources = [f'{prefixes[name.rsplit(".", 1)[0]]}.{kind}']
        elif leaf == 'qkv':
            sources = [f'{prefixes[layer]}.{t}.{kind}' for t in (q, k, v)]
        elif leaf == 'proj':
            sources = [f'{prefixes[layer]}.{out}.{kind}']
        else:
            sources = [f'{prefixes[layer]}.{_DIFFUSERS_LEAVES[leaf]}.{kind}']
        if not all(src in state_dict for src in sources):
            missing += [src for src in sources if src not in state_dict]
            continue
        used.update(sources)
        value = torch.cat([state_dict[src] for src in sources]) if len(sources) > 1 else state_dict[sources[0]]
        if value.shape != param.shape:
            wrong_shape.append(f'{", ".join(sources)} {tuple(value.shape)} (expected {tuple(param.shape)} for {name})')
        converted[name] = value
    unknown = [key for key in state_dict if key not in used]
    problems = [f'{len(unknown)} unknown keys: {unknown[:5]}' if unknown else '',
                f'{len(missing)} missing keys: {missing[:5]}' if missing else '',
                f'{len(wrong_shape)} shape mismatches: {wrong_shape[:5]}' if wrong_shape else '']
    problems = [p for p in problems if p]
    if problems:
        raise ValueError('cannot load this as a diffusers UNet2DModel of this configuration: ' + '; '.join(problems))
    return converted


def load_diffusers_unet(checkpoint, name='ddpm-cifar10', device='cpu', **overrides):
    """Build a named configuration and load diffusers UNet2DModel weights into it (a path or a state dict).

    For google/ddpm-cifar10-32: the network predicts eps on DDPM's linear schedule (1000 steps, beta from 1e-4 to
    0.02) and sees the integer step index 0..999 as its noise level, as diffusion.DiscreteVP.linear(1000) gives.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location='cpu', weights_only=True)
    with torch.device('meta'):                   # shapes only: every parameter is overwritten below
        net = create_unet(name, **overrides)
    net = net.to_empty(device='cpu')
    net.load_state_dict(convert_diffusers_unet(checkpoint, net))
    return net.to(device).eval()


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    torch.manual_seed(0)
    for name in UNET_CONFIGS:
        n_params = sum(p.numel() for p in create_unet(name).parameters())
        print(f'{name:>14}: {n_params / 1e6:7.3f}M parameters')

    # A fresh network outputs zeros (zero-initialised output conv); a trained one would not.
    net = create_unet('tiny', num_classes=10, aug_dim=2, cond_channels=3, context_dim=16)
    x, noise_level = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 250.0, 500.0, 999.0])
    with torch.no_grad():
        out = net(x, noise_level, y=torch.tensor([0, 1, 2, 10]), context=torch.randn(4, 5, 16),
                  x_cond=torch.randn(4, 3, 32, 32), aug_cond=torch.zeros(4, 2))
    print('image output', tuple(out.shape), 'max |F| at init =', out.abs().max().item())

    # Joint video-and-image batch: 4 video frames followed by 2 independent images in each sample.
    video_net = create_unet('tiny-video')
    for p in video_net.parameters():         # perturb so the zero-initialised layers pass signal
        p.data.add_(0.05 * torch.randn_like(p))
    clip = torch.randn(2, 3, 6, 16, 16)
    with torch.no_grad():
        out = video_net(clip, torch.tensor([10.0, 900.0]), num_video_frames=4)
        clip[:, :, 5] = torch.randn_like(clip[:, :, 5])    # replace the last independent image
        out2 = video_net(clip, torch.tensor([10.0, 900.0]), num_video_frames=4)
    change = (out2 - out).abs().amax(dim=(0, 1, 3, 4))
    print('video output', tuple(out.shape), 'per-frame change after editing frame 5:', change.numpy().round(4))
