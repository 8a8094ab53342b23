"""
Diffusion Transformer (DiT): a plain ViT on patches of the (latent) image, conditioned by adaLN-Zero.

Paper: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748.
Also: Dosovitskiy et al. 2021, ViT, arXiv:2010.11929 (patchify); Nichol & Dhariwal 2021, arXiv:2102.09672
(learned sigma); Chen et al. 2023, PixArt-alpha, arXiv:2310.00426 (cross-attention inside a DiT block).

  tokens = Patchify(x) + PE_sincos                     (Sec. 3.2: T = (I/p)^2 tokens of width d, Fig. 4;
                                                     PE: MAE's 2-D table, column half first)
  c      = MLP(sinusoid(noise_level) + W_aug aug_cond) + E[y]
  (g1, b1, a1, g2, b2, a2) = Linear(SiLU(c))           (adaLN-Zero, Sec. 3.2; Linear zero-initialised)
  z = z + a1 * Attn(LN(z) * (1 + g1) + b1)
  z = z + CrossAttn(LN(z), context)                    (optional; PixArt-alpha Sec. 2.3)
  z = z + a2 * MLP(LN(z) * (1 + g2) + b2)
  out = Unpatchify(Linear(LN(z) * (1 + g) + b))        (final layer zero-initialised, so a fresh DiT outputs 0)

Because every alpha starts at 0, each block starts as the identity: the paper's best conditioning (Fig. 5).

Tensor conventions: x: (N, C, H, W) with H, W divisible by patch_size; noise_level: (N,) float; y: (N,) long with
index num_classes = "no class"; context: (N, L, context_dim), context_mask: (N, L) bool, True = keep;
x_cond: (N, cond_channels, H, W); aug_cond: (N, aug_dim).
Learned sigma: with learn_sigma=True the output has 2C channels: out[:, :C] is the usual prediction F, and
out[:, C:] sets the variance of Improved DDPM Eq. 15, Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), with
v = (out + 1) / 2 as in their code (and the official DiT's). With the default learn_sigma=False the output is shaped
like x. Samplers here use only F (the official DiT's eps half).

Official weights: load_official_dit('DiT-XL-2-256x256.pt') maps the key names of facebookresearch/DiT models.py
(same network, timm module names) and refuses anything else; the stored position table must equal ours.

Usage: net = create_dit('DiT-S/2', input_size=32, in_channels=4); out = net(x, noise_level, y)
"""
import math
import pickle
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Embeddings

