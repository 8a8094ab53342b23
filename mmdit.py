"""
MM-DiT: the multimodal diffusion transformer of Stable Diffusion 3, in miniature.

Paper: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
arXiv:2403.03206, Sec. 4 and Fig. 2; built on DiT (Peebles & Xie 2023, arXiv:2212.09748, see dit.py).

A DiT conditions on text through cross-attention: image tokens query the text, the text never changes. MM-DiT
gives the text tokens a transformer stream of their own, with *separate weights* for each modality, and lets both
streams meet in one *joint attention* over the concatenated sequence, so information flows both ways (Sec. 4):

  c = MLP(sinusoid(t)) + MLP(pooled text)                              (Fig. 2a: timestep + pooled caption)
  for each stream s in (text, image), with its own weights:
      (shift_s1, scale_s1, gate_s1, shift_s2, scale_s2, gate_s2) = Linear_s(SiLU(c))     (adaLN-Zero, as DiT)
      q_s, k_s, v_s = W_s (LN(h_s) (1 + scale_s1) + shift_s1);  q_s, k_s <- RMSNorm(q_s), RMSNorm(k_s)
  o = softmax([q_text; q_img] [k_text; k_img]^T / sqrt(d_head)) [v_text; v_img]    (joint attention, Fig. 2b)
  h_s = h_s + gate_s1 * Proj_s(o_s);   h_s = h_s + gate_s2 * MLP_s(LN(h_s) (1 + scale_s2) + shift_s2)

QK-normalisation (Sec. 5.3, 'QK-normalization'): RMSNorm with a learned scale on every query and key (per head)
before the dot product, which keeps attention logits from growing without bound in mixed precision at high resolution.
Positions: the image tokens get the fixed 2-D sin-cos table of DiT/MAE (dit.py's layout, column half first), as
SD3's reference code does (it crops a larger table; one grid here); the text tokens arrive with the text encoder's
own learned positions. (Flux uses 2-D RoPE instead; not implemented here.)
The last block's text stream only feeds the attention (its outputs would be unused): no Proj/MLP there, as in
SD3's code (context_pre_only).

Resolution-dependent timestep shift (Sec. 5.3.2): at a resolution with m pixels (or latent tokens), instead of
the base n, use the time
    t_m = alpha t_n / (1 + (alpha - 1) t_n),   alpha = sqrt(m / n)
for training (applied to the logit-normal t) and sampling (applied to the sampler's grid). More pixels average
away more noise, so the same t looks cleaner at high resolution; the shift moves t towards 1 (more noise). In
the sigma frame of diffusion.py (sigma = t / (1 - t)) the shift is exactly sigma_m = alpha sigma_n.

Tensors: x (N, C, H, W); noise_level (N,) (= 1000 t for flow); context (N, L, context_dim) with context_mask
(N, L) bool (True = real token); pooled (N, pooled_dim). Usage:
    net = create_mmdit('MMDiT-tiny/2', input_size=32, in_channels=3, context_dim=64, pooled_dim=64)
    out = net(x, noise_level, context=tokens, context_mask=mask, pooled=pooled)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Embeddings and the timestep shift (copied from dit.py, so this file stands alone)

def timestep_embedding(noise_level, dim, max_period=10000.0):
    """Sinusoidal features of a scalar per sample: (N,) -> (N, dim), float32 (dit.py's helper)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=noise_level.device, dtype=torch.float32) / half)
    angles = noise_level.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_pos_embed_2d(dim, grid_h, grid_w):
    """DiT/MAE 2-D sin-cos table (grid_h * grid_w, dim), raster order, column half first (see dit.py)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift with (N, d) conditions broadcast over the tokens of (N, T, d)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def shift_alpha(m, n):
    """alpha = sqrt(m / n) of SD3 Sec. 5.3.2: m pixels (or tokens) at the target resolution, n at the base one."""
    return math.sqrt(m / n)


def time_shift(t, alpha):
    """t_m = alpha t_n / (1 + (alpha - 1) t_n) (SD3 Sec. 5.3.2); in the sigma frame, sigma_m = alpha sigma_n."""
    return alpha * t / (1 + (alpha - 1) * t)


# ----------------------------------------------------------------------------
# Joint attention and the MM-DiT block

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich 2019), for QK-norm."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def joint_attention(qkv_text, qkv_image, text_mask=None):
    """Attention over the concatenated sequence [text; image] (SD3 Fig. 2b). qkv_*: (q, k, v) each
    (N, heads, L or T, d_head); text_mask (N, L) bool (True = attend). Returns (o_text, o_image)."""
    L = qkv_text[0].shape[2]
    q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(qkv_text, qkv_image))   # (N, heads, L + T, d_head)
    mask = None
    if text_mask is not None:
        image_keys = text_mask.new_ones(text_mask.shape[0], qkv_image[1].shape[2])
        mask = torch.cat([text_mask.bool(), image_keys], dim=1)[:, None, None, :]  # (N, 1, 1, L + T): keys only
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o[:, :, :L], o[:, :, L:]


class StreamLayers(nn.Module):
    """One modality's weights in a block: adaLN regression, qkv, QK-norm, output projection and MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=True, pre_only=False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        head_dim = hidden_size // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        # pre_only (the last block's text stream): only shift and scale for the qkv input are needed.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            mlp_hidden = int(hidden_size * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate='tanh'),
                                     nn.Linear(mlp_hidden, hidden_size))

    def pre_attention(self, h, c):
        """(q, k, v) each (N, heads, T, d_head) with QK-norm, and the modulation chunks for post_attention."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q, k, v = map(heads, self.qkv(modulate(self.norm1(h), mods[0], mods[1])).chunk(3, dim=-1))
        return (self.q_norm(q), self.k_norm(k), v), mods

    def post_attention(self, h, o, mods):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        N, T, d = h.shape
        h = h + gate_msa[:, None] * self.proj(o.transpose(1, 2).reshape(N, T, d))
        return h + gate_mlp[:, None] * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Two streams with their own weights, one joint attention (SD3 Fig. 2b)."""

    def __init__(self,
                 hidden_size,             # token width d of both streams
                 num_heads,               # attention heads
                 mlp_ratio=4.0,           # MLP hidden width / d
                 qk_norm=True,            # RMSNorm on queries and keys (Sec. 5.3)
                 context_pre_only=False):  # the last block: the text stream only feeds attention
        super().__init__()
        self.context = StreamLayers(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)
        self.x = StreamLayers(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(self, x, context, c, context_mask=None):
        """x (N, T, d) image tokens, context (N, L, d) text tokens (L may be 0), c (N, d). -> (x, context or None)."""
        qkv_c, mods_c = self.context.pre_attention(context, c)
        qkv_x, mods_x = self.x.pre_attention(x, c)
        o_c, o_x = joint_attention(qkv_c, qkv_x, context_mask)
        x = self.x.post_attention(x, o_x, mods_x)
        context = None if self.context.pre_only else self.context.post_attention(context, o_c, mods_c)
        return x, context


# ----------------------------------------------------------------------------
# The network

class MMDiT(nn.Module):
    """Patchify -> MM-DiT blocks over (text, image) -> adaLN final layer on the image tokens -> unpatchify."""
    takes_pooled = True      # textenc.TextConditioned passes the pooled caption vector

    def __init__(self,
                 input_size=32,           # H = W of the input
                 patch_size=2,            # p: tokens = (input_size / p)^2
                 in_channels=3,           # channels of x
                 hidden_size=128,         # token width d (SD3: 64 * depth)
                 depth=2,                 # blocks (SD3: heads = depth)
                 num_heads=2,             # attention heads
                 mlp_ratio=4.0,           # MLP width / d
                 context_dim=64,          # width of the text encoder's tokens
                 pooled_dim=64,           # width of the pooled caption vector (0 = none)
                 qk_norm=True,            # QK-normalisation (Sec. 5.3)
                 freq_dim=256):           # width of the sinusoidal timestep features
        super().__init__()
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           context_dim=context_dim, pooled_dim=pooled_dim, qk_norm=qk_norm, freq_dim=freq_dim)
        self.patch_size, self.in_channels = patch_size, in_channels
        self.freq_dim, self.hidden_size = freq_dim, hidden_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        self.register_buffer('pos_embed', torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid, grid))[None],
                             persistent=False)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size)) if pooled_dim else None
        self.blocks = nn.ModuleList(MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm,
                                               context_pre_only=i == depth - 1) for i in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.init_weights()

    def init_weights(self):
        """DiT's initialisation: xavier linears; adaLN-Zero (every gate 0, so each block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for block in self.blocks:
            for stream in (block.context, block.x):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for layer in (self.final_adaLN[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, noise_level, y=None, context=None, x_cond=None, aug_cond=None, context_mask=None, pooled=None):
        """F(x; noise_level, caption): (N, C, H, W). context None = no text tokens (L = 0), pooled None = zeros."""
        if y is not None or x_cond is not None or aug_cond is not None:
            raise ValueError('MMDiT is conditioned on text only (context, pooled): y, x_cond and aug_cond are not used')
        N, _, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        pos = self.pos_embed if self.pos_embed.shape[1] == gh * gw else \
            torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, gh, gw))[None]
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + pos.to(x.device, x.dtype)   # (N, T, d)
        if context is None:
            context = x.new_zeros(N, 0, self.context_embedder.in_features)
            context_mask = None
        ctx = self.context_embedder(context)                                       # (N, L, d)
        noise_level = torch.as_tensor(noise_level, device=x.device).expand(N)
        c = self.t_embedder(timestep_embedding(noise_level, self.freq_dim).to(x.dtype))
        if self.y_embedder is not None and pooled is not None:
            c = c + self.y_embedder(pooled.to(x.dtype))
        for block in self.blocks:
            tokens, ctx = block(tokens, ctx, c, context_mask)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        out = self.final_linear(modulate(self.final_norm(tokens), shift, scale))     # (N, T, p*p*C)
        out = out.reshape(N, gh, gw, p, p, self.in_channels)
        return torch.einsum('nhwpqc->nchpwq', out).reshape(N, self.in_channels, H, W)


# SD3 sizes its models by depth d: width 64 d and d heads. 'tiny' (width 64, 4 heads) is a CPU size for tests.
MMDIT_CONFIGS = {'MMDiT-tiny/2': dict(depth=2, hidden_size=64, num_heads=4, patch_size=2),
                 'MMDiT-2/2': dict(depth=2, hidden_size=128, num_heads=2, patch_size=2),
                 'MMDiT-4/2': dict(depth=4, hidden_size=256, num_heads=4, patch_size=2),
                 'MMDiT-4/4': dict(depth=4, hidden_size=256, num_heads=4, patch_size=4)}


def create_mmdit(name='MMDiT-tiny/2', **overrides):
    return MMDiT(**{**MMDIT_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    torch.manual_seed(0)
    net = create_mmdit('MMDiT-tiny/2', input_size=16, in_channels=3, context_dim=32, pooled_dim=32)
    for p in net.parameters():            # random weights everywhere (a fresh net outputs 0 by adaLN-Zero)
        nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 900.0])
    context, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, context=context, context_mask=mask, pooled=context[:, 0])
    print(f'MMDiT-tiny/2: {sum(p.numel() for p in net.parameters()):,} parameters, output {tuple(out.shape)}')
    # Both ways: the image depends on the text, and a masked (padding) token changes nothing.
    padded = context.clone()
    padded[0, 3:] = 7.0
    run = lambda ctx: net(x, t, context=ctx, context_mask=mask, pooled=context[:, 0])
    print('padding ignored:', torch.allclose(run(padded)[0], out[0], atol=1e-5))
    print('text changes the image by', f'{(run(context.flip(0)) - out).abs().max():.3f}')
    # The timestep shift: 4x the pixels -> alpha = 2, and sigma = t / (1 - t) doubles exactly.
    t_n = torch.linspace(0.1, 0.9, 5)
    t_m = time_shift(t_n, shift_alpha(64 * 64, 32 * 32))
    print('t_n', t_n.tolist(), '-> t_m', [round(v, 3) for v in t_m.tolist()],
          '; sigma_m / sigma_n =', [round(v, 6) for v in ((t_m / (1 - t_m)) / (t_n / (1 - t_n))).tolist()])
