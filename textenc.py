"""
A small transformer text encoder, caption dropout, and the wrapper that feeds a caption to an image network.

Text-to-image diffusion reads the prompt through a text encoder whose output tokens are the keys and values of
cross-attention (Rombach et al. 2022, LDM, arXiv:2112.10752, Sec. 3.3: tau_theta(y) in
Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with K = W_K tau_theta(y), V = W_V tau_theta(y)), or the second
stream of an MM-DiT (Esser et al. 2024, arXiv:2403.03206, Sec. 4). The big models use a frozen pretrained
encoder (CLIP, T5); LDM also trained a transformer jointly from scratch on its captions (Sec. 4.3.1). This file
has that trained-jointly encoder, small, and the frozen option as a control: a *randomly initialised* frozen
encoder, which keeps only what random features of the words happen to separate.

  h_0 = E[ids] + P                       token embeddings plus learned positions (as CLIP's text transformer)
  h_l = h_{l-1} + Attn(LN(h_{l-1}))      pre-LN blocks; attention is bidirectional (every word sees every word,
  h_l = h_l + MLP(LN(h_l))               as BERT and T5's encoder; CLIP's is causal) and ignores padding
  tokens = LN(h_L) (N, L, d),  pooled = tokens[:, 0] (the <bos> token's output, BERT's [CLS] summary)

Caption dropout (Ho & Salimans 2022, arXiv:2207.12598, Alg. 1): during training each caption is replaced by the
empty caption with probability p_uncond, so one network learns p(x | c) and p(x); classifier-free guidance then
mixes their two predictions at sampling time. The empty caption is <bos> alone (captions.py), a learned "no
prompt" just as SD's is the CLIP encoding of "".

Tensors: ids (N, L) long with 0 = <pad>, 1 = <bos>; mask (N, L) bool, True = a real token. Networks take
context (N, L, d) and context_mask (N, L) (DESIGN.md's network contract), and an MM-DiT also takes pooled (N, d).
Usage: enc = TextEncoder(vocab_size=50); net = TextConditioned(enc, dit); out = net(x, noise_level, ids, mask)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS = 0, 1    # captions.py's indices of <pad> and <bos>

TEXT_CONFIGS = {'tiny': dict(width=64, depth=2, heads=4), 'S': dict(width=128, depth=4, heads=4)}


# ----------------------------------------------------------------------------------------------------
# The encoder

class TextBlock(nn.Module):
    """A pre-LN transformer block with padding ignored by attention."""

    def __init__(self,
                 width,                   # token width d
                 heads,                   # attention heads
                 mlp_ratio=4.0):          # MLP hidden width / d
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h, mask):
        N, L, d = h.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(self.norm1(h)).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])    # (N, heads, L, d/heads)
        h = h + self.proj(a.transpose(1, 2).reshape(N, L, d))
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    """Token ids -> (tokens (N, L, width), pooled (N, width)); see the module docstring for the equations."""

    def __init__(self,
                 vocab_size,              # words in the tokenizer's vocabulary (captions.Tokenizer)
                 max_len=16,              # longest token sequence (<bos> included)
                 width=64,                # token width d
                 depth=2,                 # transformer blocks
                 heads=4,                 # attention heads
                 mlp_ratio=4.0,           # MLP hidden width / d
                 frozen=False):           # keep the random initialisation: no gradients, never trained
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_len=max_len, width=width, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, frozen=frozen)
        self.width, self.frozen = width, frozen
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.01)          # learned positions (CLIP: std 0.01)
        nn.init.normal_(self.embed.weight, std=0.02)                           # CLIP's token-embedding init
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        if frozen:
            self.requires_grad_(False)

    def forward(self, ids, mask=None):
        mask = ids != PAD if mask is None else mask.bool()
        h = self.embed(ids) + self.pos[:ids.shape[1]]                         # (N, L, d)
        for block in self.blocks:
            h = block(h, mask)
        tokens = self.norm(h)
        return tokens, tokens[:, 0]                                           # pooled: the <bos> token's output


# ----------------------------------------------------------------------------------------------------
# Caption dropout and the network that reads captions

def caption_dropout(ids, p_uncond, generator=None):
    """Each row replaced by the empty caption (<bos>, then padding) with probability p_uncond (Ho & Salimans 2022)."""
    drop = torch.rand(ids.shape[0], generator=generator) < p_uncond
    empty = torch.full_like(ids, PAD)
    empty[:, 0] = BOS
    return torch.where(drop.to(ids.device)[:, None], empty, ids)


def empty_caption(n, max_len, device='cpu'):
    """n empty captions (n, max_len): the unconditional input of classifier-free guidance."""
    ids = torch.full((n, max_len), PAD, dtype=torch.long, device=device)
    ids[:, 0] = BOS
    return ids


class TextConditioned(nn.Module):
    """An image network that reads captions: net(x, noise_level, ids, mask) = backbone(x, noise_level,
    context=tokens, context_mask=mask[, pooled=pooled]) with (tokens, pooled) = encoder(ids, mask).

    The encoder's tokens reach the U-Net's and DiT's cross-attention (context, context_mask) and an MM-DiT's text
    stream; a backbone with `takes_pooled = True` (mmdit.MMDiT) also gets the pooled vector for its adaLN.
    Missing ids mean the empty caption. A frozen encoder runs without gradients (its weights never change).
    """

    def __init__(self, encoder, backbone):
        super().__init__()
        self.encoder, self.backbone = encoder, backbone

    def encode(self, ids, mask=None):
        if self.encoder.frozen:
            with torch.no_grad():
                return self.encoder(ids, mask)
        return self.encoder(ids, mask)

    def forward(self, x, noise_level, ids=None, mask=None, **cond):
        if ids is None:
            ids = empty_caption(x.shape[0], self.encoder.config['max_len'], x.device)
        mask = ids != PAD if mask is None else mask.bool()
        tokens, pooled = self.encode(ids, mask)
        extra = {'pooled': pooled} if getattr(self.backbone, 'takes_pooled', False) else {}
        return self.backbone(x, noise_level, context=tokens.to(x.dtype), context_mask=mask, **extra, **cond)


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=20, max_len=6)
    ids = torch.tensor([[BOS, 5, 6, 7, PAD, PAD], [BOS, 5, 6, 8, PAD, PAD], [BOS, 5, 6, 7, PAD, PAD]])
    tokens, pooled = enc(ids)
    print(f'tokens {tuple(tokens.shape)}, pooled {tuple(pooled.shape)}; '
          f'{sum(p.numel() for p in enc.parameters())} parameters')
    # Padding is ignored: changing a padded position's id changes nothing.
    other = ids.clone()
    other[0, 5] = 9
    print('padding ignored:', torch.allclose(enc(other, ids != PAD)[1][0], pooled[0], atol=1e-6))
    print('one word changed moves the pooled vector by', f'{(pooled[0] - pooled[1]).norm():.3f}',
          '(the same caption twice:', f'{(pooled[0] - pooled[2]).norm():.1e})')
    g = torch.Generator().manual_seed(0)
    dropped = caption_dropout(ids.repeat(1000, 1), 0.1, g)
    print('caption dropout rate:', (dropped[:, 1] == PAD).float().mean().item(), '(asked 0.1)')