def feature_dtype(dtype):
    """The dtype the timestep features are computed in for a network of `dtype` (same helper as unet.py): float32, as
    DiT was trained (also for float16/bfloat16 networks), or float64 for a float64 network, float64 throughout.
    The official DiT computes them in float32 (t.float()); a float64 parity against it patches this to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(noise_level, dim, max_period=10000.0, dtype=torch.float32):
    """Sinusoidal features of a scalar per sample: (N,) -> (N, dim) in `dtype` (unet.py's helper, kept copyable)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=noise_level.device, dtype=dtype) / half)
    angles = noise_level.to(dtype)[:, None] * freqs[None]                   # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_pos_embed_2d(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos position embeddings in the MAE / DiT layout: (grid_h * grid_w, dim), raster order.

    Channels [0, dim/2) encode the token's column, channels [dim/2, dim) its row (MAE's get_2d_sincos_pos_embed
    builds its grid with np.meshgrid(grid_w, grid_h), so the half it calls "h" holds the column index). Each half
    is [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1 (Vaswani et al. 2017,
    Sec. 3.5, per axis). Official DiT checkpoints store this table; the same weights with the halves swapped
    compute a different function, so the order is part of the model, not a free choice. float32 numpy.
    """
    assert dim % 4 == 0, 'hidden size must be divisible by 4 for 2-D sin-cos embeddings'
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))   # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')   # (grid_h, grid_w) each

    def encode(pos):                                                       # (T,) -> (T, dim/2)
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)   # column half first (MAE)


def modulate(x, shift, scale):
    """adaLN: LN(x) * (1 + scale) + shift, with (N, d) conditions broadcast over the T tokens of (N, T, d)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------
# Transformer layers

class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention; self-attention or, with kv_dim, cross."""

    def __init__(self,
                 dim,                     # token width
                 num_heads,               # attention heads
                 kv_dim=None):            # width of the key/value source; None = self-attention on x
        super().__init__()
        self.num_heads, self.cross = num_heads, kv_dim is not None
        if self.cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(kv_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)                               # one matmul for q, k and v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        N, T, d = x.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)   # (N, heads, T, d/heads)
        if self.cross:
            q = heads(self.q(x))
            k, v = map(heads, self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = map(heads, self.qkv(x).chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)         # (N, heads, T, d/heads)
        return self.proj(h.transpose(1, 2).reshape(N, T, d))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (Sec. 3.2, Fig. 3) and optional cross-attention."""

    def __init__(self,
                 hidden_size,             # token width d
                 num_heads,               # attention heads
                 mlp_ratio=4.0,           # MLP hidden width = mlp_ratio * d
                 context_dim=None):       # width of context tokens; None = no cross-attention
        super().__init__()
        # LayerNorms without affine parameters: the scale and shift come from the condition instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, kv_dim=context_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate='tanh'),
                                 nn.Linear(mlp_hidden, hidden_size))
        # adaLN-Zero: regress (shift, scale, gate) for attention and MLP from c; zero-initialised in DiT.init_weights.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, context=None, context_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None and hasattr(self, 'cross_attn'):
            keep = 1.0
            if context_mask is not None:
                # A sample whose tokens are all padding would softmax over nothing (NaN): let it attend to every
                # token, then drop the result, so an all-False row reads as "no context" for that sample.
                has_any = context_mask.any(dim=1)                             # (N,)
                context_mask = (context_mask | ~has_any[:, None])[:, None, None, :]   # (N, 1, 1, L) for SDPA
                keep = has_any[:, None, None].to(x.dtype)
            x = x + keep * self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its p*p*C output pixels (zero-initialised)."""

    def __init__(self,
                 hidden_size,             # token width d
                 patch_size,              # p: each token becomes a p x p patch
                 out_channels):           # C, or 2C with learned sigma
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))           # (N, T, p*p*C)


# ----------------------------------------------------------------------------
# The Diffusion Transformer

class DiT(nn.Module):
    """Patchify -> N adaLN-Zero transformer blocks -> final layer -> unpatchify (Fig. 3)."""

    def __init__(self,
                 input_size=32,           # H = W of the input (256x256 images -> 32x32x4 SD-VAE latents)
                 patch_size=2,            # p: tokens = (input_size / p)^2
                 in_channels=4,           # channels of x
                 hidden_size=1152,        # token width d
                 depth=28,                # number of DiT blocks
                 num_heads=16,            # attention heads
                 mlp_ratio=4.0,           # MLP width / d
                 num_classes=1000,        # class labels; one more learned row is the "no class" label (for CFG)
                 learn_sigma=False,       # also output v for the variance (2C output channels, see docstring)
                 aug_dim=0,               # width of aug_cond (augmentation labels, noise-augmentation level)
                 cond_channels=0,         # channels of x_cond concatenated to x before patchify
                 context_dim=None,        # width of context tokens for cross-attention; None = none
                 freq_dim=256):           # width of the sinusoidal noise-level features (DiT: 256)
        super().__init__()
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, learn_sigma=learn_sigma, aug_dim=aug_dim,
                           cond_channels=cond_channels, context_dim=context_dim, freq_dim=freq_dim)
        self.patch_size, self.in_channels, self.num_classes = patch_size, in_channels, num_classes
        self.cond_channels, self.freq_dim = cond_channels, freq_dim
        self.out_channels = 2 * in_channels if learn_sigma else in_channels

        # Patchify: a p x p conv with stride p is a linear map of each non-overlapping patch (ViT).
        self.x_embedder = nn.Conv2d(in_channels + cond_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        # Fixed (not learned) embeddings, as in the paper; a buffer, rebuilt by forward() for other input sizes.
        self.register_buffer('pos_embed', torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid, grid))[None],
                             persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        # No bias: aug_cond = 0 leaves c exactly as without aug_cond.
        self.aug_embedder = nn.Linear(aug_dim, freq_dim, bias=False) if aug_dim else None
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.init_weights()

    def init_weights(self):
        """The paper's initialisation (Sec. 3.2): xavier linears, N(0, 0.02) embeddings, zeros for adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding: initialise like a linear layer on the flattened patch.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        # adaLN-Zero: every gate alpha = 0, so each block is the identity at init (Sec. 3.2).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if hasattr(block, 'cross_attn'):
                # Cross-attention has no gate, so zero its output projection to keep the block an identity.
                nn.init.zeros_(block.cross_attn.proj.weight)
        # Zero-initialised output: a fresh DiT predicts 0.
        for p in self.final_layer.parameters():
            nn.init.zeros_(p)

    def unpatchify(self, tokens, grid_h, grid_w):
        """(N, T, p*p*C) -> (N, C, grid_h * p, grid_w * p), inverting the raster order of patchify."""
        N, p, C = tokens.shape[0], self.patch_size, self.out_channels
        x = tokens.reshape(N, grid_h, grid_w, p, p, C)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(N, C, grid_h * p, grid_w * p)

    def forward(self, x, noise_level, y=None, context=None, x_cond=None, aug_cond=None, context_mask=None):
        """Return F(x; noise_level, conditions): (N, C, H, W), or (N, 2C, H, W) with learn_sigma.

        y = None (with num_classes > 0) means "no class" for every sample; x_cond = None means zeros;
        context = None skips cross-attention, and a context_mask row that is all False reads as no context.
        """
        N, _, H, W = x.shape
        if self.cond_channels:
            if x_cond is None:
                x_cond = x.new_zeros(N, self.cond_channels, H, W)
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        pos_embed = self.pos_embed
        if pos_embed.shape[1] != grid_h * grid_w:        # another resolution than configured: rebuild the table
            pos_embed = torch.from_numpy(sincos_pos_embed_2d(pos_embed.shape[-1], grid_h, grid_w))[None]
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + pos_embed.to(x.device, x.dtype)   # (N, T, d)

        noise_level = torch.as_tensor(noise_level, device=x.device).expand(N)
        dtype = self.x_embedder.weight.dtype                                   # the network's own dtype
        features = timestep_embedding(noise_level, self.freq_dim, dtype=feature_dtype(dtype)).to(dtype)
        if self.aug_embedder is not None and aug_cond is not None:
            features = features + self.aug_embedder(aug_cond.to(dtype))
        c = self.t_embedder(features)                                          # (N, d)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)

        if context_mask is not None:
            context_mask = context_mask.bool()                                 # (N, L), True = keep
        for block in self.blocks:
            tokens = block(tokens, c, context, context_mask)
        return self.unpatchify(self.final_layer(tokens, c), grid_h, grid_w)


