"""mmdit.py: joint attention is attention over the concatenated [text; image] sequence (an explicit softmax
reference), an MM-DiT block without its text stream is dit.py's DiTBlock, padding is ignored, and the SD3
timestep shift is sigma_m = alpha sigma_n."""
import math

import pytest
import torch

import mmdit
from dit import DiTBlock

pytestmark = pytest.mark.usefixtures('one_thread')


def reference_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d)) v written out, one head at a time, float64: (N, H, S, d) each."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum('nhsd,nhtd->nhst', q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    w = logits.exp() / logits.exp().sum(-1, keepdim=True)
    return torch.einsum('nhst,nhtd->nhsd', w, v)


def random_block(**kw):
    torch.manual_seed(1)
    block = mmdit.MMDiTBlock(32, 4, **kw)
    for p in block.parameters():                 # every gate non-zero (adaLN-Zero would make the block the identity)
        torch.nn.init.normal_(p, std=0.2)
    return block


def test_joint_attention_is_attention_over_the_concatenated_sequence():
    """Each stream's q, k, v from its own weights, then one softmax over all L + T keys, padding excluded."""
    block = random_block()
    g = torch.Generator().manual_seed(0)
    x, ctx, c = torch.randn(2, 9, 32, generator=g), torch.randn(2, 4, 32, generator=g), torch.randn(2, 32, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    qkv_c, _ = block.context.pre_attention(ctx, c)
    qkv_x, _ = block.x.pre_attention(x, c)
    o_c, o_x = mmdit.joint_attention(qkv_c, qkv_x, mask)
    full = reference_attention(*(torch.cat([a, b], 2) for a, b in zip(qkv_c, qkv_x)),
                               key_mask=torch.cat([mask, torch.ones(2, 9, dtype=torch.bool)], 1))
    assert torch.allclose(o_c.double(), full[:, :, :4], atol=1e-5)
    assert torch.allclose(o_x.double(), full[:, :, 4:], atol=1e-5)
    # Not vacuous: attention within each stream alone (no exchange) is far from the joint result.
    alone = reference_attention(*qkv_x)
    assert (alone - full[:, :, 4:]).abs().max() > 0.05


def test_padding_tokens_change_nothing_and_real_text_changes_the_image():
    block = random_block()
    g = torch.Generator().manual_seed(0)
    x, ctx, c = torch.randn(1, 9, 32, generator=g), torch.randn(1, 4, 32, generator=g), torch.randn(1, 32, generator=g)
    mask = torch.tensor([[True, True, False, False]])
    other = ctx.clone()
    other[:, 2:] = torch.randn(1, 2, 32, generator=g) * 5
    assert torch.allclose(block(x, ctx, c, mask)[0], block(x, other, c, mask)[0], atol=1e-5)
    other[:, :2] = torch.randn(1, 2, 32, generator=g) * 5    # the real tokens: the image stream must see them
    assert (block(x, ctx, c, mask)[0] - block(x, other, c, mask)[0]).abs().max() > 1e-2


@pytest.mark.parametrize('empty', ['no_tokens', 'all_masked'])
def test_block_without_text_stream_is_a_dit_block(empty):
    """With no text tokens (L = 0), or all of them masked out, the image stream of an MM-DiT block with qk_norm=False
    computes dit.DiTBlock(hidden_size, num_heads, context_dim=None) with the image stream's weights copied in
    (adaLN_modulation, attn.qkv, attn.proj, mlp): x + g1 Attn(adaLN(x)) then + g2 MLP(adaLN(x))."""
    block = random_block(qk_norm=False)
    dit = DiTBlock(32, 4)
    dit.adaLN_modulation.load_state_dict(block.x.adaLN_modulation.state_dict())
    dit.attn.qkv.load_state_dict(block.x.qkv.state_dict())
    dit.attn.proj.load_state_dict(block.x.proj.state_dict())
    dit.mlp.load_state_dict(block.x.mlp.state_dict())
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 9, 32, generator=g), torch.randn(3, 32, generator=g)
    if empty == 'no_tokens':
        ctx, mask = torch.zeros(3, 0, 32), None
    else:
        ctx, mask = torch.randn(3, 4, 32, generator=g), torch.zeros(3, 4, dtype=torch.bool)
    out, _ = block(x, ctx, c, mask)
    assert torch.allclose(out, dit(x, c), atol=1e-5)
    # With QK-norm on (the MM-DiT default) the same weights compute something else: the test can tell.
    normed = random_block(qk_norm=True)
    normed.x.load_state_dict(block.x.state_dict(), strict=False)
    assert (normed(x, ctx, c, mask)[0] - dit(x, c)).abs().max() > 1e-2


def test_qk_norm_bounds_the_attention_logits():
    """RMSNorm makes |q|, |k| = sqrt(d_head) * weight, so |q.k| / sqrt(d) <= sqrt(d_head) however large the input."""
    block = random_block()
    for stream in (block.x, block.context):
        stream.q_norm.weight.data.fill_(1.0)
        stream.k_norm.weight.data.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    x, c = 1000 * torch.randn(2, 9, 32, generator=g), torch.randn(2, 32, generator=g)
    (q, k, _), _ = block.x.pre_attention(x, c)
    logits = torch.einsum('nhsd,nhtd->nhst', q, k) / math.sqrt(q.shape[-1])
    assert logits.abs().max() <= math.sqrt(q.shape[-1]) + 1e-3


def test_network_reads_text_and_starts_at_zero():
    torch.manual_seed(0)
    net = mmdit.create_mmdit('MMDiT-tiny/2', input_size=8, in_channels=3, context_dim=16, pooled_dim=16)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 3, 16)
    assert net(x, t, context=ctx, pooled=ctx[:, 0]).abs().max() == 0       # adaLN-Zero + zero final layer
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a = net(x, t, context=ctx, pooled=ctx[:, 0])
    b = net(x, t, context=ctx.flip(0), pooled=ctx[:, 0])                  # only the text tokens swapped
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match='text only'):
        net(x, t, y=torch.zeros(2, dtype=torch.long))


def test_timestep_shift_multiplies_sigma_by_alpha():
    """SD3 Sec. 5.3.2: t_m = alpha t / (1 + (alpha - 1) t) with alpha = sqrt(m / n) is sigma_m = alpha sigma_n."""
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    alpha = mmdit.shift_alpha(64 * 64, 32 * 32)
    assert alpha == pytest.approx(2.0)
    t_m = mmdit.time_shift(t, alpha)
    assert torch.allclose(t_m / (1 - t_m), alpha * t / (1 - t), rtol=1e-12)
    assert torch.equal(mmdit.time_shift(t, 1.0), t)              # the base resolution: no shift
    assert mmdit.time_shift(torch.tensor(0.5), 3.0) == pytest.approx(0.75)   # more pixels: more noise at the same t
