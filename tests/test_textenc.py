"""textenc.py: the encoder ignores padding, caption dropout replaces whole captions by the empty one at the asked
rate, a frozen encoder never changes while a jointly trained one does, and TextConditioned delivers the caption to
DiT and U-Net cross-attention and the pooled vector to an MM-DiT. Also sample_text's shifted schedule and CFG."""
import math

import pytest
import torch

import sample_text
import textenc
from diffusion import FlowSchedule
from dit import create_dit
from mmdit import create_mmdit, time_shift
from unet import create_unet

pytestmark = pytest.mark.usefixtures('one_thread')

IDS = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 5, 8, 0, 0, 0]])


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = textenc.TextEncoder(vocab_size=12, max_len=6)
    tokens, pooled = enc(IDS)
    other = IDS.clone()
    other[IDS == 0] = 9                                 # new words where the mask says padding
    tokens2, pooled2 = enc(other, IDS != 0)
    assert torch.allclose(pooled, pooled2, atol=1e-6)
    assert torch.allclose(tokens[IDS != 0], tokens2[IDS != 0], atol=1e-6)
    assert (enc(other)[1] - pooled).abs().max() > 1e-3   # read as words (no mask given), they count


def test_caption_dropout_rate_and_rows():
    ids = IDS.repeat(2000, 1)
    dropped = textenc.caption_dropout(ids, 0.2, torch.Generator().manual_seed(0))
    empty = (dropped[:, 0] == textenc.BOS) & (dropped[:, 1:] == textenc.PAD).all(1)
    kept = (dropped == ids).all(1)
    assert (empty ^ kept).all()                         # each row is either untouched or the whole empty caption
    assert abs(empty.float().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(ids))
    assert torch.equal(textenc.caption_dropout(ids, 0.0), ids)
    assert torch.equal(textenc.empty_caption(2, 6), dropped[empty][:2])


@pytest.mark.parametrize('frozen', [True, False])
def test_frozen_encoder_never_changes_and_a_trained_one_does(frozen):
    torch.manual_seed(0)
    net = textenc.TextConditioned(textenc.TextEncoder(12, 6, frozen=frozen),
                                  create_dit('DiT-tiny/2', input_size=8, in_channels=3, num_classes=0, context_dim=64))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = net(torch.randn(2, 3, 8, 8), torch.tensor([100.0, 500.0]), IDS).pow(2).mean() + \
            (net(torch.randn(2, 3, 8, 8), torch.tensor([300.0, 700.0]), IDS) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    encoder_moved = any(not torch.equal(before[k], after[k]) for k in after if k.startswith('encoder.'))
    backbone_moved = any(not torch.equal(before[k], after[k]) for k in after if k.startswith('backbone.'))
    assert backbone_moved and encoder_moved != frozen


def randomised(net):
    for p in net.parameters():                  # zero-initialised output layers would hide the caption
        torch.nn.init.normal_(p, std=0.1)
    return net


@pytest.mark.parametrize('backbone', ['dit', 'unet'])
def test_caption_reaches_cross_attention(backbone):
    torch.manual_seed(0)
    net = create_dit('DiT-tiny/2', input_size=8, in_channels=3, num_classes=0, context_dim=64) if backbone == 'dit' \
        else create_unet('micro', in_channels=3, image_size=8, context_dim=64)
    net = randomised(textenc.TextConditioned(textenc.TextEncoder(12, 6), net)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 500.0])
    a, b = net(x, t, IDS), net(x, t, IDS.flip(0))
    assert (a - b).abs().max() > 1e-3                           # another caption, another output
    assert torch.allclose(net(x, t), net(x, t, textenc.empty_caption(2, 6)))     # no ids = the empty caption
    # The caption travels only as context: the backbone given the encoder's tokens computes the same output.
    tokens, _ = net.encoder(IDS)
    assert torch.allclose(net.backbone(x, t, context=tokens, context_mask=IDS != 0), a, atol=1e-6)


def test_mmdit_gets_the_pooled_caption():
    torch.manual_seed(0)
    net = randomised(textenc.TextConditioned(textenc.TextEncoder(12, 6),
                                             create_mmdit('MMDiT-tiny/2', input_size=8, in_channels=3))).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 500.0])
    tokens, pooled = net.encoder(IDS)
    out = net(x, t, IDS)
    assert torch.allclose(net.backbone(x, t, context=tokens, context_mask=IDS != 0, pooled=pooled), out, atol=1e-6)
    assert (net.backbone(x, t, context=tokens, context_mask=IDS != 0) - out).abs().max() > 1e-3   # pooled matters


def test_shifted_schedule_and_sampling_grid():
    """Training: sigma = alpha * sigma_flow, so the median t of the logit-normal (0.5) becomes alpha / (1 + alpha).
    Sampling: t_i = shift(t_max (1 - i/n)), sigma = t / (1 - t), ending in 0."""
    u = torch.rand(20001, generator=torch.Generator().manual_seed(0))
    shifted, plain = sample_text.ShiftedFlowSchedule(3.0), FlowSchedule()
    assert torch.allclose(shifted.sigma(u), 3.0 * plain.sigma(u))
    t = shifted.sigma(u) / (1 + shifted.sigma(u))
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    sigmas = sample_text.flow_sigmas(4, shift=2.0)
    t_grid = time_shift(torch.tensor([0.999, 0.999 * 0.75, 0.999 * 0.5, 0.999 * 0.25], dtype=torch.float64), 2.0)
    assert torch.allclose(sigmas[:-1].double(), t_grid / (1 - t_grid), rtol=1e-5) and sigmas[-1] == 0


def test_guidance_is_the_cfg_combination():
    """w = 1 is the conditional denoiser, w = 0 the unconditional one, and w = 3 extrapolates: u + 3 (c - u)."""
    torch.manual_seed(0)
    net = randomised(textenc.TextConditioned(textenc.TextEncoder(12, 6),
                                             create_mmdit('MMDiT-tiny/2', input_size=8, in_channels=3))).eval()
    diffusion = sample_text.build_diffusion({'diffusion': {'shift': 1.0, 'logit_mean': 0.0, 'logit_std': 1.0}})
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor(2.0)
    with torch.no_grad():
        cond = diffusion.denoise_with(net, x, sigma, ids=IDS)
        uncond = diffusion.denoise_with(net, x, sigma, ids=textenc.empty_caption(2, 6))
        guided = lambda w: sample_text.guided_denoiser(net, diffusion, IDS, IDS != 0, w)(x, sigma)
        assert torch.allclose(guided(1.0), cond, atol=1e-5)
        assert torch.allclose(guided(0.0), uncond, atol=1e-5)
        assert torch.allclose(guided(3.0), uncond + 3 * (cond - uncond), atol=1e-4)
        assert (cond - uncond).abs().max() > 1e-3