# ----------------------------------------------------------------------------
# Named configurations (Table 1 of the paper: S, B, L, XL; patch sizes 2, 4, 8)

_SIZES = dict(S=dict(depth=12, hidden_size=384, num_heads=6), B=dict(depth=12, hidden_size=768, num_heads=12),
              L=dict(depth=24, hidden_size=1024, num_heads=16), XL=dict(depth=28, hidden_size=1152, num_heads=16))
DIT_CONFIGS = {f'DiT-{size}/{p}': dict(**_SIZES[size], patch_size=p) for size in _SIZES for p in (2, 4, 8)}
OFFICIAL_DIT_CONFIGS = tuple(DIT_CONFIGS)            # Table 1's sizes; those added below are ours
# Our own sizes, not in the paper (same network: adaLN-Zero blocks, fixed sin-cos positions, MLP ratio 4).
# Tests and demos: 2 blocks of width 64 on 2x2 patches.
DIT_CONFIGS['DiT-tiny/2'] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)
# train.py --model dit's default, sized for a CPU: 2 blocks of width 64 with 4 heads on 2x2 patches (0.18M parameters
# at 32x32x1; the size of DiT-tiny/2, named apart so the default can change without changing what tests build; Table
# 1's smallest, DiT-S, has 12 blocks of width 384 with 6 heads). 2x2 patches (256 tokens at 32x32): the paper finds
# smaller patches better at every size, and on MNIST 4x4 patches (5 blocks of width 128, 1.6M) still gave noise after
# 1000 steps of batch 64. At ~1000 process-CPU s (batch 32, lr 4e-3) these 2 blocks (4500 steps) matched 4 blocks of
# width 64 (2500 steps) within the judge's noise, at half the sampling cost (issue 32, docs/RESULTS.md).
DIT_CONFIGS['DiT-cpu'] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)


