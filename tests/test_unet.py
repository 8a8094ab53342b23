"""Tests for unet.py: zero init, gradient flow, every conditioning path, RoPE, joint video-image masking, AMP."""
import os

import pytest
import torch

import unet
from unet import apply_rope, create_unet, grid_positions, rope_angles



@pytest.fixture(autouse=True)
def _one_thread():
    """Run these tiny models on one thread: their ops are too small to split, and on a busy 2-core machine
    thread synchronisation made this file about 3x slower. The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def small_unet(**overrides):
    """A 16x16 U-Net small enough that a forward/backward takes milliseconds on CPU."""
    config = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), head_channels=16, norm_groups=4)
    return create_unet('tiny', **{**config, **overrides})


def perturb(net, std=0.05, seed=1):
    """Add noise to every weight: a fresh net has zero-initialised output and residual layers, so without this
    no input or condition could change its output and those tests would pass vacuously."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))
    return net.eval()


def full_unet(**overrides):
    """Every conditioning path switched on."""
    return small_unet(num_classes=5, aug_dim=3, cond_channels=2, context_dim=8, temporal_attention=True, **overrides)


def inputs(video=False, n=2, frames=3):
    generator = torch.Generator().manual_seed(2)
    shape = (n, 3, frames, 16, 16) if video else (n, 3, 16, 16)
    cond_shape = (n, 2, frames, 16, 16) if video else (n, 2, 16, 16)
    return dict(x=torch.randn(shape, generator=generator), noise_level=torch.tensor([10.0, 700.0])[:n],
                y=torch.tensor([1, 4])[:n], context=torch.randn(n, 4, 8, generator=generator),
                x_cond=torch.randn(cond_shape, generator=generator), aug_cond=torch.randn(n, 3, generator=generator))


# ----------------------------------------------------------------------------
# Initialisation and gradients

@pytest.mark.parametrize('video', [False, True])
def test_fresh_network_outputs_zeros(video):
    net = full_unet()
    out = net(**inputs(video))
    assert out.shape == inputs(video)['x'].shape
    assert torch.all(out == 0)


@pytest.mark.parametrize('scale_shift_norm,resblock_updown', [(True, False), (False, True)])
def test_gradients_reach_every_parameter(scale_shift_norm, resblock_updown):
    net = perturb(full_unet(scale_shift_norm=scale_shift_norm, resblock_updown=resblock_updown)).train()
    out = net(**inputs(video=True), context_mask=torch.tensor([[True, True, True, False], [True] * 4]))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f'no gradient reaches {missing}'


def test_noise_level_conditions_the_output_over_every_range():
    """The sinusoid + MLP embedding must separate DDPM steps (0..999) and EDM's c_noise = ln(sigma)/4 alike."""
    net = perturb(small_unet())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        outs = [net(x, torch.tensor([level])) for level in (-1.5, -1.0, 0.0, 1.0, 500.0, 999.0)]
    for a, b in zip(outs, outs[1:]):
        assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# Conditioning paths: each changes the output, and its absent/null form behaves as documented

def test_class_label_and_null_class():
    net = perturb(small_unet(num_classes=5))
    x, level = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 100.0])
    with torch.no_grad():
        out_a, out_b = net(x, level, y=torch.tensor([0, 0])), net(x, level, y=torch.tensor([3, 3]))
        out_none, out_null = net(x, level), net(x, level, y=torch.tensor([5, 5]))
    assert (out_a - out_b).abs().max() > 1e-3                # the label matters
    torch.testing.assert_close(out_none, out_null)           # y=None means index num_classes ("no class")
    assert (out_null - out_a).abs().max() > 1e-3


def test_aug_cond_changes_output_and_zero_means_absent():
    net = perturb(small_unet(aug_dim=3))
    x, level = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 100.0])
    with torch.no_grad():
        out_none, out_zero = net(x, level), net(x, level, aug_cond=torch.zeros(2, 3))
        out_aug = net(x, level, aug_cond=torch.tensor([[1.0, 0.0, 0.5]] * 2))
    torch.testing.assert_close(out_none, out_zero)
    assert (out_aug - out_none).abs().max() > 1e-3


@pytest.mark.parametrize('video', [False, True])
def test_x_cond_concatenation(video):
    net = perturb(small_unet(cond_channels=2, temporal_attention=video))
    data = inputs(video)
    with torch.no_grad():
        out = net(data['x'], data['noise_level'], x_cond=data['x_cond'])
        out_other = net(data['x'], data['noise_level'], x_cond=data['x_cond'] + 1)
        out_none = net(data['x'], data['noise_level'])
        out_zero = net(data['x'], data['noise_level'], x_cond=torch.zeros_like(data['x_cond']))
    assert (out - out_other).abs().max() > 1e-3
    torch.testing.assert_close(out_none, out_zero)           # x_cond=None means zeros