def create_dit(name='DiT-S/2', **overrides):
    """Build a named configuration, with any constructor argument overridden (e.g. input_size=32, in_channels=3)."""
    return DiT(**{**DIT_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------
# Official checkpoints (facebookresearch/DiT: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt)
#
# Their models.py builds the same network from timm parts, so only the module names differ: PatchEmbed's conv is
# `proj`, TimestepEmbedder wraps its MLP in `mlp`, LabelEmbedder names its table `embedding_table`, and timm's Mlp
# names its two linears `fc1` / `fc2`. The fixed position table is stored in the file (a frozen nn.Parameter
# there, a buffer rebuilt from the formula here): it is compared with ours instead of being loaded, so a table in
# another layout is refused rather than silently transposing every position.

_OFFICIAL_DIT_KEYS = [                   # (official name, regular expression) -> our name
    (r'x_embedder\.proj\.(weight|bias)', r'x_embedder.\1'),
    (r't_embedder\.mlp\.([02])\.(weight|bias)', r't_embedder.\1.\2'),
    (r'y_embedder\.embedding_table\.weight', r'y_embedder.weight'),
    (r'blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)', r'blocks.\1.attn.\2.\3'),
    (r'blocks\.(\d+)\.mlp\.fc1\.(weight|bias)', r'blocks.\1.mlp.0.\2'),
    (r'blocks\.(\d+)\.mlp\.fc2\.(weight|bias)', r'blocks.\1.mlp.2.\2'),
    (r'blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)', r'blocks.\1.adaLN_modulation.1.\2'),
    (r'final_layer\.linear\.(weight|bias)', r'final_layer.linear.\1'),
    (r'final_layer\.adaLN_modulation\.1\.(weight|bias)', r'final_layer.adaLN_modulation.1.\1'),
]


def official_dit_key(key):
    """Our parameter name for an official DiT state-dict key, or None when the key is not an official one."""
    for pattern, ours in _OFFICIAL_DIT_KEYS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, ours, key)
    return None


def dit_config_from_official(state_dict):
    """DiT constructor arguments read off the shapes of an official state dict (names must be official).

    The head count is not in the weights, so (depth, width) must match a configuration of Table 1.
    """
    need = ['x_embedder.proj.weight', 'y_embedder.embedding_table.weight', 'final_layer.linear.weight', 'pos_embed']
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise ValueError(f'not an official DiT state dict: no {", ".join(missing)} (keys start with '
                         f'{sorted(state_dict)[:4]}); expected the file of facebookresearch/DiT (DiT-XL-2-256x256.pt)')
    hidden, in_channels, patch_size, _ = state_dict['x_embedder.proj.weight'].shape
    depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
    out_channels = state_dict['final_layer.linear.weight'].shape[0] // patch_size ** 2
    grid = math.isqrt(state_dict['pos_embed'].shape[1])
    sizes = [name for name, c in DIT_CONFIGS.items()
             if (c['depth'], c['hidden_size'], c['patch_size']) == (depth, hidden, patch_size)]
    if not sizes:
        raise ValueError(f'no DiT configuration has depth {depth}, width {hidden} and patch size {patch_size}; '
                         f'the official models are the {", ".join(OFFICIAL_DIT_CONFIGS)}')
    return dict(DIT_CONFIGS[sizes[0]], input_size=grid * patch_size, in_channels=in_channels,
                # the table has one extra row, the "no class" label of classifier-free guidance (index num_classes)
                num_classes=state_dict['y_embedder.embedding_table.weight'].shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels,
                mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / hidden)


def convert_official_dit(state_dict, net):
    """Rename an official DiT state dict to this file's names, checking everything before anything is loaded.

    Refuses (ValueError, listing the offending keys) unknown keys, missing keys, shape mismatches, and a stored
    position table that differs from sincos_pos_embed_2d (another layout, or not a DiT). Returns a state dict
    for net.load_state_dict.
    """
    ours = net.state_dict()
    converted, unknown, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        if key == 'pos_embed':
            continue                                     # checked below against the formula, never loaded
        name = official_dit_key(key)
        if name is None or name not in ours:
            unknown.append(key)
        elif tuple(value.shape) != tuple(ours[name].shape):
            wrong_shape.append(f'{key} {tuple(value.shape)} (expected {tuple(ours[name].shape)})')
        else:
            converted[name] = value
    missing = [k for k in ours if k not in converted]
    problems = [f'{len(unknown)} unknown keys: {unknown[:5]}' if unknown else '',
                f'{len(missing)} missing parameters (our names): {missing[:5]}' if missing else '',
                f'{len(wrong_shape)} shape mismatches: {wrong_shape[:5]}' if wrong_shape else '']
    if 'pos_embed' not in state_dict:
        problems.append('no pos_embed: official DiT files store the fixed position table')
    else:
        stored = state_dict['pos_embed'].float().reshape(net.pos_embed.shape)
        gap = (stored - net.pos_embed.float()).abs().max().item()
        if gap > 1e-5:                           # float32 round-off of sin/cos is ~1e-7
            problems.append(f'the stored position table differs from the MAE/DiT sin-cos table by up to {gap:.3g}: '
                            'a different layout (rows and columns swapped?) or not a DiT checkpoint')
    problems = [p for p in problems if p]
    if problems:
        raise ValueError('cannot load this as an official DiT checkpoint: ' + '; '.join(problems))
    return converted


def load_official_dit(checkpoint, device='cpu'):
    """Build the DiT an official checkpoint describes and load it: checkpoint is a path or a state dict.

    A training checkpoint of the official train.py ({'model', 'ema', ...}) gives its EMA weights, as their
    download.find_model does. The result predicts eps and a learned variance (2C output channels, see the module
    docstring) for DiT's 1000-step linear schedule; class index num_classes (1000) is "no class".
    """
    if not isinstance(checkpoint, dict):
        try:
            checkpoint = torch.load(checkpoint, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:      # e.g. a training checkpoint, which also pickles its argparse args
            raise ValueError(f'{checkpoint} holds more than tensors, so it is not loaded (weights_only=True). The '
                             "released DiT-XL-2-*.pt files are plain state dicts; from a training checkpoint you "
                             "trust, save its 'ema' dict alone and load that") from e
    if 'ema' in checkpoint and isinstance(checkpoint['ema'], dict):
        checkpoint = checkpoint['ema']
    with torch.device('meta'):                   # shapes only: nothing is initialised that is then overwritten
        net = DiT(**dit_config_from_official(checkpoint))
    # The table is a buffer computed at construction, so rebuild it for real before comparing with the file's.
    net = net.to_empty(device='cpu')
    grid = math.isqrt(net.pos_embed.shape[1])
    net.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(net.pos_embed.shape[-1], grid, grid))[None])
    net.load_state_dict(convert_official_dit(checkpoint, net))
    return net.to(device).eval()


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    torch.manual_seed(0)
    # Parameter counts as in the paper's setting (32x32x4 latents, 1000 classes, learned sigma). Built on the
    # 'meta' device: shapes only, no memory, so even DiT-XL/2 counts instantly. The paper's numbers include the
    # fixed position table (a frozen parameter in its code, a buffer here).
    paper = {'DiT-S/2': 33, 'DiT-B/2': 130, 'DiT-L/2': 458, 'DiT-XL/2': 675}
    for name, millions in paper.items():
        with torch.device('meta'):
            net = create_dit(name, learn_sigma=True)
        n_params = sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()
        print(f'{name:>9}: {n_params:,} parameters (paper: {millions}M)')

    net = create_dit('DiT-tiny/2', input_size=16, in_channels=3, num_classes=10, learn_sigma=True)
    x, noise_level, y = torch.randn(4, 3, 16, 16), torch.tensor([0.0, 250.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        out = net(x, noise_level, y)
    print('output', tuple(out.shape), '(2C channels: F and v)', 'max |F| at init =', out.abs().max().item())