def test_cross_attention_uses_context_and_ignores_padding():
    net = perturb(small_unet(context_dim=8))
    x, level = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 400.0])
    context = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    with torch.no_grad():
        out = net(x, level, context=context, context_mask=mask)
        changed_padding = context.clone()
        changed_padding[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
        out_padding = net(x, level, context=changed_padding, context_mask=mask)
        changed_kept = context.clone()
        changed_kept[0, 1] += 1
        out_kept = net(x, level, context=changed_kept, context_mask=mask)
        out_none = net(x, level)
        out_all_padding = net(x, level, context=context, context_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out_padding, out)             # padded tokens are invisible
    assert (out_kept[0] - out[0]).abs().max() > 1e-3         # kept tokens are not
    torch.testing.assert_close(out_kept[1], out[1])          # and only affect their own sample
    assert (out - out_none).abs().max() > 1e-3
    torch.testing.assert_close(out_all_padding, out_none)    # an all-padding row reads as "no context"


# ----------------------------------------------------------------------------
# Relative positions (RoPE)

def test_rope_scores_depend_only_on_offsets_2d_and_1d():
    """<R(p) q, R(p') k> = <R(p + s) q, R(p' + s) k> for any shift s: translation-equivariant attention scores."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 32, generator=generator), torch.randn(2, 10, 32, generator=generator)
    for n_axes in (1, 2):
        p = torch.randint(0, 16, (10, n_axes), generator=generator)
        p_k = torch.randint(0, 16, (10, n_axes), generator=generator)
        shift = torch.randint(-50, 50, (1, n_axes), generator=generator)
        scores = (apply_rope(q, rope_angles(p, 32)) * apply_rope(k, rope_angles(p_k, 32))).sum(-1)
        shifted = (apply_rope(q, rope_angles(p + shift, 32)) * apply_rope(k, rope_angles(p_k + shift, 32))).sum(-1)
        torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)
        # and they do depend on the offset: moving only the keys changes the scores
        moved = (apply_rope(q, rope_angles(p, 32)) * apply_rope(k, rope_angles(p_k + 1, 32))).sum(-1)
        assert (moved - scores).abs().max() > 1e-2


def test_rope_is_a_rotation_and_grid_is_raster_order():
    x = torch.randn(3, 12, 16)
    angles = rope_angles(grid_positions(3, 4, 'cpu'), 16)
    torch.testing.assert_close(apply_rope(x, angles).norm(dim=-1), x.norm(dim=-1))   # norms preserved
    assert grid_positions(3, 4, 'cpu')[5].tolist() == [1, 1]


# ----------------------------------------------------------------------------
# Video and joint video-image training

def test_video_frames_interact_through_temporal_attention():
    net = perturb(small_unet(temporal_attention=True))
    clip, level = torch.randn(1, 3, 4, 16, 16), torch.tensor([300.0])
    with torch.no_grad():
        out = net(clip, level)
        clip2 = clip.clone()
        clip2[:, :, 0] += 1
        out2 = net(clip2, level)
    change = (out2 - out).abs().amax(dim=(0, 1, 3, 4))       # (F,)
    assert (change > 1e-4).all()                             # one edited frame moves every frame of the video


def test_joint_video_image_batch_masks_independent_images():
    """Frames 0..3 are a video, 4..6 independent images: editing one image changes no other output frame."""
    net = perturb(small_unet(temporal_attention=True, cond_channels=2))
    data = inputs(video=True, frames=7)
    kwargs = dict(noise_level=data['noise_level'], x_cond=data['x_cond'], num_video_frames=torch.tensor([4, 4]))
    with torch.no_grad():
        out = net(data['x'], **kwargs)
        edited = data['x'].clone()
        edited[:, :, 5] = torch.randn_like(edited[:, :, 5])
        out_edited = net(edited, **kwargs)
        # an independent image gives the same output as that image passed alone as a (N, C, H, W) batch
        alone = net(data['x'][:, :, 6], data['noise_level'], x_cond=data['x_cond'][:, :, 6])
    change = (out_edited - out).abs().amax(dim=(0, 1, 3, 4))
    assert change[5] > 1e-3
    assert torch.all(change[torch.arange(7) != 5] == 0), change
    torch.testing.assert_close(out[:, :, 6], alone, atol=1e-5, rtol=1e-4)


def test_temporal_mask_per_sample_video_lengths():
    mask = unet.temporal_mask(2, 4, torch.tensor([4, 2]), 'cpu')
    assert mask[0].all()                                     # sample 0: one 4-frame video
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[1], expected)                    # sample 1: 2-frame video + 2 images


# ----------------------------------------------------------------------------
# Configurations, precision, compilation

def test_named_configuration_parameter_counts():
    with torch.device('meta'):
        ddpm = create_unet('ddpm-cifar10')
        tiny = create_unet('tiny')
    n_ddpm = sum(p.numel() for p in ddpm.parameters())
    assert abs(n_ddpm - 35.7e6) / 35.7e6 < 0.005, n_ddpm     # Ho et al. 2020: 35.7M
    assert n_ddpm == 35_746_307                              # the released CIFAR-10 model's exact count
    assert 3e5 < sum(p.numel() for p in tiny.parameters()) < 2e6


def test_every_named_configuration_runs():
    for name in unet.UNET_CONFIGS:
        with torch.device('meta'):
            net = create_unet(name)
        size = net.config['image_size']
        shape = (1, 3, 2, size, size) if net.config['temporal_attention'] else (1, 3, size, size)
        out = net(torch.zeros(shape, device='meta'), torch.zeros(1, device='meta'))   # shapes only
        assert out.shape == shape


def test_autocast_bf16_cpu_close_to_fp32():
    net = perturb(full_unet())
    data = inputs()
    with torch.no_grad():
        ref = net(**data)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(**data)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    net = perturb(full_unet()).cuda()
    data = {k: v.cuda() for k, v in inputs(video=True).items()}
    with torch.no_grad():
        ref = net(**data)
        with torch.autocast('cuda', dtype=dtype):
            out = net(**data)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_torch_compile_captures_one_graph():
    """Dynamo traces the whole forward without graph breaks (backend='eager' skips code generation, so it is fast)."""
    net = perturb(full_unet())
    data = inputs()
    compiled = torch.compile(net, backend='eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data), net(**data))


@pytest.mark.skipif(not os.environ.get('RUN_COMPILE_TESTS'),
                    reason='inductor compilation takes minutes on a 2-core CPU; set RUN_COMPILE_TESTS=1 to run it')
def test_torch_compile_matches_eager():
    net = perturb(full_unet())
    data = inputs(video=True)
    compiled = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data), net(**data), atol=1e-4, rtol=1e-4)
